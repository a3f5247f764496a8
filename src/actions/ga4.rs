//! `ga4:`: Google Analytics 4's Measurement Protocol (`/mp/collect`). GA4 answers 2xx even
//! to events it drops, so what can be known in advance is checked by `check` (event and
//! parameter names, 25 parameters), and a test send (`fire --send`, `POST /api/v1/test`)
//! goes to the validation endpoint (`/debug/mp/collect`) and shows its
//! `validationMessages`.

use super::{Action, Answer, Build, Message, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::TemplateId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

pub const KIND: &str = "ga4";
pub const ENDPOINT: &str = "https://www.google-analytics.com";
/// Parameters an event may carry.
pub const MAX_PARAMS: usize = 25;
/// Event and parameter names are at most this long.
pub const MAX_NAME: usize = 40;
/// Prefixes GA4 keeps for itself.
const RESERVED_PREFIXES: [&str; 5] = ["_", "firebase_", "ga_", "google_", "gtag."];
/// Event names GA4 keeps for itself.
const RESERVED_EVENTS: [&str; 35] = [
    "ad_activeview",
    "ad_click",
    "ad_exposure",
    "ad_query",
    "ad_reward",
    "adunit_exposure",
    "app_background",
    "app_clear_data",
    "app_exception",
    "app_remove",
    "app_store_refund",
    "app_store_subscription_cancel",
    "app_store_subscription_convert",
    "app_store_subscription_renew",
    "app_update",
    "app_upgrade",
    "dynamic_link_app_open",
    "dynamic_link_app_update",
    "dynamic_link_first_open",
    "error",
    "firebase_campaign",
    "firebase_in_app_message_action",
    "firebase_in_app_message_dismiss",
    "firebase_in_app_message_impression",
    "first_open",
    "first_visit",
    "in_app_purchase",
    "notification_dismiss",
    "notification_foreground",
    "notification_open",
    "notification_receive",
    "os_update",
    "session_start",
    "session_start_with_rollout",
    "user_engagement",
];

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub measurement_id: Spanned<String>,
    /// From `${env:…}` or `${file:…}`.
    pub api_secret: Spanned<String>,
    /// Give `client_id` (the `_ga` cookie's id), `user_id`, or both.
    pub client_id: Option<Spanned<String>>,
    pub user_id: Option<Spanned<String>>,
    /// The event's name, e.g. `purchase` or `generate_lead`.
    pub event: Spanned<String>,
    /// The event's parameters (`transaction_id`, `value`, `currency`…); numbers are sent
    /// as numbers.
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<String>>,
    /// When the event happened, in microseconds (GA4 accepts up to 72 hours back).
    pub timestamp_micros: Option<Spanned<String>>,
    /// The base URL (default https://www.google-analytics.com), for a proxy or a test.
    pub endpoint: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug)]
pub struct Ga4 {
    endpoint: String,
    target: Target,
    measurement_id: String,
    secret: (String, String),
    client_id: Option<TemplateId>,
    user_id: Option<TemplateId>,
    event: TemplateId,
    params: Vec<(String, TemplateId)>,
    timestamp_micros: Option<TemplateId>,
}

impl Ga4 {
    fn path(&self, debug: bool, reveal: bool) -> String {
        let secret = if reveal {
            &self.secret.0
        } else {
            &self.secret.1
        };
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("measurement_id", &self.measurement_id)
            .append_pair("api_secret", secret)
            .finish();
        let path = if debug {
            "/debug/mp/collect"
        } else {
            "/mp/collect"
        };
        format!("{}{path}?{query}", self.endpoint)
    }
}

impl Action for Ga4 {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let mut v = vec![&self.event];
        v.extend(
            self.client_id
                .iter()
                .chain(&self.user_id)
                .chain(&self.timestamp_micros),
        );
        v.extend(self.params.iter().map(|(_, t)| t));
        v
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let mut body = serde_json::Map::new();
        let client_id = match &self.client_id {
            Some(t) => s.text("client_id", t)?,
            None => String::new(),
        };
        let user_id = match &self.user_id {
            Some(t) => s.text("user_id", t)?,
            None => String::new(),
        };
        if client_id.is_empty() && user_id.is_empty() {
            return Err(RenderError::Invalid(
                "ga4: client_id and user_id both rendered empty; GA4 needs one".into(),
            ));
        }
        if !client_id.is_empty() {
            body.insert("client_id".into(), client_id.into());
        }
        if !user_id.is_empty() {
            body.insert("user_id".into(), user_id.into());
        }
        if let Some(t) = &self.timestamp_micros {
            let v = s.text("timestamp_micros", t)?;
            let micros: i64 = v.trim().parse().map_err(|_| {
                RenderError::Invalid(format!(
                    "ga4.timestamp_micros: `{v}` is not a number of microseconds"
                ))
            })?;
            body.insert("timestamp_micros".into(), micros.into());
        }
        let params = super::json_fields(s, "params", &self.params, true)?;
        body.insert(
            "events".into(),
            json!([{ "name": s.text("event", &self.event)?, "params": Value::Object(params) }]),
        );
        Ok(Message::Http(Request::json(
            self.path(false, s.reveal),
            Vec::new(),
            &Value::Object(body),
        )))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        match answer.http() {
            Ok(a) if (200..300).contains(&a.status) => Outcome::Delivered {
                status: a.status,
                body: a.body,
            },
            Ok(a) => Outcome::Status {
                status: a.status,
                body: a.body,
                retry_after: a.retry_after,
            },
            Err(o) => o,
        }
    }
    fn for_test(&self, m: Message) -> Message {
        match m {
            Message::Http(mut r) => {
                let real = self.path(false, true);
                let shown = self.path(false, false);
                if r.url == real {
                    r.url = self.path(true, true);
                } else if r.url == shown {
                    r.url = self.path(true, false);
                }
                Message::Http(r)
            }
            other => other,
        }
    }
    fn judge_test(&self, answer: Answer) -> Outcome {
        match answer.http() {
            Ok(a) => judge_validation(a),
            Err(o) => o,
        }
    }
}

