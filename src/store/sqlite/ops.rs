//! The store's statements: what each command does inside the writer's transaction.

use crate::ingest::event::Event;
use crate::plan::Plan;
use crate::store::model::destination_of;
use crate::store::{
    decide, take, Accepted, Attempt, Candidate, Claim, ClaimSpec, Claimed, FinishRow, Lane, Next,
    RetryFilter, State,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::borrow::Cow;

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// `event_json` is `event` serialised, done before the job reaches the writer thread.
pub(super) fn ingest(
    c: &Connection,
    event: &Event,
    event_json: &str,
    plan: &Plan,
) -> rusqlite::Result<Accepted> {
    let key = event.conversion_key();
    // The conversion so far: its merged event, and what it has already queued.
    let earlier: Option<(String, Option<String>)> = match &key {
        Some(k) => c
            .prepare_cached("SELECT event, sent FROM conversions WHERE key = ?1")?
            .query_row([k], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?,
        None => None,
    };
    let (prev, mut sent) = match earlier {
        Some((e, sent)) => (
            serde_json::from_str::<Event>(&e).ok(),
            sent.and_then(|s| serde_json::from_str::<Vec<String>>(&s).ok())
                .unwrap_or_default(),
        ),
        None => (None, Vec::new()),
    };
    let merged = decide::merge(prev.as_ref(), event);
    let merged_json = match &merged {
        Cow::Owned(m) => Cow::Owned(to_json(m)),
        Cow::Borrowed(_) => Cow::Borrowed(event_json),
    };
    let decided = decide::deliveries(plan, key.as_deref(), &event.id, &merged, &mut sent);
    let matched: Vec<String> = decided
        .matches
        .iter()
        .map(|m| m.postback_id.clone())
        .collect();
    c.prepare_cached(&format!("INSERT INTO events (rowid, id, received_at, source, kind, conv_key, clickid, transaction_id, offer_id, affiliate_id, event, matched)
         VALUES ({}, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)", super::ids::NEXT_ROWID))?.execute(
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
            event_json,
            to_json(&matched),
        ],
    )?;
    let mut queued = 0;
    let mut deliveries = Vec::new();
    let mut fresh = Vec::new();
    for new in &decided.deliveries {
        let (m, order_key) = (&new.matched, &new.order_key);
        let due = event.received_at + m.delay.as_millis() as i64;
        let n = c.prepare_cached("INSERT INTO deliveries (event_id, postback_id, offer, conv_key, order_key, status, event, state, attempts, created_at, due_at, updated_at, delayed,
                                               clickid, transaction_id, offer_id, affiliate_id, goal)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, 0, ?8, ?9, ?8, ?10, ?11, ?12, ?13, ?14, ?15)")?.execute(
                        params![
                event.id,
                m.postback_id,
                m.offer,
                key,
                order_key,
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
        if n == 1 {
            let id = c.last_insert_rowid();
            deliveries.push(id);
            // Due now and not behind an unfinished delivery of the same order key: the
            // dispatcher can start it without a claim.
            let go_now = m.delay.is_zero()
                && !c
                    .prepare_cached(BEHIND)?
                    .query_row(params![order_key, id], |r| r.get::<_, bool>(0))?;
            if go_now {
                fresh.push(Claimed {
                    id,
                    postback_id: m.postback_id.clone(),
                    offer: m.offer.clone(),
                    event: merged.as_ref().clone(),
                    latest: None,
                    attempts: 0,
                    created_at: event.received_at,
                    delayed: false,
                    orphaned_at: None,
                    destination: destination_of(plan, &m.postback_id),
                });
            }
        }
        queued += n;
    }
    if let Some(k) = &key {
        c.prepare_cached("INSERT INTO conversions (key, status, event, updated_at, sent) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(key) DO UPDATE SET status = excluded.status, event = excluded.event,
                                            updated_at = excluded.updated_at, sent = excluded.sent")?
            .execute(params![k, merged.field("status"), merged_json, event.received_at, to_json(&sent)])?;
    }
    Ok(Accepted {
        event_id: event.id.clone(),
        matched,
        queued,
        deliveries,
        fresh,
    })
}

/// Whether an unfinished delivery of the same order key came before delivery `?2`.
const BEHIND: &str = "SELECT EXISTS (SELECT 1 FROM deliveries
                                     WHERE order_key = ?1 AND id < ?2 AND state = 0)";

/// Whether a pending delivery of the same order key waits behind delivery `?1`.
const UNBLOCKS: &str = "SELECT EXISTS (SELECT 1 FROM deliveries n
    WHERE n.order_key = (SELECT order_key FROM deliveries WHERE id = ?1)
      AND n.id > ?1 AND n.state = 0)";

const NEXT_DUE: &str = "SELECT MIN(
    (SELECT MIN(due_at) FROM deliveries WHERE state = 0 AND (attempts > 0) = 0 AND due_at > ?1),
    (SELECT MIN(due_at) FROM deliveries WHERE state = 0 AND (attempts > 0) = 1 AND due_at > ?1))";

