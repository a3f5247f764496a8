//! Prometheus metrics, served at `/metrics`.
//!
//! Every labelled counter exists at zero from the start (and for each postback a reload
//! adds), so `rate()` and alerts work on a fresh daemon. The per-postback counters (matches,
//! deliveries, attempts) are fourteen atomics per postback here, written out at scrape
//! time: through the `metrics` registry they cost about 3.5 KiB a postback, which a config
//! of 10,000 postbacks would notice. Histograms and the other counters go through the
//! `metrics` facade. State that is read rather than counted (the queue, the store, the
//! config version) is computed at scrape time and appended to the exposition.
//!
//! Labels are bounded: postback ids and source ids come from the config, the rest from
//! fixed lists. A URL, a click id or an error text is never a label.
//!
//! A [`Telemetry`] is a value each daemon holds in its state (its own recorder, counters and
//! process collector), not a process-wide global: two daemons in one process (tests) each
//! count their own. The `metrics` macros run against its recorder through
//! `metrics::with_local_recorder`.

use crate::plan::Plan;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

pub const EVENTS: &str = "postbackd_events_received_total";
pub const MATCHED: &str = "postbackd_postbacks_matched_total";
pub const DELIVERIES: &str = "postbackd_deliveries_total";
pub const ATTEMPTS: &str = "postbackd_attempts_total";
pub const ATTEMPT_SECONDS: &str = "postbackd_attempt_duration_seconds";
pub const LATENCY_SECONDS: &str = "postbackd_delivery_latency_seconds";
pub const RELOADS: &str = "postbackd_config_reloads_total";
pub const ACTION_ATTEMPTS: &str = "postbackd_action_attempts_total";
pub const CONNECTIONS_OPEN: &str = "postbackd_http_connections";
pub const CONNECTIONS_LIMIT: &str = "postbackd_http_connections_limit";
pub const CONNECTIONS_CLOSED: &str = "postbackd_http_connections_closed_total";

/// Why the listener closed or refused a connection.
pub const CONNECTION_CLOSE_REASONS: [&str; 6] = [
    "header_timeout",
    "idle_timeout",
    "request_timeout",
    "evicted",
    "refused",
    "tls_handshake",
];

/// Results of an incoming event.
pub const EVENT_RESULTS: [&str; 8] = [
    "accepted",
    "invalid",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "too_large",
    "unknown_source",
    "unavailable",
];
pub const REFUSED: &str = "postbackd_webhooks_refused_total";
pub const PAUSED: &str = "postbackd_destination_paused";
pub const PAUSES: &str = "postbackd_destination_pauses_total";
pub const KINDS: [&str; 3] = ["click", "impression", "conversion"];
/// Final outcomes of a delivery.
pub const FINAL: [&str; 3] = ["delivered", "dead", "cancelled"];
/// Result classes of an attempt.
pub const RESULTS: [&str; 11] = [
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "timeout",
    "connect",
    "tls",
    "body_rejected",
    "render_error",
    "blocked",
    "error",
];

/// One daemon's metrics.
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Per-postback counters (see the module's doc).
    postbacks: PostbackCounters,
    /// Attempts by action kind and result class: a fixed table of atomics, every series
    /// there from the start (an attempt is counted without a registry lookup).
    kinds: [[AtomicU64; RESULTS.len()]; crate::actions::KINDS.len()],
    /// The standard process metrics every Prometheus exporter has: CPU, memory, descriptors.
    process: metrics_process::Collector,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    /// A new set of metrics, every family described.
    pub fn new() -> Telemetry {
        let attempt = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let latency = [
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
        ];
        let builder = PrometheusBuilder::new();
        let builder = match builder
            .set_buckets_for_metric(Matcher::Full(ATTEMPT_SECONDS.into()), &attempt)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(LATENCY_SECONDS.into()), &latency))
        {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let t = Telemetry(Arc::new(Inner {
            recorder,
            handle,
            postbacks: PostbackCounters::default(),
            kinds: [const { [const { AtomicU64::new(0) }; RESULTS.len()] };
                crate::actions::KINDS.len()],
            process: metrics_process::Collector::default(),
        }));
        t.with(|| {
            describe();
            t.0.process.describe();
        });
        t
    }

    /// Runs `f` with this daemon's recorder behind the `metrics` macros.
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.0.recorder, f)
    }

    /// Reads the process metrics (`process_open_fds`, `process_max_fds`,
    /// `process_resident_memory_bytes`, `process_cpu_seconds_total`…) for the next scrape.
    pub fn collect_process(&self) {
        self.with(|| self.0.process.collect());
    }

    /// A reload (or the start) loaded the config (`true`) or refused it.
    pub fn reload(&self, ok: bool) {
        let r = if ok { "success" } else { "failure" };
        self.with(|| metrics::counter!(RELOADS, "result" => r).increment(1));
    }

    /// The listener closed or refused a connection, for one of [`CONNECTION_CLOSE_REASONS`]
    /// (`n` 0 creates the series).
    pub fn connection_closed(&self, reason: &'static str, n: u64) {
        self.with(|| metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason).increment(n));
    }

    /// Open connections and the cap on them, at a sweep.
    pub fn connections(&self, open: usize, limit: usize) {
        self.with(|| {
            metrics::gauge!(CONNECTIONS_OPEN).set(open as f64);
            metrics::gauge!(CONNECTIONS_LIMIT).set(limit as f64);
        });
    }

    /// How long one attempt of `postback` took.
    pub fn attempt_seconds(&self, postback: String, secs: f64) {
        self.with(|| metrics::histogram!(ATTEMPT_SECONDS, "postback" => postback).record(secs));
    }

    /// From a delivery's webhook to its delivery.
    pub fn latency_seconds(&self, postback: String, secs: f64) {
        self.with(|| metrics::histogram!(LATENCY_SECONDS, "postback" => postback).record(secs));
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS_OPEN, "Open HTTP connections to the listener.");
    describe_gauge!(
        CONNECTIONS_LIMIT,
        "Open connections allowed (server.max_connections, or the open-file limit minus room for deliveries)."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections the listener closed or refused, by reason (header_timeout, idle_timeout, request_timeout, evicted, refused)."
    );
    describe_counter!(
        EVENTS,
        "Webhooks received, by source, event kind and result."
    );
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
    describe_gauge!(
        PAUSED,
        "1 while a destination is paused after failing delivery.pause_after attempts in a row."
    );
    describe_counter!(PAUSES, "Times a destination was paused.");
    describe_counter!(
        REFUSED,
        "Webhooks refused, by source and reason (bad_secret, bad_signature, ip_not_allowed, rate_limited, too_large, ...)."
    );
}

