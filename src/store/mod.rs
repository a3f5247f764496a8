//! The durable store: events, conversions, the delivery queue and the delivery log, in one
//! embedded SQLite file (WAL, `synchronous=FULL`).
//!
//! One writer thread owns the write connection. Callers send it commands; it runs every
//! command waiting at that moment in one transaction and commits once, so durability costs
//! one fsync per batch rather than one per webhook. A webhook is acknowledged only after the
//! commit that holds its event and deliveries.

pub mod decide;
mod ops;
mod read;
mod schema;
mod writer;

pub use ops::{Claim, ClaimSpec, Lane, RetryFilter};
pub use read::{AttemptRow, DeliveryQuery, DeliveryRow, EventQuery, EventRow};

use crate::ingest::event::Event;
use crate::plan::Plan;
use rusqlite::Connection;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use tokio::sync::{oneshot, Notify};
use writer::{Job, Writer};

/// Delivery states, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Inflight,
    Delivered,
    Dead,
    Cancelled,
}

impl State {
    pub fn code(self) -> i64 {
        match self {
            State::Pending => 0,
            State::Inflight => 1,
            State::Delivered => 2,
            State::Dead => 3,
            State::Cancelled => 4,
        }
    }
    /// A state by its name: `pending`, `inflight`, `delivered`, `dead`, `cancelled`.
    pub fn parse(name: &str) -> Option<State> {
        Some(match name {
            "pending" => State::Pending,
            "inflight" => State::Inflight,
            "delivered" => State::Delivered,
            "dead" => State::Dead,
            "cancelled" => State::Cancelled,
            _ => return None,
        })
    }

    pub fn from_code(c: i64) -> State {
        match c {
            0 => State::Pending,
            1 => State::Inflight,
            2 => State::Delivered,
            3 => State::Dead,
            _ => State::Cancelled,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store cannot commit: {0}")]
    Commit(String),
    #[error("store is shut down")]
    Closed,
    #[error("cannot open store at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
}

/// What accepting one event did.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub event_id: String,
    /// Postback ids the event (merged with its conversion's earlier fields) matched.
    pub matched: Vec<String>,
    /// How many of those are new deliveries (the rest were already sent for this status).
    pub queued: usize,
    /// The ids of the new deliveries, for `/api/v1/deliveries/{id}`.
    pub deliveries: Vec<i64>,
    /// New deliveries that can go at once (not held, no earlier one of the same conversion
    /// unfinished), handed to the dispatcher straight after the commit.
    #[serde(skip)]
    pub fresh: Vec<Claimed>,
}

/// Takes deliveries the writer hands over after a commit.
type Handoff = Box<dyn Fn(Claimed) + Send + Sync>;

/// A delivery handed to the dispatcher.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub postback_id: String,
    pub offer: String,
    pub event: Event,
    /// The conversion's latest state, for re-checking a delayed postback.
    pub latest: Option<Event>,
    pub attempts: u32,
    pub created_at: i64,
    pub delayed: bool,
    /// Since when (unix ms) its postback has been missing from the config, if it is.
    pub orphaned_at: Option<i64>,
    /// The host the postback goes to, for per-destination limits.
    pub destination: String,
}

impl Claimed {
    /// First attempts and retries have slots of their own, so neither starves the other.
    pub fn lane(&self) -> Lane {
        if self.attempts == 0 {
            Lane::Fresh
        } else {
            Lane::Retry
        }
    }
}

/// One attempt, for the delivery log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Attempt {
    pub started_at: i64,
    pub duration_ms: i64,
    pub method: String,
    pub url: String,
    pub request_body: Option<String>,
    pub response_status: Option<u16>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub outcome: String,
    pub config_version: String,
    /// The commit the rules directory was at (when it is a git checkout).
    pub config_commit: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Delivered,
    Retry {
        due_at: i64,
    },
    Dead,
    Cancelled,
    /// Its postback is not in the config: wait, unattempted, for a reload to bring it back,
    /// until `due_at` (the end of the grace period that began at `since`).
    Orphaned {
        since: i64,
        due_at: i64,
    },
}

/// The unfinished deliveries at a glance.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    pub pending: i64,
    /// Of which failed at least once.
    pub retries: i64,
    /// When the oldest was created (unix ms).
    pub oldest: Option<i64>,
    /// Of which wait for their postback to come back to the config.
    pub orphaned: i64,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Job>,
    /// Woken whenever new deliveries were committed.
    pub wake: Arc<Notify>,
    /// Where the writer hands new deliveries once their commit is done (the dispatcher).
    handoff: Arc<OnceLock<Handoff>>,
    health: Arc<Health>,
    reader: Arc<Mutex<Connection>>,
    pub path: PathBuf,
}

