//! `tiktok:`: TikTok's Events API (`/open_api/{version}/event/track/`), the access token in
//! the `Access-Token` header. The user's e-mail, phone and external id are normalised and
//! SHA-256 hashed (a digest is sent as it is; an empty value is left out); `ttclid`, the
//! address and the user agent are sent as they are. Success is HTTP 200 with `code` 0;
//! anything else is logged with TikTok's message. Rate limits (40100) and server errors
//! are tried again.

use super::meta::{customer, event_keys, is_sha256, known_fields, sha256_hex, unix_seconds};
use super::{Action, Answer, Build, Message, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::TemplateId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

pub const KIND: &str = "tiktok";
pub const ENDPOINT: &str = "https://business-api.tiktok.com";
pub const API_VERSION: &str = "v1.3";

/// `user` fields hashed before sending.
pub const HASHED: [&str; 3] = ["email", "phone", "external_id"];
/// `user` fields sent as they are.
pub const PLAIN: [&str; 5] = ["ttclid", "ttp", "ip", "user_agent", "locale"];

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub pixel_code: Spanned<String>,
    /// From `${env:…}` or `${file:…}`.
    pub access_token: Spanned<String>,
    /// A standard event (`CompletePayment`, `SubmitForm`, `CompleteRegistration`…).
    pub event: Spanned<String>,
    /// Default: the transaction id, else the click id.
    pub event_id: Option<Spanned<String>>,
    /// Unix seconds (default: the event's own time).
    pub event_time: Option<Spanned<String>>,
    #[serde(default)]
    pub user: BTreeMap<String, Spanned<String>>,
    /// `value`, `currency`, `content_type`…; numbers are sent as numbers.
    #[serde(default)]
    pub properties: BTreeMap<String, Spanned<String>>,
    pub page_url: Option<Spanned<String>>,
    pub test_event_code: Option<Spanned<String>>,
    pub api_version: Option<Spanned<String>>,
    /// The API's base URL (default https://business-api.tiktok.com), for a proxy or a test.
    pub endpoint: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug)]
pub struct TikTok {
    url: String,
    target: Target,
    pixel: String,
    token: (String, String),
    event: TemplateId,
    event_id: TemplateId,
    event_time: TemplateId,
    user: Vec<(String, TemplateId)>,
    properties: Vec<(String, TemplateId)>,
    page_url: Option<TemplateId>,
    test_event_code: Option<String>,
}

impl Action for TikTok {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let mut v = vec![&self.event, &self.event_id, &self.event_time];
        v.extend(self.page_url.iter());
        v.extend(self.user.iter().map(|(_, t)| t));
        v.extend(self.properties.iter().map(|(_, t)| t));
        v
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let mut data = Map::new();
        data.insert("event".into(), s.text("event", &self.event)?.into());
        let t = unix_seconds("event_time", &s.text("event_time", &self.event_time)?)?;
        data.insert("event_time".into(), t.into());
        let id = s.text("event_id", &self.event_id)?;
        if !id.is_empty() {
            data.insert("event_id".into(), id.into());
        }
        let user = customer(s, "user", &self.user, &HASHED, hashed, false)?;
        data.insert("user".into(), Value::Object(user));
        let props = super::json_fields(s, "properties", &self.properties, true)?;
        if !props.is_empty() {
            data.insert("properties".into(), Value::Object(props));
        }
        if let Some(p) = &self.page_url {
            let u = s.text("page_url", p)?;
            if !u.is_empty() {
                data.insert("page".into(), json!({ "url": u }));
            }
        }
        let mut body = json!({
            "event_source": "web",
            "event_source_id": self.pixel,
            "data": [Value::Object(data)],
        });
        if let Some(c) = &self.test_event_code {
            body["test_event_code"] = c.as_str().into();
        }
        let token = s.pick(&self.token.0, &self.token.1).to_string();
        Ok(Message::Http(Request::json(
            self.url.clone(),
            vec![("access-token".into(), token)],
            &body,
        )))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        super::judge_http(answer, judge)
    }
}

