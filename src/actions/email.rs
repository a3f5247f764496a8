//! `email:`: a message through an SMTP relay (lettre, rustls): implicit TLS, STARTTLS or
//! plain for a local relay, optional login; from, to, cc, bcc, reply-to, subject, a text
//! body and an optional HTML body, all templates. Connections are pooled per relay.
//!
//! A 4xx reply or a lost connection is tried again; a 5xx reply is final, with the
//! server's reply in the log.

use super::{Action, Answer, Build, Message, Outcome, RenderError, Scope, Target};
use crate::render::template::{Escape, TemplateId};
use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const KIND: &str = "email";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub smtp: RawSmtp,
    pub from: Spanned<String>,
    /// One address, or several separated by commas.
    pub to: Spanned<String>,
    pub cc: Option<Spanned<String>>,
    pub bcc: Option<Spanned<String>>,
    pub reply_to: Option<Spanned<String>>,
    pub subject: Spanned<String>,
    /// The text body.
    pub text: Spanned<String>,
    /// An HTML body (sent with the text as alternatives); values are HTML-escaped.
    pub html: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

/// The relay: settings, not templates.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: Spanned<String>,
    /// Default: 465 for `tls`, 587 for `starttls`, 25 for `none`.
    pub port: Option<Spanned<u16>>,
    /// `starttls` (default), `tls` (implicit, from the first byte) or `none` (a local relay).
    pub tls: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tls {
    Implicit,
    StartTls,
    None,
}

impl Tls {
    fn as_str(self) -> &'static str {
        match self {
            Tls::Implicit => "tls",
            Tls::StartTls => "starttls",
            Tls::None => "none",
        }
    }
}

/// Where a mail goes: the relay and its login.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Relay {
    pub host: String,
    pub port: u16,
    pub tls: Tls,
    /// Username and password.
    pub login: Option<(String, String)>,
}

#[derive(Debug)]
pub struct Email {
    relay: Relay,
    target: Target,
    from: TemplateId,
    to: TemplateId,
    cc: Option<TemplateId>,
    bcc: Option<TemplateId>,
    reply_to: Option<TemplateId>,
    subject: TemplateId,
    text: TemplateId,
    html: Option<TemplateId>,
}

/// A rendered mail: addresses checked, headers as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Mail {
    pub relay: Relay,
    /// `smtp://host:port`, for the log.
    pub target: String,
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    /// From, To, Cc, Bcc, Reply-To, Subject, as rendered.
    pub headers: Vec<(String, String)>,
    pub text: String,
    pub html: Option<String>,
}

/// Why a mail was not accepted.
#[derive(Debug)]
pub enum MailError {
    /// The server's error reply: its code and text.
    Reply { code: u16, message: String },
    /// No reply: the connection or TLS failed, or it timed out.
    Connection { message: String, timeout: bool },
    /// The message could not be built from what was rendered.
    Invalid(String),
}

impl Action for Email {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn templates(&self) -> Vec<&TemplateId> {
        let mut v = vec![&self.from, &self.to, &self.subject, &self.text];
        v.extend(
            [&self.cc, &self.bcc, &self.reply_to, &self.html]
                .into_iter()
                .flatten(),
        );
        v
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let one_line = |part: &str, v: String| {
            if v.contains(['\r', '\n']) {
                Err(RenderError::BadHeader(part.into()))
            } else {
                Ok(v.trim().to_string())
            }
        };
        let list = |part: &str, t: &Option<TemplateId>| -> Result<Vec<String>, RenderError> {
            match t {
                None => Ok(Vec::new()),
                Some(t) => addresses(part, &one_line(part, s.text(part, t)?)?),
            }
        };
        let from = one_line("from", s.text("from", &self.from)?)?;
        mailbox("from", &from)?;
        let to = addresses("to", &one_line("to", s.text("to", &self.to)?)?)?;
        if to.is_empty() {
            return Err(RenderError::Invalid("to: no address to send to".into()));
        }
        let cc = list("cc", &self.cc)?;
        let bcc = list("bcc", &self.bcc)?;
        let reply_to = match &self.reply_to {
            Some(t) => {
                Some(one_line("reply_to", s.text("reply_to", t)?)?).filter(|v| !v.is_empty())
            }
            None => None,
        };
        if let Some(r) = &reply_to {
            mailbox("reply_to", r)?;
        }
        let subject = one_line("subject", s.text("subject", &self.subject)?)?;
        let text = s.text("text", &self.text)?;
        let html = match &self.html {
            Some(t) => Some(s.text("html", t)?),
            None => None,
        };
        let mut headers = vec![
            ("From".to_string(), from.clone()),
            ("To".into(), to.join(", ")),
        ];
        if !cc.is_empty() {
            headers.push(("Cc".into(), cc.join(", ")));
        }
        if !bcc.is_empty() {
            headers.push(("Bcc".into(), bcc.join(", ")));
        }
        if let Some(r) = &reply_to {
            headers.push(("Reply-To".into(), r.clone()));
        }
        headers.push(("Subject".into(), subject.clone()));
        let mut relay = self.relay.clone();
        if !s.reveal {
            if let Some((_, p)) = &mut relay.login {
                *p = "***".into();
            }
        }
        Ok(Message::Mail(Box::new(Mail {
            target: format!(
                "smtp://{}:{} ({})",
                relay.host,
                relay.port,
                relay.tls.as_str()
            ),
            relay,
            from,
            to,
            cc,
            bcc,
            reply_to,
            subject,
            headers,
            text,
            html,
        })))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        let Answer::Mail(result) = answer else {
            return Outcome::Other("an HTTP answer for an e-mail action".into());
        };
        judge(result)
    }
}

