//! The shared backend: one PostgreSQL database that any number of postbackd instances use
//! at once, each accepting webhooks and delivering.
//!
//! How it keeps the store's guarantees:
//! - **Durable before 2xx**: ingest is answered after its transaction commits
//!   (`synchronous_commit` on). Concurrent ingests share a commit ([`writer`]); outcomes
//!   are committed by a second writer on a connection of its own, so neither waits for
//!   the other. A delivery handed over after an ingest commit can therefore have its
//!   outcome recorded just before the handover reaches the dispatcher, which ignores a
//!   handover of a delivery it has already recorded.
//! - **Dedupe across instances**: ingest locks each conversion's row (`FOR UPDATE`, made
//!   first when new) for the length of its transaction, so a repeat or a status update that
//!   reaches another instance waits for the first commit and then sees it; the unique
//!   `dedupe_key` is the last line of defence.
//! - **Order**: a claim skips a delivery while an earlier one of its order key is pending,
//!   whoever holds that one.
//! - **One attempt at a time**: a claim leases what it takes (`FOR UPDATE SKIP LOCKED`, then
//!   `lease_owner` and `lease_until`); other instances skip leased rows. Leases are timed by
//!   the database's clock, so instances' clocks need not agree. The keeper renews
//!   this instance's leases six times per lease; a killed instance's leases run out after
//!   the lease ([`LEASE`] unless `store_lease` says otherwise) and its deliveries are claimed by the others.
//! - **New work wakes the others**: a finish that frees the next delivery of an order key,
//!   a retry by hand and a revive `NOTIFY`; each instance `LISTEN`s and claims at once.
//!
//! While the database is unreachable, writes fail at once with the reason (webhooks get
//! 503, `/-/ready` says why), the keeper probes every second, and everything resumes when
//! it answers again.

mod read;
mod schema;
mod writer;

use super::{
    Accepted, Attempt, Backend, Claim, ClaimSpec, DeliveryQuery, DeliveryRow, EventQuery, EventRow,
    Next, PgUrl, QueueStats, RetryFilter, Signals, StoreError,
};
use crate::ingest::event::Event;
use crate::plan::Plan;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

/// How long a claimed delivery stays this instance's without a renewal, unless
/// `store_lease` says otherwise. Leases are renewed six times per lease.
pub const LEASE: Duration = Duration::from_secs(30);
/// The `LISTEN`/`NOTIFY` channel for new claimable work.
pub(super) const CHANNEL: &str = "postbackd_work";
/// Connections per instance: the writer, claims, reads, the keeper.
const POOL_SIZE: usize = 8;

/// What the backend's tasks share.
pub(super) struct Shared {
    pool: Pool,
    signals: Arc<Signals>,
    /// This instance's name on its leases.
    me: Arc<str>,
    /// Live instances, as last counted.
    fleet: AtomicUsize,
    /// The deliveries this instance holds a lease on (claimed or made fresh, not yet
    /// finished): what the keeper renews, by id, so no index on the lease is needed.
    leased: Mutex<std::collections::HashSet<i64>>,
    /// How long a lease lasts, in ms.
    lease_ms: i64,
    /// How often leases are renewed and the instance says it is alive.
    renew: Duration,
    /// Flips when the store is dropped: the listener and the keeper stop.
    closed: tokio::sync::watch::Sender<bool>,
    /// The schema version, once the tables are known to be there (made or upgraded by the
    /// first connection that gets through: at open, or later if the database was away).
    schema: tokio::sync::OnceCell<i64>,
    last_logged: Mutex<Option<Instant>>,
}