/// Whether the last commit succeeded, and if not, why.
#[derive(Default)]
pub(crate) struct Health {
    ok: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Health {
    fn set(&self, err: Option<String>) {
        self.ok.store(err.is_none(), Ordering::Relaxed);
        if let Ok(mut e) = self.error.lock() {
            *e = err;
        }
    }
    fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }
}

const QUEUE_STATS: &str = "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0), MIN(created_at),
                                  COALESCE(SUM(orphaned_at IS NOT NULL), 0)
                           FROM deliveries WHERE state = 0";

fn to_json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn open_conn(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // Savepoints' statement journals (see the writer) and sorts stay in memory, not in temp files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Copy the log into the database every 16 MiB rather than every 4: with random click
    // and transaction ids each webhook dirties pages all over the indexes, and a page
    // changed several times between two checkpoints is copied once. Measured +17-30 %
    // webhooks/s; the price is a longer pause of the writer at each checkpoint (p99 at
    // 2,000/s 7 -> 10 ms). A checkpoint thread of its own was tried: under steady load its
    // passive checkpoints never caught up, and the log grew past a gigabyte.
    conn.pragma_update(None, "wal_autocheckpoint", 4000)?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir` and starts its writer thread.
    /// Deliveries that were in flight when the daemon last stopped become pending again.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: data_dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(data_dir).map_err(|e| open_err(e.to_string()))?;
        let path = data_dir.join("postbackd.db");
        let conn = open_conn(&path).map_err(|e| open_err(e.to_string()))?;
        schema::migrate(&conn).map_err(|e| open_err(e.to_string()))?;
        conn.execute("UPDATE deliveries SET state = 0 WHERE state = 1", [])
            .map_err(|e| open_err(e.to_string()))?;
        let reader = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_err(e.to_string()))?;
        let (tx, rx) = mpsc::channel();
        let health = Arc::new(Health::default());
        health.set(None);
        let w = Writer::new(conn, health.clone());
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Store {
            tx,
            wake: Arc::new(Notify::new()),
            handoff: Arc::default(),
            health,
            reader: Arc::new(Mutex::new(reader)),
            path,
        })
    }

    /// Runs `f` inside the writer's next transaction; the result is returned once that
    /// transaction has committed (or the commit's error if it did not).
    async fn call<T: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_with(true, f).await
    }

    /// [`Store::call`] for a job whose writes need not be synced before the answer.
    async fn call_with<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_then(durable, f, |_: &mut T| {}).await
    }

    /// [`Store::call_with`], running `after` on the result on the writer thread once the
    /// commit succeeded, before anything else is committed.
    async fn call_then<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
        after: impl FnOnce(&mut T) + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(writer::job(f, after, reply, durable))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores an event, folds it into its conversion, matches it and queues its new
    /// deliveries, all in one durable commit.
    ///
    /// Deliveries that can go at once are handed to the dispatcher by the writer thread
    /// right after the commit, before anything else can be committed: a claim cannot see
    /// them finish before the dispatcher hears of them. The rest (held, or behind an
    /// earlier delivery of the same conversion) wait for a claim.
    pub async fn ingest(&self, event: Event, plan: Arc<Plan>) -> Result<Accepted, StoreError> {
        let mut one = self.ingest_batch(vec![event], plan).await?;
        one.pop()
            .ok_or_else(|| StoreError::Commit("the store answered no event".into()))
    }

    /// [`Store::ingest`] for several events, in order, as one job: all of them are stored
    /// or none is.
    pub async fn ingest_batch(
        &self,
        events: Vec<Event>,
        plan: Arc<Plan>,
    ) -> Result<Vec<Accepted>, StoreError> {
        let (handoff, wake) = (self.handoff.clone(), self.wake.clone());
        // Serialised here, on the caller's thread, not on the one writer thread.
        let jsons = events
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        self.call_then(
            true,
            move |c| {
                events
                    .iter()
                    .zip(&jsons)
                    .map(|(event, json)| ops::ingest(c, event, json, &plan))
                    .collect::<rusqlite::Result<Vec<_>>>()
            },
            move |all: &mut Vec<Accepted>| {
                // What is not handed over waits for a claim: wake the dispatcher for it.
                let mut left = 0;
                for a in all.iter_mut() {
                    let fresh = std::mem::take(&mut a.fresh);
                    match handoff.get() {
                        Some(h) => {
                            left += a.queued - fresh.len();
                            for d in fresh {
                                h(d);
                            }
                        }
                        None => left += a.queued,
                    }
                }
                if left > 0 {
                    wake.notify_one();
                }
            },
        )
        .await
    }

    /// Sets where new deliveries go once committed (see [`Store::ingest`]); once per store.
    pub fn on_fresh(&self, f: impl Fn(Claimed) + Send + Sync + 'static) {
        let _ = self.handoff.set(Box::new(f));
    }

    /// Finds due deliveries (see [`ClaimSpec`]), several specs in order. A claim is a read:
    /// what the dispatcher holds lives in its memory and is left out of the next claim, and
    /// a delivery waits while an earlier delivery of the same postback for the same
    /// conversion is unfinished. Claims never wait for the writer.
    pub async fn claim(&self, specs: Vec<ClaimSpec>) -> Result<Vec<Claim>, StoreError> {
        self.read(move |c| specs.iter().map(|s| ops::claim(c, s)).collect())
            .await
    }

    /// Records an attempt (if any) and the delivery's next state.
    pub async fn finish(
        &self,
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        let retry = matches!(next, Next::Retry { .. } | Next::Orphaned { .. });
        // Not synced on its own: a crash of the process keeps it (the OS has it), and the next
        // synced commit covers it. Only a power loss can lose it, and then the delivery is
        // sent again: at least once still holds.
        let unblocked = self
            .call_with(false, move |c| {
                ops::finish(c, id, attempt.as_ref(), &next, reason.as_deref())
            })
            .await?;
        if retry || unblocked {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// When the next pending delivery falls due after `after` (unix ms), if any. Deliveries
    /// already due but not claimed are waiting on a slot or an earlier delivery, and the end
    /// of an attempt, not the clock, is what lets them go.
    pub async fn next_due(&self, after: i64) -> Result<Option<i64>, StoreError> {
        self.read(move |c| ops::next_due(c, after)).await
    }

    /// Deletes one slice of what is older than `before` (unix ms); returns the rows deleted.
    pub async fn prune(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.call_with(false, move |c| ops::prune(c, before, limit))
            .await
    }

    /// Makes orphaned deliveries of these postbacks due now: a reload brought them back.
    /// Returns how many.
    pub async fn revive(&self, postbacks: Vec<String>) -> Result<usize, StoreError> {
        let n = self
            .call_with(false, move |c| {
                ops::revive(c, &to_json_list(&postbacks), crate::now_ms())
            })
            .await?;
        if n > 0 {
            self.wake.notify_one();
        }
        Ok(n)
    }

    /// Queues finished deliveries again, due now; returns their ids.
    pub async fn retry(&self, filter: RetryFilter) -> Result<Vec<i64>, StoreError> {
        let ids = self
            .call(move |c| ops::retry(c, &filter, crate::now_ms()))
            .await?;
        if !ids.is_empty() {
            self.wake.notify_one();
        }
        Ok(ids)
    }

    /// Runs a read-only query on the reader connection, off the async runtime. Reads see
    /// the last commit and never wait for the writer.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn).map_err(StoreError::from)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// A page of the delivery log, newest first, and the next page's cursor.
    pub async fn deliveries(
        &self,
        q: DeliveryQuery,
    ) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError> {
        self.read(move |c| read::deliveries(c, &q)).await
    }

    /// A page of the received events, newest first, and the next page's cursor.
    pub async fn events(&self, q: EventQuery) -> Result<(Vec<EventRow>, Option<i64>), StoreError> {
        self.read(move |c| read::events(c, &q)).await
    }

    /// One delivery with every attempt, if it exists and is one of `postbacks`' (`None`:
    /// any postback's).
    pub async fn delivery(
        &self,
        id: i64,
        postbacks: Option<Vec<String>>,
    ) -> Result<Option<DeliveryRow>, StoreError> {
        self.read(move |c| read::delivery(c, id, postbacks.as_deref()))
            .await
    }

    /// Unfinished deliveries: how many, how old the oldest is, and why they wait.
    pub async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        self.read(|c| {
            c.prepare_cached(QUEUE_STATS)?.query_row([], |r| {
                Ok(QueueStats {
                    pending: r.get(0)?,
                    retries: r.get(1)?,
                    oldest: r.get(2)?,
                    orphaned: r.get(3)?,
                })
            })
        })
        .await
    }

    /// Whether the last write succeeded, and if not, why.
    pub fn health(&self) -> Result<(), String> {
        if self.health.is_ok() {
            Ok(())
        } else {
            Err(self
                .health
                .error
                .lock()
                .map(|e| e.clone().unwrap_or_default())
                .unwrap_or_default())
        }
    }
}
