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
