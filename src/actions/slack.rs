//! `slack:`: a message to a Slack incoming webhook. The webhook URL is the secret. Slack
//! answers 200 with the body `ok`; a refusal is a 4xx whose body names it
//! (`invalid_payload`, `channel_not_found`, `no_text`…), final; 429 waits for its
//! `Retry-After`; 5xx is tried again.

use super::http::{self as http_kind, JsonTemplate};
use super::{Action, Answer, Build, Message, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::TemplateId;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

pub const KIND: &str = "slack";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    /// The incoming-webhook URL, from `${env:…}` or `${file:…}`.
    pub webhook: Spanned<String>,
    pub text: Spanned<String>,
    /// Block Kit blocks, written as YAML; every string in them is a template.
    pub blocks: Option<Spanned<serde_json::Value>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug)]
pub struct Slack {
    webhook: TemplateId,
    target: Target,
    text: TemplateId,
    blocks: Option<JsonTemplate>,
}

impl Action for Slack {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let mut v = vec![&self.webhook, &self.text];
        if let Some(b) = &self.blocks {
            http_kind::json_templates(b, &mut v);
        }
        v
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let url = http_kind::wire_url(s.text("webhook", &self.webhook)?, s.reveal)?;
        let text = s.text("text", &self.text)?;
        let mut body = format!("{{\"text\":{}", serde_json::Value::from(text));
        if let Some(b) = &self.blocks {
            body.push_str(",\"blocks\":");
            http_kind::render_json(s, b, "blocks", &mut body)?;
        }
        body.push('}');
        Ok(Message::Http(Request {
            method: super::Method::Post,
            url,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.into_bytes()),
        }))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        super::judge_http(answer, judge)
    }
}

/// 200 with `ok` is delivered; Slack's named refusals are final.
pub fn judge(a: super::HttpAnswer) -> Outcome {
    let code = a.body.trim().to_string();
    match a.status {
        200 if code == "ok" => Outcome::Delivered {
            status: 200,
            body: a.body,
        },
        200 => Outcome::BodyRejected {
            status: 200,
            why: format!("slack answered `{}`, not `ok`", truncate(&code)),
            body: a.body,
        },
        s if super::outcome::status_retryable(s) => Outcome::Status {
            status: s,
            body: a.body,
            retry_after: a.retry_after,
        },
        s => Outcome::Rejected {
            status: Some(s),
            why: format!("slack refused the message: {}", truncate(&code)),
            body: a.body,
            class: super::outcome::status_class(s),
            retryable: false,
            retry_after: None,
        },
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Compiles `slack:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Slack> {
    let webhook = b.secret_template("slack.webhook", &r.webhook);
    let (real, _) = b.value(&r.webhook);
    if webhook.is_some() && !(real.starts_with("https://") || real.starts_with("http://")) {
        b.error(
            &r.webhook,
            "slack.webhook is not a URL",
            Some("set it to the incoming-webhook URL Slack gives: https://hooks.slack.com/services/…"),
        );
    }
    let text = b.template(&r.text);
    let blocks = r.blocks.as_ref().map(|j| {
        let at = Spanned::new(String::new(), j.referenced, j.defined);
        http_kind::json_template(b, &at, &j.value)
    });
    if let Some(j) = &r.blocks {
        if !j.value.is_array() {
            b.error(j, "slack.blocks must be a list of blocks", Some("blocks: [{ type: section, text: { type: mrkdwn, text: \"*{transaction_id}*\" } }]"));
        }
    }
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    Some(Slack {
        target: Target {
            destination: super::destination_of(&real),
            timeout,
        },
        webhook: webhook?,
        text: text?,
        blocks,
    })
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::HttpAnswer;
    use std::time::Duration;

    fn a(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            retry_after: Some(Duration::from_secs(30)),
            body: body.into(),
        }
    }

    #[test]
    fn slack_answers() {
        assert!(judge(a(200, "ok")).is_success());
        let o = judge(a(400, "invalid_payload"));
        assert!(!o.retryable());
        assert!(o.parts().2.unwrap().contains("invalid_payload"));
        let o = judge(a(429, "rate_limited"));
        assert!(o.retryable());
        assert_eq!(o.retry_after(), Some(Duration::from_secs(30)));
        assert!(judge(a(500, "rollup_error")).retryable());
        assert!(!judge(a(404, "channel_not_found")).retryable());
    }
}
