//! Rendering: an event plus a postback become the exact HTTP request to send.
//!
//! Rendering happens when a delivery is attempted, not when the event arrives, so a retry of
//! a postback whose rule was fixed goes out with the fixed rule.

mod simple;
pub mod template;

use crate::ingest::event::{Event, CANONICAL};
use crate::plan::{Auth, Body, Entry, JsonTemplate, Method, Plan};
use minijinja::Value;
use std::collections::BTreeMap;
use template::Engine;

/// Names templates may use besides the canonical fields (see [`event_context`]).
pub const EXTRA_NAMES: &[&str] = &[
    "txid",
    "tid",
    "sum",
    "amount",
    "ua",
    "click_id",
    "subid",
    "aff_id",
    "affiliate",
    "offer",
    "event_id",
    "kind",
    "source",
    "date",
    "time",
    "rand",
    "params",
    "vars",
    "postback_id",
    "received_at",
    "uuid",
];

/// The variables a template sees for one event. Every canonical field is present (none
/// when the event lacks it, which renders empty), numbers are numbers.
pub fn event_context(
    event: &Event,
    vars: Option<&BTreeMap<String, String>>,
    postback_id: &str,
) -> Value {
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    for name in CANONICAL {
        let v = match event.field(name) {
            Some(s) if *name == "payout" || *name == "revenue" => number(s),
            Some(s) => Value::from(s),
            None => Value::from(()),
        };
        m.insert(name, v);
    }
    let ts = event
        .field("timestamp")
        .and_then(template::parse_instant)
        .or_else(|| jiff::Timestamp::from_millisecond(event.received_at).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let utc = ts.to_zoned(jiff::tz::TimeZone::UTC);
    m.insert("timestamp", Value::from(ts.as_second()));
    m.insert("date", Value::from(utc.strftime("%Y-%m-%d").to_string()));
    m.insert("time", Value::from(utc.strftime("%H:%M:%S").to_string()));
    for (alias, canonical) in [
        ("txid", "transaction_id"),
        ("tid", "transaction_id"),
        ("sum", "payout"),
        ("amount", "payout"),
        ("ua", "user_agent"),
        ("click_id", "clickid"),
        ("subid", "clickid"),
        ("aff_id", "affiliate_id"),
        ("affiliate", "affiliate_id"),
        ("offer", "offer_id"),
    ] {
        let v = m.get(canonical).cloned().unwrap_or_default();
        m.insert(alias, v);
    }
    m.insert("event_id", Value::from(event.id.as_str()));
    m.insert("kind", Value::from(event.kind.as_str()));
    m.insert("source", Value::from(event.source.as_str()));
    m.insert("received_at", Value::from(event.received_at));
    m.insert("rand", Value::from(uuid::Uuid::new_v4().to_string()));
    m.insert("postback_id", Value::from(postback_id));
    m.insert("params", Value::from_serialize(&event.params));
    let vars = vars.cloned().unwrap_or_default();
    m.insert("vars", Value::from_serialize(&vars));
    Value::from_iter(m)
}

/// A money amount as a number: whole amounts as integers (so `30` renders as `30`, not
/// `30.0`), others as floats.
fn number(s: &str) -> Value {
    match s.parse::<f64>() {
        Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
        Ok(f) => Value::from(f),
        Err(_) => Value::from(s),
    }
}

/// The request a delivery sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    /// The request with secret values masked, for showing to people.
    pub fn redacted(mut self, plan: &Plan) -> Request {
        self.url = plan.redact(&self.url);
        for (_, v) in &mut self.headers {
            *v = plan.redact(v);
        }
        if let Some(b) = &self.body {
            self.body = Some(plan.redact(&String::from_utf8_lossy(b)).into_bytes());
        }
        self
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("{part}: {message}")]
    Template { part: String, message: String },
    #[error("rendered url `{0}` is not a valid http(s) url")]
    BadUrl(String),
    #[error("header `{0}` would contain a line break")]
    BadHeader(String),
}

