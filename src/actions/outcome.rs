//! How one attempt ended: the vocabulary every action kind judges its answers into, with
//! what the delivery log, the metrics and the retry schedule read from it.

use std::time::Duration;

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// Accepted by the API's own rule (a status, and a body when the kind checks one).
    Delivered {
        status: u16,
        body: String,
    },
    /// The destination answered with a status that is not success.
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// The status was fine but the body says the request failed.
    BodyRejected {
        status: u16,
        body: String,
        why: String,
    },
    /// The API answered and said, its own way, that the request failed (Telegram's
    /// `ok: false`, Twilio's error code, Meta's error object, an SMTP reply): `why` is its
    /// message, `class` the result class (one of [`crate::telemetry::RESULTS`]), and
    /// whether it is worth another try is the kind's judgement.
    Rejected {
        status: Option<u16>,
        body: String,
        why: String,
        class: &'static str,
        retryable: bool,
        retry_after: Option<Duration>,
    },
    Timeout(String),
    Connect(String),
    /// The TLS handshake failed (bad or expired certificate, wrong host name, protocol).
    Tls(String),
    /// The egress policy refused the address (`delivery.allow_networks`); never retried.
    Blocked(String),
    Other(String),
}

/// Why an HTTP request got no answer: the egress policy refused it, or the client failed.
#[derive(Debug)]
pub enum SendError {
    /// What the egress policy said.
    Blocked(String),
    /// The client's error, without its URL (a URL would carry its secrets).
    Http(reqwest::Error),
}

/// What an HTTP destination answered: status, `Retry-After`, the first 64 KiB of the body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: String,
}

/// The answer of an HTTP API, or the outcome when there was none (timeout, refused
/// connection, TLS, blocked). Each kind judges the answer its API's way.
pub fn answered(result: Result<HttpAnswer, SendError>) -> Result<HttpAnswer, Outcome> {
    result.map_err(unanswered)
}

/// How a request that got no answer ended: blocked, timed out, refused, TLS, or else.
pub fn unanswered(e: SendError) -> Outcome {
    let e = match e {
        SendError::Blocked(b) => return Outcome::Blocked(b),
        SendError::Http(e) => e,
    };
    if e.is_timeout() {
        Outcome::Timeout(error_chain(&e))
    } else if e.is_connect() {
        let chain = error_chain(&e);
        let lower = chain.to_ascii_lowercase();
        if ["certificate", "tls", "handshake", "invalid peer"]
            .iter()
            .any(|w| lower.contains(w))
        {
            Outcome::Tls(chain)
        } else {
            Outcome::Connect(chain)
        }
    } else {
        Outcome::Other(error_chain(&e))
    }
}

/// The error and its causes on one line ("error sending request: connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Whether an HTTP status is worth another try by the usual rule: 408, 429 and 5xx.
pub fn status_retryable(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// The result class of a status: `3xx`, `4xx` or `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        0..400 => "3xx",
        400..500 => "4xx",
        _ => "5xx",
    }
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Delivered { .. })
    }

    /// Timeouts, connection errors, 408, 429 and 5xx are worth another try; other 4xx and
    /// body rejections mean the destination understood and refused. A kind's own
    /// rejection says for itself.
    pub fn retryable(&self) -> bool {
        match self {
            Outcome::Delivered { .. } | Outcome::BodyRejected { .. } | Outcome::Blocked(_) => false,
            Outcome::Status { status, .. } => status_retryable(*status),
            Outcome::Rejected { retryable, .. } => *retryable,
            Outcome::Timeout(_) | Outcome::Connect(_) | Outcome::Tls(_) | Outcome::Other(_) => true,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Outcome::Status { retry_after, .. } | Outcome::Rejected { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// A bounded label for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Status { status, .. } => status_class(*status),
            Outcome::BodyRejected { .. } => "body_rejected",
            Outcome::Rejected { class, .. } => class,
            Outcome::Timeout(_) => "timeout",
            Outcome::Connect(_) => "connect",
            Outcome::Tls(_) => "tls",
            Outcome::Blocked(_) => "blocked",
            Outcome::Other(_) => "error",
        }
    }

    /// The result class for the attempts metric: the log's class, with success as `2xx`.
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "2xx",
            other => other.class(),
        }
    }

    /// (status, first 1 KiB of the body, error text) for the delivery log.
    pub fn parts(&self) -> (Option<u16>, Option<String>, Option<String>) {
        let cut = |b: &str| {
            let mut end = b.len().min(1024);
            while !b.is_char_boundary(end) {
                end -= 1;
            }
            b[..end].to_string()
        };
        match self {
            Outcome::Delivered { status, body } => (Some(*status), Some(cut(body)), None),
            Outcome::Status { status, body, .. } => (
                Some(*status),
                Some(cut(body)),
                Some(format!("http status {status}")),
            ),
            Outcome::BodyRejected { status, body, why } => {
                (Some(*status), Some(cut(body)), Some(why.clone()))
            }
            Outcome::Rejected {
                status, body, why, ..
            } => (
                *status,
                (!body.is_empty()).then(|| cut(body)),
                Some(why.clone()),
            ),
            Outcome::Timeout(e)
            | Outcome::Connect(e)
            | Outcome::Tls(e)
            | Outcome::Blocked(e)
            | Outcome::Other(e) => (None, None, Some(e.clone())),
        }
    }
}
