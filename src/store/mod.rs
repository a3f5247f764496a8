//! The durable store: events, conversions, the delivery queue and the delivery log, in one
//! embedded SQLite file (WAL, `synchronous=FULL`).
//!
//! One writer thread owns the write connection. Callers send it commands; it runs every
//! command waiting at that moment in one transaction and commits once, so durability costs
//! one fsync per batch rather than one per webhook. A webhook is acknowledged only after the
//! commit that holds its event and deliveries.

mod schema;

use crate::ingest::event::{Event, Kind};
use crate::plan::{Match, Plan};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::{oneshot, Notify};

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
}

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
}

/// One attempt, for the delivery log.
#[derive(Debug, Clone, Default)]
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
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Delivered,
    Retry { due_at: i64 },
    Dead,
    Cancelled,
}

enum Cmd {
    Ingest {
        event: Event,
        plan: Arc<Plan>,
        reply: oneshot::Sender<Result<Accepted, StoreError>>,
    },
    Claim {
        now: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Claimed>, StoreError>>,
    },
    Finish {
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    NextDue {
        reply: oneshot::Sender<Result<Option<i64>, StoreError>>,
    },
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Cmd>,
    /// Woken whenever new deliveries were committed.
    pub wake: Arc<Notify>,
    healthy: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
    pub path: PathBuf,
}

fn open_conn(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
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
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(Notify::new());
        let healthy = Arc::new(AtomicBool::new(true));
        let last_error = Arc::new(Mutex::new(None));
        let w = Writer {
            conn,
            wake: wake.clone(),
            healthy: healthy.clone(),
            last_error: last_error.clone(),
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Store {
            tx,
            wake,
            healthy,
            last_error,
            path,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Cmd,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores an event, folds it into its conversion, matches it and queues its new
    /// deliveries, all in one durable commit.
    pub async fn ingest(&self, event: Event, plan: Arc<Plan>) -> Result<Accepted, StoreError> {
        self.call(|reply| Cmd::Ingest { event, plan, reply }).await
    }

    /// Marks up to `limit` due deliveries in flight and returns them. A delivery waits while
    /// an earlier delivery of the same postback for the same conversion is unfinished.
    pub async fn claim(&self, now: i64, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        self.call(|reply| Cmd::Claim { now, limit, reply }).await
    }

    /// Records an attempt (if any) and the delivery's next state.
    pub async fn finish(
        &self,
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        self.call(|reply| Cmd::Finish {
            id,
            attempt,
            next,
            reason,
            reply,
        })
        .await
    }

    /// When the next pending delivery falls due (unix ms), if any.
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.call(|reply| Cmd::NextDue { reply }).await
    }

    /// Whether the last write succeeded, and if not, why.
    pub fn health(&self) -> Result<(), String> {
        if self.healthy.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(self
                .last_error
                .lock()
                .map(|e| e.clone().unwrap_or_default())
                .unwrap_or_default())
        }
    }
}

struct Writer {
    conn: Connection,
    wake: Arc<Notify>,
    healthy: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
}

/// A reply to send once the batch's commit is known.
enum Reply {
    Ingest(
        oneshot::Sender<Result<Accepted, StoreError>>,
        Result<Accepted, rusqlite::Error>,
    ),
    Claim(
        oneshot::Sender<Result<Vec<Claimed>, StoreError>>,
        Result<Vec<Claimed>, rusqlite::Error>,
    ),
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), rusqlite::Error>,
    ),
    Due(
        oneshot::Sender<Result<Option<i64>, StoreError>>,
        Result<Option<i64>, rusqlite::Error>,
    ),
}

