//! Rendering: an event plus a postback become the exact HTTP request to send.
//!
//! Rendering happens when a delivery is attempted, not when the event arrives, so a retry of
//! a postback whose rule was fixed goes out with the fixed rule.

mod simple;
pub mod template;

use crate::ingest::event::{Event, CANONICAL};
use crate::plan::{Auth, Body, Entry, JsonTemplate, Method, Plan};
use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
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
///
/// Values are made when a template asks for them: a postback URL reads a handful of the
/// fifty names, and building them all (dates, a random id, the params map) cost more than
/// rendering.
pub fn event_context(
    event: &Event,
    vars: Option<&BTreeMap<String, String>>,
    postback_id: &str,
) -> Value {
    Value::from_object(Context {
        event: event.clone(),
        vars: vars.cloned().unwrap_or_default(),
        postback_id: postback_id.to_string(),
        rand: OnceLock::new(),
    })
}

/// The context behind [`event_context`].
#[derive(Debug)]
struct Context {
    event: Event,
    vars: BTreeMap<String, String>,
    postback_id: String,
    /// One random id per render, however often the template uses it.
    rand: OnceLock<Value>,
}

impl Context {
    fn lookup(&self, name: &str) -> Option<Value> {
        let alias = match name {
            "txid" | "tid" => Some("transaction_id"),
            "sum" | "amount" => Some("payout"),
            "ua" => Some("user_agent"),
            "click_id" | "subid" => Some("clickid"),
            "aff_id" | "affiliate" => Some("affiliate_id"),
            "offer" => Some("offer_id"),
            _ => None,
        };
        if let Some(canonical) = alias {
            return self.lookup(canonical);
        }
        let e = &self.event;
        Some(match name {
            "timestamp" => Value::from(self.instant().as_second()),
            "date" => Value::from(self.utc().strftime("%Y-%m-%d").to_string()),
            "time" => Value::from(self.utc().strftime("%H:%M:%S").to_string()),
            "event_id" => Value::from(e.id.as_str()),
            "kind" => Value::from(e.kind.as_str()),
            "source" => Value::from(e.source.as_str()),
            "received_at" => Value::from(e.received_at),
            "rand" => self
                .rand
                .get_or_init(|| Value::from(uuid::Uuid::new_v4().to_string()))
                .clone(),
            "postback_id" => Value::from(self.postback_id.as_str()),
            "params" => Value::from_serialize(&e.params),
            "vars" => Value::from_serialize(&self.vars),
            _ if CANONICAL.contains(&name) => match e.field(name) {
                Some(s) if name == "payout" || name == "revenue" => number(s),
                Some(s) => Value::from(s),
                None => Value::from(()),
            },
            _ => return None,
        })
    }

    /// The event's own timestamp when it has a readable one, else its arrival.
    fn instant(&self) -> jiff::Timestamp {
        self.event
            .field("timestamp")
            .and_then(template::parse_instant)
            .or_else(|| jiff::Timestamp::from_millisecond(self.event.received_at).ok())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    fn utc(&self) -> jiff::Zoned {
        self.instant().to_zoned(jiff::tz::TimeZone::UTC)
    }
}

impl Object for Context {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.lookup(key.as_str()?)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut names: Vec<&str> = CANONICAL
            .iter()
            .chain(EXTRA_NAMES)
            .copied()
            .filter(|n| *n != "uuid")
            .chain(["timestamp"])
            .collect();
        names.sort_unstable();
        names.dedup();
        Enumerator::Values(names.into_iter().map(Value::from).collect())
    }
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
