//! The durable store: events, conversions, the delivery queue and the delivery log, behind
//! one interface ([`Backend`]) in domain terms, with two implementations: an embedded
//! SQLite file ([`sqlite`], the default) and a PostgreSQL database that any number of
//! instances share ([`postgres`]).
//!
//! # What every backend guarantees
//!
//! 1. **No 2xx before durable.** [`Backend::ingest`] returns only after the events and the
//!    deliveries they make are committed to disk; an error means none of the batch was kept.
//! 2. **One delivery per (conversion, postback, offer, status)**, whichever instance receives
//!    the repeat: the conversion's record is read and rewritten under a lock in the same
//!    commit as the deliveries it guards ([`decide`] decides, the backend serialises).
//! 3. **One unfinished delivery per order key, sent in order.** A claim never returns a
//!    delivery while an earlier one with the same order key is pending.
//! 4. **One attempt at a time.** A claimed delivery is held by one dispatcher until its
//!    outcome is recorded. One that was claimed and never finished (its process died) is
//!    claimable again after a bounded time: at the next start (embedded), or when its lease
//!    runs out (shared).
//! 5. **Nothing acknowledged is lost** when any process is killed: a delivery ends only as
//!    delivered, dead or cancelled, with its reason.
//!
//! The domain decisions (merging an update into its conversion, matching, which deliveries
//! to create, their order and dedupe keys) are pure functions in [`decide`] that both
//! backends call; claim caps are applied by [`model::take`]. The conformance tests in
//! `tests/it/store.rs` run the same scenarios on both backends.

pub mod decide;
mod model;
pub mod postgres;
pub mod sqlite;

pub(crate) use model::{page, take, Candidate, FinishRow};
pub use model::{
    Accepted, Attempt, AttemptRow, Claim, ClaimSpec, Claimed, DeliveryQuery, DeliveryRow,
    EventQuery, EventRow, Lane, Next, QueueStats, Refused, RetryFilter, State, REFUSED_KEPT,
};

use crate::ingest::event::Event;
use crate::plan::Plan;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store cannot commit: {0}")]
    Commit(String),
    #[error("store is shut down")]
    Closed,
    #[error("cannot open store at {path}: {reason}")]
    Open { path: String, reason: String },
}

/// Which backend, from `store:` in `postbackd.yaml` (or `POSTBACKD_STORE`).
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// `postbackd.db` in this directory.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database.
    Postgres(PgUrl),
}

/// A PostgreSQL connection string (`postgres://user:password@host:port/db`).
#[derive(Debug, Clone, PartialEq)]
pub struct PgUrl {
    /// As sent to the server.
    pub url: String,
    /// The same with its password masked, for logs and pages.
    pub shown: String,
    /// How long a claimed delivery stays an instance's without renewal: an instance that
    /// died gives its deliveries back after this (`store_lease`, 30 s by default; set from
    /// the settings by `Settings::store`).
    pub lease: std::time::Duration,
}

impl PgUrl {
    /// Checks a connection string; `shown` is how to show it (secrets masked), else the
    /// password is masked here.
    pub fn parse(url: &str, shown: Option<String>) -> Result<PgUrl, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                "a PostgreSQL store is written postgres://user:password@host:port/database".into(),
            );
        }
        url.parse::<tokio_postgres::Config>()
            .map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
        let shown = shown.unwrap_or_else(|| match url::Url::parse(url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            _ => url.to_string(),
        });
        Ok(PgUrl {
            url: url.to_string(),
            shown,
            lease: postgres::LEASE,
        })
    }
}

impl Location {
    /// Where the store is, with no secret in it.
    pub fn shown(&self) -> String {
        match self {
            Location::Sqlite(dir) => dir.join("postbackd.db").display().to_string(),
            Location::Postgres(pg) => pg.shown.clone(),
        }
    }
}

