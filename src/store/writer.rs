//! The writer thread: the only connection that writes. It takes every job waiting at that
//! moment, runs them in one transaction (a savepoint each, so one failing job does not undo
//! the others) and commits once. Each job's result is released only after that commit.
//!
//! When a commit fails (disk full, read-only, I/O error) every job of the batch gets the
//! error, health turns bad with the reason, and the writer probes the disk every second with
//! a one-row write until a commit succeeds again.

use super::{ops, Health, StoreError};
use rusqlite::Connection;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// At most this many jobs share one commit.
const MAX_BATCH: usize = 512;
/// While writes fail, probe this often, and repeat the error log line at most this often.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const REPEAT_ERROR_LOG: Duration = Duration::from_secs(30);

/// What a job does once its batch's commit is known (`Some(error)` if it failed).
pub(super) type Done = Box<dyn FnOnce(Option<&str>) + Send>;

/// One unit of work for the writer.
pub(super) type Job = Box<dyn Op>;

/// A job runs in the batch's transaction, then hears how the commit went.
pub(super) trait Op: Send {
    /// Runs inside the transaction; returns what to do once the commit's outcome is known.
    fn run(self: Box<Self>, c: &Connection) -> Done;
    /// The transaction could not even begin.
    fn fail(self: Box<Self>, error: &str);
    /// Whether the job's writes must be on disk before it is answered.
    fn durable(&self) -> bool;
}

struct Call<F, A, T> {
    f: F,
    after: A,
    reply: oneshot::Sender<Result<T, StoreError>>,
    durable: bool,
}

impl<F, A, T> Op for Call<F, A, T>
where
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    A: FnOnce(&mut T) + Send + 'static,
    T: Send + 'static,
{
    fn run(self: Box<Self>, c: &Connection) -> Done {
        let Call {
            f, after, reply, ..
        } = *self;
        let result = savepoint(c, f);
        Box::new(move |commit_error: Option<&str>| {
            let _ = reply.send(match commit_error {
                Some(e) => Err(StoreError::Commit(e.to_string())),
                None => result
                    .map(|mut v| {
                        after(&mut v);
                        v
                    })
                    .map_err(StoreError::from),
            });
        })
    }

    fn fail(self: Box<Self>, error: &str) {
        let _ = self.reply.send(Err(StoreError::Commit(error.to_string())));
    }

    fn durable(&self) -> bool {
        self.durable
    }
}

/// Wraps a closure and its reply channel as a job; `after` runs on its result on this
/// thread once the commit succeeded, before the next batch. A `durable` job is answered
/// only after its commit is synced to disk; the others (finishes and pruning, which a
/// process crash cannot lose) may share a commit that is not synced, which a later synced
/// commit covers.
pub(super) fn job<F, A, T>(
    f: F,
    after: A,
    reply: oneshot::Sender<Result<T, StoreError>>,
    durable: bool,
) -> Job
where
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    A: FnOnce(&mut T) + Send + 'static,
    T: Send + 'static,
{
    Box::new(Call {
        f,
        after,
        reply,
        durable,
    })
}

pub(super) struct Writer {
    conn: Connection,
    health: Arc<Health>,
    last_logged: Option<Instant>,
    /// Whether the connection is at `synchronous=FULL` (else OFF).
    synced: bool,
}

impl Writer {
    pub(super) fn new(conn: Connection, health: Arc<Health>) -> Writer {
        Writer {
            conn,
            health,
            last_logged: None,
            synced: true,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = if self.health.is_ok() {
                match rx.recv() {
                    Ok(j) => Some(j),
                    Err(_) => return,
                }
            } else {
                match rx.recv_timeout(PROBE_EVERY) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut batch: Vec<Job> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn run_batch(&mut self, batch: Vec<Job>) {
        // In WAL mode a commit at synchronous=FULL syncs the log up to and including itself,
        // so skipping the sync for batches without a durable job never weakens one.
        let durable = !self.health.is_ok() || batch.iter().any(|j| j.durable());
        if durable != self.synced {
            let mode = if durable { "FULL" } else { "OFF" };
            if self.conn.pragma_update(None, "synchronous", mode).is_ok() {
                self.synced = durable;
            }
        }
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = self.describe(&e);
            self.failed(&msg);
            for j in batch {
                j.fail(&msg);
            }
            return;
        }
        // While unhealthy, every batch also rewrites the heartbeat row, so that a commit
        // which succeeds proves the disk takes writes again (an empty commit proves nothing).
        if !self.health.is_ok() {
            let _ = ops::heartbeat(&self.conn, crate::now_ms());
        }
        let done: Vec<_> = batch.into_iter().map(|j| j.run(&self.conn)).collect();
        let error = match self.conn.execute_batch("COMMIT") {
            Ok(()) => {
                if !self.health.is_ok() {
                    tracing::info!("store writes again; ready");
                    self.last_logged = None;
                }
                self.health.set(None);
                None
            }
            Err(e) => {
                let msg = self.describe(&e);
                let _ = self.conn.execute_batch("ROLLBACK");
                self.failed(&msg);
                Some(msg)
            }
        };
        for d in done {
            d(error.as_deref());
        }
    }

    /// SQLite's message plus the operating system's reason when there is one: "disk I/O
    /// error" alone does not tell a full disk from a read-only one.
    fn describe(&self, e: &rusqlite::Error) -> String {
        // SAFETY: the handle is this thread's open connection; the call only reads the
        // errno SQLite saved for the last failed system call on it.
        let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(self.conn.handle()) };
        if errno != 0 {
            format!("{e}: {}", std::io::Error::from_raw_os_error(errno))
        } else {
            e.to_string()
        }
    }

    /// Records a failed write: health turns bad; the log says so at once, then every 30 s.
    fn failed(&mut self, msg: &str) {
        self.health.set(Some(msg.to_string()));
        let due = self
            .last_logged
            .is_none_or(|t| t.elapsed() >= REPEAT_ERROR_LOG);
        if due {
            tracing::error!(error = %msg, "store cannot write; webhooks get 503 until it recovers");
            self.last_logged = Some(Instant::now());
        }
    }
}

/// Runs `f` in a savepoint so one failing job does not undo the rest of the batch.
fn savepoint<T>(
    c: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached("SAVEPOINT job")?.execute([])?;
    match f(c) {
        Ok(v) => {
            c.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}