const MAX_BATCH: usize = 512;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn run_batch(&mut self, batch: Vec<Cmd>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut new_work = false;
        let begin = self.conn.execute_batch("BEGIN IMMEDIATE");
        if let Err(e) = begin {
            self.fail_all(batch, e);
            return;
        }
        for cmd in batch {
            match cmd {
                Cmd::Ingest { event, plan, reply } => {
                    let r = savepoint(&self.conn, |c| ingest(c, &event, &plan));
                    if matches!(&r, Ok(a) if a.queued > 0) {
                        new_work = true;
                    }
                    replies.push(Reply::Ingest(reply, r));
                }
                Cmd::Claim { now, limit, reply } => {
                    let r = savepoint(&self.conn, |c| claim(c, now, limit));
                    replies.push(Reply::Claim(reply, r));
                }
                Cmd::Finish {
                    id,
                    attempt,
                    next,
                    reason,
                    reply,
                } => {
                    if matches!(next, Next::Retry { .. }) {
                        new_work = true;
                    }
                    let r = savepoint(&self.conn, |c| {
                        finish(c, id, attempt.as_ref(), &next, reason.as_deref())
                    });
                    replies.push(Reply::Unit(reply, r));
                }
                Cmd::NextDue { reply } => {
                    let r = self.conn.query_row(
                        "SELECT MIN(due_at) FROM deliveries WHERE state = 0",
                        [],
                        |r| r.get(0),
                    );
                    replies.push(Reply::Due(reply, r));
                }
            }
        }
        let commit = self.conn.execute_batch("COMMIT");
        let commit_err = match commit {
            Ok(()) => {
                self.set_health(None);
                None
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.set_health(Some(e.to_string()));
                tracing::error!(error = %e, "store commit failed; answering 503 until it recovers");
                Some(e.to_string())
            }
        };
        let fail = |msg: &Option<String>| StoreError::Commit(msg.clone().unwrap_or_default());
        for r in replies {
            match r {
                Reply::Ingest(tx, res) => {
                    let _ = tx.send(match (&commit_err, res) {
                        (Some(_), _) => Err(fail(&commit_err)),
                        (None, res) => res.map_err(StoreError::from),
                    });
                }
                Reply::Claim(tx, res) => {
                    let _ = tx.send(match (&commit_err, res) {
                        (Some(_), _) => Err(fail(&commit_err)),
                        (None, res) => res.map_err(StoreError::from),
                    });
                }
                Reply::Unit(tx, res) => {
                    let _ = tx.send(match (&commit_err, res) {
                        (Some(_), _) => Err(fail(&commit_err)),
                        (None, res) => res.map_err(StoreError::from),
                    });
                }
                Reply::Due(tx, res) => {
                    let _ = tx.send(res.map_err(StoreError::from));
                }
            }
        }
        if new_work && commit_err.is_none() {
            self.wake.notify_one();
        }
    }

    fn set_health(&self, err: Option<String>) {
        self.healthy.store(err.is_none(), Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = err;
        }
    }

    fn fail_all(&mut self, batch: Vec<Cmd>, e: rusqlite::Error) {
        let msg = e.to_string();
        self.set_health(Some(msg.clone()));
        tracing::error!(error = %msg, "store cannot begin a transaction");
        let err = || StoreError::Commit(msg.clone());
        for c in batch {
            match c {
                Cmd::Ingest { reply, .. } => drop(reply.send(Err(err()))),
                Cmd::Claim { reply, .. } => drop(reply.send(Err(err()))),
                Cmd::Finish { reply, .. } => drop(reply.send(Err(err()))),
                Cmd::NextDue { reply } => drop(reply.send(Err(err()))),
            }
        }
    }
}

