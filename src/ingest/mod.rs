//! Ingest: incoming postbacks and events over HTTP, turned into [`event::Event`]s and
//! handed to the store. A sender always learns what happened: the event id and the
//! postbacks it matched, or a 4xx with a reason. Ingest never waits on outgoing requests.

pub mod event;

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
        map: FieldMap::default(),
        kind: Kind::Conversion,
    }
}

/// A rejected request: status plus a JSON reason.
pub struct Reject(StatusCode, Value);

impl Reject {
    fn new(code: StatusCode, msg: impl Into<String>) -> Reject {
        Reject(code, json!({ "error": msg.into() }))
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn bad(msg: impl Into<String>) -> Reject {
    Reject::new(StatusCode::BAD_REQUEST, msg)
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
        Some(_) => Err(Reject::new(
            StatusCode::UNAUTHORIZED,
            format!("wrong secret for source `{}`", source.id),
        )),
        None => {
            let where_ = match &source.secret_header {
                Some(h) => format!("header `{h}`"),
                None => format!("parameter `{}`", source.secret_param),
            };
            Err(Reject::new(
                StatusCode::UNAUTHORIZED,
                format!("source `{}` requires its secret in {where_}", source.id),
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        r.1.get("error")
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
    match r.0.as_u16() {
        401 | 403 => "unauthorized",
        404 => "unknown_source",
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
            crate::telemetry::events(&source, kind.as_str(), "accepted", n);
            Ok(all
                .into_iter()
                .map(|a| {
                    tracing::debug!(event = %a.event_id, %kind, %source, matched = a.matched.len(), queued = a.queued, "event accepted");
                    for m in &a.matched {
                        crate::telemetry::matched(m);
                    }
                    json!({ "event_id": a.event_id, "matched": a.matched, "queued": a.queued, "deliveries": a.deliveries })
                })
                .collect())
        }
        Err(e) => {
            tracing::error!(error = %e, events = n, "events not stored; answering 503");
            crate::telemetry::events(&source, kind.as_str(), "unavailable", n);
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

/// `GET|POST /postback` and `/postback/{source}`: tracker-style incoming postbacks.
pub async fn postback(
    State(state): State<AppState>,
    source: Option<Path<String>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, Reject> {
    let plan = state.plan.load_full();
    let source = resolve_source(&plan, source.as_ref().map(|p| p.0.as_str())).inspect_err(|r| {
        crate::telemetry::event("unknown", "conversion", result_of(r));
    })?;
    let mut params = BTreeMap::new();
    query_params(query.as_deref(), &mut params);
    let parsed = body_params(&headers, &body, &mut params)
        .and_then(|()| check_secret(&source, &headers, &mut params))
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
    let event = parsed.inspect_err(|r| {
        crate::telemetry::event(&source.id, source.kind.as_str(), result_of(r));
    })?;
    let mut out = accept(state, plan, vec![event]).await?;
    Ok(Json(out.pop().unwrap_or_default()))
}

/// `POST /v1/events`: one JSON event or a batch (an array, at most 1000). A batch is
/// validated whole: if any event is bad, none is accepted and the reply says which. A valid
/// batch is stored in one commit, all of it or none.
pub async fn events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, Reject> {
    let plan = state.plan.load_full();
    let mut q = BTreeMap::new();
    query_params(query.as_deref(), &mut q);
    let source = resolve_source(&plan, q.get("source").map(String::as_str)).inspect_err(|r| {
        crate::telemetry::event("unknown", "conversion", result_of(r));
    })?;
    let count_bad = |n: usize, result: &'static str| {
        crate::telemetry::events(&source.id, source.kind.as_str(), result, n as u64);
    };
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        count_bad(1, "invalid");
        bad(format!("body is not valid JSON: {e}"))
    })?;
    let (items, batch) = match v {
        Value::Array(a) => (a, true),
        obj @ Value::Object(_) => (vec![obj], false),
        _ => {
            count_bad(1, "invalid");
            return Err(bad("send a JSON object (one event) or an array of them"));
        }
    };
    if items.len() > 1000 {
        count_bad(items.len(), "invalid");
        return Err(bad("a batch holds at most 1000 events"));
    }
    let mut evs = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            errors.push(json!({"index": i, "error": "each event must be a JSON object"}));
            continue;
        };
        let mut params = q.clone();
        params.remove("source");
        if let Err(e) = json_params(obj, &mut params) {
            errors.push(json!({"index": i, "error": e}));
            continue;
        }
        check_secret(&source, &headers, &mut params)
            .inspect_err(|_| count_bad(1, "unauthorized"))?;
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
    if !errors.is_empty() {
        count_bad(items.len(), "invalid");
        let body = json!({ "error": "invalid events; none were accepted", "errors": errors });
        return Err(Reject(StatusCode::BAD_REQUEST, body));
    }
    let out = accept(state, plan, evs).await?;
    if batch {
        Ok(Json(json!({ "events": out })))
    } else {
        Ok(Json(out.into_iter().next().unwrap_or_default()))
    }
}
