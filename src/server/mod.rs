//! The HTTP listener: routes, shared state and health endpoints; [`conns`] accepts and
//! bounds the connections.

pub mod conns;
pub mod ui;

use crate::ingest;
use crate::plan::Plan;
use crate::store::Store;
use arc_swap::ArcSwap;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub plan: Arc<ArcSwap<Plan>>,
    pub store: Store,
    pub reloader: Arc<crate::reload::Reloader>,
    /// This daemon's metrics.
    pub telemetry: crate::telemetry::Telemetry,
    /// When the process started (unix seconds).
    pub started: f64,
    /// Each source's rate limit, kept across reloads.
    pub limiters: Arc<crate::ingest::guard::Limiters>,
    /// The destinations the dispatcher has paused.
    pub paused: crate::deliver::Paused,
    /// The web page's templates and sessions.
    pub ui: Arc<ui::Ui>,
    /// Refused webhooks kept for the incoming log, bounded in rate.
    pub refusals: Arc<crate::ingest::Refusals>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/postback", get(ingest::postback).post(ingest::postback))
        .route(
            "/postback/{source}",
            get(ingest::postback).post(ingest::postback),
        )
        .route("/v1/events", post(ingest::events))
        .route("/-/healthy", get(|| async { "ok\n" }))
        .route("/-/ready", get(ready))
        .route("/-/reload", post(reload))
        .route("/metrics", get(metrics_page))
        .merge(crate::api::routes())
        .merge(ui::routes())
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(
                    json!({"error": "no such endpoint: send postbacks to /postback or /v1/events"}),
                ),
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({
                    "error": format!("{method} is not allowed on {}: webhooks are GET or POST /postback, POST /v1/events", uri.path()),
                    "reason": "method_not_allowed",
                })),
            )
        })
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Ready when a config is loaded (always, once serving) and the store can write.
/// Paused destinations are said in the detail; they do not make the daemon unready.
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let mut detail = String::new();
    for (dest, since, failures) in state.paused.lock().map(|p| p.clone()).unwrap_or_default() {
        detail.push_str(&format!(
            "destination {dest} paused since {} after {failures} failed attempts in a row; probing every {}\n",
            crate::utc_text(since),
            crate::duration_text(state.plan.load().settings.delivery.probe_every)
        ));
    }
    match state.store.health() {
        Ok(()) => (
            StatusCode::OK,
            format!("ready (config {})\n{detail}", state.plan.load().hash),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store cannot write: {e}\n"),
        ),
    }
}

/// `POST /-/reload`: reloads now. 200 with the new version, or 400 with every error while
/// the running config keeps serving. Needs an admin token when tokens are configured.
async fn reload(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let s = &state.plan.load().settings;
    if !s.admin_tokens.is_empty() || !s.affiliate_tokens.is_empty() {
        if let Err(e) = crate::api::admin(&state, &headers) {
            return e.into_response();
        }
    }
    match state.reloader.reload("http").await {
        Ok(r) => (StatusCode::OK, Json(json!(r))).into_response(),
        Err(errors) => (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "error": format!(
                    "config refused: {} error(s); the running config {} keeps serving",
                    errors.0.len(),
                    state.plan.load().hash
                ),
                "errors": errors.0,
                "text": errors.to_string(),
            })),
        )
            .into_response(),
    }
}

/// `GET /metrics`: the Prometheus exposition.
async fn metrics_page(State(state): State<AppState>) -> axum::response::Response {
    let now = crate::now_ms();
    let q = state.store.queue_stats().await.unwrap_or_default();
    state.telemetry.collect_process();
    let plan = state.plan.load();
    let status = state.reloader.status();
    let s = crate::telemetry::State {
        pending: q.pending,
        retries_waiting: q.retries,
        orphaned: q.orphaned,
        oldest_pending_age_seconds: q.oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
        store_writable: state.store.health().is_ok(),
        config_version: plan.hash.clone(),
        config_commit: plan
            .git
            .as_ref()
            .map(|g| g.commit.clone())
            .unwrap_or_default(),
        last_reload_ok: status.ok,
        last_success_seconds: status.loaded_at as f64 / 1000.0,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.telemetry.render(&s),
    )
        .into_response()
}