/// The validation endpoint's answer: no `validationMessages` is a pass.
pub fn judge_validation(a: super::HttpAnswer) -> Outcome {
    let v: Value = serde_json::from_str(&a.body).unwrap_or_default();
    let messages = v["validationMessages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if a.status == 200 && v.get("validationMessages").is_some() && messages.is_empty() {
        return Outcome::Delivered {
            status: 200,
            body: a.body,
        };
    }
    if a.status != 200 {
        return Outcome::Status {
            status: a.status,
            body: a.body,
            retry_after: a.retry_after,
        };
    }
    let why = messages
        .iter()
        .map(|m| {
            format!(
                "{} ({}{})",
                m["description"].as_str().unwrap_or("invalid"),
                m["validationCode"].as_str().unwrap_or("?"),
                m["fieldPath"]
                    .as_str()
                    .map(|p| format!(" at {p}"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Outcome::BodyRejected {
        status: 200,
        body: a.body,
        why: format!("ga4 validation: {why}"),
    }
}

/// Why a name breaks GA4's rules, if it does.
fn bad_name(name: &str, event: bool) -> Option<String> {
    if name.chars().count() > MAX_NAME {
        return Some(format!("is longer than {MAX_NAME} characters"));
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return Some("must start with a letter".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Some("may hold only letters, digits and underscores".into());
    }
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Some(format!("starts with `{p}`, which GA4 keeps for itself"));
    }
    if event && RESERVED_EVENTS.contains(&name) {
        return Some("is an event name GA4 keeps for itself".into());
    }
    None
}

/// Compiles `ga4:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Ga4> {
    let (measurement_id, _) = b.value(&r.measurement_id);
    if !measurement_id.starts_with("G-") {
        b.error(
            &r.measurement_id,
            "ga4.measurement_id must be a web stream's measurement id",
            Some("measurement_id: G-XXXXXXXXXX, from Admin > Data streams"),
        );
    }
    let secret = b.secret("ga4.api_secret", &r.api_secret);
    let endpoint = b.endpoint(r.endpoint.as_ref(), ENDPOINT);
    if r.client_id.is_none() && r.user_id.is_none() {
        b.error(
            &r.event,
            "ga4: give client_id, user_id or both",
            Some("client_id: \"{params.ga_client_id}\""),
        );
    }
    let client_id = b.template_opt(r.client_id.as_ref());
    let user_id = b.template_opt(r.user_id.as_ref());
    if !r.event.value.contains('{') {
        if let Some(why) = bad_name(&r.event.value, true) {
            b.error(
                &r.event,
                format!("ga4.event `{}` {why}", r.event.value),
                Some("use names like purchase, generate_lead or sign_up"),
            );
        }
    }
    let event = b.template(&r.event);
    if r.params.len() > MAX_PARAMS {
        b.error(
            &r.event,
            format!(
                "ga4: {} params; an event carries at most {MAX_PARAMS}",
                r.params.len()
            ),
            None,
        );
    }
    for (k, v) in &r.params {
        if let Some(why) = bad_name(k, false) {
            b.error(v, format!("ga4.params: `{k}` {why}"), None);
        }
    }
    let params = super::compile_fields(b, &r.params);
    let timestamp_micros = b.template_opt(r.timestamp_micros.as_ref());
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    Some(Ga4 {
        target: Target {
            destination: super::destination_of(&endpoint),
            timeout,
        },
        endpoint,
        measurement_id,
        secret: secret?,
        client_id,
        user_id,
        event: event?,
        params,
        timestamp_micros,
    })
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::HttpAnswer;

    #[test]
    fn names_follow_ga4_rules() {
        assert_eq!(bad_name("purchase", true), None);
        assert!(bad_name("first_visit", true).is_some());
        assert!(bad_name("1st", true).is_some());
        assert!(bad_name("google_x", false).is_some());
        assert!(bad_name("has-dash", false).is_some());
        assert!(bad_name(&"a".repeat(41), false).is_some());
        assert_eq!(bad_name("first_visit", false), None);
    }

    #[test]
    fn validation_answers() {
        let a = |body: &str| HttpAnswer {
            status: 200,
            retry_after: None,
            body: body.into(),
        };
        assert!(judge_validation(a(r#"{"validationMessages":[]}"#)).is_success());
        let o = judge_validation(a(
            r#"{"validationMessages":[{"fieldPath":"events","description":"Event at index: [0] has invalid name [_bad]. Names must start with an alphabetic character.","validationCode":"NAME_INVALID"}]}"#,
        ));
        assert!(!o.is_success());
        assert!(o.parts().2.unwrap().contains("NAME_INVALID at events"));
    }
}
