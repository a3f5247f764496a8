//! The writer task: ingests and finishes waiting at the same moment share one transaction
//! and one commit (group commit), so throughput does not cost one round trip and one flush
//! per webhook. Each kind of job is written with one statement per table for the whole
//! batch (`unnest` of arrays). A batch that fails is run again one job per transaction, so
//! a failing job fails alone; a deadlock or serialisation failure is tried again.
//!
//! Ingest locks each conversion's row (created first when new, in key order, so two
//! instances never wait on each other in a cycle), folds the batch's events into it in
//! order with [`decide`], and writes the events, the deliveries and the conversions back.
//! Deliveries that can go at once are leased to this instance and handed to its
//! dispatcher right after the commit, before the next batch.

use super::Shared;
use crate::ingest::event::Event;
use crate::plan::Plan;
use crate::store::model::destination_of;
use crate::store::{decide, Accepted, Attempt, Claimed, FinishRow, Next, State, StoreError};
use deadpool_postgres::Transaction;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
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
    let mut accepted = ingest(shared, tx, &p, &ingests).await?.into_iter();
    let mut unblocked = finish(tx, &p, &finishes).await?.into_iter();
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

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A conversion as the batch goes: its merged event and what it has queued.
struct Conversion {
    event: Option<Event>,
    json: Option<String>,
    sent: Vec<String>,
    touched: Option<(Option<String>, i64)>,
}

/// The rows of new deliveries, column by column.
#[derive(Default)]
struct NewRows {
    id: Vec<i64>,
    event_id: Vec<String>,
    postback_id: Vec<String>,
    offer: Vec<String>,
    conv_key: Vec<Option<String>>,
    order_key: Vec<String>,
    dedupe_key: Vec<Option<String>>,
    status: Vec<Option<String>>,
    event: Vec<String>,
    created_at: Vec<i64>,
    due_at: Vec<i64>,
    delayed: Vec<bool>,
    clickid: Vec<Option<String>>,
    transaction_id: Vec<Option<String>>,
    offer_id: Vec<Option<String>>,
    affiliate_id: Vec<Option<String>>,
    goal: Vec<Option<String>>,
    lease_owner: Vec<Option<String>>,
    /// How long the lease lasts, for the deliveries leased at insert (the database's clock
    /// starts it).
    lease_for: Vec<Option<i64>>,
}

#[derive(Default)]
struct EventRows {
    id: Vec<String>,
    received_at: Vec<i64>,
    source: Vec<String>,
    kind: Vec<String>,
    conv_key: Vec<Option<String>>,
    clickid: Vec<Option<String>>,
    transaction_id: Vec<Option<String>>,
    offer_id: Vec<Option<String>>,
    affiliate_id: Vec<Option<String>>,
    event: Vec<String>,
    matched: Vec<String>,
}

fn field(e: &Event, name: &str) -> Option<String> {
    e.field(name).map(str::to_string)
}

