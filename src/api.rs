//! The admin API under `/api/v1`: the delivery log and retries by hand. Every request needs
//! `Authorization: Bearer <token>` with one of `api.admin_tokens`; without tokens configured
//! the API is off and answers 401.

use crate::render::template::parse_instant;
use crate::server::AppState;
use crate::store::{DeliveryQuery, EventQuery, RetryFilter, State as DeliveryState, StoreError};
use axum::extract::{Path, Query, State};
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
        .route("/api/v1/deliveries", get(deliveries))
        .route("/api/v1/events", get(events))
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
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    Admin,
    /// An affiliate's token: only the postbacks that affiliate owns, read only.
    Affiliate(String),
}

impl Access {
    /// The postbacks this caller may see (`None`: all).
    pub fn postbacks(&self, plan: &crate::plan::Plan) -> Option<Vec<String>> {
        self.affiliate().map(|a| plan.owned_by(a))
    }

    /// The affiliate this caller is (`None`: an admin).
    pub fn affiliate(&self) -> Option<&str> {
        match self {
            Access::Admin => None,
            Access::Affiliate(a) => Some(a),
        }
    }
}

/// Identifies the caller by its bearer token: 401 without one or with an unknown one.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Access, ApiError> {
    let plan = state.plan.load();
    let s = &plan.settings;
    if s.admin_tokens.is_empty() && s.affiliate_tokens.is_empty() {
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
    let Some(g) = given else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <token>".into(),
        ));
    };
    if s.admin_tokens
        .iter()
        .any(|t| same(t.as_bytes(), g.as_bytes()))
    {
        return Ok(Access::Admin);
    }
    if let Some((_, a)) = s
        .affiliate_tokens
        .iter()
        .find(|(t, _)| same(t.as_bytes(), g.as_bytes()))
    {
        return Ok(Access::Affiliate(a.clone()));
    }
    Err(ApiError(StatusCode::UNAUTHORIZED, "unknown token".into()))
}

/// Like [`authorize`], for what only an admin may do.
pub fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match authorize(state, headers)? {
        Access::Admin => Ok(()),
        Access::Affiliate(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            "this needs an admin token".into(),
        )),
    }
}

async fn delivery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let access = authorize(&state, &headers)?;
    let visible = access.postbacks(&state.plan.load());
    // Another affiliate's (or the admin's) delivery does not exist for this caller: the
    // query itself is restricted to the caller's postbacks, as every other read is.
    match state.store.delivery(id, visible).await? {
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
    admin(&state, &headers)?;
    let ids = state
        .store
        .retry(RetryFilter {
            id: Some(id),
            ..RetryFilter::default()
        })
        .await?;
    if ids.is_empty() {
        let why = match state.store.delivery(id, None).await? {
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
    admin(&state, &headers)?;
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
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
        state: req.state.as_deref().and_then(DeliveryState::parse),
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
    admin(&state, &headers)?;
    let plan = state.plan.load_full();
    let dir = state.reloader.dir().to_path_buf();
    let status = state.reloader.status();
    let postbacks = postback_views(&state, &plan).await;
    Ok(Json(json!({
        "version": plan.hash,
        "git": plan.git,
        "dir": dir,
        "reload": status,
        "postbacks": postbacks,
    })))
}

/// One postback as the config API and the web page's rules show it.
#[derive(Debug, serde::Serialize)]
pub struct PostbackView {
    pub id: String,
    pub name: Option<String>,
    /// Relative to the config directory.
    pub file: String,
    pub line: u64,
    pub trigger: &'static str,
    pub statuses: Option<Vec<&'static str>>,
    pub offers: Vec<String>,
    pub enabled: bool,
    pub kind: &'static str,
    pub destination: String,
    pub last_change: Option<crate::config::git::LineChange>,
}

/// Every postback of `plan` with where it is written and who last changed it.
pub async fn postback_views(state: &AppState, plan: &crate::plan::Plan) -> Vec<PostbackView> {
    let dir = state.reloader.dir().to_path_buf();
    let changes = crate::reload::postback_changes(plan, &*state.reloader.line_changes(plan).await);
    plan.postbacks
        .iter()
        .map(|p| {
            let mine = |e: &&crate::plan::Entry| plan.postbacks[e.postback].id == p.id;
            let file = p.origin.file.strip_prefix(&dir).unwrap_or(&p.origin.file);
            PostbackView {
                id: p.id.clone(),
                name: p.name.clone(),
                file: file.display().to_string(),
                line: p.origin.line,
                trigger: p.trigger.as_str(),
                statuses: p
                    .statuses
                    .as_ref()
                    .map(|s| s.iter().map(|s| s.as_str()).collect()),
                offers: plan
                    .entries
                    .iter()
                    .filter(mine)
                    .map(|e| e.offer.clone())
                    .collect(),
                enabled: plan.entries.iter().filter(mine).any(|e| e.enabled),
                kind: p.action.kind(),
                destination: p.action.destination().to_string(),
                last_change: changes.get(&p.id).cloned(),
            }
        })
        .collect()
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
    admin(&state, &headers)?;
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
    // Rendering is CPU work: off the threads that serve HTTP.
    let fired = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || crate::simulate::simulate(&plan, &history))
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the simulation stopped unexpectedly: {e}"),
                )
            })?
    };
    let egress = crate::deliver::egress::Egress::new(state.plan.clone());
    let client = req
        .send
        .then(|| crate::deliver::client(&plan.settings.delivery.user_agent, egress.clone()));
    let mailer = crate::actions::email::Mailer::default();
    let appender = crate::actions::sheets::Appender::default();
    let mut out = Vec::new();
    for f in &fired {
        let mut v = json!(crate::simulate::FiredJson::new(f));
        if let (Some(c), Ok(r)) = (&client, &f.request) {
            let t = crate::deliver::Transports {
                client: c,
                egress: &egress,
                mailer: &mailer,
                appender: &appender,
            };
            let tried = crate::deliver::send_once(&t, &plan, &f.postback, &r.message).await;
            tracing::info!(postback = %f.postback, outcome = %tried.outcome, "test postback sent by hand");
            v["answer"] = json!(tried);
        }
        out.push(v);
    }
    Ok(Json(
        json!({ "version": plan.hash, "fired": out, "sent": req.send }),
    ))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn instant(field: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    v.as_deref()
        .map(|s| {
            parse_instant(s).map(|t| t.as_millisecond()).ok_or_else(|| {
                bad(format!(
                    "{field}: `{s}` is not a time; use RFC 3339 or unix seconds"
                ))
            })
        })
        .transpose()
}

