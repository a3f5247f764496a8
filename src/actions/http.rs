//! `http:`: any HTTP request, written out: method, URL with its query, headers, a form, JSON
//! or raw body, basic or bearer auth, Standard Webhooks signing, and what counts as success.
//! The URL's scheme and host are written in the rule, never rendered from event data.

use super::{Action, Answer, Build, Message, Method, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::{expand_shorthand, Escape, TemplateId};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

pub const KIND: &str = "http";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub method: Option<Spanned<String>>,
    pub url: Spanned<String>,
    /// Query parameters appended to the URL (values are templates, encoded for you).
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// A form body (`application/x-www-form-urlencoded`).
    pub form: Option<BTreeMap<String, Spanned<String>>>,
    /// A JSON body written as YAML; every string in it is a template.
    pub json: Option<Spanned<serde_json::Value>>,
    /// A raw body template with its content type.
    pub body: Option<Spanned<String>>,
    pub content_type: Option<String>,
    pub auth: Option<RawAuth>,
    pub timeout: Option<Spanned<String>>,
    pub success: Option<RawSuccess>,
    /// Sign the request the Standard Webhooks way.
    pub sign: Option<RawSign>,
}

/// `sign: { secret: … }` or, while a key rotates, `sign: { secrets: [new, old] }`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSign {
    pub secret: Option<Spanned<String>>,
    pub secrets: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub bearer: Option<Spanned<String>>,
}

/// How to tell success from the response, for APIs that answer 200 to failures.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSuccess {
    /// Accepted status codes (default 200-299).
    pub status: Option<Vec<u16>>,
    /// The body must contain this text.
    pub body_contains: Option<String>,
    /// The body must not contain this text.
    pub body_not_contains: Option<String>,
    /// A JSON field of the body (dotted path) must equal this value, e.g. `code: 0`.
    #[serde(default)]
    pub json: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug)]
pub struct Http {
    pub method: Method,
    /// The host the URL is sent to, as written in the rule, and its own timeout.
    pub target: Target,
    pub url: TemplateId,
    pub params: Vec<(String, TemplateId)>,
    pub headers: Vec<(String, TemplateId)>,
    pub body: Body,
    pub auth: Option<Auth>,
    pub success: Success,
    /// Standard Webhooks signing keys (decoded from `whsec_…`), newest first.
    pub sign: Option<SigningKeys>,
}

/// Keys that sign a postback the Standard Webhooks way. Never printed.
#[derive(Clone, PartialEq)]
pub struct SigningKeys(pub Vec<Vec<u8>>);

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKeys({} keys)", self.0.len())
    }
}

#[derive(Debug)]
pub enum Body {
    None,
    Form(Vec<(String, TemplateId)>),
    Json(JsonTemplate),
    Raw {
        template: TemplateId,
        content_type: String,
    },
}

/// A JSON body whose strings are templates. A string that is one whole expression keeps
/// the value's type (`"{{ payout }}"` becomes a number).
#[derive(Debug)]
pub enum JsonTemplate {
    Static(serde_json::Value),
    Text(TemplateId),
    Whole(TemplateId),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

#[derive(Debug, Clone)]
pub enum Auth {
    /// `masked`: the username or password is a secret, so the header shows as `Basic ***`.
    Basic {
        username: String,
        password: String,
        masked: bool,
    },
    /// The token, and the token as shown (`***` where it holds a secret).
    Bearer { token: String, shown: String },
}

#[derive(Debug, Clone, Default)]
pub struct Success {
    /// Accepted statuses; empty means 200-299.
    pub status: Vec<u16>,
    pub body_contains: Option<String>,
    pub body_not_contains: Option<String>,
    pub json: Vec<(String, serde_json::Value)>,
}

impl Action for Http {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let json = json_templates;
        let mut out = vec![&self.url];
        out.extend(self.params.iter().map(|(_, t)| t));
        out.extend(self.headers.iter().map(|(_, t)| t));
        match &self.body {
            Body::None => {}
            Body::Form(fields) => out.extend(fields.iter().map(|(_, t)| t)),
            Body::Json(j) => json(j, &mut out),
            Body::Raw { template, .. } => out.push(template),
        }
        out
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        render(self, s).map(Message::Http)
    }
    fn judge(&self, answer: Answer) -> Outcome {
        match answer.http() {
            Ok(a) => judge(a, &self.success),
            Err(o) => o,
        }
    }
    fn signing(&self) -> Option<&SigningKeys> {
        self.sign.as_ref()
    }
}