/// A backend: the operations the daemon needs, in domain terms. See the module's doc for
/// the guarantees each one keeps.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Stores events in order, folds each into its conversion, matches it and queues its
    /// new deliveries, all in one durable commit (or none of it). Right after the commit,
    /// before recording anything else, it calls [`Signals::committed`].
    async fn ingest(
        &self,
        events: Vec<Event>,
        jsons: Vec<String>,
        plan: Arc<Plan>,
    ) -> Result<Vec<Accepted>, StoreError>;
    /// Finds due deliveries (see [`ClaimSpec`]) and holds them for this process.
    async fn claim(&self, specs: Vec<ClaimSpec>) -> Result<Vec<Claim>, StoreError>;
    /// Records an attempt (if any) and the delivery's next state; returns whether a later
    /// delivery of the same order key waited for this one.
    async fn finish(
        &self,
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
    ) -> Result<bool, StoreError>;
    /// When the next pending delivery falls due after `after` (unix ms), if any.
    async fn next_due(&self, after: i64) -> Result<Option<i64>, StoreError>;
    /// Deletes one slice of finished work older than `before`; returns the rows deleted.
    async fn prune(&self, before: i64, limit: usize) -> Result<usize, StoreError>;
    /// Makes orphaned deliveries of these postbacks due at `now`; returns how many.
    async fn revive(&self, postbacks: Vec<String>, now: i64) -> Result<usize, StoreError>;
    /// Queues finished deliveries again, due at `now`; returns their ids.
    async fn retry(&self, filter: RetryFilter, now: i64) -> Result<Vec<i64>, StoreError>;
    async fn deliveries(
        &self,
        q: DeliveryQuery,
    ) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError>;
    async fn events(&self, q: EventQuery) -> Result<(Vec<EventRow>, Option<i64>), StoreError>;
    async fn delivery(
        &self,
        id: i64,
        postbacks: Option<Vec<String>>,
    ) -> Result<Option<DeliveryRow>, StoreError>;
    async fn queue_stats(&self) -> Result<QueueStats, StoreError>;
    /// How many deliveries each postback made since `since` (unix ms), by state. Deliveries'
    /// ids grow with time, so the first one since then is found by a binary search over
    /// ids (primary-key lookups) and only the rows after it are counted.
    async fn made_since(&self, since: i64) -> Result<Vec<(String, State, i64)>, StoreError>;
    /// Keeps a refused webhook for the incoming log (not synced on its own).
    async fn refuse(&self, r: Refused) -> Result<(), StoreError>;
    /// A page of refused webhooks, newest first, and the next page's cursor.
    async fn refused(
        &self,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<Refused>, Option<i64>), StoreError>;
    /// How many live instances share this store (1 for an embedded one).
    fn instances(&self) -> usize {
        1
    }
}

/// Takes deliveries the writer hands over after a commit.
type Handoff = Box<dyn Fn(Claimed) + Send + Sync>;