fn cursor(v: &Option<String>) -> Result<Option<i64>, ApiError> {
    v.as_deref()
        .map(|c| {
            c.parse().map_err(|_| {
                bad(format!(
                    "cursor: `{c}` is not a cursor from a previous page"
                ))
            })
        })
        .transpose()
}

/// `GET /api/v1/deliveries` filters; all optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesParams {
    transaction_id: Option<String>,
    clickid: Option<String>,
    offer: Option<String>,
    affiliate: Option<String>,
    goal: Option<String>,
    postback: Option<String>,
    /// The conversion's status: approved, pending, rejected.
    status: Option<String>,
    /// pending, inflight, delivered, dead, cancelled.
    state: Option<String>,
    /// The last attempt's result: delivered, 3xx, 4xx, 5xx, timeout, connect, tls, body_rejected, render_error, error.
    outcome: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/deliveries`: the delivery log, newest first, 50 a page (`limit` up to
/// 1000); `next_cursor` fetches the next page. An affiliate's token sees its own postbacks
/// only.
async fn deliveries(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<DeliveriesParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let access = authorize(&state, &headers)?;
    let Query(p) = params.map_err(|e| bad(e.body_text()))?;
    let plan = state.plan.load_full();
    let mut postbacks = access.postbacks(&plan);
    if let Some(one) = &p.postback {
        postbacks = Some(match postbacks {
            None => vec![one.clone()],
            Some(v) => v.into_iter().filter(|x| x == one).collect(),
        });
    }
    let st = match p.state.as_deref() {
        None => None,
        Some(name) => Some(DeliveryState::parse(name).ok_or_else(|| {
            bad(format!(
                "state: `{name}` is not one of pending, inflight, delivered, dead, cancelled"
            ))
        })?),
    };
    let q = DeliveryQuery {
        transaction_id: p.transaction_id,
        clickid: p.clickid,
        id: None,
        offer: p.offer,
        affiliate: p.affiliate,
        goal: p.goal,
        postbacks,
        status: p.status,
        state: st,
        outcome: p.outcome,
        since: instant("since", &p.since)?,
        until: instant("until", &p.until)?,
        before_id: cursor(&p.cursor)?,
        limit: p.limit.unwrap_or(50),
    };
    let (rows, next) = state.store.deliveries(q).await?;
    Ok(Json(json!({
        "deliveries": rows,
        "next_cursor": next.map(|n| n.to_string()),
    })))
}

/// `GET /api/v1/events` filters; all optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsParams {
    source: Option<String>,
    kind: Option<String>,
    clickid: Option<String>,
    transaction_id: Option<String>,
    offer: Option<String>,
    affiliate: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/events`: what trackers sent and what it matched, newest first. Admin only:
/// events carry every affiliate's data.
async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<EventsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    let Query(p) = params.map_err(|e| bad(e.body_text()))?;
    let q = EventQuery {
        source: p.source,
        kind: p.kind,
        clickid: p.clickid,
        transaction_id: p.transaction_id,
        id: None,
        offer: p.offer,
        affiliate: p.affiliate,
        since: instant("since", &p.since)?,
        until: instant("until", &p.until)?,
        before_rowid: cursor(&p.cursor)?,
        limit: p.limit.unwrap_or(50),
    };
    let (rows, next) = state.store.events(q).await?;
    Ok(Json(json!({
        "events": rows,
        "next_cursor": next.map(|n| n.to_string()),
    })))
}