const PRUNE_DELIVERIES: &str =
    "SELECT id FROM deliveries WHERE state IN (2, 3, 4) AND updated_at < ?1 LIMIT ?2";

const PRUNE_EVENTS: &str =
    "SELECT rowid, transaction_id, clickid FROM events e WHERE received_at < ?1
       AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
     LIMIT ?2";

/// The statements that run per webhook, per attempt or over the whole queue: each must
/// find its deliveries through an index (checked in the schema's tests).
#[cfg(test)]
pub(super) const INDEXED: &[&str] = &[
    BEHIND,
    UNBLOCKS,
    NEXT_DUE,
    PRUNE_DELIVERIES,
    PRUNE_EVENTS,
    CLAIM_FRESH,
    CLAIM_RETRY,
    REVIVE,
    super::QUEUE_STATS,
    "SELECT rowid, transaction_id, clickid FROM events WHERE rowid > ?1 AND rowid <= ?2",
];

pub(super) fn claim(c: &Connection, spec: &ClaimSpec) -> rusqlite::Result<Claim> {
    let sql = match spec.lane {
        Lane::Fresh => CLAIM_FRESH,
        Lane::Retry => CLAIM_RETRY,
        Lane::Any => CLAIM_ANY,
    };
    let mut st = c.prepare_cached(sql)?;
    let held = to_json(&*spec.held);
    let rows = st.query_map(
        params![spec.now, to_json(&spec.blocked()), spec.scan(), held],
        |r| {
            Ok(Candidate {
                id: r.get(0)?,
                postback_id: r.get(1)?,
                offer: r.get(2)?,
                event: r.get(3)?,
                attempts: r.get(4)?,
                created_at: r.get(5)?,
                delayed: r.get(6)?,
                latest: r.get(7)?,
                orphaned_at: r.get(8)?,
            })
        },
    )?;
    // A claim here is a read: what it read and did not take is simply not held.
    Ok(take(spec, rows, false)?.0)
}

macro_rules! claim_sql {
    ($lane:literal) => {
        concat!(
            "SELECT d.id, d.postback_id, d.offer, d.event, d.attempts, d.created_at, d.delayed,
                    CASE WHEN d.delayed AND d.attempts = 0
                         THEN (SELECT event FROM conversions WHERE key = d.conv_key) END,
                    d.orphaned_at
             FROM deliveries d
             WHERE d.state = 0 AND d.due_at <= ?1 ",
            $lane,
            " AND d.id NOT IN (SELECT value FROM json_each(?4))
               AND d.postback_id NOT IN (SELECT value FROM json_each(?2))
               AND NOT EXISTS (SELECT 1 FROM deliveries p
                               WHERE p.order_key = d.order_key AND p.id < d.id AND p.state = 0)
             ORDER BY d.due_at, d.id
             LIMIT ?3"
        )
    };
}
// `(attempts > 0) = …` and `state = 0` are written to match the `deliveries_pending` index:
// its expression and the condition of the partial index.
const CLAIM_FRESH: &str = claim_sql!("AND (d.attempts > 0) = 0");
const CLAIM_RETRY: &str = claim_sql!("AND (d.attempts > 0) = 1");
const CLAIM_ANY: &str = claim_sql!("");

/// Records an attempt and the delivery's next state. Returns whether a later delivery of
/// the same order key was waiting for this one to finish (and can now be claimed).
pub(super) fn finish(
    c: &Connection,
    id: i64,
    attempt: Option<&Attempt>,
    next: &Next,
    reason: Option<&str>,
) -> rusqlite::Result<bool> {
    let f = FinishRow::of(attempt, next, reason);
    c.prepare_cached("UPDATE deliveries SET state = ?2, attempts = attempts + ?3, due_at = COALESCE(?4, due_at), updated_at = ?5,
                last_error = COALESCE(?6, last_error), last_status = COALESCE(?7, last_status),
                last_outcome = COALESCE(?8, last_outcome), orphaned_at = ?9
         WHERE id = ?1")?.execute(
                params![
            id,
            f.state.code(),
            f.bump,
            f.due,
            f.now,
            f.error,
            attempt.and_then(|a| a.response_status),
            f.outcome,
            f.orphaned,
        ],
    )?;
    if let Some(a) = attempt {
        c.prepare_cached("INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, method, url, request_body, response_status, response_body, error, outcome, config_version, config_commit)
             VALUES (?1, (SELECT attempts FROM deliveries WHERE id = ?1), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)")?.execute(
                        params![id, a.started_at, a.duration_ms, a.method, a.url, a.request_body, a.response_status, a.response_body, a.error, a.outcome, a.config_version, a.config_commit],
        )?;
    }
    if f.state == State::Pending {
        return Ok(false);
    }
    c.prepare_cached(UNBLOCKS)?.query_row([id], |r| r.get(0))
}

