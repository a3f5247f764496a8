//! The embedded backend: one SQLite file (WAL, `synchronous=FULL`) in the data directory.
//!
//! One writer thread owns the write connection. Callers send it jobs; it runs every job
//! waiting at that moment in one transaction and commits once, so durability costs one
//! fsync per batch rather than one per webhook. A webhook is acknowledged only after the
//! commit that holds its event and deliveries. Reads (claims, the log) go to a read-only
//! connection and never wait for the writer.
//!
//! How it keeps the store's guarantees: one writer serialises every conversion's update
//! (dedupe); a claim is a read, and the dispatcher holds what it claimed in memory, so a
//! crash leaves it pending and the next start sends it again.

mod ids;
mod ops;
mod read;
mod schema;
mod writer;

use super::{
    Accepted, Attempt, Backend, Claim, ClaimSpec, DeliveryQuery, DeliveryRow, EventQuery, EventRow,
    Next, QueueStats, RetryFilter, Signals, StoreError,
};
use crate::ingest::event::Event;
use crate::plan::Plan;
use rusqlite::Connection;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::oneshot;
use writer::{Job, Writer};

/// The embedded store.
pub struct Sqlite {
    tx: mpsc::Sender<Job>,
    signals: Arc<Signals>,
    reader: Arc<Mutex<Connection>>,
    /// The id indexer ([`ids`]) runs while this lives.
    _indexer: Arc<()>,
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

impl Sqlite {
    /// Opens (creating if needed) the store in `data_dir` and starts its writer thread.
    /// Deliveries that were in flight when the daemon last stopped become pending again.
    pub fn open(data_dir: &Path, signals: Arc<Signals>) -> Result<Sqlite, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: data_dir.display().to_string(),
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
        ids::register(&reader).map_err(|e| open_err(e.to_string()))?;
        let (tx, rx) = mpsc::channel();
        let w = Writer::new(conn, signals.clone());
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| open_err(e.to_string()))?;
        let reader = Arc::new(Mutex::new(reader));
        let indexer = Arc::new(());
        ids::spawn(tx.clone(), reader.clone(), Arc::downgrade(&indexer));
        Ok(Sqlite {
            tx,
            signals,
            reader,
            _indexer: indexer,
        })
    }

    /// Runs `f` inside the writer's next transaction; the result is returned once that
    /// transaction has committed (or the commit's error if it did not). A `durable` job is
    /// answered only after its commit is synced. `after` runs on the result on the writer
    /// thread once the commit succeeded, before anything else is committed.
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

    async fn call<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_then(durable, f, |_: &mut T| {}).await
    }

    /// Runs a read-only query on the reader connection, off the async runtime. Reads see
    /// the last commit and never wait for the writer.
    async fn read<T: Send + 'static>(
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
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    async fn ingest(
        &self,
        events: Vec<Event>,
        jsons: Vec<String>,
        plan: Arc<Plan>,
    ) -> Result<Vec<Accepted>, StoreError> {
        let signals = self.signals.clone();
        self.call_then(
            true,
            move |c| {
                events
                    .iter()
                    .zip(&jsons)
                    .map(|(event, json)| ops::ingest(c, event, json, &plan))
                    .collect::<rusqlite::Result<Vec<_>>>()
            },
            move |all: &mut Vec<Accepted>| signals.committed(all),
        )
        .await
    }

    async fn claim(&self, specs: Vec<ClaimSpec>) -> Result<Vec<Claim>, StoreError> {
        self.read(move |c| specs.iter().map(|s| ops::claim(c, s)).collect())
            .await
    }

    async fn finish(
        &self,
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
    ) -> Result<bool, StoreError> {
        // Not synced on its own: a crash of the process keeps it (the OS has it), and the next
        // synced commit covers it. Only a power loss can lose it, and then the delivery is
        // sent again: at least once still holds.
        self.call(false, move |c| {
            ops::finish(c, id, attempt.as_ref(), &next, reason.as_deref())
        })
        .await
    }

    async fn next_due(&self, after: i64) -> Result<Option<i64>, StoreError> {
        self.read(move |c| ops::next_due(c, after)).await
    }

    async fn prune(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.call(false, move |c| ops::prune(c, before, limit))
            .await
    }

    async fn revive(&self, postbacks: Vec<String>, now: i64) -> Result<usize, StoreError> {
        self.call(false, move |c| {
            ops::revive(c, &to_json_list(&postbacks), now)
        })
        .await
    }

    async fn retry(&self, filter: RetryFilter, now: i64) -> Result<Vec<i64>, StoreError> {
        self.call(true, move |c| ops::retry(c, &filter, now)).await
    }

    async fn deliveries(
        &self,
        q: DeliveryQuery,
    ) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError> {
        self.read(move |c| read::deliveries(c, &q)).await
    }

    async fn events(&self, q: EventQuery) -> Result<(Vec<EventRow>, Option<i64>), StoreError> {
        self.read(move |c| read::events(c, &q)).await
    }

    async fn delivery(
        &self,
        id: i64,
        postbacks: Option<Vec<String>>,
    ) -> Result<Option<DeliveryRow>, StoreError> {
        self.read(move |c| read::delivery(c, id, postbacks.as_deref()))
            .await
    }

    async fn made_since(&self, since: i64) -> Result<Vec<(String, super::State, i64)>, StoreError> {
        self.read(move |c| read::made_since(c, since)).await
    }

    async fn refuse(&self, r: super::Refused) -> Result<(), StoreError> {
        self.call(false, move |c| ops::refuse(c, &r)).await
    }

    async fn refused(
        &self,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<super::Refused>, Option<i64>), StoreError> {
        self.read(move |c| read::refused(c, before_id, limit)).await
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
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
}