/// A 2xx reply is delivered; 4xx and a lost connection are retried; 5xx is final.
pub fn judge(result: Result<String, MailError>) -> Outcome {
    match result {
        Ok(reply) => Outcome::Delivered {
            status: 250,
            body: reply,
        },
        Err(MailError::Reply { code, message }) => Outcome::Rejected {
            status: Some(code),
            body: String::new(),
            why: format!("smtp {code} {message}"),
            class: if code >= 500 { "5xx" } else { "4xx" },
            retryable: code < 500,
            retry_after: None,
        },
        Err(MailError::Connection { message, timeout }) => {
            if timeout {
                Outcome::Timeout(message)
            } else {
                Outcome::Connect(message)
            }
        }
        Err(MailError::Invalid(m)) => Outcome::Rejected {
            status: None,
            body: String::new(),
            why: m,
            class: "error",
            retryable: false,
            retry_after: None,
        },
    }
}

fn mailbox(part: &str, v: &str) -> Result<Mailbox, RenderError> {
    v.parse::<Mailbox>()
        .map_err(|e| RenderError::Invalid(format!("{part}: `{v}` is not an e-mail address ({e})")))
}

/// A comma-separated list of addresses, each checked.
fn addresses(part: &str, v: &str) -> Result<Vec<String>, RenderError> {
    let mut out = Vec::new();
    for a in v.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        mailbox(part, a)?;
        out.push(a.to_string());
    }
    Ok(out)
}

/// Compiles `email:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Email> {
    let tls = match r.smtp.tls.as_ref().map(|t| t.value.as_str()) {
        None | Some("starttls") => Tls::StartTls,
        Some("tls") => Tls::Implicit,
        Some("none") => Tls::None,
        Some(other) => {
            let at = r.smtp.tls.as_ref()?;
            b.error(
                at,
                format!("smtp.tls: unknown mode `{other}`"),
                Some("use starttls (port 587), tls (port 465) or none (a relay on this host or network)"),
            );
            Tls::StartTls
        }
    };
    let port = r.smtp.port.as_ref().map(|p| p.value).unwrap_or(match tls {
        Tls::Implicit => 465,
        Tls::StartTls => 587,
        Tls::None => 25,
    });
    let (host, _) = b.value(&r.smtp.host);
    if host.is_empty() || host.contains(['/', ' ', '{']) {
        b.error(
            &r.smtp.host,
            "smtp.host must be a host name or address",
            Some("smtp: { host: smtp.example.com }"),
        );
    }
    let login = match (&r.smtp.username, &r.smtp.password) {
        (Some(u), Some(p)) => {
            let (user, _) = b.value(u);
            let (pass, _) = b.secret("smtp.password", p)?;
            Some((user, pass))
        }
        (None, None) => None,
        (Some(at), None) | (None, Some(at)) => {
            b.error(
                at,
                "smtp: give both username and password, or neither",
                None,
            );
            None
        }
    };
    let from = b.template(&r.from);
    let to = b.template(&r.to);
    let cc = b.template_opt(r.cc.as_ref());
    let bcc = b.template_opt(r.bcc.as_ref());
    let reply_to = b.template_opt(r.reply_to.as_ref());
    let subject = b.template(&r.subject);
    let (_, text_src) = b.text(&r.text);
    let text = b.compile(&r.text, &text_src, Escape::Plain, true);
    let html = r.html.as_ref().and_then(|h| {
        let (_, src) = b.text(h);
        b.compile(h, &src, Escape::Html, true)
    });
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    let destination = format!("{}:{port}", host.to_ascii_lowercase());
    Some(Email {
        relay: Relay {
            host,
            port,
            tls,
            login,
        },
        target: Target {
            destination,
            timeout,
        },
        from: from?,
        to: to?,
        cc,
        bcc,
        reply_to,
        subject: subject?,
        text: text?,
        html,
    })
}