/// Deletes up to `limit` finished deliveries (with their attempts), events and conversions
/// last touched before `before`. Returns how many rows went; the caller repeats while that
/// is `limit`, so a large prune never holds the writer for long.
pub(super) fn prune(c: &Connection, before: i64, limit: usize) -> rusqlite::Result<usize> {
    let ids: Vec<i64> = c
        .prepare_cached(PRUNE_DELIVERIES)?
        .query_map(params![before, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut del_attempts = c.prepare_cached("DELETE FROM attempts WHERE delivery_id = ?1")?;
    let mut del_delivery = c.prepare_cached("DELETE FROM deliveries WHERE id = ?1")?;
    for id in &ids {
        del_attempts.execute([id])?;
        del_delivery.execute([id])?;
    }
    // An event stays while a delivery it made is kept: the log finds deliveries by the
    // ids on their event.
    let events: Vec<super::ids::Pruned> = c
        .prepare_cached(PRUNE_EVENTS)?
        .query_map(params![before, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    super::ids::forget(c, &events)?;
    let mut del_event = c.prepare_cached("DELETE FROM events WHERE rowid = ?1")?;
    for (rowid, ..) in &events {
        del_event.execute([rowid])?;
    }
    let events = events.len();
    let conversions = c
        .prepare_cached(
            // A conversion stays while any of its deliveries is unfinished: its `sent`
            // list is the dedupe, and without it a repeated status would fire again.
            // Pending deliveries' order keys start with the conversion key and `|`.
            "DELETE FROM conversions WHERE key IN
               (SELECT key FROM conversions c WHERE updated_at < ?1
                  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.state = 0
                       AND d.order_key >= c.key || '|' AND d.order_key < c.key || '}')
                LIMIT ?2)",
        )?
        .execute(params![before, limit as i64])?;
    // Refused webhooks: past retention, and beyond the newest REFUSED_KEPT.
    let refused = c
        .prepare_cached(
            "DELETE FROM refused WHERE id IN
               (SELECT id FROM refused WHERE at < ?1
                   OR id <= (SELECT id FROM refused ORDER BY id DESC LIMIT 1 OFFSET ?3)
                LIMIT ?2)",
        )?
        .execute(params![before, limit as i64, crate::store::REFUSED_KEPT])?;
    Ok(ids.len().max(events).max(conversions).max(refused))
}

/// Keeps a refused webhook.
pub(super) fn refuse(c: &Connection, r: &crate::store::Refused) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO refused (at, source, reason, status, message, method, target, client)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        r.at, r.source, r.reason, r.status, r.message, r.method, r.target, r.client
    ])?;
    Ok(())
}

/// Puts matching finished deliveries back in the queue, due now. Returns their ids.
pub(super) fn retry(c: &Connection, f: &RetryFilter, now: i64) -> rusqlite::Result<Vec<i64>> {
    let Some(state) = f.finished_state() else {
        return Ok(Vec::new());
    };
    let ids: Vec<i64> = c
        .prepare_cached(
            "SELECT id FROM deliveries
             WHERE state IN (2, 3, 4)
               AND (?1 IS NULL OR id = ?1)
               AND (?1 IS NOT NULL OR state = ?2)
               AND (?3 IS NULL OR postback_id = ?3)
               AND (?4 IS NULL OR created_at >= ?4)
               AND (?5 IS NULL OR created_at < ?5)",
        )?
        .query_map(
            params![f.id, state.code(), f.postback, f.since, f.until],
            |r| r.get(0),
        )?
        .collect::<Result<_, _>>()?;
    let mut upd = c.prepare_cached(
        "UPDATE deliveries SET state = 0, due_at = ?2, updated_at = ?2,
                last_error = 'queued again by hand' WHERE id = ?1",
    )?;
    for id in &ids {
        upd.execute(params![id, now])?;
    }
    Ok(ids)
}

/// Makes orphaned deliveries of the postbacks in `postbacks` (a JSON list of ids) due at
/// `now`. Returns how many.
pub(super) fn revive(c: &Connection, postbacks: &str, now: i64) -> rusqlite::Result<usize> {
    c.prepare_cached(REVIVE)?.execute(params![postbacks, now])
}

const REVIVE: &str = "UPDATE deliveries SET due_at = ?2
     WHERE state = 0 AND orphaned_at IS NOT NULL AND due_at > ?2
       AND postback_id IN (SELECT value FROM json_each(?1))";

/// When the next pending delivery falls due after `after` (unix ms), if any. One look per
/// lane, each the first entry past `after` in `deliveries_pending`.
pub(super) fn next_due(c: &Connection, after: i64) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached(NEXT_DUE)?.query_row([after], |r| r.get(0))
}

/// Rewrites one row, so that a commit proves the disk takes writes.
pub(super) fn heartbeat(c: &Connection, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO heartbeat (id, at) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET at = excluded.at")?
        .execute([now])?;
    Ok(())
}
