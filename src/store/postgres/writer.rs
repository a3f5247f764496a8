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
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Transaction;

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
                shared.signals.committed(&mut all);
                let _ = reply.send(Ok(all));
            }
            (Op::Finish { reply, .. }, Ok(Out::Finish(b))) => {
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
    let mut client = shared
        .pool
        .get()
        .await
        .map_err(|e| Failure::Connection(super::describe_pool(&e)))?;
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
    let mut accepted = ingest(shared, tx, &ingests).await?.into_iter();
    let mut unblocked = finish(tx, &finishes).await?.into_iter();
    Ok(batch
        .iter()
        .map(|op| match op {
            Op::Ingest { .. } => Out::Ingest(accepted.next().unwrap_or_default()),
            Op::Finish { .. } => Out::Finish(unblocked.next().unwrap_or(false)),
        })
        .collect())
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
    lease_until: Vec<Option<i64>>,
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
        tx.execute(
            "INSERT INTO conversions (key, updated_at)
             SELECT k, 0 FROM unnest($1::text[]) AS k ORDER BY k
             ON CONFLICT (key) DO NOTHING",
            &[&keys],
        )
        .await?;
        for r in tx
            .query(
                "SELECT key, event, sent FROM conversions WHERE key = ANY($1)
                 ORDER BY key FOR UPDATE",
                &[&keys],
            )
            .await?
        {
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
    let now = crate::now_ms();
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
    tx.execute(
        "INSERT INTO events (id, received_at, source, kind, conv_key, clickid, transaction_id,
                             offer_id, affiliate_id, event, matched)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])",
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
    .await?;
    if !made.is_empty() {
        // Ids in creation order, so that an order key's deliveries go out as created.
        let mut ids: Vec<i64> = tx
            .query(
                "SELECT nextval('deliveries_id_seq') FROM generate_series(1, $1::bigint)",
                &[&(made.len() as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ids.sort_unstable();
        rows.id = ids;
        // Order keys with an unfinished delivery already: new ones wait behind it.
        let busy: HashSet<String> = tx
            .query(
                "SELECT DISTINCT order_key FROM deliveries WHERE state = 0 AND order_key = ANY($1)",
                &[&rows.order_key],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut first_of_key: HashSet<&str> = HashSet::new();
        let lease_until = now + shared.lease_ms;
        let mut fresh = Vec::with_capacity(made.len());
        for (i, (_, _, _, now_due)) in made.iter().enumerate() {
            let key = rows.order_key[i].as_str();
            let first = first_of_key.insert(key);
            let go = *now_due && first && !busy.contains(key);
            fresh.push(go);
            rows.lease_owner.push(go.then(|| shared.me.to_string()));
            rows.lease_until.push(go.then_some(lease_until));
        }
        let inserted: HashSet<i64> = tx
            .query(
                "INSERT INTO deliveries (id, event_id, postback_id, offer, conv_key, order_key,
                     dedupe_key, status, event, state, attempts, created_at, due_at, updated_at,
                     delayed, clickid, transaction_id, offer_id, affiliate_id, goal,
                     lease_owner, lease_until)
                 SELECT u.id, u.event_id, u.postback_id, u.offer, u.conv_key, u.order_key,
                        u.dedupe_key, u.status, u.event, 0, 0, u.created_at, u.due_at,
                        u.created_at, u.delayed, u.clickid, u.transaction_id, u.offer_id,
                        u.affiliate_id, u.goal, u.lease_owner, u.lease_until
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[],
                             $11::bigint[], $12::boolean[], $13::text[], $14::text[],
                             $15::text[], $16::text[], $17::text[], $18::text[], $19::bigint[])
                   AS u(id, event_id, postback_id, offer, conv_key, order_key, dedupe_key,
                        status, event, created_at, due_at, delayed, clickid, transaction_id,
                        offer_id, affiliate_id, goal, lease_owner, lease_until)
                 ON CONFLICT (dedupe_key) DO NOTHING
                 RETURNING id",
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
                    &rows.lease_until,
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
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
    }
    let touched: Vec<(&String, &Conversion)> = conversions
        .iter()
        .filter(|(_, c)| c.touched.is_some())
        .collect();
    if !touched.is_empty() {
        let mut k = Vec::with_capacity(touched.len());
        let mut status = Vec::with_capacity(touched.len());
        let mut event = Vec::with_capacity(touched.len());
        let mut at = Vec::with_capacity(touched.len());
        let mut sent = Vec::with_capacity(touched.len());
        for (key, c) in touched {
            let (st, when) = c.touched.clone().unwrap_or_default();
            k.push(key.clone());
            status.push(st);
            event.push(c.json.clone().unwrap_or_default());
            at.push(when);
            sent.push(to_json(&c.sent));
        }
        tx.execute(
            "UPDATE conversions c SET status = u.status, event = u.event,
                                      updated_at = u.updated_at, sent = u.sent
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])
               AS u(key, status, event, updated_at, sent)
             WHERE c.key = u.key",
            &[&k, &status, &event, &at, &sent],
        )
        .await?;
    }
    Ok(answers)
}