/// SMTP connections, one pool per relay, reused across deliveries.
#[derive(Clone, Default)]
pub struct Mailer {
    pools: Arc<Mutex<HashMap<Relay, AsyncSmtpTransport<Tokio1Executor>>>>,
}

impl Mailer {
    fn transport(
        &self,
        relay: &Relay,
        timeout: Duration,
    ) -> Result<AsyncSmtpTransport<Tokio1Executor>, MailError> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = pools.get(relay) {
            return Ok(t.clone());
        }
        let bad = |e: lettre::transport::smtp::Error| MailError::Connection {
            message: super::outcome::error_chain(&e),
            timeout: false,
        };
        let builder = match relay.tls {
            Tls::Implicit => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&relay.host).map_err(bad)?
            }
            Tls::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&relay.host).map_err(bad)?
            }
            Tls::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(relay.host.as_str())
            }
        };
        let mut builder = builder.port(relay.port).timeout(Some(timeout)).pool_config(
            PoolConfig::new()
                .max_size(8)
                .idle_timeout(Duration::from_secs(60)),
        );
        if let Some((u, p)) = &relay.login {
            builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
        }
        let t = builder.build();
        pools.insert(relay.clone(), t.clone());
        Ok(t)
    }

    /// Sends one mail; the server's last reply, or why it was not accepted.
    pub async fn send(&self, m: &Mail, timeout: Duration) -> Result<String, MailError> {
        let email = build(m)?;
        let transport = self.transport(&m.relay, timeout)?;
        match tokio::time::timeout(timeout + Duration::from_secs(1), transport.send(email)).await {
            Err(_) => Err(MailError::Connection {
                message: format!("no answer from the relay within {}s", timeout.as_secs()),
                timeout: true,
            }),
            Ok(Ok(resp)) => Ok(format!(
                "{} {}",
                u16::from(resp.code()),
                resp.message().collect::<Vec<_>>().join(" ")
            )),
            Ok(Err(e)) => Err(match e.status() {
                Some(code) if e.is_transient() || e.is_permanent() => MailError::Reply {
                    code: u16::from(code),
                    message: reply_text(&e),
                },
                _ => MailError::Connection {
                    message: super::outcome::error_chain(&e),
                    timeout: e.is_timeout(),
                },
            }),
        }
    }
}

/// The server's reply text from a lettre error ("permanent error (550): no such user"
/// gives "no such user").
fn reply_text(e: &lettre::transport::smtp::Error) -> String {
    let full = e.to_string();
    match full.split_once("): ") {
        Some((_, rest)) => rest.to_string(),
        None => full,
    }
}

fn build(m: &Mail) -> Result<lettre::Message, MailError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| MailError::Invalid(format!("{what}: {e}"));
    let parse = |what: &str, v: &str| v.parse::<Mailbox>().map_err(|e| bad(what, &e));
    let mut b = lettre::Message::builder()
        .from(parse("from", &m.from)?)
        .subject(m.subject.clone());
    for a in &m.to {
        b = b.to(parse("to", a)?);
    }
    for a in &m.cc {
        b = b.cc(parse("cc", a)?);
    }
    for a in &m.bcc {
        b = b.bcc(parse("bcc", a)?);
    }
    if let Some(r) = &m.reply_to {
        b = b.reply_to(parse("reply_to", r)?);
    }
    let built = match &m.html {
        Some(html) => b.multipart(MultiPart::alternative_plain_html(
            m.text.clone(),
            html.clone(),
        )),
        None => b.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(m.text.clone()),
        ),
    };
    built.map_err(|e| bad("message", &e))
}

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_replies_are_judged_by_their_class() {
        let o = judge(Err(MailError::Reply {
            code: 451,
            message: "try later".into(),
        }));
        assert!(o.retryable());
        assert_eq!(o.class(), "4xx");
        let o = judge(Err(MailError::Reply {
            code: 550,
            message: "no such user".into(),
        }));
        assert!(!o.retryable());
        assert_eq!(o.class(), "5xx");
        assert_eq!(o.parts().2.unwrap(), "smtp 550 no such user");
        let o = judge(Err(MailError::Connection {
            message: "refused".into(),
            timeout: false,
        }));
        assert!(o.retryable());
        assert!(judge(Ok("250 ok".into())).is_success());
    }

    #[test]
    fn address_lists_are_checked() {
        assert_eq!(
            addresses("to", "a@example.com, Bo <b@example.com>").unwrap(),
            vec!["a@example.com", "Bo <b@example.com>"]
        );
        assert!(matches!(
            addresses("to", "a@example.com, nope"),
            Err(RenderError::Invalid(_))
        ));
    }
}
