//! Action kinds: what a postback does when it fires. Each kind is one module behind one
//! small interface ([`Action`]): compile its YAML into a checked value (through [`Build`],
//! which the config compiler implements, so errors carry file, line, column, postback id
//! and a hint), render an event into exactly what is sent ([`Message`]), judge the answer
//! its API's way ([`Outcome`]) and say whether a failure is worth retrying.
//!
//! Kinds that speak HTTP render a [`Request`]; e-mail renders a [`email::Mail`]. Sending
//! is `deliver`'s job: one HTTP client and one SMTP pool for every kind.
//!
//! Adding a kind: a module here with its `Raw` type (serde, `deny_unknown_fields`), its
//! `compile`, an `Action` impl and unit tests; a field in `config::raw::RawPostback` and a
//! line in [`KINDS`] and `RawPostback::actions`.

pub mod email;
pub mod ga4;
pub mod http;
pub mod meta;
pub mod outcome;
pub mod sheets;
pub mod sign;
pub mod slack;
pub mod telegram;
pub mod tiktok;
pub mod twilio;

pub use outcome::{HttpAnswer, Outcome, SendError};

use crate::render::template::{Engine, Escape, TemplateId};
use minijinja::Value;
use serde_saphyr::Spanned;
use std::time::Duration;

/// Every action kind, by the key a postback writes it under.
pub const KINDS: [&str; 9] = [
    "http", "email", "slack", "telegram", "twilio", "meta", "ga4", "tiktok", "sheets",
];

/// A compiled action: what one postback sends and how its answer is judged.
pub trait Action: std::fmt::Debug + Send + Sync {
    /// Its key in [`KINDS`].
    fn kind(&self) -> &'static str;
    /// Where it sends and its own timeout.
    fn target(&self) -> &Target;
    /// The host (or `host:port`) it sends to: the key of per-destination limits.
    fn destination(&self) -> &str {
        &self.target().destination
    }
    /// Its own timeout, if it sets one (else `delivery.timeout`).
    fn timeout(&self) -> Option<Duration> {
        self.target().timeout
    }
    /// Attempts in flight to its destination at once, when the kind needs more than
    /// `delivery.per_destination` (Sheets batches rows: a batch can only be as large as
    /// the attempts waiting in it). `delivery.destinations` overrides it.
    fn concurrency(&self) -> Option<usize> {
        None
    }
    /// Every template it renders (to know whether rendering is cheap).
    fn templates(&self) -> Vec<&TemplateId>;
    /// The message for one event: revealed (to send) or with secrets as `***` (to show).
    fn render(&self, s: &Scope) -> Result<Message, RenderError>;
    /// What the answer means, the API's way.
    fn judge(&self, answer: Answer) -> Outcome;
    /// Standard Webhooks keys that sign every attempt (HTTP only).
    fn signing(&self) -> Option<&crate::actions::http::SigningKeys> {
        None
    }
    /// What a one-off test send (`fire --send`, `POST /api/v1/test`) sends instead, for an
    /// API with a validation endpoint (GA4 answers 2xx even to events it drops).
    fn for_test(&self, m: Message) -> Message {
        m
    }
    /// How a test send's answer is judged.
    fn judge_test(&self, answer: Answer) -> Outcome {
        self.judge(answer)
    }
}

/// Where an action sends, and how long an attempt may take.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The host (or `host:port`): the key of per-destination limits.
    pub destination: String,
    /// The action's own timeout (else `delivery.timeout`).
    pub timeout: Option<Duration>,
}

/// Judges an HTTP answer with `judge`; an attempt that got none is judged by how it failed.
pub fn judge_http(answer: Answer, judge: impl FnOnce(HttpAnswer) -> Outcome) -> Outcome {
    match answer.http() {
        Ok(a) => judge(a),
        Err(o) => o,
    }
}

/// What rendering an action reads: the engine, one event's context, and whether secrets are
/// revealed.
pub struct Scope<'a> {
    pub engine: &'a Engine,
    pub ctx: &'a Value,
    /// Secrets as their values (to send), or as `***` (to show).
    pub reveal: bool,
    /// Unix milliseconds at render time.
    pub now_ms: i64,
}

