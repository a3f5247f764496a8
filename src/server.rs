//! The HTTP listener: routes, shared state and health endpoints.

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
        .merge(crate::api::routes())
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(
                    json!({"error": "no such endpoint: send postbacks to /postback or /v1/events"}),
                ),
            )
        })
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Ready when a config is loaded (always, once serving) and the store can write.
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.health() {
        Ok(()) => (
            StatusCode::OK,
            format!("ready (config {})\n", state.plan.load().hash),
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
    if !state.plan.load().settings.admin_tokens.is_empty() {
        if let Err(e) = crate::api::authorize(&state, &headers) {
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