/// Every template in a JSON template.
pub(super) fn json_templates<'a>(t: &'a JsonTemplate, out: &mut Vec<&'a TemplateId>) {
    match t {
        JsonTemplate::Static(_) => {}
        JsonTemplate::Text(id) | JsonTemplate::Whole(id) => out.push(id),
        JsonTemplate::Array(items) => items.iter().for_each(|i| json_templates(i, out)),
        JsonTemplate::Object(fields) => fields.iter().for_each(|(_, v)| json_templates(v, out)),
    }
}

/// Judges an answer against a postback's success rule.
pub fn judge(a: super::HttpAnswer, success: &Success) -> Outcome {
    let super::HttpAnswer {
        status,
        retry_after,
        body,
    } = a;
    let status_ok = if success.status.is_empty() {
        (200..300).contains(&status)
    } else {
        success.status.contains(&status)
    };
    if !status_ok {
        return Outcome::Status {
            status,
            body,
            retry_after,
        };
    }
    if let Some(why) = body_verdict(&body, success) {
        return Outcome::BodyRejected { status, body, why };
    }
    Outcome::Delivered { status, body }
}

/// Why the body fails the success rule, if it does.
pub fn body_verdict(body: &str, success: &Success) -> Option<String> {
    if let Some(needle) = &success.body_contains {
        if !body.contains(needle.as_str()) {
            return Some(format!("response body does not contain `{needle}`"));
        }
    }
    if let Some(needle) = &success.body_not_contains {
        if body.contains(needle.as_str()) {
            return Some(format!("response body contains `{needle}`"));
        }
    }
    if !success.json.is_empty() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
            return Some("response body is not JSON".into());
        };
        for (path, want) in &success.json {
            let got = path
                .split('.')
                .try_fold(&v, |cur, seg| match seg.parse::<usize>() {
                    Ok(i) => cur.get(i),
                    Err(_) => cur.get(seg),
                });
            if got != Some(want) {
                let got = got
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "nothing".into());
                return Some(format!("response `{path}` is {got}, expected {want}"));
            }
        }
    }
    None
}