/// Every ingest job of the batch, events in order; one `Vec<Accepted>` per job.
async fn ingest(
    shared: &Shared,
    tx: &Transaction<'_>,
    p: &Prepared,
    jobs: &[(&[Event], &[String], &Arc<Plan>)],
) -> Result<Vec<Vec<Accepted>>, tokio_postgres::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<String> = jobs
        .iter()
        .flat_map(|(events, _, _)| events.iter().filter_map(|e| e.conversion_key()))
        .collect();
    keys.sort();
    keys.dedup();
    // Lock each conversion (made first if new, in key order): whichever instance holds it
    // decides its deliveries, and the other waits for that commit.
    let mut conversions: HashMap<String, Conversion> = HashMap::new();
    if !keys.is_empty() {
        // Sent together (pipelined): the server runs them in order, one round trip.
        let (_, locked) =
            tokio::try_join!(async { execute(tx, &p.lock_new, &[&keys],).await }, async {
                query(tx, &p.lock, &[&keys]).await
            },)?;
        for r in locked {
            let json: Option<String> = r.get(1);
            let sent: Option<String> = r.get(2);
            conversions.insert(
                r.get(0),
                Conversion {
                    event: json.as_deref().and_then(|j| serde_json::from_str(j).ok()),
                    json: None,
                    sent: sent
                        .and_then(|s| serde_json::from_str(&s).ok())
                        .unwrap_or_default(),
                    touched: None,
                },
            );
        }
    }
    let mut rows = NewRows::default();
    let mut events_out = EventRows::default();
    // Per new delivery: (job, event in the job, merged event, zero delay), for the answers.
    let mut made: Vec<(usize, usize, usize, bool)> = Vec::new();
    let mut merged_events: Vec<Event> = Vec::new();
    let mut answers: Vec<Vec<Accepted>> = Vec::with_capacity(jobs.len());
    for (j, (events, jsons, plan)) in jobs.iter().enumerate() {
        let mut job_answers = Vec::with_capacity(events.len());
        for (event, json) in events.iter().zip(jsons.iter()) {
            let key = event.conversion_key();
            let mut none = Vec::new();
            let (prev, sent) = match key.as_ref().and_then(|k| conversions.get_mut(k)) {
                Some(c) => (c.event.take(), &mut c.sent),
                None => (None, &mut none),
            };
            let merged = decide::merge(prev.as_ref(), event);
            let merged_json = match &merged {
                Cow::Owned(m) => to_json(m),
                Cow::Borrowed(_) => json.clone(),
            };
            let decided = decide::deliveries(plan, key.as_deref(), &event.id, &merged, sent);
            let matched: Vec<String> = decided
                .matches
                .iter()
                .map(|m| m.postback_id.clone())
                .collect();
            events_out.id.push(event.id.clone());
            events_out.received_at.push(event.received_at);
            events_out.source.push(event.source.clone());
            events_out.kind.push(event.kind.as_str().to_string());
            events_out.conv_key.push(key.clone());
            events_out.clickid.push(field(&merged, "clickid"));
            events_out
                .transaction_id
                .push(field(&merged, "transaction_id"));
            events_out.offer_id.push(field(&merged, "offer_id"));
            events_out.affiliate_id.push(field(&merged, "affiliate_id"));
            events_out.event.push(json.clone());
            events_out.matched.push(to_json(&matched));
            for new in &decided.deliveries {
                let m = &new.matched;
                rows.event_id.push(event.id.clone());
                rows.postback_id.push(m.postback_id.clone());
                rows.offer.push(m.offer.clone());
                rows.conv_key.push(key.clone());
                rows.order_key.push(new.order_key.clone());
                rows.dedupe_key.push(key.as_ref().map(|k| {
                    format!(
                        "{k}|{}|{}|{}",
                        m.postback_id,
                        m.offer,
                        merged.field("status").unwrap_or_default()
                    )
                }));
                rows.status.push(field(&merged, "status"));
                rows.event.push(merged_json.clone());
                rows.created_at.push(event.received_at);
                rows.due_at
                    .push(event.received_at + m.delay.as_millis() as i64);
                rows.delayed.push(!m.delay.is_zero());
                rows.clickid.push(field(&merged, "clickid"));
                rows.transaction_id.push(field(&merged, "transaction_id"));
                rows.offer_id.push(field(&merged, "offer_id"));
                rows.affiliate_id.push(field(&merged, "affiliate_id"));
                rows.goal.push(field(&merged, "goal"));
                made.push((j, job_answers.len(), merged_events.len(), m.delay.is_zero()));
            }
            job_answers.push(Accepted {
                event_id: event.id.clone(),
                matched,
                queued: 0,
                deliveries: Vec::new(),
                fresh: Vec::new(),
            });
            let merged = merged.into_owned();
            if !decided.deliveries.is_empty() {
                merged_events.push(merged.clone());
            }
            if let Some(c) = key.as_ref().and_then(|k| conversions.get_mut(k)) {
                c.touched = Some((
                    merged.field("status").map(str::to_string),
                    event.received_at,
                ));
                c.json = Some(merged_json);
                c.event = Some(merged);
            }
        }
        answers.push(job_answers);
    }
    let n = made.len() as i64;
    let (_, id_rows, busy_rows) = tokio::try_join!(
        async {
            execute(
                tx,
                &p.insert_events,
                &[
                    &events_out.id,
                    &events_out.received_at,
                    &events_out.source,
                    &events_out.kind,
                    &events_out.conv_key,
                    &events_out.clickid,
                    &events_out.transaction_id,
                    &events_out.offer_id,
                    &events_out.affiliate_id,
                    &events_out.event,
                    &events_out.matched,
                ],
            )
            .await
        },
        // Ids in creation order, so that an order key's deliveries go out as created.
        async {
            if n == 0 {
                return Ok(Vec::new());
            }
            query(tx, &p.next_ids, &[&n]).await
        },
        // Order keys with an unfinished delivery already: new ones wait behind it.
        async {
            if n == 0 {
                return Ok(Vec::new());
            }
            query(tx, &p.busy, &[&rows.order_key]).await
        },
    )?;
    let conversions_update = conversion_rows(&conversions);
    if !made.is_empty() {
        let mut ids: Vec<i64> = id_rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        rows.id = ids;
        let busy: HashSet<String> = busy_rows.iter().map(|r| r.get(0)).collect();
        let mut first_of_key: HashSet<&str> = HashSet::new();
        let mut fresh = Vec::with_capacity(made.len());
        for (i, (_, _, _, now_due)) in made.iter().enumerate() {
            let key = rows.order_key[i].as_str();
            let first = first_of_key.insert(key);
            let go = *now_due && first && !busy.contains(key);
            fresh.push(go);
            rows.lease_owner.push(go.then(|| shared.me.to_string()));
            rows.lease_for.push(go.then_some(shared.lease_ms));
        }
        let (inserted, _) = tokio::try_join!(
            async {
                query(
                    tx,
                    &p.insert_deliveries,
                    &[
                        &rows.id,
                        &rows.event_id,
                        &rows.postback_id,
                        &rows.offer,
                        &rows.conv_key,
                        &rows.order_key,
                        &rows.dedupe_key,
                        &rows.status,
                        &rows.event,
                        &rows.created_at,
                        &rows.due_at,
                        &rows.delayed,
                        &rows.clickid,
                        &rows.transaction_id,
                        &rows.offer_id,
                        &rows.affiliate_id,
                        &rows.goal,
                        &rows.lease_owner,
                        &rows.lease_for,
                    ],
                )
                .await
            },
            update_conversions(tx, p, &conversions_update),
        )?;
        let inserted: HashSet<i64> = inserted.iter().map(|r| r.get(0)).collect();
        for (i, (j, e, m, _)) in made.iter().enumerate() {
            let id = rows.id[i];
            if !inserted.contains(&id) {
                continue;
            }
            let a = &mut answers[*j][*e];
            a.queued += 1;
            a.deliveries.push(id);
            if fresh[i] {
                let plan = jobs[*j].2;
                a.fresh.push(Claimed {
                    id,
                    postback_id: rows.postback_id[i].clone(),
                    offer: rows.offer[i].clone(),
                    event: merged_events[*m].clone(),
                    latest: None,
                    attempts: 0,
                    created_at: rows.created_at[i],
                    delayed: false,
                    orphaned_at: None,
                    destination: destination_of(plan, &rows.postback_id[i]),
                });
            }
        }
    } else {
        update_conversions(tx, p, &conversions_update).await?;
    }
    Ok(answers)
}

