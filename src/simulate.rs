//! What an event would do, without the store or the network: which postbacks fire and the
//! exact requests they would send. Rule tests, `postbackd fire`, `postbackd diff` and
//! `POST /api/v1/test` all use it, so what they show is what the daemon does.

use crate::ingest::event::Event;
use crate::plan::Plan;
use crate::render::{self, Rendered, Request};
use crate::store::decide;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;

/// One postback an event fires. The request is the real one, secrets included; its
/// [`Rendered::shown`] form is what [`describe`] and [`FiredJson::new`] show.
#[derive(Debug, Clone)]
pub struct Fired {
    pub postback: String,
    pub offer: String,
    pub delay: Duration,
    pub request: Result<Rendered, String>,
}

/// Folds `history` (earlier events of the same conversion, oldest first, then the event
/// itself) the way the store does, and returns what the last one fires: the same merge and
/// the same per-status dedupe as ingest ([`decide`]), so a status the history already sent
/// fires nothing again.
pub fn simulate(plan: &Plan, history: &[Event]) -> Vec<Fired> {
    let mut merged: Option<Event> = None;
    let mut sent = Vec::new();
    let mut last = None;
    for e in history {
        let key = e.conversion_key();
        let prev = merged
            .as_ref()
            .filter(|m| key.is_some() && m.conversion_key() == key);
        if prev.is_none() {
            sent.clear();
        }
        let next = decide::merge(prev, e).into_owned();
        last = Some(decide::deliveries(
            plan,
            key.as_deref(),
            &e.id,
            &next,
            &mut sent,
        ));
        merged = Some(next);
    }
    let (Some(merged), Some(decided)) = (merged, last) else {
        return Vec::new();
    };
    decided
        .deliveries
        .into_iter()
        .map(|d| {
            let m = d.matched;
            let entry = &plan.entries[m.entry];
            Fired {
                postback: m.postback_id,
                offer: m.offer,
                delay: m.delay,
                request: render::render(plan, entry, &merged).map_err(|e| e.to_string()),
            }
        })
        .collect()
}

/// A request as text people read: method and URL, headers, a blank line, the body. Give it
/// the shown form of a request, where secrets are masked.
pub fn describe(r: &Request) -> String {
    let mut out = format!("{} {}", r.method.as_str(), r.url);
    for (k, v) in &r.headers {
        out.push_str(&format!("\n{k}: {v}"));
    }
    if let Some(b) = r.body.as_ref().filter(|b| !b.is_empty()) {
        out.push_str("\n\n");
        out.push_str(&String::from_utf8_lossy(b));
    }
    out
}

/// A fired postback as JSON (for the API and `fire --json`).
#[derive(Debug, Serialize)]
pub struct FiredJson {
    pub postback: String,
    pub offer: String,
    pub delay_ms: u64,
    pub request: Value,
}

impl FiredJson {
    /// Secrets are masked.
    pub fn new(f: &Fired) -> Self {
        let request = f.request.as_ref().map(Rendered::shown);
        FiredJson {
            postback: f.postback.clone(),
            offer: f.offer.clone(),
            delay_ms: f.delay.as_millis() as u64,
            request: match &request {
                Ok(r) => json!({
                    "method": r.method.as_str(),
                    "url": r.url,
                    "headers": r.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                    "body": r.body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
                }),
                Err(e) => json!({ "error": e }),
            },
        }
    }
}
