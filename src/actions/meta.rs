//! `meta:`: Meta's (Facebook's) Conversions API. One event per delivery, posted to
//! `/{api_version}/{pixel_id}/events`. The customer fields Meta wants hashed are normalised
//! exactly as Meta documents and SHA-256 hashed here; a value that already is a SHA-256
//! digest is sent as it is, and an empty one is left out. `client_ip_address`,
//! `client_user_agent`, `fbc` and `fbp` are sent as they are.
//!
//! Success is an answer whose `events_received` is at least 1. Meta's error object
//! (`message`, `code`, `error_subcode`) goes in the log; rate limits, transient errors and
//! 5xx are tried again, anything else is final. An event older than Meta's 7-day window is
//! dead before it is sent.

use super::{Action, Answer, Build, Message, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::{Escape, TemplateId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use serde_saphyr::Spanned;
use sha2::Digest;
use std::collections::BTreeMap;
use std::time::Duration;

pub const KIND: &str = "meta";
pub const ENDPOINT: &str = "https://graph.facebook.com";
/// The Graph API version used unless `api_version` says otherwise.
pub const API_VERSION: &str = "v24.0";
/// Meta refuses events older than this.
pub const WINDOW: Duration = Duration::from_secs(7 * 86400);

/// The `user_data` fields Meta wants hashed.
pub const HASHED: [&str; 11] = [
    "em",
    "ph",
    "fn",
    "ln",
    "ge",
    "db",
    "ct",
    "st",
    "zp",
    "country",
    "external_id",
];
/// The `user_data` fields sent as they are.
pub const PLAIN: [&str; 8] = [
    "client_ip_address",
    "client_user_agent",
    "fbc",
    "fbp",
    "subscription_id",
    "fb_login_id",
    "lead_id",
    "page_id",
];

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub pixel_id: Spanned<String>,
    /// From `${env:…}` or `${file:…}`.
    pub access_token: Spanned<String>,
    pub event_name: Spanned<String>,
    /// Unix seconds (default: the event's own time).
    pub event_time: Option<Spanned<String>>,
    /// The id the browser pixel sent for the same event, so Meta can drop the repeat
    /// (default: the transaction id, else the click id).
    pub event_id: Option<Spanned<String>>,
    /// `website` (default), `app`, `email`, `phone_call`, `chat`, `physical_store`,
    /// `system_generated`, `business_messaging` or `other`.
    pub action_source: Option<Spanned<String>>,
    pub event_source_url: Option<Spanned<String>>,
    #[serde(default)]
    pub user_data: BTreeMap<String, Spanned<String>>,
    /// `value`, `currency` and any other field; numbers are sent as numbers.
    #[serde(default)]
    pub custom_data: BTreeMap<String, Spanned<String>>,
    /// Shows the events in Events Manager's Test Events tab.
    pub test_event_code: Option<Spanned<String>>,
    pub api_version: Option<Spanned<String>>,
    /// The Graph API's base URL (default https://graph.facebook.com), for a proxy or a test.
    pub endpoint: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

const ACTION_SOURCES: [&str; 9] = [
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
];

#[derive(Debug)]
pub struct Meta {
    url: String,
    target: Target,
    token: (String, String),
    event_name: TemplateId,
    event_time: TemplateId,
    event_id: TemplateId,
    action_source: String,
    event_source_url: Option<TemplateId>,
    user_data: Vec<(String, TemplateId)>,
    custom_data: Vec<(String, TemplateId)>,
    test_event_code: Option<String>,
}

impl Action for Meta {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let mut v = vec![&self.event_name, &self.event_time, &self.event_id];
        v.extend(self.event_source_url.iter());
        v.extend(self.user_data.iter().map(|(_, t)| t));
        v.extend(self.custom_data.iter().map(|(_, t)| t));
        v
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let event_time = unix_seconds("event_time", &s.text("event_time", &self.event_time)?)?;
        let age = s.now_ms / 1000 - event_time;
        if age > WINDOW.as_secs() as i64 {
            return Err(RenderError::Invalid(format!(
                "event_time {event_time} is {} days old: Meta accepts events up to 7 days old",
                age / 86400
            )));
        }
        let mut event = Map::new();
        event.insert(
            "event_name".into(),
            s.text("event_name", &self.event_name)?.into(),
        );
        event.insert("event_time".into(), event_time.into());
        let id = s.text("event_id", &self.event_id)?;
        if !id.is_empty() {
            event.insert("event_id".into(), id.into());
        }
        event.insert("action_source".into(), self.action_source.clone().into());
        if let Some(t) = &self.event_source_url {
            let u = s.text("event_source_url", t)?;
            if !u.is_empty() {
                event.insert("event_source_url".into(), u.into());
            }
        }
        let user = customer(s, "user_data", &self.user_data, &HASHED, hashed, true)?;
        event.insert("user_data".into(), Value::Object(user));
        let custom = super::json_fields(s, "custom_data", &self.custom_data, true)?;
        if !custom.is_empty() {
            event.insert("custom_data".into(), Value::Object(custom));
        }
        let mut body = json!({ "data": [Value::Object(event)] });
        if let Some(c) = &self.test_event_code {
            body["test_event_code"] = c.as_str().into();
        }
        let url = format!(
            "{}?access_token={}",
            self.url,
            s.pick(&self.token.0, &self.token.1)
        );
        Ok(Message::Http(Request::json(url, Vec::new(), &body)))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        super::judge_http(answer, judge)
    }
}

/// Meta's answer: `events_received` of at least 1 is delivered; its error object says why
/// not, and whether to try again.
pub fn judge(a: super::HttpAnswer) -> Outcome {
    let v: Value = serde_json::from_str(&a.body).unwrap_or_default();
    if (200..300).contains(&a.status) && v["events_received"].as_u64().unwrap_or(0) >= 1 {
        return Outcome::Delivered {
            status: a.status,
            body: a.body,
        };
    }
    let e = &v["error"];
    let code = e["code"].as_u64();
    let why = match code {
        Some(c) => {
            let mut w = format!("meta error {c}");
            if let Some(sub) = e["error_subcode"].as_u64() {
                w.push_str(&format!(" (subcode {sub})"));
            }
            w.push_str(": ");
            w.push_str(e["message"].as_str().unwrap_or("no message"));
            if let Some(t) = e["error_user_title"].as_str() {
                w.push_str(&format!(" ({t}"));
                if let Some(m) = e["error_user_msg"].as_str() {
                    w.push_str(&format!(": {m}"));
                }
                w.push(')');
            }
            w
        }
        None if (200..300).contains(&a.status) => {
            "meta received no event (events_received is 0)".into()
        }
        None => format!("meta answered http {}", a.status),
    };
    // Rate limits (4, 17, 32, 613, 80004), temporary errors (1, 2) and anything Meta marks
    // transient are worth another try.
    let transient = e["is_transient"].as_bool() == Some(true)
        || matches!(code, Some(1 | 2 | 4 | 17 | 32 | 341 | 613 | 80004));
    Outcome::Rejected {
        status: Some(a.status),
        why,
        body: a.body.clone(),
        class: if (200..300).contains(&a.status) {
            "body_rejected"
        } else {
            super::outcome::status_class(a.status)
        },
        retryable: transient || super::outcome::status_retryable(a.status),
        retry_after: a.retry_after,
    }
}

/// `event_time` and `event_id` as written, or their defaults: the event's own time, and its
/// transaction id (else its click id), so a platform drops the repeat of a conversion.
pub(super) fn event_keys(
    b: &mut dyn Build,
    near: &Spanned<String>,
    time: Option<&Spanned<String>>,
    id: Option<&Spanned<String>>,
) -> (Option<TemplateId>, Option<TemplateId>) {
    let mut one = |given: Option<&Spanned<String>>, default: &str| match given {
        Some(t) => b.template(t),
        None => {
            let at = Spanned::new(default.to_string(), near.referenced, near.defined);
            b.compile(&at, default, Escape::Plain, false)
        }
    };
    let time = one(time, "{{ timestamp }}");
    let id = one(id, "{{ transaction_id or clickid or '' }}");
    (time, id)
}

/// Refuses the fields of a customer block (`meta.user_data`, `tiktok.user`) the API does
/// not know, with the nearest known name.
pub(super) fn known_fields(
    b: &mut dyn Build,
    what: &str,
    fields: &BTreeMap<String, Spanned<String>>,
    hashed: &[&str],
    plain: &[&str],
) {
    for (k, at) in fields {
        if hashed.contains(&k.as_str()) || plain.contains(&k.as_str()) {
            continue;
        }
        let known = hashed.iter().chain(plain).copied();
        let hint = crate::suggest::suggest(k, known).unwrap_or_else(|| {
            format!(
                "its fields are {} (hashed here) and {}",
                hashed.join(", "),
                plain.join(", ")
            )
        });
        b.error(at, format!("{what}: unknown field `{k}`"), Some(&hint));
    }
}

/// A customer block rendered: the `hashed` fields through `hash` (left out when empty,
/// each in a one-element list when `list`), the others trimmed, empty ones left out.
pub(super) fn customer(
    s: &Scope,
    part: &str,
    fields: &[(String, TemplateId)],
    hashed: &[&str],
    hash: fn(&str, &str) -> Option<String>,
    list: bool,
) -> Result<Map<String, Value>, RenderError> {
    let mut out = Map::new();
    for (k, t) in fields {
        let v = s.optional(&format!("{part}.{k}"), t)?;
        if hashed.contains(&k.as_str()) {
            if let Some(h) = hash(k, &v) {
                out.insert(k.clone(), if list { json!([h]) } else { h.into() });
            }
        } else if !v.trim().is_empty() {
            out.insert(k.clone(), v.trim().into());
        }
    }
    Ok(out)
}

/// Unix seconds from a rendered time: seconds, milliseconds, or a date and time.
pub fn unix_seconds(part: &str, v: &str) -> Result<i64, RenderError> {
    let t = v.trim();
    if let Ok(n) = t.parse::<i64>() {
        // Milliseconds are 13 digits for any date this century.
        return Ok(if n > 100_000_000_000 { n / 1000 } else { n });
    }
    crate::render::template::parse_instant(t)
        .map(|i| i.as_second())
        .ok_or_else(|| {
            RenderError::Invalid(format!(
                "{part}: `{t}` is not a time (unix seconds or a date)"
            ))
        })
}

/// A field normalised Meta's way and hashed, or as it is when it already is a SHA-256
/// digest; none when it is empty.
pub fn hashed(field: &str, value: &str) -> Option<String> {
    let v = value.trim();
    if is_sha256(v) {
        return Some(v.to_ascii_lowercase());
    }
    let n = normalise(field, v);
    (!n.is_empty()).then(|| sha256_hex(&n))
}

/// Whether a value is already a SHA-256 digest (64 hex digits).
pub fn is_sha256(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn sha256_hex(v: &str) -> String {
    sha2::Sha256::digest(v.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Meta's normalisation of one customer field, before hashing.
pub fn normalise(field: &str, value: &str) -> String {
    let v = value.trim().to_lowercase();
    let letters_only = |s: &str| -> String { s.chars().filter(|c| c.is_alphabetic()).collect() };
    match field {
        "em" => v,
        // Digits only, without a leading plus or zeros: the country code comes first.
        "ph" => {
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            digits.trim_start_matches('0').to_string()
        }
        // Names: lower case, no punctuation (letters in any script are kept).
        "fn" | "ln" => v
            .chars()
            .filter(|c| c.is_alphabetic() || c.is_whitespace())
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        "ge" => match v.chars().next() {
            Some('f') => "f".into(),
            Some('m') => "m".into(),
            _ => String::new(),
        },
        // YYYYMMDD.
        "db" => {
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            if digits.len() == 8 {
                digits
            } else {
                String::new()
            }
        }
        // City and state: no digits, spaces or punctuation.
        "ct" | "st" => letters_only(&v),
        // No spaces, nothing after a dash (`94025-1234` is `94025`).
        "zp" => v
            .split('-')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
        // Two letters, ISO 3166-1 alpha-2.
        "country" => {
            let l = letters_only(&v);
            if l.chars().count() == 2 {
                l
            } else {
                String::new()
            }
        }
        _ => v,
    }
}

/// Compiles `meta:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Meta> {
    let (pixel, _) = b.value(&r.pixel_id);
    if pixel.is_empty() || !pixel.bytes().all(|c| c.is_ascii_digit()) {
        b.error(
            &r.pixel_id,
            "meta.pixel_id must be the pixel's (dataset's) number",
            Some("pixel_id: \"1234567890123456\", as Events Manager shows it"),
        );
    }
    let token = b.secret("meta.access_token", &r.access_token);
    let endpoint = b.endpoint(r.endpoint.as_ref(), ENDPOINT);
    let version = r
        .api_version
        .as_ref()
        .map(|v| v.value.clone())
        .unwrap_or_else(|| API_VERSION.to_string());
    if let Some(at) = &r.api_version {
        if !version.starts_with('v') || version[1..].parse::<f32>().is_err() {
            b.error(
                at,
                format!("meta.api_version `{version}` is not a Graph API version"),
                Some("write it like v24.0"),
            );
        }
    }
    let event_name = b.template(&r.event_name);
    let (event_time, event_id) =
        event_keys(b, &r.event_name, r.event_time.as_ref(), r.event_id.as_ref());
    let action_source = match &r.action_source {
        None => "website".to_string(),
        Some(a) if ACTION_SOURCES.contains(&a.value.as_str()) => a.value.clone(),
        Some(a) => {
            let hint = format!("use one of {}", ACTION_SOURCES.join(", "));
            b.error(
                a,
                format!("meta.action_source: unknown source `{}`", a.value),
                Some(&hint),
            );
            "website".into()
        }
    };
    let event_source_url = b.template_opt(r.event_source_url.as_ref());
    known_fields(b, "meta.user_data", &r.user_data, &HASHED, &PLAIN);
    if r.user_data.is_empty() {
        b.error(&r.event_name, "meta: user_data is empty; Meta drops events it cannot match to a person", Some("give at least one of em, ph, external_id, fbc, or client_ip_address with client_user_agent"));
    }
    let user_data = super::compile_fields(b, &r.user_data);
    let custom_data = super::compile_fields(b, &r.custom_data);
    let test_event_code = r.test_event_code.as_ref().map(|c| b.value(c).0);
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    Some(Meta {
        url: format!("{endpoint}/{version}/{pixel}/events"),
        target: Target {
            destination: super::destination_of(&endpoint),
            timeout,
        },
        token: token?,
        event_name: event_name?,
        event_time: event_time?,
        event_id: event_id?,
        action_source,
        event_source_url,
        user_data,
        custom_data,
        test_event_code,
    })
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::HttpAnswer;

    /// Awkward inputs and what Meta's rules make of them before hashing.
    #[test]
    fn normalisation_table() {
        let cases = [
            ("em", "  John.Doe@Example.COM ", "john.doe@example.com"),
            ("ph", "+1 (650) 555-1212", "16505551212"),
            ("ph", "0044 20 7946 0958", "442079460958"),
            ("ph", "00-1-650-555-1212", "16505551212"),
            ("fn", " Mary-Jane ", "maryjane"),
            ("fn", "Élodie", "élodie"),
            ("ln", "O'Brien", "obrien"),
            ("ge", "Female", "f"),
            ("ge", "M", "m"),
            ("ge", "x", ""),
            ("db", "1990-05-17", "19900517"),
            ("db", "17/05", ""),
            ("ct", "San Francisco", "sanfrancisco"),
            ("ct", "Paris 75001", "paris"),
            ("st", "C.A.", "ca"),
            ("zp", "94025-1234", "94025"),
            ("zp", "SW1A 1AA", "sw1a1aa"),
            ("country", " US ", "us"),
            ("country", "USA", ""),
            ("external_id", " ABC-123 ", "abc-123"),
        ];
        for (field, input, want) in cases {
            assert_eq!(normalise(field, input), want, "{field}: {input:?}");
        }
    }

    #[test]
    fn hashing_leaves_digests_and_drops_empties() {
        assert_eq!(
            hashed("em", " John.Doe@Example.COM").unwrap(),
            sha256_hex("john.doe@example.com")
        );
        let digest = sha256_hex("x");
        assert_eq!(hashed("em", &digest.to_uppercase()).unwrap(), digest);
        assert_eq!(hashed("ph", "  "), None);
        assert_eq!(hashed("ph", "+"), None);
        assert_eq!(hashed("country", "France"), None);
        // The example in Meta's customer-information docs.
        assert_eq!(
            sha256_hex("john_smith@gmail.com"),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
    }

    #[test]
    fn meta_answers() {
        let a = |status, body: &str| HttpAnswer {
            status,
            retry_after: None,
            body: body.into(),
        };
        assert!(judge(a(
            200,
            r#"{"events_received":1,"messages":[],"fbtrace_id":"A"}"#
        ))
        .is_success());
        let o = judge(a(
            400,
            r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804003,"error_user_title":"Event Timestamp Too Old","error_user_msg":"The timestamp for this event is too far in the past.","fbtrace_id":"A"}}"#,
        ));
        assert!(!o.retryable());
        assert_eq!(o.parts().2.unwrap(), "meta error 100 (subcode 2804003): Invalid parameter (Event Timestamp Too Old: The timestamp for this event is too far in the past.)");
        let o = judge(a(
            400,
            r#"{"error":{"message":"(#17) User request limit reached","type":"OAuthException","code":17}}"#,
        ));
        assert!(o.retryable());
        assert!(!judge(a(200, r#"{"events_received":0}"#)).is_success());
    }
}