impl Telemetry {
    /// Creates every series the plan's sources and postbacks can have, at zero.
    pub fn register_plan(&self, plan: &Plan) {
        self.with(|| self.register(plan));
    }

    fn register(&self, plan: &Plan) {
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
        let mut all = self.0.postbacks.write().unwrap_or_else(|e| e.into_inner());
        for p in &plan.postbacks {
            if !all.contains_key(p.id.as_str()) {
                all.insert(p.id.as_str().into(), Arc::default());
            }
        }
        drop(all);
        for r in ["success", "failure"] {
            metrics::counter!(RELOADS, "result" => r).increment(0);
        }
        for d in plan.destinations() {
            metrics::gauge!(PAUSED, "destination" => d.clone()).increment(0.0);
            metrics::counter!(PAUSES, "destination" => d).increment(0);
        }
        for s in &sources {
            for r in crate::ingest::guard::REASONS {
                metrics::counter!(REFUSED, "source" => s.clone(), "reason" => r).increment(0);
            }
        }
    }
}

/// One postback's counters.
#[derive(Debug, Default)]
struct Counters {
    matched: AtomicU64,
    /// By [`FINAL`] outcome.
    deliveries: [AtomicU64; FINAL.len()],
    /// By [`RESULTS`] class.
    attempts: [AtomicU64; RESULTS.len()],
}

type PostbackCounters = RwLock<HashMap<Box<str>, Arc<Counters>>>;

impl Telemetry {
    /// Adds to one postback's counters, creating them for an id no plan registered (a pending
    /// delivery of a postback a reload removed).
    fn count(&self, postback: &str, f: impl Fn(&Counters)) {
        let all = &self.0.postbacks;
        if let Some(c) = all.read().unwrap_or_else(|e| e.into_inner()).get(postback) {
            return f(c);
        }
        let c = Arc::clone(
            all.write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(postback.into())
                .or_default(),
        );
        f(&c)
    }

    /// An accepted event matched a postback.
    pub fn matched(&self, postback: &str) {
        self.count(postback, |c| {
            c.matched.fetch_add(1, Relaxed);
        });
    }

    /// A delivery finished with one of the [`FINAL`] outcomes.
    pub fn delivery(&self, postback: &str, outcome: &str) {
        if let Some(i) = FINAL.iter().position(|o| *o == outcome) {
            self.count(postback, |c| {
                c.deliveries[i].fetch_add(1, Relaxed);
            });
        }
    }

    /// An attempt of an action kind ended in one of the [`RESULTS`] classes.
    pub fn action_attempt(&self, kind: &'static str, result: &str) {
        let Some(k) = crate::actions::KINDS.iter().position(|x| *x == kind) else {
            return;
        };
        let r = RESULTS
            .iter()
            .position(|x| *x == result)
            .unwrap_or(RESULTS.len() - 1);
        self.0.kinds[k][r].fetch_add(1, Relaxed);
    }

    /// An attempt ended in one of the [`RESULTS`] classes (`error` for anything else).
    pub fn attempt(&self, postback: &str, result: &str) {
        let i = RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(RESULTS.len() - 1);
        self.count(postback, |c| {
            c.attempts[i].fetch_add(1, Relaxed);
        });
    }