impl Scope<'_> {
    /// Renders one template; `part` names it in errors (`url`, `json.data`, `subject`).
    pub fn text(&self, part: &str, id: &TemplateId) -> Result<String, RenderError> {
        self.engine
            .render(id, self.ctx)
            .map_err(|message| RenderError::Template {
                part: part.to_string(),
                message,
            })
    }

    /// An optional field: one that reads a parameter the event does not have renders
    /// empty (and is left out) rather than failing the delivery.
    pub fn optional(&self, part: &str, id: &TemplateId) -> Result<String, RenderError> {
        self.engine
            .render_or_empty(id, self.ctx)
            .map_err(|message| RenderError::Template {
                part: part.to_string(),
                message,
            })
    }

    /// A literal value or its shown form.
    pub fn pick<'s>(&self, real: &'s str, shown: &'s str) -> &'s str {
        if self.reveal {
            real
        } else {
            shown
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
    /// A value the API would refuse whatever the retry (an e-mail address that is not
    /// one, an event older than the API accepts): the delivery is dead with this reason.
    #[error("{0}")]
    Invalid(String),
}

impl RenderError {
    /// Whether rendering again later could succeed (a template error may be fixed by a
    /// reload; an invalid value stays invalid).
    pub fn retryable(&self) -> bool {
        !matches!(self, RenderError::Invalid(_))
    }
}

/// An HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// An HTTP request as it goes on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    /// A JSON POST.
    pub fn json(url: String, headers: Vec<(String, String)>, body: &serde_json::Value) -> Request {
        let mut headers = headers;
        headers.push(("content-type".into(), "application/json".into()));
        Request {
            method: Method::Post,
            url,
            headers,
            body: Some(body.to_string().into_bytes()),
        }
    }
}

/// What an action sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Http(Request),
    Mail(Box<email::Mail>),
    /// A row appended to a spreadsheet, batched with others bound for the same range.
    Rows(Box<sheets::Row>),
}

impl Message {
    /// `GET`, `POST`…, or `SMTP`.
    pub fn method(&self) -> &str {
        match self {
            Message::Http(r) => r.method.as_str(),
            Message::Mail(_) => "SMTP",
            Message::Rows(_) => "POST",
        }
    }

    /// The URL, or `smtp://relay:port` for mail.
    pub fn target(&self) -> &str {
        match self {
            Message::Http(r) => &r.url,
            Message::Mail(m) => &m.target,
            Message::Rows(r) => &r.url,
        }
    }

    /// Request headers, or the message's (From, To, Cc, Bcc, Reply-To, Subject).
    pub fn headers(&self) -> &[(String, String)] {
        match self {
            Message::Http(r) => &r.headers,
            Message::Mail(m) => &m.headers,
            Message::Rows(r) => &r.headers,
        }
    }

    /// The request body, or the mail's text body.
    pub fn body(&self) -> Option<&[u8]> {
        match self {
            Message::Http(r) => r.body.as_deref(),
            Message::Mail(m) => Some(m.text.as_bytes()),
            Message::Rows(r) => Some(&r.body),
        }
    }

    /// A mail's HTML body.
    pub fn html(&self) -> Option<&str> {
        match self {
            Message::Mail(m) => m.html.as_deref(),
            _ => None,
        }
    }

    /// The body as the delivery log keeps it, its first `limit` bytes. A mail's is the
    /// whole message as rendered: its headers, a blank line, the text, then the HTML part.
    pub fn logged_body(&self, limit: usize) -> Option<String> {
        // Cut where a UTF-8 character starts: only the part kept is copied.
        let cut = |b: &[u8]| {
            let mut end = b.len().min(limit);
            while end > 0 && end < b.len() && (b[end] & 0xC0) == 0x80 {
                end -= 1;
            }
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        let body = self.body().filter(|b| !b.is_empty());
        let Message::Mail(m) = self else {
            return body.map(cut);
        };
        let body = body.map(|b| String::from_utf8_lossy(b).into_owned());
        let mut out: String = m
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect();
        out.push('\n');
        out.push_str(&body.unwrap_or_default());
        if let Some(h) = &m.html {
            out.push_str("\n\n--- html ---\n");
            out.push_str(h);
        }
        Some(cut(out.as_bytes()))
    }
}

/// A rendered postback: what is sent, and the same as people see it, with every secret
/// shown as `***` in whatever form its template put it (encoded, escaped, filtered, inside
/// an `authorization` header).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub message: Message,
    /// None when the postback places no secret: then it is shown as it is sent.
    pub shown: Option<Message>,
}