impl Shared {
    /// Notes leases taken (`true`) or given up.
    fn lease(&self, ids: impl IntoIterator<Item = i64>, taken: bool) {
        let mut l = self.leased.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if taken {
                l.insert(id);
            } else {
                l.remove(&id);
            }
        }
    }

    fn healthy(&self) {
        if !self.signals.is_ok() {
            tracing::info!("database writes again; ready");
            if let Ok(mut l) = self.last_logged.lock() {
                *l = None;
            }
        }
        self.signals.set_health(None);
    }

    /// The database cannot be written: health turns bad; logged at once, then every 30 s.
    fn unhealthy(&self, msg: &str) {
        self.signals.set_health(Some(msg.to_string()));
        if let Ok(mut l) = self.last_logged.lock() {
            if l.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                tracing::error!(error = %msg, "database unavailable; webhooks get 503 until it answers");
                *l = Some(Instant::now());
            }
        }
    }

    /// A pooled connection to a database whose tables are there.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let mut client = self.pool.get().await.map_err(|e| {
            let msg = describe_pool(&e);
            self.unhealthy(&msg);
            StoreError::Unavailable(msg)
        })?;
        if self.schema.get().is_none() {
            let migrated = self
                .schema
                .get_or_try_init(|| async { schema::migrate(&mut client).await })
                .await;
            if let Err(e) = migrated {
                let msg = format!("cannot create the tables: {}", describe(&e));
                self.unhealthy(&msg);
                return Err(StoreError::Unavailable(msg));
            }
        }
        Ok(client)
    }
}

/// A database error with the server's message, code and detail when it sent one.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        }
    }
}

pub(super) fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

fn store_err(shared: &Shared, e: tokio_postgres::Error) -> StoreError {
    let msg = describe(&e);
    if e.code().is_none() {
        shared.unhealthy(&msg);
    }
    StoreError::Unavailable(msg)
}

/// The shared store.
pub struct Postgres {
    shared: Arc<Shared>,
    /// The writer of ingests.
    ingests: mpsc::UnboundedSender<writer::Op>,
    /// The writer of finishes, on a connection of its own: a webhook's commit never waits
    /// behind a batch of outcomes, nor a drain behind the webhooks.
    finishes: mpsc::UnboundedSender<writer::Op>,
}

impl Postgres {
    /// Connects, creates or upgrades the tables, registers this instance and starts the
    /// writer, the listener and the keeper.
    pub async fn open(pg: &PgUrl, signals: Arc<Signals>) -> Result<Postgres, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: pg.shown.clone(),
            reason,
        };
        let mut config: tokio_postgres::Config =
            pg.url.parse().map_err(|e| open_err(format!("{e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("postbackd");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| open_err(e.to_string()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let me: Arc<str> = format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        )
        .into();
        let shared = Arc::new(Shared {
            pool,
            signals,
            me,
            fleet: AtomicUsize::new(1),
            leased: Mutex::default(),
            lease_ms: pg.lease.as_millis() as i64,
            renew: pg.lease / 6,
            closed: tokio::sync::watch::channel(false).0,
            schema: tokio::sync::OnceCell::new(),
            last_logged: Mutex::new(None),
        });
        // A database that refuses us (a wrong password, no such database) is a mistake to
        // fix before starting; one that cannot be reached yet is waited for, answering 503.
        match shared.pool.get().await {
            Err(deadpool_postgres::PoolError::Backend(e)) if e.code().is_some() => {
                return Err(open_err(describe(&e)));
            }
            _ => {}
        }
        match read::heartbeat(&shared, true).await {
            Ok(_) => tracing::info!(
                instance = %shared.me,
                schema = shared.schema.get().copied().unwrap_or_default(),
                "PostgreSQL store open"
            ),
            Err(e) => tracing::warn!(
                instance = %shared.me,
                error = %e,
                "database not reachable at start; webhooks get 503 until it answers"
            ),
        }
        let (ingests, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer::run(shared.clone(), rx));
        let (finishes, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer::run(shared.clone(), rx));
        let closed = shared.closed.subscribe();
        tokio::spawn(stop_on(closed.clone(), listen(config, shared.clone())));
        tokio::spawn(stop_on(closed, keep(shared.clone())));
        Ok(Postgres {
            shared,
            ingests,
            finishes,
        })
    }

    /// This instance's name on its leases.
    pub fn instance(&self) -> &str {
        &self.shared.me
    }

    async fn write<T>(
        &self,
        op: writer::Op,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let lane = match op {
            writer::Op::Ingest { .. } => &self.ingests,
            writer::Op::Finish { .. } => &self.finishes,
        };
        lane.send(op).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.shared.closed.send(true);
    }
}

/// Runs `task` until the store is dropped.
async fn stop_on(
    mut closed: tokio::sync::watch::Receiver<bool>,
    task: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        _ = closed.wait_for(|c| *c) => {}
        _ = task => {}
    }
}

