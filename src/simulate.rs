//! What an event would do, without the store or the network: which postbacks fire and the
//! exact requests they would send. Rule tests, `postbackd fire`, `postbackd diff` and
//! `POST /api/v1/test` all use it, so what they show is what the daemon does.

use crate::actions::{Message, Rendered};
use crate::ingest::event::Event;
use crate::plan::Plan;
use crate::store::decide;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;

/// One postback an event fires. The message is the real one, secrets included; its
/// [`Rendered::shown`] form is what [`describe`] and [`FiredJson::new`] show.
#[derive(Debug, Clone)]
pub struct Fired {
    pub postback: String,
    /// Its action's kind (`http`, `email`, `slack`…).
    pub kind: &'static str,
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
                kind: plan.postbacks[entry.postback].action.kind(),
                postback: m.postback_id,
                offer: m.offer,
                delay: m.delay,
                request: plan
                    .render(entry, &merged, merged.received_at)
                    .map_err(|e| e.to_string()),
            }
        })
        .collect()
}

/// A message as text people read: method and URL (or `SMTP` and the relay), headers, a
/// blank line, the body (and a mail's HTML part). Give it the shown form, where secrets are
/// masked.
pub fn describe(m: &Message) -> String {
    let mut out = format!("{} {}", m.method(), m.target());
    for (k, v) in m.headers() {
        out.push_str(&format!("\n{k}: {v}"));
    }
    if let Some(b) = m.body().filter(|b| !b.is_empty()) {
        out.push_str("\n\n");
        out.push_str(&String::from_utf8_lossy(b));
    }
    if let Some(h) = m.html() {
        out.push_str("\n\n--- html ---\n");
        out.push_str(h);
    }
    out
}

/// A fired postback as JSON (for the API and `fire --json`).
#[derive(Debug, Serialize)]
pub struct FiredJson {
    pub postback: String,
    pub kind: &'static str,
    pub offer: String,
    pub delay_ms: u64,
    pub request: Value,
}

/// A message as JSON: method, url (or relay), headers as pairs, body, and a mail's HTML
/// body. A JSON body is also given parsed, as `json`.
pub fn message_json(m: &Message) -> Value {
    let body = m.body().map(|b| String::from_utf8_lossy(b).into_owned());
    let mut v = json!({
        "method": m.method(),
        "url": m.target(),
        "headers": m.headers().iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "body": body,
    });
    if let Some(j) = body
        .as_deref()
        .and_then(|b| serde_json::from_str::<Value>(b).ok())
    {
        if j.is_object() || j.is_array() {
            v["json"] = j;
        }
    }
    if let Some(h) = m.html() {
        v["html"] = h.into();
    }
    v
}

impl FiredJson {
    /// Secrets are masked.
    pub fn new(f: &Fired) -> Self {
        FiredJson {
            postback: f.postback.clone(),
            kind: f.kind,
            offer: f.offer.clone(),
            delay_ms: f.delay.as_millis() as u64,
            request: match f.request.as_ref().map(Rendered::shown) {
                Ok(m) => message_json(m),
                Err(e) => json!({ "error": e }),
            },
        }
    }
}
