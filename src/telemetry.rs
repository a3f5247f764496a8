//! Prometheus metrics, served at `/metrics`.
//!
//! Counters and histograms go through the `metrics` facade; every labelled series exists at
//! zero from the start (and for each postback a reload adds), so `rate()` and alerts work
//! on a fresh daemon. State that is read rather than counted (the queue, the store, the
//! config version) is computed at scrape time and appended to the exposition.
//!
//! Labels are bounded: postback ids and source ids come from the config, the rest from
//! fixed lists. A URL, a click id or an error text is never a label.

use crate::plan::Plan;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::sync::OnceLock;

pub const EVENTS: &str = "postbackd_events_received_total";
pub const MATCHED: &str = "postbackd_postbacks_matched_total";
pub const DELIVERIES: &str = "postbackd_deliveries_total";
pub const ATTEMPTS: &str = "postbackd_attempts_total";
pub const ATTEMPT_SECONDS: &str = "postbackd_attempt_duration_seconds";
pub const LATENCY_SECONDS: &str = "postbackd_delivery_latency_seconds";
pub const RELOADS: &str = "postbackd_config_reloads_total";

/// Results of an incoming event.
pub const EVENT_RESULTS: [&str; 5] = [
    "accepted",
    "invalid",
    "unauthorized",
    "unknown_source",
    "unavailable",
];
pub const KINDS: [&str; 3] = ["click", "impression", "conversion"];
/// Final outcomes of a delivery.
pub const FINAL: [&str; 3] = ["delivered", "dead", "cancelled"];
/// Result classes of an attempt.
pub const RESULTS: [&str; 10] = [
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "timeout",
    "connect",
    "tls",
    "body_rejected",
    "render_error",
    "error",
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process and returns the handle that renders it.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let attempt = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let latency = [
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ATTEMPT_SECONDS.into()), &attempt)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(LATENCY_SECONDS.into()), &latency)
                });
            let handle = builder.ok()?.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        EVENTS,
        "Webhooks received, by source, event kind and result."
    );
    describe_counter!(MATCHED, "Times an accepted event matched a postback.");
    describe_counter!(
        DELIVERIES,
        "Deliveries finished, by postback and final outcome (delivered, dead, cancelled)."
    );
    describe_counter!(ATTEMPTS, "Delivery attempts, by postback and result class.");
    describe_histogram!(
        ATTEMPT_SECONDS,
        Unit::Seconds,
        "How long one attempt took, by postback."
    );
    describe_histogram!(
        LATENCY_SECONDS,
        Unit::Seconds,
        "From the webhook's arrival to the postback's delivery (holds included), by postback."
    );
    describe_counter!(RELOADS, "Config reloads, by result (success, failure).");
}

/// Creates every series the plan's sources and postbacks can have, at zero.
pub fn register_plan(plan: &Plan) {
    let mut sources: Vec<String> = plan.sources.keys().cloned().collect();
    for s in ["default", "unknown"] {
        if !sources.iter().any(|x| x == s) {
            sources.push(s.to_string());
        }
    }
    for s in &sources {
        for k in KINDS {
            for r in EVENT_RESULTS {
                metrics::counter!(EVENTS, "source" => s.clone(), "kind" => k, "result" => r)
                    .increment(0);
            }
        }
    }
    for p in &plan.postbacks {
        metrics::counter!(MATCHED, "postback" => p.id.clone()).increment(0);
        for o in FINAL {
            metrics::counter!(DELIVERIES, "postback" => p.id.clone(), "outcome" => o).increment(0);
        }
        for r in RESULTS {
            metrics::counter!(ATTEMPTS, "postback" => p.id.clone(), "result" => r).increment(0);
        }
    }
    for r in ["success", "failure"] {
        metrics::counter!(RELOADS, "result" => r).increment(0);
    }
}

/// The result of `n` incoming events.
pub fn events(source: &str, kind: &str, result: &'static str, n: u64) {
    metrics::counter!(EVENTS, "source" => source.to_string(), "kind" => kind.to_string(), "result" => result)
        .increment(n);
}

/// An incoming event's result.
pub fn event(source: &str, kind: &str, result: &'static str) {
    events(source, kind, result, 1);
}

/// What the store and the config look like at scrape time.
#[derive(Debug, Default)]
pub struct State {
    pub pending: i64,
    pub retries_waiting: i64,
    pub oldest_pending_age_seconds: f64,
    pub store_writable: bool,
    pub config_version: String,
    pub config_commit: String,
    pub last_reload_ok: bool,
    pub last_success_seconds: f64,
    pub start_seconds: f64,
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name}{labels} {value}");
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition: the recorder's series, then the state gauges.
pub fn render(handle: Option<&PrometheusHandle>, s: &State) -> String {
    let mut out = handle.map(|h| h.render()).unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    gauge(
        &mut out,
        "postbackd_queue_pending",
        "Deliveries not yet finished (waiting, held or in flight).",
        "",
        s.pending as f64,
    );
    gauge(
        &mut out,
        "postbackd_retries_waiting",
        "Unfinished deliveries that have failed at least once.",
        "",
        s.retries_waiting as f64,
    );
    gauge(
        &mut out,
        "postbackd_queue_oldest_pending_age_seconds",
        "Age of the oldest unfinished delivery (0 when there is none).",
        "",
        s.oldest_pending_age_seconds,
    );
    gauge(
        &mut out,
        "postbackd_store_writable",
        "1 when the last write to the store succeeded.",
        "",
        b(s.store_writable),
    );
    gauge(
        &mut out,
        "postbackd_config_info",
        "The running config: its content hash and git commit.",
        &format!(
            "{{version=\"{}\",commit=\"{}\"}}",
            label(&s.config_version),
            label(&s.config_commit)
        ),
        1.0,
    );
    gauge(
        &mut out,
        "postbackd_config_last_reload_successful",
        "1 when the last reload (or the start) loaded the config.",
        "",
        b(s.last_reload_ok),
    );
    gauge(
        &mut out,
        "postbackd_config_last_reload_success_timestamp_seconds",
        "When the running config was loaded (unix seconds).",
        "",
        s.last_success_seconds,
    );
    gauge(
        &mut out,
        "postbackd_build_info",
        "The postbackd version.",
        &format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
        1.0,
    );
    gauge(
        &mut out,
        "process_start_time_seconds",
        "When the process started (unix seconds).",
        "",
        s.start_seconds,
    );
    out
}
