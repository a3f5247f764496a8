//! `twilio:`: an SMS through Twilio's Messages API: a form POST with basic auth (account
//! SID and auth token) of `To`, `From` (or `MessagingServiceSid`) and `Body`. Success is
//! 201. A failure is Twilio's error JSON (`code`, `message`, `more_info`), which goes in
//! the log; 20429 (too many requests) and 5xx are tried again, other errors are final.

use super::{Action, Answer, Build, Message, Method, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::TemplateId;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

pub const KIND: &str = "twilio";
pub const ENDPOINT: &str = "https://api.twilio.com";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub account_sid: Spanned<String>,
    /// From `${env:…}` or `${file:…}`.
    pub auth_token: Spanned<String>,
    pub to: Spanned<String>,
    /// The sender number; or give `messaging_service_sid`.
    pub from: Option<Spanned<String>>,
    pub messaging_service_sid: Option<Spanned<String>>,
    pub body: Spanned<String>,
    /// The API's base URL (default https://api.twilio.com), for a proxy or a test.
    pub endpoint: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug)]
pub struct Twilio {
    endpoint: String,
    target: Target,
    sid: String,
    token: (String, String),
    to: TemplateId,
    from: Option<TemplateId>,
    service: Option<String>,
    body: TemplateId,
}

impl Action for Twilio {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let mut v = vec![&self.to, &self.body];
        v.extend(self.from.iter());
        v
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.endpoint, self.sid
        );
        let to = s.text("to", &self.to)?;
        if to.trim().is_empty() {
            return Err(RenderError::Invalid(
                "twilio.to rendered empty: no number to send to".into(),
            ));
        }
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("To", to.trim());
        match (&self.from, &self.service) {
            (Some(f), _) => {
                form.append_pair("From", s.text("from", f)?.trim());
            }
            (None, Some(sid)) => {
                form.append_pair("MessagingServiceSid", sid);
            }
            (None, None) => {}
        }
        form.append_pair("Body", &s.text("body", &self.body)?);
        let auth = if s.reveal {
            super::http::basic(&self.sid, &self.token.0)
        } else {
            "Basic ***".into()
        };
        Ok(Message::Http(Request {
            method: Method::Post,
            url,
            headers: vec![
                ("authorization".into(), auth),
                (
                    "content-type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
            ],
            body: Some(form.finish().into_bytes()),
        }))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        super::judge_http(answer, judge)
    }
}

/// 201 is delivered; Twilio's error code says whether to try again.
pub fn judge(a: super::HttpAnswer) -> Outcome {
    if a.status == 201 {
        return Outcome::Delivered {
            status: 201,
            body: a.body,
        };
    }
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
    let code = v["code"].as_u64();
    let message = v["message"].as_str().unwrap_or("no error message");
    let why = match code {
        Some(c) => format!("twilio error {c}: {message}"),
        None => format!("twilio answered http {}: {message}", a.status),
    };
    Outcome::Rejected {
        status: Some(a.status),
        why,
        body: a.body.clone(),
        class: if a.status < 300 {
            "body_rejected"
        } else {
            super::outcome::status_class(a.status)
        },
        retryable: code == Some(20429) || a.status == 429 || a.status >= 500,
        retry_after: a.retry_after,
    }
}

/// Compiles `twilio:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Twilio> {
    let (sid, _) = b.value(&r.account_sid);
    if !sid.starts_with("AC") || !sid.bytes().all(|c| c.is_ascii_alphanumeric()) {
        b.error(
            &r.account_sid,
            "twilio.account_sid is not an account SID",
            Some("an account SID starts with AC, as the Twilio console shows it"),
        );
    }
    let token = b.secret("twilio.auth_token", &r.auth_token);
    let endpoint = b.endpoint(r.endpoint.as_ref(), ENDPOINT);
    let to = b.template(&r.to);
    let from = b.template_opt(r.from.as_ref());
    let service = r.messaging_service_sid.as_ref().map(|s| b.value(s).0);
    if r.from.is_some() == r.messaging_service_sid.is_some() {
        b.error(
            &r.to,
            "twilio: give either `from` or `messaging_service_sid`",
            Some("from: \"+15017122661\""),
        );
    }
    let body = b.template(&r.body);
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    Some(Twilio {
        target: Target {
            destination: super::destination_of(&endpoint),
            timeout,
        },
        endpoint,
        sid,
        token: token?,
        to: to?,
        from,
        service,
        body: body?,
    })
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::HttpAnswer;

    fn a(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            retry_after: None,
            body: body.into(),
        }
    }

    #[test]
    fn twilio_answers() {
        assert!(judge(a(201, r#"{"sid":"SM1","status":"queued"}"#)).is_success());
        let o = judge(a(
            400,
            r#"{"code":21211,"message":"The 'To' number 5551234 is not a valid phone number.","more_info":"https://www.twilio.com/docs/errors/21211","status":400}"#,
        ));
        assert!(!o.retryable());
        assert!(o
            .parts()
            .2
            .unwrap()
            .starts_with("twilio error 21211: The 'To' number"));
        let o = judge(a(
            429,
            r#"{"code":20429,"message":"Too Many Requests","status":429}"#,
        ));
        assert!(o.retryable());
        assert!(judge(a(503, "")).retryable());
    }
}