fn render_part(
    engine: &Engine,
    part: &str,
    id: &template::TemplateId,
    ctx: &Value,
) -> Result<String, RenderError> {
    engine
        .render(id, ctx)
        .map_err(|message| RenderError::Template {
            part: part.to_string(),
            message,
        })
}

/// Renders one entry's postback for an event.
pub fn render(plan: &Plan, entry: &Entry, event: &Event) -> Result<Request, RenderError> {
    let pb = &plan.postbacks[entry.postback];
    let http = &pb.http;
    let ctx = event_context(event, Some(&entry.vars), &pb.id);
    let engine = &plan.engine;
    let mut url = render_part(engine, "url", &http.url, &ctx)?;
    if !http.params.is_empty() {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, t) in &http.params {
            ser.append_pair(k, &render_part(engine, &format!("params.{k}"), t, &ctx)?);
        }
        let q = ser.finish();
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&q);
    }
    let parsed = reqwest::Url::parse(&url).map_err(|_| RenderError::BadUrl(url.clone()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(RenderError::BadUrl(url));
    }
    let mut headers = Vec::new();
    for (k, t) in &http.headers {
        let v = render_part(engine, &format!("headers.{k}"), t, &ctx)?;
        if v.contains(['\r', '\n']) {
            return Err(RenderError::BadHeader(k.clone()));
        }
        headers.push((k.clone(), v));
    }
    match &http.auth {
        Some(Auth::Basic { username, password }) => {
            use base64_lite::encode;
            headers.push((
                "authorization".into(),
                format!(
                    "Basic {}",
                    encode(format!("{username}:{password}").as_bytes())
                ),
            ));
        }
        Some(Auth::Bearer(token)) => {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        None => {}
    }
    let body = match &http.body {
        Body::None => None,
        Body::Form(fields) => {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, t) in fields {
                ser.append_pair(k, &render_part(engine, &format!("form.{k}"), t, &ctx)?);
            }
            set_content_type(&mut headers, "application/x-www-form-urlencoded");
            Some(ser.finish().into_bytes())
        }
        Body::Json(j) => {
            let v = render_json(engine, j, &ctx, "json")?;
            set_content_type(&mut headers, "application/json");
            Some(serde_json::to_vec(&v).unwrap_or_default())
        }
        Body::Raw {
            template,
            content_type,
        } => {
            let b = render_part(engine, "body", template, &ctx)?;
            set_content_type(&mut headers, content_type);
            Some(b.into_bytes())
        }
    };
    if http.method != Method::Get && body.is_none() {
        // Some servers reject a POST without a length; send an explicit empty body.
        return Ok(Request {
            method: http.method,
            url,
            headers,
            body: Some(Vec::new()),
        });
    }
    Ok(Request {
        method: http.method,
        url,
        headers,
        body,
    })
}

fn set_content_type(headers: &mut Vec<(String, String)>, ct: &str) {
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type".into(), ct.into()));
    }
}

fn render_json(
    engine: &Engine,
    j: &JsonTemplate,
    ctx: &Value,
    path: &str,
) -> Result<serde_json::Value, RenderError> {
    Ok(match j {
        JsonTemplate::Static(v) => v.clone(),
        JsonTemplate::Text(t) => serde_json::Value::String(render_part(engine, path, t, ctx)?),
        JsonTemplate::Whole(t) => {
            let text = render_part(engine, path, t, ctx)?;
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        }
        JsonTemplate::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| render_json(engine, x, ctx, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        JsonTemplate::Object(fields) => {
            let mut m = serde_json::Map::new();
            for (k, x) in fields {
                m.insert(
                    k.clone(),
                    render_json(engine, x, ctx, &format!("{path}.{k}"))?,
                );
            }
            serde_json::Value::Object(m)
        }
    })
}

/// Standard base64 for basic auth, to avoid a dependency for twelve lines.
mod base64_lite {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[cfg(test)]
    #[test]
    fn known_vectors() {
        assert_eq!(
            encode(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(encode(b"ab"), "YWI=");
        assert_eq!(encode(b""), "");
    }
}
