//! Rendering: an event plus a postback become the exact HTTP request to send.
//!
//! Rendering happens when a delivery is attempted, not when the event arrives, so a retry of
//! a postback whose rule was fixed goes out with the fixed rule.

#[cfg(test)]
mod props;
pub mod sign;
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
///
/// `secrets` are the values templates place (`__secret_N`); without them every secret
/// reads `***`, which is how a request is rendered for showing.
pub fn event_context(
    event: &Event,
    vars: Option<&BTreeMap<String, String>>,
    postback_id: &str,
    secrets: Option<Arc<[String]>>,
) -> Value {
    Value::from_object(Context {
        event: event.clone(),
        vars: vars.cloned().unwrap_or_default(),
        postback_id: postback_id.to_string(),
        rand: OnceLock::new(),
        secrets,
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
    /// The secrets' values, or none to show each as `***`.
    secrets: Option<Arc<[String]>>,
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
        if let Some(n) = name.strip_prefix(crate::config::SECRET_PREFIX) {
            let n: usize = n.parse().ok()?;
            return Some(Value::from_safe_string(match &self.secrets {
                Some(values) => values.get(n)?.clone(),
                None => "***".to_string(),
            }));
        }
        if let Some(field) = name.strip_prefix(template::EXACT_PREFIX) {
            return Some(match self.event.field(field) {
                Some(s) => exact_amount(s),
                None => Value::from(()),
            });
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

/// A money amount as a number, for expressions: whole amounts as integers, exactly (up to
/// 39 digits), others as floats. Printing an amount does not go through this: see
/// [`exact_amount`].
fn number(s: &str) -> Value {
    if let Ok(i) = s.trim().parse::<i128>() {
        return Value::from(i);
    }
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() => Value::from(f),
        _ => Value::from(s),
    }
}

/// A money amount as printed: the text as received when it is a plain decimal (`12.50`
/// stays `12.50`, `12345678901234567890` stays whole), written unquoted in JSON like a
/// number; any other text is an ordinary string.
fn exact_amount(s: &str) -> Value {
    if is_decimal(s) {
        Value::from_safe_string(s.to_string())
    } else {
        Value::from(s)
    }
}

/// `-?digits[.digits][e[-]digits]`: a JSON number that needs no escaping in a URL.
fn is_decimal(s: &str) -> bool {
    let b = s.strip_prefix('-').unwrap_or(s).as_bytes();
    let digits = |b: &[u8], i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    let mut i = 0;
    if !digits(b, &mut i) || (b[0] == b'0' && i > 1) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(b, &mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e') | Some(b'E')) {
        i += 1;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        if !digits(b, &mut i) {
            return false;
        }
    }
    i == b.len()
}

/// The request a delivery sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// A rendered postback: the request that is sent and the same request as people see it,
/// with every secret shown as `***` in whatever form its template put it (encoded,
/// escaped, filtered, inside an `authorization` header).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub request: Request,
    /// None when the postback places no secret: then it is shown as it is sent.
    shown: Option<Request>,
}

impl Rendered {
    /// The request for logs, the delivery log and the tools.
    pub fn shown(&self) -> &Request {
        self.shown.as_ref().unwrap_or(&self.request)
    }

    /// Signs the request the Standard Webhooks way, as message `id` sent at `timestamp`
    /// (unix seconds): `webhook-id`, `webhook-timestamp` and `webhook-signature`, one
    /// `v1,<base64 HMAC-SHA256 of id.timestamp.body>` per key. The shown request carries
    /// the same headers (a signature reveals nothing of its key).
    pub fn sign(&mut self, keys: &crate::plan::SigningKeys, id: &str, timestamp: i64) {
        let headers = sign::standard_webhooks(&self.request, keys, id, timestamp);
        for r in std::iter::once(&mut self.request).chain(self.shown.as_mut()) {
            r.headers
                .retain(|(k, _)| !sign::HEADERS.contains(&k.to_ascii_lowercase().as_str()));
            r.headers.extend(headers.iter().cloned());
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("{part}: {message}")]
    Template { part: String, message: String },
    /// The url as shown (secrets masked).
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

/// Renders one entry's postback for an event: what is sent, and what is shown.
/// Whether every template of the entry's postback is bounded (the simple path, or minijinja
/// without a loop or a macro): then rendering costs microseconds, in proportion to the
/// template and the event, and needs no thread of its own.
pub fn is_cheap(plan: &Plan, entry: &Entry) -> bool {
    fn json(engine: &template::Engine, t: &crate::plan::JsonTemplate) -> bool {
        use crate::plan::JsonTemplate as J;
        match t {
            J::Static(_) => true,
            J::Text(id) | J::Whole(id) => engine.is_bounded(id),
            J::Array(items) => items.iter().all(|i| json(engine, i)),
            J::Object(fields) => fields.iter().all(|(_, v)| json(engine, v)),
        }
    }
    let e = &plan.engine;
    let http = &plan.postbacks[entry.postback].http;
    e.is_bounded(&http.url)
        && http.params.iter().all(|(_, t)| e.is_bounded(t))
        && http.headers.iter().all(|(_, t)| e.is_bounded(t))
        && match &http.body {
            Body::None => true,
            Body::Form(fields) => fields.iter().all(|(_, t)| e.is_bounded(t)),
            Body::Json(j) => json(e, j),
            Body::Raw { template, .. } => e.is_bounded(template),
        }
}

pub fn render(plan: &Plan, entry: &Entry, event: &Event) -> Result<Rendered, RenderError> {
    let has_secret = plan.postbacks[entry.postback].has_secret;
    let request = match build(plan, entry, event, true) {
        Ok(r) => r,
        Err(RenderError::BadUrl(_)) if has_secret => {
            let shown = build(plan, entry, event, false).map(|r| r.url);
            return Err(RenderError::BadUrl(shown.unwrap_or_else(|_| "***".into())));
        }
        Err(e) => return Err(e),
    };
    let shown = if has_secret {
        Some(build(plan, entry, event, false)?)
    } else {
        None
    };
    Ok(Rendered { request, shown })
}

/// The request with secrets revealed (to send) or shown as `***`. Only the one sent is
/// checked for a valid url: a masked url (`***` for a secret that is the whole url) need
/// not be one.
fn build(plan: &Plan, entry: &Entry, event: &Event, reveal: bool) -> Result<Request, RenderError> {
    let pb = &plan.postbacks[entry.postback];
    let http = &pb.http;
    let (vars, secrets) = if reveal {
        (&entry.vars, Some(plan.template_secrets.clone()))
    } else {
        (entry.shown_vars.as_ref().unwrap_or(&entry.vars), None)
    };
    let ctx = event_context(event, Some(vars), &pb.id, secrets);
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
    // The url as it goes on the wire: parsing drops tabs and line breaks and encodes what
    // must be, so what is logged is what is sent.
    match reqwest::Url::parse(&url) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() =>
        {
            url = parsed.into();
        }
        _ if reveal => return Err(RenderError::BadUrl(url)),
        _ => url = escape_controls(&url),
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
        Some(Auth::Basic { masked: true, .. }) if !reveal => {
            headers.push(("authorization".into(), "Basic ***".into()));
        }
        Some(Auth::Basic {
            username, password, ..
        }) => {
            use base64::Engine as _;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            headers.push(("authorization".into(), format!("Basic {token}")));
        }
        Some(Auth::Bearer { token, shown }) => {
            let t = if reveal { token } else { shown };
            headers.push(("authorization".into(), format!("Bearer {t}")));
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
            let mut out = String::new();
            render_json(engine, j, &ctx, "json", &mut out)?;
            set_content_type(&mut headers, "application/json");
            Some(out.into_bytes())
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
    // Some servers reject a POST without a length; send an explicit empty body.
    let body = match body {
        None if http.method != Method::Get => Some(Vec::new()),
        b => b,
    };
    Ok(Request {
        method: http.method,
        url,
        headers,
        body,
    })
}

/// Text with control characters written as escapes (`\r`, `\n`, `\u{1b}`), for logs: a
/// value from a webhook cannot start a line of its own.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn set_content_type(headers: &mut Vec<(String, String)>, ct: &str) {
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type".into(), ct.into()));
    }
}

/// Writes a JSON body. A string that was one whole expression is written as the JSON its
/// value is (a number as its text, so an amount keeps every digit it arrived with), or as a
/// string when it is not JSON.
fn render_json(
    engine: &Engine,
    j: &JsonTemplate,
    ctx: &Value,
    path: &str,
    out: &mut String,
) -> Result<(), RenderError> {
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    match j {
        JsonTemplate::Static(v) => out.push_str(&v.to_string()),
        JsonTemplate::Text(t) => out.push_str(&quoted(&render_part(engine, path, t, ctx)?)),
        JsonTemplate::Whole(t) => {
            let text = render_part(engine, path, t, ctx)?;
            let trimmed = text.trim();
            if !trimmed.is_empty() && serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_ok()
            {
                out.push_str(trimmed);
            } else {
                out.push_str(&quoted(&text));
            }
        }
        JsonTemplate::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render_json(engine, x, ctx, &format!("{path}[{i}]"), out)?;
            }
            out.push(']');
        }
        JsonTemplate::Object(fields) => {
            out.push('{');
            for (i, (k, x)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&quoted(k));
                out.push(':');
                render_json(engine, x, ctx, &format!("{path}.{k}"), out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}