/// The conversions the batch changed, column by column: key, status, event, updated_at, sent.
type ConversionRows = (
    Vec<String>,
    Vec<Option<String>>,
    Vec<String>,
    Vec<i64>,
    Vec<String>,
);

fn conversion_rows(conversions: &HashMap<String, Conversion>) -> ConversionRows {
    let mut out: ConversionRows = Default::default();
    for (key, c) in conversions {
        let Some((status, when)) = &c.touched else {
            continue;
        };
        out.0.push(key.clone());
        out.1.push(status.clone());
        out.2.push(c.json.clone().unwrap_or_default());
        out.3.push(*when);
        out.4.push(to_json(&c.sent));
    }
    out
}

async fn update_conversions(
    tx: &Transaction<'_>,
    p: &Prepared,
    c: &ConversionRows,
) -> Result<u64, tokio_postgres::Error> {
    if c.0.is_empty() {
        return Ok(0);
    }
    execute(tx, &p.update_conversions, &[&c.0, &c.1, &c.2, &c.3, &c.4]).await
}

/// Every finish of the batch; per finish, whether a later delivery of its order key waited.
/// The update, the attempts, the notification and the question of who waited are sent
/// together (one round trip): each statement sees the ones before it.
async fn finish(
    tx: &Transaction<'_>,
    p: &Prepared,
    jobs: &[(i64, Option<&Attempt>, &Next, Option<&str>)],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let n = jobs.len();
    let mut ids = Vec::with_capacity(n);
    let mut state = Vec::with_capacity(n);
    let mut bump = Vec::with_capacity(n);
    let mut due: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut now = Vec::with_capacity(n);
    let mut err: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut status: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut outcome: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut orphaned: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut a = AttemptRows::default();
    let mut ended: Vec<i64> = Vec::new();
    for (id, attempt, next, reason) in jobs {
        let f = FinishRow::of(*attempt, next, *reason);
        ids.push(*id);
        state.push(f.state.code());
        bump.push(f.bump);
        due.push(f.due);
        now.push(f.now);
        err.push(f.error);
        status.push(attempt.and_then(|a| a.response_status).map(i64::from));
        outcome.push(f.outcome);
        orphaned.push(f.orphaned);
        if let Some(at) = attempt {
            a.push(*id, at);
        }
        if f.state != State::Pending {
            ended.push(*id);
        }
    }
    let (_, _, _, waiting) = tokio::try_join!(
        async {
            execute(
                tx,
                &p.finish,
                &[
                    &ids, &state, &bump, &due, &now, &err, &status, &outcome, &orphaned,
                ],
            )
            .await
        },
        async {
            if a.delivery_id.is_empty() {
                return Ok(0);
            }
            // Numbered by the delivery's attempt count, just updated; a delivery that is
            // gone (pruned) takes no attempt.
            execute(
                tx,
                &p.insert_attempts,
                &[
                    &a.delivery_id,
                    &a.started_at,
                    &a.duration_ms,
                    &a.method,
                    &a.url,
                    &a.request_body,
                    &a.response_status,
                    &a.response_body,
                    &a.error,
                    &a.outcome,
                    &a.config_version,
                    &a.config_commit,
                ],
            )
            .await
        },
        async {
            if ended.is_empty() {
                return Ok(0);
            }
            // The next delivery of an order key that just ended may now go, from any
            // instance.
            execute(tx, &p.notify_waiting, &[&super::CHANNEL, &ended]).await
        },
        async {
            if ended.is_empty() {
                return Ok(Vec::new());
            }
            query(tx, &p.waiting, &[&ended]).await
        },
    )?;
    let waiting: HashSet<i64> = waiting.iter().map(|r| r.get(0)).collect();
    Ok(jobs.iter().map(|(id, ..)| waiting.contains(id)).collect())
}

#[derive(Default)]
struct AttemptRows<'a> {
    delivery_id: Vec<i64>,
    started_at: Vec<i64>,
    duration_ms: Vec<i64>,
    method: Vec<&'a str>,
    url: Vec<&'a str>,
    request_body: Vec<Option<&'a str>>,
    response_status: Vec<Option<i64>>,
    response_body: Vec<Option<&'a str>>,
    error: Vec<Option<&'a str>>,
    outcome: Vec<&'a str>,
    config_version: Vec<&'a str>,
    config_commit: Vec<Option<&'a str>>,
}

impl<'a> AttemptRows<'a> {
    fn push(&mut self, id: i64, a: &'a Attempt) {
        self.delivery_id.push(id);
        self.started_at.push(a.started_at);
        self.duration_ms.push(a.duration_ms);
        self.method.push(&a.method);
        self.url.push(&a.url);
        self.request_body.push(a.request_body.as_deref());
        self.response_status.push(a.response_status.map(i64::from));
        self.response_body.push(a.response_body.as_deref());
        self.error.push(a.error.as_deref());
        self.outcome.push(&a.outcome);
        self.config_version.push(&a.config_version);
        self.config_commit.push(a.config_commit.as_deref());
    }
}
