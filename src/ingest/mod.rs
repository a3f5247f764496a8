//! Ingest: incoming postbacks and events over HTTP, turned into [`event::Event`]s and
//! handed to the store. A sender always learns what happened: the event id and the
//! postbacks it matched, or a 4xx with a reason. Ingest never waits on outgoing requests.

pub mod event;
pub mod guard;
#[cfg(test)]
mod props;

use crate::plan::{Plan, Source};
use crate::server::AppState;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use event::{Event, FieldMap, Kind};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The built-in source used by `/postback` when the config defines no `default` source.
fn builtin_default() -> Source {
    Source {
        id: "default".into(),
        secret: None,
        secret_param: "token".into(),
        secret_header: None,
        signature: None,
        allow_ips: Vec::new(),
        rate: None,
        map: FieldMap::default(),
        kind: Kind::Conversion,
    }
}

/// A rejected request: status plus a JSON reason, the reason's label for the metrics, and
/// when to come back (429).
pub struct Reject {
    code: StatusCode,
    body: Value,
    reason: &'static str,
    retry_after: Option<u64>,
}

impl Reject {
    fn new(code: StatusCode, msg: impl Into<String>) -> Reject {
        let reason = match code.as_u16() {
            404 => "unknown_source",
            503 => "unavailable",
            413 => "too_large",
            _ => "invalid",
        };
        Reject::with_reason(code, reason, msg)
    }

    fn with_reason(code: StatusCode, reason: &'static str, msg: impl Into<String>) -> Reject {
        Reject {
            code,
            body: json!({ "error": msg.into() }),
            reason,
            retry_after: None,
        }
    }
}

impl From<guard::Refusal> for Reject {
    fn from(r: guard::Refusal) -> Reject {
        Reject {
            retry_after: r.retry_after,
            ..Reject::with_reason(r.status, r.reason, r.message)
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let mut body = self.body;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("reason".into(), json!(self.reason));
        }
        let mut r = (self.code, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

fn bad(msg: impl Into<String>) -> Reject {
    Reject::new(StatusCode::BAD_REQUEST, msg)
}

/// The request a refusal is kept with: its method, its path and query with secrets masked,
/// and the client's address.
pub struct Seen {
    method: String,
    target: String,
    client: Option<String>,
}

/// Parameter names whose values are never kept (secrets sent in the query).
const SECRET_NAMES: [&str; 7] = ["secret", "token", "key", "pass", "sig", "auth", "hash"];

/// How long a kept request line may be.
const TARGET_KEPT: usize = 1024;

impl Seen {
    pub fn of(
        method: &axum::http::Method,
        uri: &axum::http::Uri,
        peer: Option<std::net::SocketAddr>,
    ) -> Seen {
        let mut target = uri.path().to_string();
        if let Some(q) = uri.query() {
            let masked = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form_urlencoded::parse(q.as_bytes()).map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let secret = SECRET_NAMES.iter().any(|n| lower.contains(n));
                    (
                        k.into_owned(),
                        if secret {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        },
                    )
                }))
                .finish();
            target.push('?');
            target.push_str(&masked);
        }
        if target.len() > TARGET_KEPT {
            let mut end = TARGET_KEPT;
            while !target.is_char_boundary(end) {
                end -= 1;
            }
            target.truncate(end);
            target.push('…');
        }
        Seen {
            method: method.to_string(),
            target,
            client: peer.map(|p| p.ip().to_string()),
        }
    }
}

/// Refused webhooks kept for the incoming log, at most 20 a second (a burst of 100): a
/// sender cannot fill the disk with refusals, and the store keeps the newest
/// [`crate::store::REFUSED_KEPT`] only.
pub struct Refusals {
    limiter: governor::DefaultDirectRateLimiter,
}

impl Default for Refusals {
    fn default() -> Self {
        let quota = governor::Quota::per_second(
            std::num::NonZeroU32::new(20).unwrap_or(std::num::NonZeroU32::MIN),
        )
        .allow_burst(std::num::NonZeroU32::new(100).unwrap_or(std::num::NonZeroU32::MIN));
        Refusals {
            limiter: governor::RateLimiter::direct(quota),
        }
    }
}

