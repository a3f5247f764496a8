//! The writer tasks, one for ingests and one for outcomes, each on a connection of its own:
//! the jobs waiting at one moment share one transaction and one commit (group commit), so
//! throughput does not cost one round trip and one flush per webhook. Each kind of job is written with one statement per table for the whole
//! batch (`unnest` of arrays). A batch that fails is run again one job per transaction, so
//! a failing job fails alone; a deadlock or serialisation failure is tried again.
//!
//! Ingest locks each conversion's row (created first when new, in key order, so two
//! instances never wait on each other in a cycle), folds the batch's events into it in
//! order with [`crate::store::decide`] ([`ingest`]), and writes the events, the deliveries and the conversions back.
//! Deliveries that can go at once are leased to this instance and handed to its
//! dispatcher right after the commit, before the next batch.

mod finish;
mod ingest;

use super::Shared;
use crate::ingest::event::Event;
use crate::plan::Plan;
use crate::store::{Accepted, Attempt, Next, StoreError};
use deadpool_postgres::Transaction;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

/// At most this many jobs share one commit.
const MAX_BATCH: usize = 512;
/// A batch that takes longer than this has lost its database.
const BATCH_TIMEOUT: Duration = Duration::from_secs(15);

// Moved once, through a channel; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Op {
    Ingest {
        events: Vec<Event>,
        jsons: Vec<String>,
        plan: Arc<Plan>,
        reply: oneshot::Sender<Result<Vec<Accepted>, StoreError>>,
    },
    Finish {
        id: i64,
        attempt: Option<Attempt>,
        next: Next,
        reason: Option<String>,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

enum Out {
    Ingest(Vec<Accepted>),
    Finish(bool),
}

impl Op {
    fn answer(self, out: Result<Out, StoreError>, shared: &Shared) {
        match (self, out) {
            (Op::Ingest { reply, .. }, Ok(Out::Ingest(mut all))) => {
                // Fresh deliveries were leased to this instance at insert.
                shared.lease(all.iter().flat_map(|a| a.fresh.iter().map(|c| c.id)), true);
                shared.signals.committed(&mut all);
                let _ = reply.send(Ok(all));
            }
            (Op::Finish { id, reply, .. }, Ok(Out::Finish(b))) => {
                shared.lease([id], false);
                let _ = reply.send(Ok(b));
            }
            (Op::Ingest { reply, .. }, Err(e)) => {
                let _ = reply.send(Err(e));
            }
            (Op::Finish { reply, .. }, Err(e)) => {
                let _ = reply.send(Err(e));
            }
            (Op::Ingest { reply, .. }, Ok(_)) => {
                let _ = reply.send(Err(StoreError::Commit("mismatched answer".into())));
            }
            (Op::Finish { reply, .. }, Ok(_)) => {
                let _ = reply.send(Err(StoreError::Commit("mismatched answer".into())));
            }
        }
    }
}

pub(super) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Op>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        match commit(&shared, &batch).await {
            Ok(outs) => {
                shared.healthy();
                for (op, out) in batch.into_iter().zip(outs) {
                    op.answer(Ok(out), &shared);
                }
            }
            Err(e) if batch.len() > 1 && e.is_statement() => {
                for op in batch {
                    let one = [op];
                    let out = alone(&shared, &one).await;
                    let [op] = one;
                    op.answer(out, &shared);
                }
            }
            Err(e) => {
                let e = e.into_store(&shared);
                for op in batch {
                    op.answer(Err(StoreError::Unavailable(e.to_string())), &shared);
                }
            }
        }
    }
}

/// One job in a transaction of its own, tried again after a deadlock or serialisation
/// failure.
async fn alone(shared: &Shared, one: &[Op; 1]) -> Result<Out, StoreError> {
    let mut tries = 0;
    loop {
        match commit(shared, one).await {
            Ok(mut outs) => {
                shared.healthy();
                return outs.pop().ok_or(StoreError::Closed);
            }
            Err(e) if e.is_transient() && tries < 3 => tries += 1,
            Err(e) => return Err(e.into_store(shared)),
        }
    }
}

/// Why a batch failed: the database is unreachable (`Connection`), or a statement failed.
pub(super) enum Failure {
    Connection(String),
    Statement(tokio_postgres::Error),
}

impl Failure {
    fn is_statement(&self) -> bool {
        matches!(self, Failure::Statement(e) if e.code().is_some())
    }