impl Rendered {
    /// The message for logs, the delivery log and the tools.
    pub fn shown(&self) -> &Message {
        self.shown.as_ref().unwrap_or(&self.message)
    }

    /// Signs an HTTP request the Standard Webhooks way, as message `id` sent at
    /// `timestamp` (unix seconds). The shown request carries the same headers (a signature
    /// reveals nothing of its key).
    pub fn sign(&mut self, keys: &http::SigningKeys, id: &str, timestamp: i64) {
        let Message::Http(request) = &self.message else {
            return;
        };
        let headers = sign::standard_webhooks(request, keys, id, timestamp);
        for m in std::iter::once(&mut self.message).chain(self.shown.as_mut()) {
            if let Message::Http(r) = m {
                r.headers
                    .retain(|(k, _)| !sign::HEADERS.contains(&k.to_ascii_lowercase().as_str()));
                r.headers.extend(headers.iter().cloned());
            }
        }
    }
}

/// What came back for one message.
#[derive(Debug)]
pub enum Answer {
    Http(Result<HttpAnswer, SendError>),
    Mail(Result<String, email::MailError>),
    Rows(sheets::Appended),
}

impl Answer {
    /// The HTTP answer, or the outcome of an attempt that got none.
    pub fn http(self) -> Result<HttpAnswer, Outcome> {
        match self {
            Answer::Http(r) => outcome::answered(r),
            _ => Err(Outcome::Other("not an HTTP answer".into())),
        }
    }
}

/// An action block as written: compiles itself into its [`Action`].
pub trait RawAction {
    fn compile(&self, b: &mut dyn Build) -> Option<Box<dyn Action>>;
}

/// Implements [`RawAction`] for a kind's `Raw` through its `compile`.
macro_rules! raw_action {
    ($raw:ty, $compile:path) => {
        impl $crate::actions::RawAction for $raw {
            fn compile(
                &self,
                b: &mut dyn $crate::actions::Build,
            ) -> Option<Box<dyn $crate::actions::Action>> {
                $compile(b, self).map(|a| Box::new(a) as Box<dyn $crate::actions::Action>)
            }
        }
    };
}
pub(crate) use raw_action;

/// What a kind's `compile` may ask of the config compiler. Every method records its own
/// errors, located at the value it was given.
pub trait Build {
    /// An error at a line and column of the file being compiled.
    fn error_at(&mut self, line: u64, column: u64, message: String, hint: Option<String>);
    /// The value with `${env:…}`/`${file:…}` read, and its shown form when it held one.
    fn value(&mut self, at: &Spanned<String>) -> (String, Option<String>);
    /// A template's text: the value with secrets in place (for checks of what is sent),
    /// and the source to compile, where each secret is a variable.
    fn text(&mut self, at: &Spanned<String>) -> (String, String);
    /// Compiles a template source (from [`Build::text`]); its macros are checked.
    fn compile(
        &mut self,
        at: &Spanned<String>,
        source: &str,
        escape: Escape,
        shorthand: bool,
    ) -> Option<TemplateId>;
    fn duration(&mut self, at: &Spanned<String>) -> Option<Duration>;
}

