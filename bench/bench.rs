//! `postbackd-bench`: the pieces of the benchmark suite that off-the-shelf tools do not
//! provide (the suite itself is `bench/run.sh`):
//!
//! - `sink`: a receiver that answers 200 and records each request's latency from the `t`
//!   parameter (microseconds since the epoch, set by `load`); `GET /__stats` returns the
//!   count and percentiles, and resets them.
//! - `forward`: the bare forwarder (baseline 2): receives a request and sends one GET on,
//!   with no durability; answers 200 once the forward is done.
//! - `load`: an open-loop load generator at a fixed rate, each request a new conversion
//!   carrying its send time.
//! - `batches`: many new conversions through `/v1/events`, to build a backlog quickly.

use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[derive(Default)]
struct Stats {
    latencies_us: Mutex<Vec<u64>>,
    count: AtomicU64,
    first_us: AtomicU64,
    last_us: AtomicU64,
}

async fn record(State(stats): State<Arc<Stats>>, RawQuery(q): RawQuery) -> &'static str {
    let now = now_us();
    stats.count.fetch_add(1, Ordering::Relaxed);
    let _ = stats
        .first_us
        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    stats.last_us.fetch_max(now, Ordering::Relaxed);
    if let Some(t) = q
        .as_deref()
        .and_then(|q| param(q, "t"))
        .and_then(|t| t.parse::<u64>().ok())
    {
        if let Ok(mut l) = stats.latencies_us.lock() {
            l.push(now.saturating_sub(t));
        }
    }
    "ok"
}

async fn stats_page(State(stats): State<Arc<Stats>>) -> String {
    let mut l = std::mem::take(&mut *stats.latencies_us.lock().unwrap_or_else(|e| e.into_inner()));
    l.sort_unstable();
    let pct = |p: f64| -> u64 {
        if l.is_empty() {
            0
        } else {
            l[((l.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    let out = serde_json::json!({
        "count": stats.count.swap(0, Ordering::Relaxed),
        "first_us": stats.first_us.swap(0, Ordering::Relaxed),
        "last_us": stats.last_us.swap(0, Ordering::Relaxed),
        "latency_samples": l.len(),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": l.last().copied().unwrap_or(0),
    });
    out.to_string()
}

/// A new click or transaction id, random as trackers make them: ids that sort in arrival
/// order would spare the store's indexes the random inserts real traffic costs.
fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

async fn serve(listen: SocketAddr, app: Router) {
    // A port can stay taken for a moment by a connection that is closing: try for 5 seconds.
    let mut tries = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => break l,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("cannot listen on {listen} yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot listen on {listen}: {e}"),
        }
    };
    axum::serve(listener, app)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn sink(listen: SocketAddr) {
    let stats = Arc::new(Stats::default());
    let app = Router::new()
        .route("/__stats", get(stats_page))
        .fallback(record)
        .with_state(stats);
    serve(listen, app).await
}

async fn forward(listen: SocketAddr, to: String) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap_or_default();
    let to = Arc::new(to);
    let app = Router::new().fallback(move |RawQuery(q): RawQuery| {
        let (client, to) = (client.clone(), to.clone());
        async move {
            let url = format!("{to}?{}", q.unwrap_or_default());
            match client.get(url).send().await {
                Ok(r) if r.status().is_success() => (axum::http::StatusCode::OK, "ok"),
                _ => (axum::http::StatusCode::BAD_GATEWAY, "forward failed"),
            }
        }
    });
    serve(listen, app).await
}

/// Sends `rate` requests a second for `secs` seconds, open loop (a slow server does not
/// slow the sender down, up to `max_inflight`), and prints what happened as JSON.
async fn load(url: String, rate: u64, secs: u64, max_inflight: usize) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(max_inflight)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_inflight));
    let start = Instant::now();
    let total = rate * secs;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            sent += 1;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let req = client.get(format!(
                "{url}?clickid={}&tid={}&payout=1.5&status=approved&offer_id=1&t={}",
                random_id(),
                random_id(),
                now_us()
            ));
            let (ok, failed) = (ok.clone(), failed.clone());
            tokio::spawn(async move {
                match req.send().await {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                drop(permit);
            });
        }
    }
    let _ = slots.acquire_many(max_inflight as u32).await;
    let took = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "ok": ok.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "skipped_over_inflight_cap": skipped.load(Ordering::Relaxed),
            "seconds": took,
        })
    );
}

/// Posts `events` new conversions to `/v1/events` in batches of 1,000, `parallel` batches at
/// a time: the quickest way to build a large backlog. Prints how many were acknowledged.
async fn batches(url: String, events: u64, parallel: usize) {
    let client = reqwest::Client::new();
    let acked = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
    let start = Instant::now();
    let mut from = 0;
    while from < events {
        let to = (from + 1000).min(events);
        let body: Vec<serde_json::Value> = (from..to)
            .map(|_| serde_json::json!({"clickid": random_id(), "tid": random_id(), "status": "approved", "offer_id": 1}))
            .collect();
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let (client, url, acked) = (client.clone(), url.clone(), acked.clone());
        let n = to - from;
        tokio::spawn(async move {
            if let Ok(r) = client.post(&url).json(&body).send().await {
                if r.status().is_success() {
                    acked.fetch_add(n, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        from = to;
    }
    let _ = slots.acquire_many(parallel as u32).await;
    println!(
        "{}",
        serde_json::json!({"acked": acked.load(Ordering::Relaxed), "seconds": start.elapsed().as_secs_f64()})
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("missing {name}"))
    };
    match args.first().map(String::as_str) {
        Some("sink") => sink(arg("--listen").parse().expect("--listen ADDR")).await,
        Some("forward") => {
            forward(arg("--listen").parse().expect("--listen ADDR"), arg("--to")).await
        }
        Some("load") => {
            load(
                arg("--url"),
                arg("--rate").parse().expect("--rate N"),
                arg("--secs").parse().expect("--secs N"),
                512,
            )
            .await
        }
        Some("batches") => {
            batches(
                arg("--url"),
                arg("--events").parse().expect("--events N"),
                4,
            )
            .await
        }
        _ => {
            eprintln!("usage: postbackd-bench sink --listen ADDR | forward --listen ADDR --to URL | load --url URL --rate N --secs N | batches --url URL --events N");
            std::process::exit(2);
        }
    }
}