    fn is_transient(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(self, Failure::Statement(e) if matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE))
    }

    /// The error to answer with; a lost database also turns health bad.
    fn into_store(self, shared: &Shared) -> StoreError {
        match self {
            Failure::Connection(msg) => {
                shared.unhealthy(&msg);
                StoreError::Unavailable(msg)
            }
            Failure::Statement(e) if e.code().is_none() => {
                let msg = super::describe(&e);
                shared.unhealthy(&msg);
                StoreError::Unavailable(msg)
            }
            Failure::Statement(e) => StoreError::Commit(super::describe(&e)),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Statement(e)
    }
}

/// Runs `batch` in one transaction and commits it.
async fn commit(shared: &Shared, batch: &[Op]) -> Result<Vec<Out>, Failure> {
    let mut client = shared.client().await.map_err(|e| match e {
        StoreError::Unavailable(msg) => Failure::Connection(msg),
        other => Failure::Connection(other.to_string()),
    })?;
    let work = async {
        let tx = client.transaction().await?;
        // Finishes need not be synced before they are answered: a crash of this process
        // cannot lose a commit the server has, and the server's next synced commit covers
        // them. A lost server loses at most the last few, and those are sent again.
        if batch.iter().all(|op| matches!(op, Op::Finish { .. })) {
            tx.batch_execute("SET LOCAL synchronous_commit TO off")
                .await?;
        }
        let outs = apply(shared, &tx, batch).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(outs)
    };
    match tokio::time::timeout(BATCH_TIMEOUT, work).await {
        Ok(Ok(outs)) => Ok(outs),
        Ok(Err(e)) => {
            if e.code().is_none() {
                // The connection broke: do not give it back to the pool.
                let _ = deadpool_postgres::Object::take(client);
            }
            Err(Failure::Statement(e))
        }
        Err(_) => {
            let _ = deadpool_postgres::Object::take(client);
            Err(Failure::Connection(format!(
                "the database did not answer within {} s",
                BATCH_TIMEOUT.as_secs()
            )))
        }
    }
}

/// The batch's writes, in one transaction; one answer per job, in order.
async fn apply(
    shared: &Shared,
    tx: &Transaction<'_>,
    batch: &[Op],
) -> Result<Vec<Out>, tokio_postgres::Error> {
    let ingests: Vec<(&[Event], &[String], &Arc<Plan>)> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Ingest {
                events,
                jsons,
                plan,
                ..
            } => Some((events.as_slice(), jsons.as_slice(), plan)),
            _ => None,
        })
        .collect();
    let finishes: Vec<(i64, Option<&Attempt>, &Next, Option<&str>)> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Finish {
                id,
                attempt,
                next,
                reason,
                ..
            } => Some((*id, attempt.as_ref(), next, reason.as_deref())),
            _ => None,
        })
        .collect();
    let p = Prepared::new(tx).await?;
    let mut accepted = ingest::ingest(shared, tx, &p, &ingests).await?.into_iter();
    let mut unblocked = finish::finish(tx, &p, &finishes).await?.into_iter();
    Ok(batch
        .iter()
        .map(|op| match op {
            Op::Ingest { .. } => Out::Ingest(accepted.next().unwrap_or_default()),
            Op::Finish { .. } => Out::Finish(unblocked.next().unwrap_or(false)),
        })
        .collect())
}

/// Every statement the writer runs, prepared once per connection (deadpool caches them):
/// a plain query string would be parsed and described on every call, a second round trip.
/// They are prepared before a batch's statements are sent together (pipelined), so that
/// what is sent together reaches the server in the order written.
struct Prepared {
    lock_new: Statement,
    lock: Statement,
    insert_events: Statement,
    next_ids: Statement,
    busy: Statement,
    insert_deliveries: Statement,
    update_conversions: Statement,
    finish: Statement,
    insert_attempts: Statement,
    notify_waiting: Statement,
    waiting: Statement,
}

impl Prepared {
    async fn new(tx: &Transaction<'_>) -> Result<Prepared, tokio_postgres::Error> {
        Ok(Prepared {
            lock_new: tx.prepare_cached(LOCK_NEW).await?,
            lock: tx.prepare_cached(LOCK).await?,
            insert_events: tx.prepare_cached(INSERT_EVENTS).await?,
            next_ids: tx.prepare_cached(NEXT_IDS).await?,
            busy: tx.prepare_cached(BUSY).await?,
            insert_deliveries: tx.prepare_cached(INSERT_DELIVERIES).await?,
            update_conversions: tx.prepare_cached(UPDATE_CONVERSIONS).await?,
            finish: tx.prepare_cached(FINISH).await?,
            insert_attempts: tx.prepare_cached(INSERT_ATTEMPTS).await?,
            notify_waiting: tx.prepare_cached(NOTIFY_WAITING).await?,
            waiting: tx.prepare_cached(WAITING).await?,
        })
    }
}