/// The request with secrets revealed (to send) or shown as `***`. Only the one sent is
/// checked for a valid url: a masked url (`***` for a secret that is the whole url) need
/// not be one.
fn render(http: &Http, s: &Scope) -> Result<Request, RenderError> {
    let mut url = s.text("url", &http.url)?;
    if !http.params.is_empty() {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, t) in &http.params {
            ser.append_pair(k, &s.text(&format!("params.{k}"), t)?);
        }
        let q = ser.finish();
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&q);
    }
    let url = wire_url(url, s.reveal)?;
    let mut headers = Vec::new();
    for (k, t) in &http.headers {
        let v = s.text(&format!("headers.{k}"), t)?;
        if v.contains(['\r', '\n']) {
            return Err(RenderError::BadHeader(k.clone()));
        }
        headers.push((k.clone(), v));
    }
    match &http.auth {
        Some(Auth::Basic { masked: true, .. }) if !s.reveal => {
            headers.push(("authorization".into(), "Basic ***".into()));
        }
        Some(Auth::Basic {
            username, password, ..
        }) => headers.push(("authorization".into(), basic(username, password))),
        Some(Auth::Bearer { token, shown }) => {
            headers.push((
                "authorization".into(),
                format!("Bearer {}", s.pick(token, shown)),
            ));
        }
        None => {}
    }
    let body = match &http.body {
        Body::None => None,
        Body::Form(fields) => {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, t) in fields {
                ser.append_pair(k, &s.text(&format!("form.{k}"), t)?);
            }
            set_content_type(&mut headers, "application/x-www-form-urlencoded");
            Some(ser.finish().into_bytes())
        }
        Body::Json(j) => {
            let mut out = String::new();
            render_json(s, j, "json", &mut out)?;
            set_content_type(&mut headers, "application/json");
            Some(out.into_bytes())
        }
        Body::Raw {
            template,
            content_type,
        } => {
            let b = s.text("body", template)?;
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

/// `Basic <base64 of user:password>`.
pub fn basic(username: &str, password: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {token}")
}

/// The url as it goes on the wire: parsing drops tabs and line breaks and encodes what must
/// be, so what is logged is what is sent. A url to send must be http(s) with a host; one to
/// show need not be (a secret may be all of it).
pub fn wire_url(url: String, reveal: bool) -> Result<String, RenderError> {
    match reqwest::Url::parse(&url) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() =>
        {
            Ok(parsed.into())
        }
        _ if reveal => Err(RenderError::BadUrl(url)),
        _ => Ok(crate::render::escape_controls(&url)),
    }
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
pub(super) fn render_json(
    s: &Scope,
    j: &JsonTemplate,
    path: &str,
    out: &mut String,
) -> Result<(), RenderError> {
    let quoted = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
    match j {
        JsonTemplate::Static(v) => out.push_str(&v.to_string()),
        JsonTemplate::Text(t) => out.push_str(&quoted(&s.text(path, t)?)),
        JsonTemplate::Whole(t) => {
            let text = s.text(path, t)?;
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
                render_json(s, x, &format!("{path}[{i}]"), out)?;
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
                render_json(s, x, &format!("{path}.{k}"), out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// Compiles `http:`.
pub fn compile(b: &mut dyn Build, h: &Raw) -> Option<Http> {
    let method = match h.method.as_ref().map(|m| m.value.to_ascii_uppercase()) {
        None => Method::Get,
        Some(m) => match m.as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => {
                if let Some(at) = &h.method {
                    b.error(
                        at,
                        format!("unknown method `{m}`"),
                        Some("use GET, POST, PUT, PATCH or DELETE"),
                    );
                }
                Method::Get
            }
        },
    };
    let (url_text, url_src) = b.text(&h.url);
    check_url(b, &h.url, &url_text);
    let url = b.compile(&h.url, &url_src, Escape::Url, true);
    let params = super::compile_fields(b, &h.params);
    let mut headers = Vec::new();
    for (k, v) in &h.headers {
        if k.is_empty()
            || !k
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c))
        {
            b.error(v, format!("`{k}` is not a valid header name"), None);
            continue;
        }
        if let Some(t) = b.template(v) {
            headers.push((k.clone(), t));
        }
    }
    let bodies = [h.form.is_some(), h.json.is_some(), h.body.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if bodies > 1 {
        b.error(&h.url, "give at most one of form, json and body", None);
    }
    if bodies > 0 && method == Method::Get {
        let at = h
            .method
            .as_ref()
            .map(|m| (m.referenced.line(), m.referenced.column()));
        let (l, c) = at.unwrap_or((h.url.referenced.line(), h.url.referenced.column()));
        b.error_at(
            l,
            c,
            "a GET request cannot carry a body".into(),
            Some("set `method: POST`".into()),
        );
    }
    let body = if let Some(form) = &h.form {
        Body::Form(super::compile_fields(b, form))
    } else if let Some(j) = &h.json {
        let at = Spanned::new(String::new(), j.referenced, j.defined);
        Body::Json(json_template(b, &at, &j.value))
    } else if let Some(raw) = &h.body {
        let (_, text) = b.text(raw);
        let ct = h
            .content_type
            .clone()
            .unwrap_or_else(|| "text/plain; charset=utf-8".into());
        let esc = if ct.contains("json") {
            Escape::Json
        } else {
            Escape::Plain
        };
        match b.compile(raw, &text, esc, false) {
            Some(t) => Body::Raw {
                template: t,
                content_type: ct,
            },
            None => Body::None,
        }
    } else {
        Body::None
    };
    let auth = h
        .auth
        .as_ref()
        .and_then(|a| match (&a.username, &a.password, &a.bearer) {
            (Some(u), Some(p), None) => {
                let (username, u_shown) = b.value(u);
                let (password, p_shown) = b.value(p);
                Some(Auth::Basic {
                    username,
                    password,
                    masked: u_shown.is_some() || p_shown.is_some(),
                })
            }
            (None, None, Some(t)) => {
                let (token, shown) = b.value(t);
                Some(Auth::Bearer {
                    shown: shown.unwrap_or_else(|| token.clone()),
                    token,
                })
            }
            _ => {
                b.error(
                    &h.url,
                    "auth: give either username and password, or bearer",
                    Some("auth: { bearer: \"${env:CRM_TOKEN}\" }"),
                );
                None
            }
        });
    let timeout = h.timeout.as_ref().and_then(|t| b.duration(t));
    let success = match &h.success {
        Some(s) => Success {
            status: s.status.clone().unwrap_or_default(),
            body_contains: s.body_contains.clone(),
            body_not_contains: s.body_not_contains.clone(),
            json: s.json.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        },
        None => Success::default(),
    };
    let sign = h.sign.as_ref().and_then(|g| signing_keys(b, g, &h.url));
    Some(Http {
        sign,
        method,
        target: Target {
            destination: super::destination_of(&url_text),
            timeout,
        },
        url: url?,
        params,
        headers,
        body,
        auth,
        success,
    })
}

/// URL confinement: the scheme and host are written in the rule, never rendered from event
/// data, so a crafted click id cannot redirect a postback. `text` has secrets in place; a
/// message shows the url as written, so an expanded secret never goes into one.
pub fn check_url(b: &mut dyn Build, at: &Spanned<String>, text: &str) {
    let static_prefix = text.split('{').next().unwrap_or("");
    let after_scheme = static_prefix
        .strip_prefix("https://")
        .or_else(|| static_prefix.strip_prefix("http://"));
    match after_scheme {
        None => b.error(
            at,
            format!(
                "url must start with http:// or https://, got `{}`",
                truncate(&at.value, 60)
            ),
            Some("write the full url, e.g. https://tracker.example/postback?cid={clickid}"),
        ),
        Some(rest) if !rest.contains(['/', '?']) && text.contains('{') => b.error(
            at,
            "url: the host must be written out, not templated",
            Some("keep macros in the path and query: https://tracker.example/pb?cid={clickid}"),
        ),
        Some("") => b.error(at, "url has no host", None),
        _ => {}
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

pub(super) fn json_template(
    b: &mut dyn Build,
    at: &Spanned<String>,
    v: &serde_json::Value,
) -> JsonTemplate {
    match v {
        serde_json::Value::String(s) => {
            let at_text = Spanned::new(s.clone(), at.referenced, at.defined);
            let (expanded, src) = b.text(&at_text);
            let src = expand_shorthand(&src);
            if !src.contains("{{") && !src.contains("{%") {
                return JsonTemplate::Static(serde_json::Value::String(expanded));
            }
            let trimmed = src.trim();
            let whole = trimmed.starts_with("{{")
                && trimmed.ends_with("}}")
                && trimmed.matches("{{").count() == 1;
            let (src, esc) = if whole {
                (trimmed.to_string(), Escape::Json)
            } else {
                (src, Escape::Plain)
            };
            match b.compile(&at_text, &src, esc, false) {
                Some(t) if whole => JsonTemplate::Whole(t),
                Some(t) => JsonTemplate::Text(t),
                None => JsonTemplate::Static(v.clone()),
            }
        }
        serde_json::Value::Array(a) => {
            JsonTemplate::Array(a.iter().map(|x| json_template(b, at, x)).collect())
        }
        serde_json::Value::Object(o) => JsonTemplate::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), json_template(b, at, x)))
                .collect(),
        ),
        other => JsonTemplate::Static(other.clone()),
    }
}

/// `sign:`: each secret from `${env:…}`/`${file:…}`, `whsec_` and base64, as the Standard
/// Webhooks specification writes them.
fn signing_keys(b: &mut dyn Build, g: &RawSign, url: &Spanned<String>) -> Option<SigningKeys> {
    let all: Vec<&Spanned<String>> = g.secret.iter().chain(g.secrets.iter().flatten()).collect();
    if all.is_empty() || all.len() > 2 {
        let at = all.first().copied().unwrap_or(url);
        b.error(
            at,
            "sign: give one secret, or two (new and old) while a key rotates",
            Some("sign: { secret: \"${env:WEBHOOK_SECRET}\" }"),
        );
        return None;
    }
    let mut keys = Vec::new();
    for s in all {
        if !s.value.trim_start().starts_with("${") {
            b.error(
                s,
                "sign: a signing secret must not be written in the config",
                Some("read it from the environment or a file: ${env:WEBHOOK_SECRET}"),
            );
            continue;
        }
        let (value, _) = b.value(s);
        let raw = value.strip_prefix("whsec_").unwrap_or(&value);
        use base64::Engine;
        match base64::engine::general_purpose::STANDARD.decode(raw.trim()) {
            Ok(k) if !k.is_empty() => keys.push(k),
            _ => b.error(
                s,
                "sign: the secret is not a Standard Webhooks secret (whsec_ and base64)",
                Some("generate one with: echo whsec_$(openssl rand -base64 32)"),
            ),
        }
    }
    (!keys.is_empty()).then_some(SigningKeys(keys))
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::HttpAnswer;

    fn ok(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            retry_after: None,
            body: body.to_string(),
        }
    }

    #[test]
    fn status_classes() {
        let s = Success::default();
        assert!(judge(ok(200, ""), &s).is_success());
        assert!(judge(ok(503, ""), &s).retryable());
        assert!(judge(ok(429, ""), &s).retryable());
        assert!(!judge(ok(400, ""), &s).retryable());
        assert!(!judge(ok(302, ""), &s).is_success());
    }

    #[test]
    fn body_judged_success() {
        let s = Success {
            json: vec![("code".into(), serde_json::json!(0))],
            ..Success::default()
        };
        assert!(judge(ok(200, r#"{"code":0}"#), &s).is_success());
        let o = judge(ok(200, r#"{"code":40001,"message":"bad pixel"}"#), &s);
        assert_eq!(o.class(), "body_rejected");
        assert!(o.parts().2.unwrap().contains("40001"));
        let s = Success {
            body_not_contains: Some("error".into()),
            ..Success::default()
        };
        assert_eq!(
            judge(ok(200, "error: bad token"), &s).class(),
            "body_rejected"
        );
    }
}