/// Runs `f` in a savepoint so one failing command does not undo the rest of the batch.
fn savepoint<T>(
    c: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.execute_batch("SAVEPOINT cmd")?;
    match f(c) {
        Ok(v) => {
            c.execute_batch("RELEASE cmd")?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK TO cmd; RELEASE cmd");
            Err(e)
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn ingest(c: &Connection, event: &Event, plan: &Plan) -> rusqlite::Result<Accepted> {
    let key = event.conversion_key();
    let merged = match &key {
        Some(k) => {
            let earlier: Option<String> = c
                .prepare_cached("SELECT event FROM conversions WHERE key = ?1")?
                .query_row([k], |r| r.get(0))
                .optional()?;
            let merged = match earlier.and_then(|e| serde_json::from_str::<Event>(&e).ok()) {
                Some(prev) => event.merged_onto(&prev),
                None => event.clone(),
            };
            c.prepare_cached("INSERT INTO conversions (key, status, event, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(key) DO UPDATE SET status = excluded.status, event = excluded.event, updated_at = excluded.updated_at")?.execute(
                                params![k, merged.field("status"), to_json(&merged), event.received_at],
            )?;
            merged
        }
        None => event.clone(),
    };
    let matches: Vec<Match> = plan.matches(&merged);
    let matched: Vec<String> = matches.iter().map(|m| m.postback_id.clone()).collect();
    c.prepare_cached("INSERT INTO events (id, received_at, source, kind, conv_key, clickid, transaction_id, offer_id, affiliate_id, event, matched)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)")?.execute(
                params![
            event.id,
            event.received_at,
            event.source,
            event.kind.as_str(),
            key,
            merged.field("clickid"),
            merged.field("transaction_id"),
            merged.field("offer_id"),
            merged.field("affiliate_id"),
            to_json(event),
            to_json(&matched),
        ],
    )?;
    let mut queued = 0;
    let merged_json = to_json(&merged);
    for m in &matches {
        let order_key = format!(
            "{}|{}|{}",
            key.as_deref().unwrap_or(&event.id),
            m.postback_id,
            m.offer
        );
        // Conversions: one delivery per (conversion, postback, offer, status), whatever the
        // sender repeats. Clicks and impressions fire every time.
        let dedupe = match (&key, event.kind) {
            (Some(k), Kind::Conversion) => Some(format!(
                "{k}|{}|{}|{}",
                m.postback_id,
                m.offer,
                merged.field("status").unwrap_or_default()
            )),
            _ => None,
        };
        let due = event.received_at + m.delay.as_millis() as i64;
        let n = c.prepare_cached("INSERT OR IGNORE INTO deliveries (event_id, postback_id, offer, conv_key, order_key, dedupe_key, status, event, state, attempts, created_at, due_at, updated_at, delayed,
                                               clickid, transaction_id, offer_id, affiliate_id, goal)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, 0, ?9, ?10, ?9, ?11, ?12, ?13, ?14, ?15, ?16)")?.execute(
                        params![
                event.id,
                m.postback_id,
                m.offer,
                key,
                order_key,
                dedupe,
                merged.field("status"),
                merged_json,
                event.received_at,
                due,
                !m.delay.is_zero(),
                merged.field("clickid"),
                merged.field("transaction_id"),
                merged.field("offer_id"),
                merged.field("affiliate_id"),
                merged.field("goal"),
            ],
        )?;
        queued += n;
    }
    Ok(Accepted {
        event_id: event.id.clone(),
        matched,
        queued,
    })
}

fn claim(c: &Connection, now: i64, limit: usize) -> rusqlite::Result<Vec<Claimed>> {
    let mut st = c.prepare_cached(
        "SELECT d.id, d.postback_id, d.offer, d.event, d.attempts, d.created_at, d.delayed,
                (SELECT event FROM conversions WHERE key = d.conv_key)
         FROM deliveries d
         WHERE d.state = 0 AND d.due_at <= ?1
           AND NOT EXISTS (SELECT 1 FROM deliveries p
                           WHERE p.order_key = d.order_key AND p.id < d.id AND p.state IN (0, 1))
         ORDER BY d.due_at, d.id
         LIMIT ?2",
    )?;
    let rows = st.query_map(params![now, limit as i64], |r| {
        let event: String = r.get(3)?;
        let latest: Option<String> = r.get(7)?;
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            event,
            r.get::<_, u32>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, bool>(6)?,
            latest,
        ))
    })?;
    let mut out = Vec::new();
    let mut upd =
        c.prepare_cached("UPDATE deliveries SET state = 1, updated_at = ?2 WHERE id = ?1")?;
    for row in rows {
        let (id, postback_id, offer, event, attempts, created_at, delayed, latest) = row?;
        let Ok(event) = serde_json::from_str::<Event>(&event) else {
            // A row we cannot read is dead rather than retried forever.
            c.execute("UPDATE deliveries SET state = 3, last_error = 'stored event is unreadable' WHERE id = ?1", [id])?;
            continue;
        };
        upd.execute(params![id, now])?;
        out.push(Claimed {
            id,
            postback_id,
            offer,
            event,
            latest: latest.and_then(|l| serde_json::from_str(&l).ok()),
            attempts,
            created_at,
            delayed,
        });
    }
    Ok(out)
}

fn finish(
    c: &Connection,
    id: i64,
    attempt: Option<&Attempt>,
    next: &Next,
    reason: Option<&str>,
) -> rusqlite::Result<()> {
    let now = attempt
        .map(|a| a.started_at + a.duration_ms)
        .unwrap_or_else(crate::now_ms);
    let (state, due) = match next {
        Next::Delivered => (State::Delivered, None),
        Next::Retry { due_at } => (State::Pending, Some(*due_at)),
        Next::Dead => (State::Dead, None),
        Next::Cancelled => (State::Cancelled, None),
    };
    let bump = i64::from(attempt.is_some());
    c.prepare_cached("UPDATE deliveries SET state = ?2, attempts = attempts + ?3, due_at = COALESCE(?4, due_at), updated_at = ?5,
                last_error = COALESCE(?6, last_error), last_status = COALESCE(?7, last_status)
         WHERE id = ?1")?.execute(
                params![
            id,
            state.code(),
            bump,
            due,
            now,
            reason.or(attempt.and_then(|a| a.error.as_deref())),
            attempt.and_then(|a| a.response_status),
        ],
    )?;
    if let Some(a) = attempt {
        c.prepare_cached("INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, method, url, request_body, response_status, response_body, error, outcome, config_version)
             VALUES (?1, (SELECT attempts FROM deliveries WHERE id = ?1), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)")?.execute(
                        params![id, a.started_at, a.duration_ms, a.method, a.url, a.request_body, a.response_status, a.response_body, a.error, a.outcome, a.config_version],
        )?;
    }
    Ok(())
}