/// Counts a refused webhook (its result in `events_received_total`, its reason in
/// `webhooks_refused_total`) and keeps it for the incoming log, in the background.
fn count_refusal(state: &AppState, seen: &Seen, source: &str, kind: Kind, r: &Reject) {
    state.telemetry.event(source, kind.as_str(), result_of(r));
    state.telemetry.refused(source, r.reason);
    if state.refusals.limiter.check().is_err() {
        return;
    }
    let refused = crate::store::Refused {
        id: 0,
        at: crate::now_ms(),
        source: source.to_string(),
        reason: r.reason.to_string(),
        status: r.code.as_u16(),
        message: r.body["error"].as_str().unwrap_or_default().to_string(),
        method: seen.method.clone(),
        target: seen.target.clone(),
        client: seen.client.clone(),
    };
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.refuse(refused).await {
            tracing::debug!(error = %e, "a refused webhook was not kept");
        }
    });
}

fn resolve_source(plan: &Plan, name: Option<&str>) -> Result<Source, Reject> {
    match name {
        Some(n) => plan.sources.get(n).cloned().ok_or_else(|| {
            Reject::new(
                StatusCode::NOT_FOUND,
                format!("unknown source `{n}`: configure it under `sources:`"),
            )
        }),
        None => Ok(plan
            .sources
            .get("default")
            .cloned()
            .unwrap_or_else(builtin_default)),
    }
}

/// Checks the source's shared secret and removes it from the parameters, so it is never
/// stored or forwarded.
fn check_secret(
    source: &Source,
    headers: &HeaderMap,
    params: &mut BTreeMap<String, String>,
) -> Result<(), Reject> {
    let Some(want) = &source.secret else {
        return Ok(());
    };
    let from_param = params.remove(&source.secret_param);
    let got = match &source.secret_header {
        Some(h) => headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        None => from_param,
    };
    match got {
        Some(g) if constant_time_eq(g.as_bytes(), want.as_bytes()) => Ok(()),
        Some(_) => Err(Reject::with_reason(
            StatusCode::UNAUTHORIZED,
            "bad_secret",
            format!("wrong secret for source `{}`", source.id),
        )),
        None => {
            let where_ = match &source.secret_header {
                Some(h) => format!("header `{h}`"),
                None => format!("parameter `{}`", source.secret_param),
            };
            Err(Reject::with_reason(
                StatusCode::UNAUTHORIZED,
                "missing_secret",
                format!("source `{}` requires its secret in {where_}", source.id),
            ))
        }
    }
}

/// Equal, in time that does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Builds an event from a JSON object as `source` (the default source when `None`) would
/// send it, without a secret check: for dry runs, rule tests and `fire`.
pub fn parse_event(
    plan: &Plan,
    source: Option<&str>,
    obj: &serde_json::Map<String, Value>,
    now_ms: i64,
) -> Result<Event, String> {
    let source = resolve_source(plan, source).map_err(|r| {
        r.body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("bad source")
            .to_string()
    })?;
    let mut params = BTreeMap::new();
    json_params(obj, &mut params)?;
    if let Some(secret) = &source.secret {
        params.retain(|k, v| k != &source.secret_param || v != secret);
    }
    Event::from_params(params, source.kind, &source.id, &source.map, now_ms)
        .map_err(|e| e.to_string())
}

/// Flattens a JSON object into string parameters.
fn json_params(
    v: &serde_json::Map<String, Value>,
    out: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    for (k, v) in v {
        let s = match v {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Object(inner) if k == "params" => {
                json_params(inner, out)?;
                continue;
            }
            Value::Array(_) | Value::Object(_) => {
                return Err(format!("field `{k}` must be a string, number or boolean"))
            }
        };
        out.insert(k.clone(), s);
    }
    Ok(())
}

