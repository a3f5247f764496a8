//! postbackd: conversion webhooks in, durable templated postbacks out.
//!
//! The data flows through the modules in this order:
//!
//! - [`config`]: YAML files in a directory → a checked, immutable [`plan::Plan`];
//! - [`ingest`]: HTTP requests from trackers → canonical [`ingest::event::Event`]s;
//! - [`plan`]: which postbacks an event fires (indexed matching);
//! - [`render`]: a postback + an event → the exact HTTP request (minijinja macros);
//! - [`store`]: the durable queue and delivery log (embedded SQLite or shared PostgreSQL), group-committed;
//! - [`deliver`]: claims due deliveries, sends them, judges answers, schedules retries.
//!
//! [`reload`] loads the config at start-up and on every reload; [`server`] wires the HTTP
//! routes, [`api`] the admin API and [`cli`] the commands; [`run`] (or [`start`], with a
//! loaded plan) starts a daemon on a listener and returns its [`Handle`]: the command line
//! and in-process tests start daemons the same way.

pub mod actions;
pub mod api;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod diff;
pub mod ingest;
pub mod notify;
pub mod plan;
pub mod reload;
pub mod render;
pub mod server;
pub mod simulate;
pub mod store;
pub mod suggest;
pub mod telemetry;
pub mod testing;
pub mod tls;

use arc_swap::ArcSwap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Milliseconds since the unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A unix-ms time as RFC 3339 in UTC, to the second (`2026-12-03T11:33:25Z`).
pub fn utc_text(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// A duration the way the config writes them (`1h30m`, `45s`, `250ms`).
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    for (v, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            out.push_str(&format!("{v}{unit}"));
        }
    }
    out
}

/// How to start the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    /// Overrides `listen` from `postbackd.yaml`.
    pub listen: Option<SocketAddr>,
    /// Overrides `data_dir` from `postbackd.yaml`.
    pub data_dir: Option<PathBuf>,
    /// Overrides `store` from `postbackd.yaml`: `sqlite` or a `postgres://` connection
    /// string (`--store`, `POSTBACKD_STORE`).
    pub store: Option<String>,
    /// Reload when files in the config directory change (SIGHUP and `POST /-/reload`
    /// work either way).
    pub watch: bool,
    /// Added to `delivery.allow_networks` (`--allow-network`).
    pub allow_networks: Vec<deliver::egress::Allowed>,
    /// Overrides `log.format`: JSON lines (true) or text.
    pub log_json: Option<bool>,
    /// Overrides `log.level`.
    pub log_level: Option<String>,
    /// Replaces `api.admin_tokens` (`POSTBACKD_ADMIN_TOKEN`, `--admin-token-file`).
    pub admin_token: Option<String>,
}

/// A running daemon, from [`run`] or [`start`].
pub struct Handle {
    addr: SocketAddr,
    store: store::Store,
    telemetry: telemetry::Telemetry,
    done: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its store.
    pub fn store(&self) -> &store::Store {
        &self.store
    }

    /// Its metrics.
    pub fn telemetry(&self) -> &telemetry::Telemetry {
        &self.telemetry
    }

    /// Resolves once the daemon has stopped (after its `shutdown` resolved).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done
            .await
            .map_err(|e| anyhow::anyhow!("the daemon's task failed: {e}"))
    }
}

/// Binds the listener a plan asks for (`listen`, or the `--listen` override).
pub async fn bind(plan: &plan::Plan) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(plan.settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", plan.settings.listen))
}

/// Starts a daemon on `listener`: loads the config, opens the store, serves HTTP and
/// delivers, until `shutdown` resolves; then it stops accepting, lets in-flight attempts
/// finish (up to 10 s) and its [`Handle`] resolves. Each daemon has its own metrics, so
/// several can run in one process.
pub async fn run(
    listener: tokio::net::TcpListener,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Handle> {
    let plan = reload::load(&opts).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    start(listener, plan, opts, shutdown).await
}

/// [`run`] with a plan the caller already loaded with [`reload::load`] (the command line
/// loads it first: logging follows it).
pub async fn start(
    listener: tokio::net::TcpListener,
    plan: plan::Plan,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Handle> {
    ignore_file_size_signal();
    server::conns::raise_open_file_limit();
    let started_ms = now_ms();
    let telemetry = telemetry::Telemetry::new();
    telemetry.register_plan(&plan);
    let store = store::Store::open(&plan.settings.store()).await?;
    // TLS is decided at start (like `listen`); a renewed certificate at the same paths is
    // picked up without a restart.
    let tls = match &plan.settings.server.tls {
        Some((cert, key)) => {
            let files = tls::CertFiles::open(cert, key).map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            let config = files
                .server_config()
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            Some(tokio_rustls::TlsAcceptor::from(config))
        }
        None => None,
    };
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        config = %opts.config_dir.display(),
        version = %plan.hash,
        commit = %plan.git.as_ref().map(|g| &g.commit[..12.min(g.commit.len())]).unwrap_or("-"),
        offers = plan.offers.len(),
        postbacks = plan.postbacks.len(),
        store = %store.location(),
        max_connections = server::conns::connection_cap(&plan.settings.server, plan.settings.delivery.concurrency),
        tls = tls.is_some(),
        "listening"
    );
    let plan = Arc::new(ArcSwap::from_pointee(plan));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reloader = Arc::new(reload::Reloader::new(
        opts.clone(),
        plan.clone(),
        telemetry.clone(),
    ));
    let watching = tokio::spawn({
        let (r, stop) = (reloader.clone(), stop_rx.clone());
        async move {
            if r.watching() {
                reload::watch(r, stop).await
            }
        }
    });
    let hup = tokio::spawn(reload::on_sighup(reloader.clone(), stop_rx.clone()));
    let deliverer = deliver::Deliverer::new(store.clone(), plan.clone(), telemetry.clone());
    let paused = deliverer.paused.clone();
    let delivering = tokio::spawn(deliverer.run(stop_rx.clone(), Duration::from_secs(10)));
    let pruning = tokio::spawn(deliver::prune_loop(store.clone(), plan.clone(), stop_rx));
    let app = server::router(server::AppState {
        plan: plan.clone(),
        store: store.clone(),
        reloader,
        telemetry: telemetry.clone(),
        started: started_ms as f64 / 1000.0,
        limiters: Arc::default(),
        paused,
        ui: Arc::default(),
        refusals: Arc::default(),
    });
    let limits = plan.clone();
    let limits = move || {
        let p = limits.load();
        (p.settings.server.clone(), p.settings.delivery.concurrency)
    };
    notify::ready(&format!("serving on {addr}, config {}", plan.load().hash));
    let conns_telemetry = telemetry.clone();
    let done = tokio::spawn(async move {
        server::conns::serve(listener, app, tls, limits, conns_telemetry, shutdown).await;
        notify::stopping();
        tracing::info!("shutting down: finishing in-flight deliveries");
        let _ = stop_tx.send(true);
        let _ = delivering.await;
        let _ = pruning.await;
        let _ = watching.await;
        let _ = hup.await;
        tracing::info!("stopped");
    });
    Ok(Handle {
        addr,
        store,
        telemetry,
        done,
    })
}

/// A write past the file size limit (`ulimit -f`, a quota) raises SIGXFSZ, which would kill
/// the daemon; with a handler installed the write fails with an error instead, which the
/// store reports and survives like a full disk.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut s) = signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            tokio::spawn(async move { while s.recv().await.is_some() {} });
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Returns freed heap pages to the system (glibc only; elsewhere it does nothing).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
