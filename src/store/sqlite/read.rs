//! Reads for the delivery log, on the read-only connection.

use crate::store::{
    page, Attempt, AttemptRow, DeliveryQuery, DeliveryRow, EventQuery, EventRow, State,
};
use rusqlite::{params, Connection, OptionalExtension};

/// One delivery and its attempts; only if its postback is one of `postbacks` when given (an
/// affiliate's token sees its own only).
pub(super) fn delivery(
    c: &Connection,
    id: i64,
    postbacks: Option<&[String]>,
) -> rusqlite::Result<Option<DeliveryRow>> {
    let scope = postbacks.map(|p| serde_json::to_string(p).unwrap_or_else(|_| "[]".into()));
    let row = c
        .prepare_cached(
            "SELECT id, postback_id, offer, event_id, state, status, attempts, created_at, due_at,
                    updated_at, last_status, last_error, clickid, transaction_id, offer_id,
                    affiliate_id, goal, last_outcome, orphaned_at
             FROM deliveries WHERE id = ?1
               AND (?2 IS NULL OR postback_id IN (SELECT value FROM json_each(?2)))",
        )?
        .query_row(params![id, scope], delivery_row)
        .optional()?;
    let Some(mut row) = row else {
        return Ok(None);
    };
    row.attempt_log = c
        .prepare_cached(
            "SELECT attempt, started_at, duration_ms, method, url, request_body, response_status,
                    response_body, error, outcome, config_version, config_commit
             FROM attempts WHERE delivery_id = ?1 ORDER BY attempt, id",
        )?
        .query_map(params![id], |r| {
            Ok(AttemptRow {
                attempt: r.get(0)?,
                recorded: Attempt {
                    started_at: r.get(1)?,
                    duration_ms: r.get(2)?,
                    method: r.get(3)?,
                    url: r.get(4)?,
                    request_body: r.get(5)?,
                    response_status: r.get(6)?,
                    response_body: r.get(7)?,
                    error: r.get(8)?,
                    outcome: r.get(9)?,
                    config_version: r.get(10)?,
                    config_commit: r.get(11)?,
                },
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(row))
}

const DELIVERY_COLUMNS: &str =
    "id, postback_id, offer, event_id, state, status, attempts, created_at, due_at,
    updated_at, last_status, last_error, clickid, transaction_id, offer_id, affiliate_id, goal,
    last_outcome, orphaned_at";

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: r.get(0)?,
        postback: r.get(1)?,
        offer: r.get(2)?,
        event_id: r.get(3)?,
        state: State::from_code(r.get(4)?),
        status: r.get(5)?,
        attempts: r.get(6)?,
        created_at: r.get(7)?,
        due_at: r.get(8)?,
        updated_at: r.get(9)?,
        last_status: r.get(10)?,
        last_error: r.get(11)?,
        clickid: r.get(12)?,
        transaction_id: r.get(13)?,
        offer_id: r.get(14)?,
        affiliate_id: r.get(15)?,
        goal: r.get(16)?,
        last_outcome: r.get(17)?,
        orphaned_at: r.get(18)?,
        attempt_log: Vec::new(),
    })
}

/// A page of deliveries, newest first, and the cursor of the next page if there is one.
pub(super) fn deliveries(
    c: &Connection,
    q: &DeliveryQuery,
) -> rusqlite::Result<(Vec<DeliveryRow>, Option<i64>)> {
    let mut sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE 1 = 1");
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    // `clause` holds one `?`, which becomes this value's parameter number.
    let mut cond = |sql: &mut String, clause: &str, v: &Option<String>| {
        if let Some(v) = v {
            args.push(Box::new(v.clone()));
            sql.push_str(" AND ");
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        }
    };
    cond(&mut sql, "offer_id = ?", &q.offer);
    cond(&mut sql, "affiliate_id = ?", &q.affiliate);
    cond(&mut sql, "goal = ?", &q.goal);
    cond(&mut sql, "status = ?", &q.status);
    cond(&mut sql, "last_outcome = ?", &q.outcome);
    // Through the delivery's event, which carries the same merged ids and is found by them
    // (`ids.rs`).
    for (columns, v) in [
        (&["transaction_id"][..], &q.transaction_id),
        (&["clickid"][..], &q.clickid),
        (&["transaction_id", "clickid"][..], &q.id),
    ] {
        if let Some(v) = v {
            args.push(Box::new(v.clone()));
            sql.push_str(&format!(
                " AND event_id IN (SELECT e.id FROM events e WHERE {})",
                super::ids::matches(columns, args.len())
            ));
        }
    }
    if let Some(p) = &q.postbacks {
        args.push(Box::new(serde_json::to_string(p).unwrap_or_default()));
        sql.push_str(&format!(
            " AND postback_id IN (SELECT value FROM json_each(?{}))",
            args.len()
        ));
    }
    for (col, op, v) in [
        ("state", "=", q.state.map(State::code)),
        ("created_at", ">=", q.since),
        ("created_at", "<", q.until),
        ("id", "<", q.before_id),
    ] {
        if let Some(v) = v {
            args.push(Box::new(v));
            sql.push_str(&format!(" AND {col} {op} ?{}", args.len()));
        }
    }
    let limit = q.limit.clamp(1, 1000);
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
    let mut st = c.prepare(&sql)?;
    let rows: Vec<DeliveryRow> = st
        .query_map(
            rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
            delivery_row,
        )?
        .collect::<Result<_, _>>()?;
    Ok(page(rows, limit, |r| r.id))
}