    /// Writes the per-postback counter families, postbacks in id order.
    fn render_postbacks(&self, out: &mut String) {
        let all = self.0.postbacks.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<(&Box<str>, &Arc<Counters>)> = all.iter().collect();
        ids.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let head = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
        };
        head(out, MATCHED, "Times an accepted event matched a postback.");
        for (id, c) in &ids {
            let _ = writeln!(
                out,
                "{MATCHED}{{postback=\"{}\"}} {}",
                label(id),
                c.matched.load(Relaxed)
            );
        }
        head(
            out,
            DELIVERIES,
            "Deliveries finished, by postback and final outcome (delivered, dead, cancelled).",
        );
        for (id, c) in &ids {
            let id = label(id);
            for (o, n) in FINAL.iter().zip(&c.deliveries) {
                let n = n.load(Relaxed);
                let _ = writeln!(out, "{DELIVERIES}{{postback=\"{id}\",outcome=\"{o}\"}} {n}");
            }
        }
        head(
            out,
            ATTEMPTS,
            "Delivery attempts, by postback and result class.",
        );
        for (id, c) in &ids {
            let id = label(id);
            for (r, n) in RESULTS.iter().zip(&c.attempts) {
                let n = n.load(Relaxed);
                let _ = writeln!(out, "{ATTEMPTS}{{postback=\"{id}\",result=\"{r}\"}} {n}");
            }
        }
        head(
            out,
            ACTION_ATTEMPTS,
            "Delivery attempts, by action kind (http, email, slack, ...) and result class.",
        );
        for (k, row) in crate::actions::KINDS.iter().zip(&self.0.kinds) {
            for (r, n) in RESULTS.iter().zip(row) {
                let n = n.load(Relaxed);
                let _ = writeln!(out, "{ACTION_ATTEMPTS}{{kind=\"{k}\",result=\"{r}\"}} {n}");
            }
        }
    }

    /// The result of `n` incoming events.
    pub fn events(&self, source: &str, kind: &str, result: &'static str, n: u64) {
        self.with(|| metrics::counter!(EVENTS, "source" => source.to_string(), "kind" => kind.to_string(), "result" => result)
        .increment(n));
    }

    /// A destination was paused (`true`) or resumed.
    pub fn destination_paused(&self, destination: &str, paused: bool) {
        let d = destination.to_string();
        self.with(|| {
            metrics::gauge!(PAUSED, "destination" => d.clone()).set(if paused { 1.0 } else { 0.0 });
            if paused {
                metrics::counter!(PAUSES, "destination" => d).increment(1);
            }
        });
    }

    /// A webhook was refused, for `reason` (one of [`crate::ingest::guard::REASONS`]).
    pub fn refused(&self, source: &str, reason: &'static str) {
        self.with(|| {
            metrics::counter!(REFUSED, "source" => source.to_string(), "reason" => reason)
                .increment(1)
        });
    }

    /// An incoming event's result.
    pub fn event(&self, source: &str, kind: &str, result: &'static str) {
        self.events(source, kind, result, 1);
    }

    /// The exposition: the recorder's series, the per-postback counters, then the state
    /// gauges.
    pub fn render(&self, s: &State) -> String {
        self.0.handle.run_upkeep();
        let mut out = self.0.handle.render();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        self.render_postbacks(&mut out);
        render_state(&mut out, s);
        out
    }
}

/// What the store and the config look like at scrape time.
#[derive(Debug, Default)]
pub struct State {
    pub pending: i64,
    pub retries_waiting: i64,
    pub orphaned: i64,
    pub oldest_pending_age_seconds: f64,
    pub store_writable: bool,
    pub config_version: String,
    pub config_commit: String,
    pub last_reload_ok: bool,
    pub last_success_seconds: f64,
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

/// The state gauges, read at scrape time.
fn render_state(out: &mut String, s: &State) {
    let out = &mut *out;
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    gauge(
        out,
        "postbackd_queue_pending",
        "Deliveries not yet finished (waiting, held or in flight).",
        "",
        s.pending as f64,
    );
    gauge(
        out,
        "postbackd_retries_waiting",
        "Unfinished deliveries that have failed at least once.",
        "",
        s.retries_waiting as f64,
    );
    gauge(
        out,
        "postbackd_deliveries_orphaned",
        "Unfinished deliveries whose postback is not in the running config (cancelled after delivery.orphan_grace).",
        "",
        s.orphaned as f64,
    );
    gauge(
        out,
        "postbackd_queue_oldest_pending_age_seconds",
        "Age of the oldest unfinished delivery (0 when there is none).",
        "",
        s.oldest_pending_age_seconds,
    );
    gauge(
        out,
        "postbackd_store_writable",
        "1 when the last write to the store succeeded.",
        "",
        b(s.store_writable),
    );
    gauge(
        out,
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
        out,
        "postbackd_config_last_reload_successful",
        "1 when the last reload (or the start) loaded the config.",
        "",
        b(s.last_reload_ok),
    );
    gauge(
        out,
        "postbackd_config_last_reload_success_timestamp_seconds",
        "When the running config was loaded (unix seconds).",
        "",
        s.last_success_seconds,
    );
    gauge(
        out,
        "postbackd_build_info",
        "The postbackd version.",
        &format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
        1.0,
    );
}