/// HTTP 200 with `code` 0 is delivered; otherwise TikTok's code and message say why.
pub fn judge(a: super::HttpAnswer) -> Outcome {
    let v: Value = serde_json::from_str(&a.body).unwrap_or_default();
    let code = v["code"].as_i64();
    if a.status == 200 && code == Some(0) {
        return Outcome::Delivered {
            status: 200,
            body: a.body,
        };
    }
    let message = v["message"].as_str().unwrap_or("no message");
    let why = match code {
        Some(c) => format!("tiktok error {c}: {message}"),
        None => format!("tiktok answered http {}: {message}", a.status),
    };
    Outcome::Rejected {
        status: Some(a.status),
        why,
        body: a.body.clone(),
        class: if a.status == 200 {
            "body_rejected"
        } else {
            super::outcome::status_class(a.status)
        },
        retryable: matches!(code, Some(40100 | 50000 | 50002))
            || super::outcome::status_retryable(a.status),
        retry_after: a.retry_after,
    }
}

/// TikTok's normalisation before hashing: e-mail trimmed and lower case, phone in E.164
/// (`+` and digits), external id trimmed.
pub fn hashed(field: &str, value: &str) -> Option<String> {
    let v = value.trim();
    if is_sha256(v) {
        return Some(v.to_ascii_lowercase());
    }
    let n = match field {
        "email" => v.to_lowercase(),
        "phone" => {
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            let digits = digits.trim_start_matches('0');
            if digits.is_empty() {
                String::new()
            } else {
                format!("+{digits}")
            }
        }
        _ => v.to_string(),
    };
    (!n.is_empty()).then(|| sha256_hex(&n))
}

/// Compiles `tiktok:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<TikTok> {
    let (pixel, _) = b.value(&r.pixel_code);
    if pixel.is_empty() || !pixel.bytes().all(|c| c.is_ascii_alphanumeric()) {
        b.error(
            &r.pixel_code,
            "tiktok.pixel_code must be the pixel's code",
            Some("pixel_code: C4ABCDEFGHIJKLMNOP, as Events Manager shows it"),
        );
    }
    let token = b.secret("tiktok.access_token", &r.access_token);
    let endpoint = b.endpoint(r.endpoint.as_ref(), ENDPOINT);
    let version = r
        .api_version
        .as_ref()
        .map(|v| b.value(v).0)
        .unwrap_or_else(|| API_VERSION.to_string());
    let event = b.template(&r.event);
    let (event_time, event_id) =
        event_keys(b, &r.event, r.event_time.as_ref(), r.event_id.as_ref());
    known_fields(b, "tiktok.user", &r.user, &HASHED, &PLAIN);
    let user = super::compile_fields(b, &r.user);
    let properties = super::compile_fields(b, &r.properties);
    let page_url = b.template_opt(r.page_url.as_ref());
    let test_event_code = r.test_event_code.as_ref().map(|c| b.value(c).0);
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    Some(TikTok {
        url: format!("{endpoint}/open_api/{version}/event/track/"),
        target: Target {
            destination: super::destination_of(&endpoint),
            timeout,
        },
        pixel,
        token: token?,
        event: event?,
        event_id: event_id?,
        event_time: event_time?,
        user,
        properties,
        page_url,
        test_event_code,
    })
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::HttpAnswer;

    #[test]
    fn tiktok_answers_and_hashing() {
        let a = |status, body: &str| HttpAnswer {
            status,
            retry_after: None,
            body: body.into(),
        };
        assert!(judge(a(
            200,
            r#"{"code":0,"message":"OK","request_id":"r","data":{}}"#
        ))
        .is_success());
        let o = judge(a(
            200,
            r#"{"code":40002,"message":"Invalid pixel_code","request_id":"r"}"#,
        ));
        assert!(!o.retryable());
        assert_eq!(
            o.parts().2.unwrap(),
            "tiktok error 40002: Invalid pixel_code"
        );
        assert!(judge(a(200, r#"{"code":40100,"message":"Too many requests"}"#)).retryable());
        assert_eq!(
            hashed("phone", "+1 (213) 373-4253").unwrap(),
            sha256_hex("+12133734253")
        );
        assert_eq!(hashed("email", " A@B.co ").unwrap(), sha256_hex("a@b.co"));
        assert_eq!(hashed("phone", ""), None);
    }
}
