//! Reads for the delivery log, on the read-only connection.

use super::State;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// One delivery as the log shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub postback: String,
    pub offer: String,
    pub event_id: String,
    pub state: State,
    pub status: Option<String>,
    pub attempts: u32,
    pub created_at: i64,
    pub due_at: i64,
    pub updated_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub clickid: Option<String>,
    pub transaction_id: Option<String>,
    pub offer_id: Option<String>,
    pub affiliate_id: Option<String>,
    pub goal: Option<String>,
    pub attempt_log: Vec<AttemptRow>,
}

/// One attempt as the log shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub attempt: u32,
    pub started_at: i64,
    pub duration_ms: i64,
    pub method: String,
    pub url: String,
    pub request_body: Option<String>,
    pub response_status: Option<u16>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub outcome: String,
    pub config_version: String,
}

pub(super) fn delivery(c: &Connection, id: i64) -> rusqlite::Result<Option<DeliveryRow>> {
    let row = c
        .prepare_cached(
            "SELECT id, postback_id, offer, event_id, state, status, attempts, created_at, due_at,
                    updated_at, last_status, last_error, clickid, transaction_id, offer_id,
                    affiliate_id, goal
             FROM deliveries WHERE id = ?1",
        )?
        .query_row([id], |r| {
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
                attempt_log: Vec::new(),
            })
        })
        .optional()?;
    let Some(mut row) = row else {
        return Ok(None);
    };
    row.attempt_log = c
        .prepare_cached(
            "SELECT attempt, started_at, duration_ms, method, url, request_body, response_status,
                    response_body, error, outcome, config_version
             FROM attempts WHERE delivery_id = ?1 ORDER BY attempt, id",
        )?
        .query_map(params![id], |r| {
            Ok(AttemptRow {
                attempt: r.get(0)?,
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
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(row))
}