fn query_params(q: Option<&str>, out: &mut BTreeMap<String, String>) {
    if let Some(q) = q {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            out.insert(k.into_owned(), v.into_owned());
        }
    }
}

fn body_params(
    headers: &HeaderMap,
    body: &[u8],
    out: &mut BTreeMap<String, String>,
) -> Result<(), Reject> {
    if body.is_empty() {
        return Ok(());
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.starts_with("application/json") || (ct.is_empty() && body.first() == Some(&b'{')) {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| bad(format!("body is not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(bad("JSON body must be an object of fields"));
        };
        json_params(&obj, out).map_err(bad)
    } else if ct.starts_with("application/x-www-form-urlencoded") || ct.is_empty() {
        for (k, v) in form_urlencoded::parse(body) {
            out.insert(k.into_owned(), v.into_owned());
        }
        Ok(())
    } else {
        Err(Reject::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content type `{ct}`: send a query string, a form or JSON"),
        ))
    }
}

/// The metrics result of a rejection.
fn result_of(r: &Reject) -> &'static str {
    match r.code.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "unknown_source",
        413 => "too_large",
        429 => "rate_limited",
        503 => "unavailable",
        _ => "invalid",
    }
}

/// Stores events (one webhook's, or a batch's) in one commit and says what each matched.
async fn accept(
    state: AppState,
    plan: Arc<Plan>,
    events: Vec<Event>,
) -> Result<Vec<Value>, Reject> {
    let Some(first) = events.first() else {
        return Ok(Vec::new());
    };
    let (kind, source) = (first.kind, first.source.clone());
    let n = events.len() as u64;
    match state.store.ingest_batch(events, plan).await {
        Ok(all) => {
            state
                .telemetry
                .events(&source, kind.as_str(), "accepted", n);
            Ok(all
                .into_iter()
                .map(|a| {
                    tracing::debug!(event = %a.event_id, %kind, %source, matched = a.matched.len(), queued = a.queued, "event accepted");
                    for m in &a.matched {
                        state.telemetry.matched(m);
                    }
                    json!({ "event_id": a.event_id, "matched": a.matched, "queued": a.queued, "deliveries": a.deliveries })
                })
                .collect())
        }
        Err(e) => {
            tracing::error!(error = %e, events = n, "events not stored; answering 503");
            state
                .telemetry
                .events(&source, kind.as_str(), "unavailable", n);
            let what = if n == 1 {
                "event not stored"
            } else {
                "no event of the batch was stored"
            };
            Err(Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{what}, send it again later: {e}"),
            ))
        }
    }
}

/// The checks on where a webhook comes from and its size, before its fields are read.
fn admit_peer<'b>(
    plan: &Plan,
    source: &Source,
    peer: Option<std::net::SocketAddr>,
    headers: &HeaderMap,
    body: &'b Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<&'b [u8], Reject> {
    if let Some(peer) = peer {
        let ip = guard::client_ip(peer.ip(), headers, &plan.settings.server.trusted_proxies);
        guard::check_ip(source, ip)?;
    }
    body.as_deref().map_err(|e| {
        Reject::new(
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            },
            format!("cannot read the body: {} (at most 1 MiB)", e.body_text()),
        )
    })
}

