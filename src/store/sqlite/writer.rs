//! The writer thread: the only connection that writes. It takes every job waiting at that
//! moment, runs them in one transaction and commits once. Each job's result is released
//! only after that commit.
//!
//! One failing job must not undo the others, yet a savepoint per job is costly: SQLite then
//! copies every page a job touches into a statement journal, which took about 40 % of the
//! writer's time. So a batch runs without savepoints; if any job fails, the transaction is
//! rolled back and the whole batch runs again with a savepoint per job. Jobs are therefore
//! closures that can run twice (`Fn`), and all they do is write to the connection.
//!
//! When a commit fails (disk full, read-only, I/O error) every job of the batch gets the
//! error, health turns bad with the reason, and the writer probes the disk every second with
//! a one-row write until a commit succeeds again.

use super::ops;
use crate::store::{Signals, StoreError};
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

/// A job runs in the batch's transaction (again, if the batch is replayed), then hears
/// how the commit went.
pub(super) trait Op: Send {
    /// Runs inside the transaction, in a savepoint of its own if `isolated`; keeps the
    /// result and says whether it succeeded.
    fn run(&mut self, c: &Connection, isolated: bool) -> bool;
    /// Hands the kept result over once the commit's outcome is known.
    fn done(self: Box<Self>) -> Done;
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
    result: Option<rusqlite::Result<T>>,
}

impl<F, A, T> Op for Call<F, A, T>
where
    F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    A: FnOnce(&mut T) + Send + 'static,
    T: Send + 'static,
{
    fn run(&mut self, c: &Connection, isolated: bool) -> bool {
        let result = if isolated {
            savepoint(c, &self.f)
        } else {
            (self.f)(c)
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn done(self: Box<Self>) -> Done {
        let Call {
            after,
            reply,
            result,
            ..
        } = *self;
        let result = result.unwrap_or(Err(rusqlite::Error::InvalidQuery));
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

/// Wraps a closure and its reply channel as a job; `f` may run twice (see the module's
/// doc) and must only write to the connection. `after` runs on its result on this
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
    F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    A: FnOnce(&mut T) + Send + 'static,
    T: Send + 'static,
{
    Box::new(Call {
        f,
        after,
        reply,
        durable,
        result: None,
    })
}

pub(super) struct Writer {
    conn: Connection,
    health: Arc<Signals>,
    last_logged: Option<Instant>,
    /// Whether the connection is at `synchronous=FULL` (else OFF).
    synced: bool,
}

impl Writer {
    pub(super) fn new(conn: Connection, health: Arc<Signals>) -> Writer {
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

    fn run_batch(&mut self, mut batch: Vec<Job>) {
        // In WAL mode a commit at synchronous=FULL syncs the log up to and including itself,
        // so skipping the sync for batches without a durable job never weakens one.
        let durable = !self.health.is_ok() || batch.iter().any(|j| j.durable());
        if durable != self.synced {
            let mode = if durable { "FULL" } else { "OFF" };
            if self.conn.pragma_update(None, "synchronous", mode).is_ok() {
                self.synced = durable;
            }
        }
        if let Err(msg) = self.begin() {
            for j in batch {
                j.fail(&msg);
            }
            return;
        }
        let mut all_ok = true;
        for j in batch.iter_mut() {
            if !j.run(&self.conn, false) {
                all_ok = false;
                break;
            }
        }
        if !all_ok {
            // Undo the failed job's partial writes with everything else (SQLite may have
            // rolled back already, after an I/O error or a full disk), then run the batch
            // again with each job in its own savepoint.
            let rollback = match self.conn.is_autocommit() {
                true => Ok(()),
                false => self.conn.execute_batch("ROLLBACK"),
            };
            let replay = match rollback {
                Ok(()) => self.begin(),
                Err(e) => {
                    let msg = self.describe(&e);
                    self.failed(&msg);
                    Err(msg)
                }
            };
            if let Err(msg) = replay {
                for j in batch {
                    j.fail(&msg);
                }
                return;
            }
            for j in batch.iter_mut() {
                j.run(&self.conn, true);
            }
        }
        let done: Vec<_> = batch.into_iter().map(|j| j.done()).collect();
        let error = match self.conn.execute_batch("COMMIT") {
            Ok(()) => {
                if !self.health.is_ok() {
                    tracing::info!("store writes again; ready");
                    self.last_logged = None;
                }
                self.health.set_health(None);
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

    /// Begins the batch's transaction. While unhealthy, every batch also rewrites the
    /// heartbeat row, so that a commit which succeeds proves the disk takes writes again
    /// (an empty commit proves nothing).
    fn begin(&mut self) -> Result<(), String> {
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = self.describe(&e);
            self.failed(&msg);
            return Err(msg);
        }
        if !self.health.is_ok() {
            let _ = ops::heartbeat(&self.conn, crate::now_ms());
        }
        Ok(())
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
        self.health.set_health(Some(msg.to_string()));
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
    f: impl Fn(&Connection) -> rusqlite::Result<T>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(c: &Connection, x: i64) -> rusqlite::Result<i64> {
        c.execute("INSERT INTO t (x) VALUES (?1)", [x])?;
        Ok(x)
    }

    /// A job that fails after writing leaves nothing behind, and the jobs of its batch
    /// before and after it are committed, each answered once with its own result.
    #[test]
    fn a_failing_job_undoes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open_conn(&dir.path().join("t.db")).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER UNIQUE)")
            .unwrap();
        let health = Signals::new();
        let mut writer = Writer::new(conn, health.clone());
        let after_runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut replies = Vec::new();
        let mut batch = Vec::new();
        type Write = Box<dyn Fn(&Connection) -> rusqlite::Result<i64> + Send>;
        let jobs: Vec<Write> = vec![
            Box::new(|c| insert(c, 1)),
            // Writes 2, then breaks the unique constraint: 2 must not stay.
            Box::new(|c| insert(c, 2).and_then(|_| insert(c, 1))),
            Box::new(|c| insert(c, 3)),
        ];
        for f in jobs {
            let (tx, rx) = oneshot::channel();
            let runs = after_runs.clone();
            batch.push(job(
                f,
                move |_: &mut i64| {
                    runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                },
                tx,
                true,
            ));
            replies.push(rx);
        }
        writer.run_batch(batch);
        let got: Vec<_> = replies
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().ok())
            .collect();
        assert_eq!(got, vec![Some(1), None, Some(3)]);
        assert_eq!(after_runs.load(std::sync::atomic::Ordering::Relaxed), 2);
        let rows: Vec<i64> = writer
            .conn
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![1, 3]);
        assert!(health.is_ok());
    }
}