/// Every finish of the batch; per finish, whether a later delivery of its order key waited.
async fn finish(
    tx: &Transaction<'_>,
    jobs: &[(i64, Option<&Attempt>, &Next, Option<&str>)],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(jobs.len());
    let mut state = Vec::with_capacity(jobs.len());
    let mut bump = Vec::with_capacity(jobs.len());
    let mut due: Vec<Option<i64>> = Vec::with_capacity(jobs.len());
    let mut now = Vec::with_capacity(jobs.len());
    let mut err: Vec<Option<&str>> = Vec::with_capacity(jobs.len());
    let mut status: Vec<Option<i64>> = Vec::with_capacity(jobs.len());
    let mut outcome: Vec<Option<&str>> = Vec::with_capacity(jobs.len());
    let mut orphaned: Vec<Option<i64>> = Vec::with_capacity(jobs.len());
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
    }
    let rows = tx
        .query(
            "UPDATE deliveries d SET state = u.state, attempts = d.attempts + u.bump,
                    due_at = COALESCE(u.due, d.due_at), updated_at = u.now,
                    last_error = COALESCE(u.err, d.last_error),
                    last_status = COALESCE(u.status, d.last_status),
                    last_outcome = COALESCE(u.outcome, d.last_outcome),
                    orphaned_at = u.orphaned, lease_owner = NULL, lease_until = NULL
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::text[], $7::bigint[], $8::text[], $9::bigint[])
               AS u(id, state, bump, due, now, err, status, outcome, orphaned)
             WHERE d.id = u.id
             RETURNING d.id, d.attempts, d.order_key",
            &[
                &ids, &state, &bump, &due, &now, &err, &status, &outcome, &orphaned,
            ],
        )
        .await?;
    let mut found: HashMap<i64, (i64, String)> = HashMap::new();
    for r in rows {
        found.insert(r.get(0), (r.get(1), r.get(2)));
    }
    let mut a = AttemptRows::default();
    let mut ended_keys = Vec::new();
    for (id, attempt, next, _) in jobs {
        let Some((n, order_key)) = found.get(id) else {
            continue;
        };
        if let Some(at) = attempt {
            a.push(*id, *n, at);
        }
        if FinishRow::of(None, next, None).state != State::Pending {
            ended_keys.push(order_key.clone());
        }
    }
    if !a.delivery_id.is_empty() {
        tx.execute(
            "INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, method, url,
                                   request_body, response_status, response_body, error, outcome,
                                   config_version, config_commit)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                  $5::text[], $6::text[], $7::text[], $8::bigint[], $9::text[],
                                  $10::text[], $11::text[], $12::text[], $13::text[])",
            &[
                &a.delivery_id,
                &a.attempt,
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
        .await?;
    }
    let waiting: HashSet<String> = if ended_keys.is_empty() {
        HashSet::new()
    } else {
        tx.query(
            "SELECT DISTINCT order_key FROM deliveries WHERE state = 0 AND order_key = ANY($1)",
            &[&ended_keys],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    if !waiting.is_empty() {
        // The next delivery of those order keys may now go, from any instance.
        tx.execute("SELECT pg_notify($1, '')", &[&super::CHANNEL])
            .await?;
    }
    Ok(jobs
        .iter()
        .map(|(id, ..)| found.get(id).is_some_and(|(_, k)| waiting.contains(k)))
        .collect())
}

#[derive(Default)]
struct AttemptRows<'a> {
    delivery_id: Vec<i64>,
    attempt: Vec<i64>,
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
    fn push(&mut self, id: i64, n: i64, a: &'a Attempt) {
        self.delivery_id.push(id);
        self.attempt.push(n);
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