/// The checks on who sent it: its signature, then its source's rate (the secret is checked
/// with the fields, which may carry it).
fn admit_sender(
    state: &AppState,
    source: &Source,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Reject> {
    guard::check_signature(source, headers, body, crate::now_ms())?;
    state.limiters.check(source)?;
    Ok(())
}

/// `GET|POST /postback` and `/postback/{source}`: tracker-style incoming postbacks.
#[allow(clippy::too_many_arguments)]
pub async fn postback(
    State(state): State<AppState>,
    source: Option<Path<String>>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<guard::Peer>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, Reject> {
    let plan = state.plan.load_full();
    let seen = Seen::of(&method, &uri, peer.as_ref().map(|p| p.0 .0));
    let source = resolve_source(&plan, source.as_ref().map(|p| p.0.as_str())).inspect_err(|r| {
        count_refusal(&state, &seen, "unknown", Kind::Conversion, r);
    })?;
    let mut params = BTreeMap::new();
    query_params(query.as_deref(), &mut params);
    let peer = peer.map(|p| p.0 .0);
    let parsed = admit_peer(&plan, &source, peer, &headers, &body)
        .and_then(|raw| {
            body_params(&headers, raw, &mut params)?;
            check_secret(&source, &headers, &mut params)?;
            admit_sender(&state, &source, &headers, raw)
        })
        .and_then(|()| {
            Event::from_params(
                params,
                source.kind,
                &source.id,
                &source.map,
                crate::now_ms(),
            )
            .map_err(|e| bad(e.to_string()))
        });
    let event = parsed.inspect_err(|r| count_refusal(&state, &seen, &source.id, source.kind, r))?;
    let mut out = accept(state, plan, vec![event]).await?;
    Ok(Json(out.pop().unwrap_or_default()))
}

/// `POST /v1/events`: one JSON event or a batch (an array, at most 1000). A batch is
/// validated whole: if any event is bad, none is accepted and the reply says which. A valid
/// batch is stored in one commit, all of it or none.
pub async fn events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<guard::Peer>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, Reject> {
    let plan = state.plan.load_full();
    let seen = Seen::of(&method, &uri, peer.as_ref().map(|p| p.0 .0));
    let mut q = BTreeMap::new();
    query_params(query.as_deref(), &mut q);
    let source = resolve_source(&plan, q.get("source").map(String::as_str)).inspect_err(|r| {
        count_refusal(&state, &seen, "unknown", Kind::Conversion, r);
    })?;
    q.remove("source");
    let refuse = |r: Reject| {
        count_refusal(&state, &seen, &source.id, source.kind, &r);
        r
    };
    // The secret (in a header, the query or each event) is checked per event below, as
    // each may carry it; the address, size and signature once for the request, first.
    let peer = peer.map(|p| p.0 .0);
    let raw = admit_peer(&plan, &source, peer, &headers, &body).map_err(refuse)?;
    guard::check_signature(&source, &headers, raw, crate::now_ms())
        .map_err(|r| refuse(r.into()))?;
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| refuse(bad(format!("body is not valid JSON: {e}"))))?;
    let (items, batch) = match v {
        Value::Array(a) => (a, true),
        obj @ Value::Object(_) => (vec![obj], false),
        _ => {
            return Err(refuse(bad(
                "send a JSON object (one event) or an array of them",
            )))
        }
    };
    if items.len() > 1000 {
        return Err(refuse(bad("a batch holds at most 1000 events")));
    }
    let mut evs = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            errors.push(json!({"index": i, "error": "each event must be a JSON object"}));
            continue;
        };
        let mut params = q.clone();
        if let Err(e) = json_params(obj, &mut params) {
            errors.push(json!({"index": i, "error": e}));
            continue;
        }
        check_secret(&source, &headers, &mut params).map_err(refuse)?;
        match Event::from_params(
            params,
            source.kind,
            &source.id,
            &source.map,
            crate::now_ms(),
        ) {
            Ok(e) => evs.push(e),
            Err(e) => errors.push(json!({"index": i, "error": e.to_string()})),
        }
    }
    // The rate is spent once the sender proved who it is (each event's secret).
    state
        .limiters
        .check(&source)
        .map_err(|r| refuse(r.into()))?;
    if !errors.is_empty() {
        state.telemetry.events(
            &source.id,
            source.kind.as_str(),
            "invalid",
            items.len() as u64,
        );
        state.telemetry.refused(&source.id, "invalid");
        return Err(Reject {
            code: StatusCode::BAD_REQUEST,
            body: json!({ "error": "invalid events; none were accepted", "errors": errors }),
            reason: "invalid",
            retry_after: None,
        });
    }
    let out = accept(state, plan, evs).await?;
    if batch {
        Ok(Json(json!({ "events": out })))
    } else {
        Ok(Json(out.into_iter().next().unwrap_or_default()))
    }
}