const LOCK_NEW: &str = "INSERT INTO conversions (key, updated_at)
                 SELECT k, 0 FROM unnest($1::text[]) AS k ORDER BY k
                 ON CONFLICT (key) DO NOTHING";

const LOCK: &str = "SELECT key, event, sent FROM conversions WHERE key = ANY($1)
                 ORDER BY key FOR UPDATE";

const INSERT_EVENTS: &str = "INSERT INTO events (id, received_at, source, kind, conv_key, clickid, transaction_id,
                             offer_id, affiliate_id, event, matched)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])";

const NEXT_IDS: &str = "SELECT nextval('deliveries_id_seq') FROM generate_series(1, $1::bigint)";

const BUSY: &str =
    "SELECT DISTINCT order_key FROM deliveries WHERE state = 0 AND order_key = ANY($1)";

const INSERT_DELIVERIES: &str =
    "INSERT INTO deliveries (id, event_id, postback_id, offer, conv_key, order_key,
                     dedupe_key, status, event, state, attempts, created_at, due_at, updated_at,
                     delayed, clickid, transaction_id, offer_id, affiliate_id, goal,
                     lease_owner, lease_until)
                 SELECT u.id, u.event_id, u.postback_id, u.offer, u.conv_key, u.order_key,
                        u.dedupe_key, u.status, u.event, 0, 0, u.created_at, u.due_at,
                        u.created_at, u.delayed, u.clickid, u.transaction_id, u.offer_id,
                        u.affiliate_id, u.goal, u.lease_owner,
                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint + u.lease_for
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[],
                             $11::bigint[], $12::boolean[], $13::text[], $14::text[],
                             $15::text[], $16::text[], $17::text[], $18::text[], $19::bigint[])
                   AS u(id, event_id, postback_id, offer, conv_key, order_key, dedupe_key,
                        status, event, created_at, due_at, delayed, clickid, transaction_id,
                        offer_id, affiliate_id, goal, lease_owner, lease_for)
                 ON CONFLICT (dedupe_key) DO NOTHING
                 RETURNING id";

const UPDATE_CONVERSIONS: &str = "UPDATE conversions c SET status = u.status, event = u.event,
                                  updated_at = u.updated_at, sent = u.sent
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])
           AS u(key, status, event, updated_at, sent)
         WHERE c.key = u.key";

const FINISH: &str = "UPDATE deliveries d SET state = u.state, attempts = d.attempts + u.bump,
                        due_at = COALESCE(u.due, d.due_at), updated_at = u.now,
                        last_error = COALESCE(u.err, d.last_error),
                        last_status = COALESCE(u.status, d.last_status),
                        last_outcome = COALESCE(u.outcome, d.last_outcome),
                        orphaned_at = u.orphaned, lease_owner = NULL, lease_until = NULL
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                             $6::text[], $7::bigint[], $8::text[], $9::bigint[])
                   AS u(id, state, bump, due, now, err, status, outcome, orphaned)
                 WHERE d.id = u.id";

const INSERT_ATTEMPTS: &str =
    "INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, method, url,
                                       request_body, response_status, response_body, error,
                                       outcome, config_version, config_commit)
                 SELECT u.id, d.attempts, u.started_at, u.duration_ms, u.method, u.url,
                        u.request_body, u.response_status, u.response_body, u.error, u.outcome,
                        u.config_version, u.config_commit
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                             $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[],
                             $11::text[], $12::text[])
                   AS u(id, started_at, duration_ms, method, url, request_body, response_status,
                        response_body, error, outcome, config_version, config_commit)
                 JOIN deliveries d ON d.id = u.id";

const NOTIFY_WAITING: &str = "SELECT pg_notify($1, '') FROM (
                   SELECT 1 FROM deliveries e
                   JOIN deliveries w ON w.order_key = e.order_key AND w.state = 0
                   WHERE e.id = ANY($2) LIMIT 1) x";

const WAITING: &str = "SELECT DISTINCT e.id FROM deliveries e
                 JOIN deliveries w ON w.order_key = e.order_key AND w.state = 0
                 WHERE e.id = ANY($1)";

async fn query(
    tx: &Transaction<'_>,
    st: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    tx.query(st, params).await
}

async fn execute(
    tx: &Transaction<'_>,
    st: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(st, params).await
}