impl dyn Build + '_ {
    pub fn error<T>(&mut self, at: &Spanned<T>, message: impl Into<String>, hint: Option<&str>) {
        self.error_at(
            at.referenced.line(),
            at.referenced.column(),
            message.into(),
            hint.map(str::to_string),
        );
    }

    /// A field that is a template (`{clickid}` shorthand allowed), as plain text.
    pub fn template(&mut self, at: &Spanned<String>) -> Option<TemplateId> {
        let (_, src) = self.text(at);
        self.compile(at, &src, Escape::Plain, true)
    }

    /// An optional template field.
    pub fn template_opt(&mut self, at: Option<&Spanned<String>>) -> Option<TemplateId> {
        at.and_then(|a| self.template(a))
    }

    /// A credential: it must come from `${env:…}` or `${file:…}`, never the config itself.
    /// Returns the value and its shown form (`***`).
    pub fn secret(&mut self, what: &str, at: &Spanned<String>) -> Option<(String, String)> {
        if !at.value.trim_start().starts_with("${") {
            let msg = format!("{what} must not be written in the config");
            let hint = "read it from the environment or a file: \"${env:NAME}\" or \"${file:/run/secrets/NAME}\"";
            self.error(at, msg, Some(hint));
            return None;
        }
        let (real, shown) = self.value(at);
        Some((real, shown.unwrap_or_else(|| "***".into())))
    }

    /// A credential placed inside templates (a token in a URL path): its template, which
    /// renders `***` when shown.
    pub fn secret_template(&mut self, what: &str, at: &Spanned<String>) -> Option<TemplateId> {
        if !at.value.trim_start().starts_with("${") {
            let msg = format!("{what} must not be written in the config");
            self.error(
                at,
                msg,
                Some("read it from the environment or a file: \"${env:NAME}\""),
            );
            return None;
        }
        let (_, src) = self.text(at);
        self.compile(at, &src, Escape::Plain, false)
    }

    /// An `endpoint:` override: an http(s) URL written out, or the API's own.
    pub fn endpoint(&mut self, at: Option<&Spanned<String>>, default: &str) -> String {
        let Some(at) = at else {
            return default.to_string();
        };
        let (v, _) = self.value(at);
        let v = v.trim_end_matches('/').to_string();
        match url::Url::parse(&v) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => v,
            _ => {
                self.error(
                    at,
                    format!("endpoint `{}` is not an http(s) URL", at.value),
                    Some("write the base URL, e.g. http://127.0.0.1:9000 for a local stand-in"),
                );
                default.to_string()
            }
        }
    }
}

/// The host (with its port when one is written) a URL is sent to, from the URL's static
/// prefix: `https://user:pw@Tracker.example:8443/pb?x={y}` gives `tracker.example:8443`.
pub fn destination_of(url: &str) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let authority = rest.split(['/', '?', '#', '{']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    host.to_ascii_lowercase()
}

/// Renders a map of templates into a JSON object, leaving out fields that render empty (or
/// read a parameter the event lacks); a
/// value that reads as a JSON number is written as one when `numbers` says so.
pub fn json_fields(
    s: &Scope,
    part: &str,
    fields: &[(String, TemplateId)],
    numbers: bool,
) -> Result<serde_json::Map<String, serde_json::Value>, RenderError> {
    let mut out = serde_json::Map::new();
    for (k, t) in fields {
        let v = s.optional(&format!("{part}.{k}"), t)?;
        if v.is_empty() {
            continue;
        }
        out.insert(
            k.clone(),
            if numbers {
                number_or_text(&v)
            } else {
                v.into()
            },
        );
    }
    Ok(out)
}

/// `12.50` as the JSON number 12.50 (every digit kept), anything else as a string.
pub fn number_or_text(v: &str) -> serde_json::Value {
    let t = v.trim();
    if !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || b"-.eE+".contains(&b))
        && !t.starts_with('+')
    {
        if let Ok(n) = serde_json::from_str::<serde_json::Number>(t) {
            return serde_json::Value::Number(n);
        }
    }
    serde_json::Value::String(v.to_string())
}

/// Compiles a map of template fields, in key order.
pub fn compile_fields(
    b: &mut dyn Build,
    fields: &std::collections::BTreeMap<String, Spanned<String>>,
) -> Vec<(String, TemplateId)> {
    fields
        .iter()
        .filter_map(|(k, v)| b.template(v).map(|t| (k.clone(), t)))
        .collect()
}
