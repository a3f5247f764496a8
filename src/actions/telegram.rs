//! `telegram:`: the Bot API's `sendMessage`. The bot token is the secret (it is part of the
//! URL, shown as `***`). Telegram answers `{"ok": true, …}`; a failure is
//! `{"ok": false, "error_code": …, "description": …}`, whose description goes in the log.
//! 429 waits for `parameters.retry_after`, 5xx is tried again, other errors are final.

use super::{Action, Answer, Build, Message, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::{Escape, TemplateId};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::time::Duration;

pub const KIND: &str = "telegram";
pub const ENDPOINT: &str = "https://api.telegram.org";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    /// From `${env:…}` or `${file:…}`.
    pub bot_token: Spanned<String>,
    pub chat_id: Spanned<String>,
    pub text: Spanned<String>,
    /// `HTML` (values are HTML-escaped), `MarkdownV2` or `Markdown`; none: plain text.
    pub parse_mode: Option<Spanned<String>>,
    pub disable_notification: Option<bool>,
    /// The Bot API's base URL (default https://api.telegram.org), for a proxy or a test.
    pub endpoint: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug)]
pub struct Telegram {
    endpoint: String,
    target: Target,
    token: (String, String),
    chat_id: TemplateId,
    text: TemplateId,
    parse_mode: Option<String>,
    disable_notification: Option<bool>,
}

impl Action for Telegram {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        vec![&self.chat_id, &self.text]
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let token = s.pick(&self.token.0, &self.token.1);
        let url = format!("{}/bot{token}/sendMessage", self.endpoint);
        let mut body = serde_json::json!({
            "chat_id": super::number_or_text(&s.text("chat_id", &self.chat_id)?),
            "text": s.text("text", &self.text)?,
        });
        if let Some(p) = &self.parse_mode {
            body["parse_mode"] = p.as_str().into();
        }
        if let Some(d) = self.disable_notification {
            body["disable_notification"] = d.into();
        }
        Ok(Message::Http(Request::json(url, Vec::new(), &body)))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        super::judge_http(answer, judge)
    }
}

/// `"ok": true` is delivered; otherwise the description says why.
pub fn judge(a: super::HttpAnswer) -> Outcome {
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
    if a.status == 200 && v["ok"] == serde_json::Value::Bool(true) {
        return Outcome::Delivered {
            status: 200,
            body: a.body,
        };
    }
    let code = v["error_code"]
        .as_u64()
        .map(|c| c as u16)
        .unwrap_or(a.status);
    let description = v["description"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("http status {}", a.status));
    let retry_after = v["parameters"]["retry_after"]
        .as_u64()
        .map(Duration::from_secs)
        .or(a.retry_after);
    Outcome::Rejected {
        status: Some(a.status),
        why: format!("telegram error {code}: {description}"),
        body: a.body,
        class: if a.status == 200 {
            "body_rejected"
        } else {
            super::outcome::status_class(a.status)
        },
        retryable: code == 429 || code >= 500 || a.status == 429 || a.status >= 500,
        retry_after,
    }
}

/// Compiles `telegram:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Telegram> {
    let token = b.secret("telegram.bot_token", &r.bot_token);
    let endpoint = b.endpoint(r.endpoint.as_ref(), ENDPOINT);
    let chat_id = b.template(&r.chat_id);
    let parse_mode = match &r.parse_mode {
        None => None,
        Some(p) if ["HTML", "MarkdownV2", "Markdown"].contains(&p.value.as_str()) => {
            Some(p.value.clone())
        }
        Some(p) => {
            b.error(
                p,
                format!("telegram.parse_mode: unknown mode `{}`", p.value),
                Some("use HTML, MarkdownV2 or Markdown, or leave it out for plain text"),
            );
            None
        }
    };
    let (_, src) = b.text(&r.text);
    let escape = if parse_mode.as_deref() == Some("HTML") {
        Escape::Html
    } else {
        Escape::Plain
    };
    let text = b.compile(&r.text, &src, escape, true);
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    Some(Telegram {
        target: Target {
            destination: super::destination_of(&endpoint),
            timeout,
        },
        endpoint,
        token: token?,
        chat_id: chat_id?,
        text: text?,
        parse_mode,
        disable_notification: r.disable_notification,
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
    fn telegram_answers() {
        assert!(judge(a(200, r#"{"ok":true,"result":{"message_id":7}}"#)).is_success());
        let o = judge(a(
            400,
            r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
        ));
        assert!(!o.retryable());
        assert_eq!(
            o.parts().2.unwrap(),
            "telegram error 400: Bad Request: chat not found"
        );
        let o = judge(a(
            429,
            r#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 17","parameters":{"retry_after":17}}"#,
        ));
        assert!(o.retryable());
        assert_eq!(o.retry_after(), Some(Duration::from_secs(17)));
    }
}
