//! The admin API under `/api/v1`: the delivery log and retries by hand. Every request needs
//! `Authorization: Bearer <token>` with one of `api.admin_tokens`; without tokens configured
//! the API is off and answers 401.

use crate::render::template::parse_instant;
use crate::server::AppState;
use crate::store::{RetryFilter, StoreError};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/config", get(config))
        .route("/api/v1/test", post(test))
        .route("/api/v1/deliveries/{id}", get(delivery))
        .route("/api/v1/deliveries/{id}/retry", post(retry_one))
        .route("/api/v1/deliveries/retry", post(retry_many))
}

/// An API error: a status and a JSON reason.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let plan = state.plan.load();
    let tokens = &plan.settings.admin_tokens;
    if tokens.is_empty() {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "the API is off: set api.admin_tokens in postbackd.yaml".into(),
        ));
    }
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <token>".into(),
        )),
        Some(g) if tokens.iter().any(|t| same(t.as_bytes(), g.as_bytes())) => Ok(()),
        Some(_) => Err(ApiError(StatusCode::UNAUTHORIZED, "unknown token".into())),
    }
}

async fn delivery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    match state.store.delivery(id).await? {
        Some(d) => Ok(Json(json!(d))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no delivery {id} (never existed, or pruned after the retention period)"),
        )),
    }
}

async fn retry_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let ids = state
        .store
        .retry(RetryFilter {
            id: Some(id),
            ..RetryFilter::default()
        })
        .await?;
    if ids.is_empty() {
        let why = match state.store.delivery(id).await? {
            None => (StatusCode::NOT_FOUND, format!("no delivery {id}")),
            Some(d) => (
                StatusCode::CONFLICT,
                format!(
                    "delivery {id} is {}: only finished deliveries can be retried",
                    json!(d.state).as_str().unwrap_or_default()
                ),
            ),
        };
        return Err(ApiError(why.0, why.1));
    }
    tracing::info!(delivery = id, "delivery queued again by hand");
    Ok(Json(json!({ "queued": ids })))
}

/// Which deliveries a bulk retry takes: every finished delivery in `state` (dead unless
/// said otherwise), optionally of one postback, created in a time range.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    postback: Option<String>,
    state: Option<String>,
    /// RFC 3339 or unix seconds/milliseconds.
    since: Option<String>,
    until: Option<String>,
}

async fn retry_many(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<RetryRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let instant = |field: &str, v: &Option<String>| -> Result<Option<i64>, ApiError> {
        v.as_deref()
            .map(|s| {
                parse_instant(s).map(|t| t.as_millisecond()).ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("{field}: `{s}` is not a time; use RFC 3339 or unix seconds"),
                    )
                })
            })
            .transpose()
    };
    if let Some(s) = req.state.as_deref() {
        if !matches!(s, "dead" | "cancelled" | "delivered") {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("state: `{s}` cannot be retried; use dead, cancelled or delivered"),
            ));
        }
    }
    if let Some(p) = &req.postback {
        if state.plan.load().postback(p).is_none() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("postback `{p}` is not in the current config"),
            ));
        }
    }
    let filter = RetryFilter {
        id: None,
        postback: req.postback,
        state: req.state,
        since: instant("since", &req.since)?,
        until: instant("until", &req.until)?,
    };
    let ids = state.store.retry(filter).await?;
    tracing::info!(count = ids.len(), "deliveries queued again by hand");
    Ok(Json(json!({ "queued": ids })))
}

/// `GET /api/v1/config`: the running config's version (hash and git commit), the last
/// reload, and every postback with where it is written and who last changed it.
async fn config(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let plan = state.plan.load_full();
    let dir = state.reloader.dir().to_path_buf();
    let status = state.reloader.status();
    let changes = state.reloader.line_changes(&plan).await;
    let postbacks: Vec<Value> = plan
        .postbacks
        .iter()
        .map(|p| {
            let offers: Vec<&str> = plan
                .entries
                .iter()
                .filter(|e| plan.postbacks[e.postback].id == p.id)
                .map(|e| e.offer.as_str())
                .collect();
            let enabled = plan
                .entries
                .iter()
                .any(|e| plan.postbacks[e.postback].id == p.id && e.enabled);
            let file = p.origin.file.strip_prefix(&dir).unwrap_or(&p.origin.file);
            json!({
                "id": p.id,
                "name": p.name,
                "file": file,
                "line": p.origin.line,
                "trigger": p.trigger.as_str(),
                "statuses": p.statuses.as_ref().map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
                "offers": offers,
                "enabled": enabled,
                "method": p.http.method.as_str(),
                "destination": p.http.destination,
                "last_change": changes.get(&(p.origin.file.clone(), p.origin.line)),
            })
        })
        .collect();
    Ok(Json(json!({
        "version": plan.hash,
        "git": plan.git,
        "dir": dir,
        "reload": status,
        "postbacks": postbacks,
    })))
}

/// What `POST /api/v1/test` takes: the seeds' "Test" button.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    /// The event as a tracker would send it (a JSON object of fields).
    event: serde_json::Map<String, Value>,
    /// Earlier events of the same conversion, oldest first.
    #[serde(default)]
    before: Vec<serde_json::Map<String, Value>>,
    source: Option<String>,
    /// Send each postback once and return the answers (nothing is queued or logged).
    #[serde(default)]
    send: bool,
}

/// `POST /api/v1/test`: which postbacks an event fires and exactly what they send; with
/// `"send": true`, sends each once and returns the answers.
async fn test(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<TestRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let plan = state.plan.load_full();
    let mut history = Vec::new();
    for (i, obj) in req.before.iter().chain([&req.event]).enumerate() {
        let e = crate::ingest::parse_event(
            &plan,
            req.source.as_deref(),
            obj,
            crate::now_ms() + i as i64,
        )
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
        history.push(e);
    }
    let fired = crate::simulate::simulate(&plan, &history);
    let client = req
        .send
        .then(|| crate::deliver::client(&plan.settings.delivery.user_agent));
    let mut out = Vec::new();
    for f in &fired {
        let mut v = json!(crate::simulate::FiredJson::new(&plan, f));
        if let (Some(c), Ok(r)) = (&client, &f.request) {
            let tried = crate::deliver::send_once(c, &plan, &f.postback, r).await;
            tracing::info!(postback = %f.postback, outcome = %tried.outcome, "test postback sent by hand");
            v["answer"] = json!(tried);
        }
        out.push(v);
    }
    Ok(Json(
        json!({ "version": plan.hash, "fired": out, "sent": req.send }),
    ))
}