/// `LISTEN`s for new claimable work on a connection of its own and wakes the dispatcher;
/// reconnects every second while the database is away, and wakes it once reconnected (what
/// was notified meanwhile is claimable now).
async fn listen(config: tokio_postgres::Config, shared: Arc<Shared>) {
    loop {
        if let Ok((client, mut conn)) = config.connect(NoTls).await {
            let (tx, mut rx) = mpsc::unbounded_channel::<()>();
            let driver = tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                            if tx.send(()).is_err() {
                                break;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
            });
            if client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .is_ok()
            {
                shared.signals.wake.notify_one();
                while rx.recv().await.is_some() {
                    shared.signals.wake.notify_one();
                }
            }
            driver.abort();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every second while the database is failing, a write that proves it works again; every
/// sixth of a lease, this instance's leases renewed, its heartbeat written and the live
/// instances counted.
async fn keep(shared: Arc<Shared>) {
    let mut last = Instant::now();
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(shared.renew.min(Duration::from_secs(1))).await;
        let probe = !shared.signals.is_ok();
        if probe || last.elapsed() >= shared.renew {
            last = Instant::now();
            match read::heartbeat(&shared, false).await {
                Ok(n) => {
                    // A renewal later than half a lease (an overloaded host, a slow
                    // database) risks another instance taking this one's deliveries while
                    // they are attempted: say so, as it would explain a duplicate.
                    let gap = renewed.elapsed();
                    if gap.as_millis() as i64 > shared.lease_ms / 2 {
                        tracing::warn!(
                            gap_ms = gap.as_millis() as u64,
                            lease_ms = shared.lease_ms,
                            "leases renewed late; another instance may attempt some of this one's deliveries too (raise store_lease)"
                        );
                    }
                    renewed = Instant::now();
                    shared.fleet.store(n.max(1), Ordering::Relaxed);
                    shared.healthy();
                }
                Err(e) => {
                    if let StoreError::Unavailable(msg) = &e {
                        shared.unhealthy(msg);
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for Postgres {
    async fn ingest(
        &self,
        events: Vec<Event>,
        jsons: Vec<String>,
        plan: Arc<Plan>,
    ) -> Result<Vec<Accepted>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.write(
            writer::Op::Ingest {
                events,
                jsons,
                plan,
                reply,
            },
            rx,
        )
        .await
    }

    async fn claim(&self, specs: Vec<ClaimSpec>) -> Result<Vec<Claim>, StoreError> {
        read::claim(&self.shared, specs).await
    }

    async fn finish(
        &self,
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
    ) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.write(
            writer::Op::Finish {
                id,
                attempt,
                next,
                reason,
                reply,
            },
            rx,
        )
        .await
    }

    async fn next_due(&self, after: i64) -> Result<Option<i64>, StoreError> {
        read::next_due(&self.shared, after).await
    }

    async fn prune(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        read::prune(&self.shared, before, limit).await
    }

    async fn revive(&self, postbacks: Vec<String>, now: i64) -> Result<usize, StoreError> {
        read::revive(&self.shared, postbacks, now).await
    }

    async fn retry(&self, filter: RetryFilter, now: i64) -> Result<Vec<i64>, StoreError> {
        read::retry(&self.shared, filter, now).await
    }

    async fn deliveries(
        &self,
        q: DeliveryQuery,
    ) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError> {
        read::deliveries(&self.shared, q).await
    }

    async fn events(&self, q: EventQuery) -> Result<(Vec<EventRow>, Option<i64>), StoreError> {
        read::events(&self.shared, q).await
    }

    async fn delivery(
        &self,
        id: i64,
        postbacks: Option<Vec<String>>,
    ) -> Result<Option<DeliveryRow>, StoreError> {
        read::delivery(&self.shared, id, postbacks).await
    }

    async fn made_since(&self, since: i64) -> Result<Vec<(String, super::State, i64)>, StoreError> {
        read::made_since(&self.shared, since).await
    }

    async fn refuse(&self, r: super::Refused) -> Result<(), StoreError> {
        read::refuse(&self.shared, r).await
    }

    async fn refused(
        &self,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<super::Refused>, Option<i64>), StoreError> {
        read::refused(&self.shared, before_id, limit).await
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        read::queue_stats(&self.shared).await
    }

    fn instances(&self) -> usize {
        self.shared.fleet.load(Ordering::Relaxed)
    }
}
