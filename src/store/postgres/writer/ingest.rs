//! Ingest's writes for a batch: conversions locked in key order, folded with `decide`, then
//! events, deliveries and conversions written with one `unnest` statement each, pipelined.

use super::{execute, query, Prepared};
use crate::ingest::event::Event;
use crate::plan::Plan;
use crate::store::model::destination_of;
use crate::store::postgres::Shared;
use crate::store::{decide, Accepted, Claimed};
use deadpool_postgres::Transaction;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
pub(super) async fn ingest(
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