/// What a backend tells the rest of the daemon: new work (wake), deliveries to start now
/// (the handoff), and whether it can write (health).
#[derive(Default)]
pub struct Signals {
    /// Woken whenever new deliveries were committed or became claimable.
    pub wake: Arc<Notify>,
    handoff: OnceLock<Handoff>,
    ok: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Signals {
    pub fn new() -> Arc<Signals> {
        let s = Signals::default();
        s.ok.store(true, Ordering::Relaxed);
        Arc::new(s)
    }

    /// Hands the batch's fresh deliveries to the dispatcher and wakes it for the rest.
    /// A backend calls it right after the commit, before it commits anything else, so the
    /// dispatcher always hears of a delivery before its outcome.
    pub fn committed(&self, all: &mut [Accepted]) {
        let mut left = 0;
        for a in all.iter_mut() {
            let fresh = std::mem::take(&mut a.fresh);
            match self.handoff.get() {
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
            self.wake.notify_one();
        }
    }

    /// Records whether the last write succeeded (`None`) or why not.
    pub fn set_health(&self, err: Option<String>) {
        self.ok.store(err.is_none(), Ordering::Relaxed);
        if let Ok(mut e) = self.error.lock() {
            *e = err;
        }
    }

    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }

    /// Whether the last write succeeded, and if not, why.
    pub fn health(&self) -> Result<(), String> {
        if self.is_ok() {
            Ok(())
        } else {
            Err(self
                .error
                .lock()
                .map(|e| e.clone().unwrap_or_default())
                .unwrap_or_default())
        }
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    signals: Arc<Signals>,
    /// Woken whenever new deliveries were committed or became claimable.
    pub wake: Arc<Notify>,
    location: String,
}

impl Store {
    /// Opens the store at `location` (creating its tables if needed) and starts its writer.
    pub async fn open(location: &Location) -> Result<Store, StoreError> {
        let signals = Signals::new();
        let backend: Arc<dyn Backend> = match location {
            Location::Sqlite(dir) => Arc::new(sqlite::Sqlite::open(dir, signals.clone())?),
            Location::Postgres(pg) => {
                Arc::new(postgres::Postgres::open(pg, signals.clone()).await?)
            }
        };
        Ok(Store {
            backend,
            wake: signals.wake.clone(),
            signals,
            location: location.shown(),
        })
    }

    /// A store over any backend (the tests' in-memory one); `signals` must be the ones the
    /// backend reports through.
    pub fn with_backend(backend: Arc<dyn Backend>, signals: Arc<Signals>, location: &str) -> Store {
        Store {
            backend,
            wake: signals.wake.clone(),
            signals,
            location: location.to_string(),
        }
    }

    /// Where the store is (a path, or a connection string with its password masked).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Stores an event, folds it into its conversion, matches it and queues its new
    /// deliveries, all in one durable commit. Deliveries that can go at once are handed to
    /// the dispatcher right after the commit (see [`Store::on_fresh`]); the rest wait for
    /// a claim.
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
        // Serialised here, on the caller's thread, not on the one writer.
        let jsons = events
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        self.backend.ingest(events, jsons, plan).await
    }

    /// Sets where new deliveries go once committed (see [`Store::ingest`]); once per store.
    pub fn on_fresh(&self, f: impl Fn(Claimed) + Send + Sync + 'static) {
        let _ = self.signals.handoff.set(Box::new(f));
    }

    /// Finds due deliveries (see [`ClaimSpec`]), several specs in order. What the
    /// dispatcher holds is left out of the next claim, and a delivery waits while an
    /// earlier delivery of the same postback for the same conversion is unfinished.
    pub async fn claim(&self, specs: Vec<ClaimSpec>) -> Result<Vec<Claim>, StoreError> {
        self.backend.claim(specs).await
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
        let unblocked = self.backend.finish(id, attempt, next, reason).await?;
        if retry || unblocked {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// When the next pending delivery falls due after `after` (unix ms), if any. Deliveries
    /// already due but not claimed are waiting on a slot or an earlier delivery, and the end
    /// of an attempt, not the clock, is what lets them go.
    pub async fn next_due(&self, after: i64) -> Result<Option<i64>, StoreError> {
        self.backend.next_due(after).await
    }

    /// Deletes one slice of what is older than `before` (unix ms); returns the rows deleted.
    pub async fn prune(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.backend.prune(before, limit).await
    }

    /// Makes orphaned deliveries of these postbacks due now: a reload brought them back.
    /// Returns how many.
    pub async fn revive(&self, postbacks: Vec<String>) -> Result<usize, StoreError> {
        let n = self.backend.revive(postbacks, crate::now_ms()).await?;
        if n > 0 {
            self.wake.notify_one();
        }
        Ok(n)
    }

    /// Queues finished deliveries again, due now; returns their ids.
    pub async fn retry(&self, filter: RetryFilter) -> Result<Vec<i64>, StoreError> {
        let ids = self.backend.retry(filter, crate::now_ms()).await?;
        if !ids.is_empty() {
            self.wake.notify_one();
        }
        Ok(ids)
    }

    /// A page of the delivery log, newest first, and the next page's cursor.
    pub async fn deliveries(
        &self,
        q: DeliveryQuery,
    ) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError> {
        self.backend.deliveries(q).await
    }

    /// A page of the received events, newest first, and the next page's cursor.
    pub async fn events(&self, q: EventQuery) -> Result<(Vec<EventRow>, Option<i64>), StoreError> {
        self.backend.events(q).await
    }

    /// One delivery with every attempt, if it exists and is one of `postbacks`' (`None`:
    /// any postback's).
    pub async fn delivery(
        &self,
        id: i64,
        postbacks: Option<Vec<String>>,
    ) -> Result<Option<DeliveryRow>, StoreError> {
        self.backend.delivery(id, postbacks).await
    }

    /// Unfinished deliveries: how many, how old the oldest is, and why they wait.
    pub async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        self.backend.queue_stats().await
    }

    /// How many deliveries each postback made since `since` (unix ms), by state.
    pub async fn made_since(&self, since: i64) -> Result<Vec<(String, State, i64)>, StoreError> {
        self.backend.made_since(since).await
    }

    /// Keeps a refused webhook for the incoming log.
    pub async fn refuse(&self, r: Refused) -> Result<(), StoreError> {
        self.backend.refuse(r).await
    }

    /// A page of refused webhooks, newest first, and the next page's cursor.
    pub async fn refused(
        &self,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<Refused>, Option<i64>), StoreError> {
        self.backend.refused(before_id, limit).await
    }

    /// How many live instances share the store (1 for the embedded one).
    pub fn instances(&self) -> usize {
        self.backend.instances()
    }

    /// Whether the last write succeeded, and if not, why.
    pub fn health(&self) -> Result<(), String> {
        self.signals.health()
    }
}