/// How many deliveries each postback made since `since`, by state (see
/// [`crate::store::Backend::made_since`]).
pub(super) fn made_since(
    c: &Connection,
    since: i64,
) -> rusqlite::Result<Vec<(String, State, i64)>> {
    let (lo, hi): (Option<i64>, Option<i64>) =
        c.query_row("SELECT MIN(id), MAX(id) FROM deliveries", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let (Some(mut lo), Some(mut hi)) = (lo, hi) else {
        return Ok(Vec::new());
    };
    let mut probe = c.prepare_cached(
        "SELECT id, created_at FROM deliveries WHERE id >= ?1 ORDER BY id LIMIT 1",
    )?;
    // The smallest id whose delivery was made at or after `since`.
    hi += 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let found: Option<(i64, i64)> = probe
            .query_row([mid], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match found {
            Some((_, at)) if at < since => lo = mid + 1,
            _ => hi = mid,
        }
    }
    c.prepare_cached(
        "SELECT postback_id, state, COUNT(*) FROM deliveries WHERE id >= ?1
         GROUP BY postback_id, state",
    )?
    .query_map([lo], |r| {
        Ok((r.get(0)?, State::from_code(r.get(1)?), r.get(2)?))
    })?
    .collect()
}

/// A page of refused webhooks, newest first, and the next page's cursor.
pub(super) fn refused(
    c: &Connection,
    before_id: Option<i64>,
    limit: usize,
) -> rusqlite::Result<(Vec<crate::store::Refused>, Option<i64>)> {
    let limit = limit.clamp(1, 1000);
    let rows = c
        .prepare_cached(
            "SELECT id, at, source, reason, status, message, method, target, client
             FROM refused WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2",
        )?
        .query_map(params![before_id, (limit + 1) as i64], |r| {
            Ok(crate::store::Refused {
                id: r.get(0)?,
                at: r.get(1)?,
                source: r.get(2)?,
                reason: r.get(3)?,
                status: r.get(4)?,
                message: r.get(5)?,
                method: r.get(6)?,
                target: r.get(7)?,
                client: r.get(8)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(page(rows, limit, |r| r.id))
}

/// A page of received events, newest first, and the next page's cursor.
pub(super) fn events(
    c: &Connection,
    q: &EventQuery,
) -> rusqlite::Result<(Vec<EventRow>, Option<i64>)> {
    let mut sql = String::from(
        "SELECT e.rowid, e.id, e.received_at, e.source, e.kind, e.clickid, e.transaction_id,
                e.offer_id, e.affiliate_id, e.event, e.matched FROM events e WHERE 1 = 1",
    );
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    for (col, v) in [
        ("source", &q.source),
        ("kind", &q.kind),
        ("offer_id", &q.offer),
        ("affiliate_id", &q.affiliate),
    ] {
        if let Some(v) = v {
            args.push(Box::new(v.clone()));
            sql.push_str(&format!(" AND e.{col} = ?{}", args.len()));
        }
    }
    for (columns, v) in [
        (&["clickid"][..], &q.clickid),
        (&["transaction_id"][..], &q.transaction_id),
        (&["transaction_id", "clickid"][..], &q.id),
    ] {
        if let Some(v) = v {
            args.push(Box::new(v.clone()));
            let n = args.len();
            sql.push_str(&format!(" AND {}", super::ids::matches(columns, n)));
        }
    }
    for (col, op, v) in [
        ("received_at", ">=", q.since),
        ("received_at", "<", q.until),
        ("rowid", "<", q.before_rowid),
    ] {
        if let Some(v) = v {
            args.push(Box::new(v));
            sql.push_str(&format!(" AND e.{col} {op} ?{}", args.len()));
        }
    }
    let limit = q.limit.clamp(1, 1000);
    sql.push_str(&format!(" ORDER BY e.rowid DESC LIMIT {}", limit + 1));
    let mut st = c.prepare(&sql)?;
    let rows: Vec<(i64, EventRow)> = st
        .query_map(
            rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
            |r| {
                let event: String = r.get(9)?;
                let matched: String = r.get(10)?;
                Ok((
                    r.get(0)?,
                    EventRow {
                        id: r.get(1)?,
                        received_at: r.get(2)?,
                        source: r.get(3)?,
                        kind: r.get(4)?,
                        clickid: r.get(5)?,
                        transaction_id: r.get(6)?,
                        offer_id: r.get(7)?,
                        affiliate_id: r.get(8)?,
                        event: serde_json::from_str(&event).unwrap_or_default(),
                        matched: serde_json::from_str(&matched).unwrap_or_default(),
                    },
                ))
            },
        )?
        .collect::<Result<_, _>>()?;
    let (rows, next) = page(rows, limit, |r| r.0);
    Ok((rows.into_iter().map(|r| r.1).collect(), next))
}
