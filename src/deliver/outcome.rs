//! Judging an attempt: what the destination answered, and whether that is a success, a
//! failure worth retrying, or a final refusal.

use crate::plan::Success;
use std::time::Duration;

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// Accepted by status (and body, when the postback checks it).
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
    Timeout(String),
    Connect(String),
    /// The TLS handshake failed (bad or expired certificate, wrong host name, protocol).
    Tls(String),
    /// The egress policy refused the address (`delivery.allow_networks`); never retried.
    Blocked(String),
    Other(String),
}

/// Why a request got no answer: the egress policy refused it, or the HTTP client failed.
#[derive(Debug)]
pub enum SendError {
    Blocked(super::egress::Blocked),
    Http(reqwest::Error),
}

/// Judges the result of sending a request against the postback's success rule.
pub fn judge(
    result: Result<(u16, Option<Duration>, String), SendError>,
    success: &Success,
) -> Outcome {
    let result = match result {
        Ok(r) => Ok(r),
        Err(SendError::Blocked(b)) => return Outcome::Blocked(b.to_string()),
        Err(SendError::Http(e)) => match super::egress::blocked_in(&e) {
            Some(b) => return Outcome::Blocked(b.to_string()),
            // The error's url would carry what was placed in it, secrets included: the
            // attempt already records the url as shown.
            None => Err(e.without_url()),
        },
    };
    let (status, retry_after, body) = match result {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Outcome::Timeout(error_chain(&e)),
        Err(e) if e.is_connect() => {
            let chain = error_chain(&e);
            let lower = chain.to_ascii_lowercase();
            return if ["certificate", "tls", "handshake", "invalid peer"]
                .iter()
                .any(|w| lower.contains(w))
            {
                Outcome::Tls(chain)
            } else {
                Outcome::Connect(chain)
            };
        }
        Err(e) => return Outcome::Other(error_chain(&e)),
    };
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

/// The error and its causes on one line ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
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

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Delivered { .. })
    }

    /// Timeouts, connection errors, 408, 429 and 5xx are worth another try; other 4xx and
    /// body rejections mean the destination understood and refused.
    pub fn retryable(&self) -> bool {
        match self {
            Outcome::Delivered { .. } | Outcome::BodyRejected { .. } | Outcome::Blocked(_) => false,
            Outcome::Status { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            Outcome::Timeout(_) | Outcome::Connect(_) | Outcome::Tls(_) | Outcome::Other(_) => true,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Outcome::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A bounded label for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Status { status, .. } if *status < 400 => "3xx",
            Outcome::Status { status, .. } if *status < 500 => "4xx",
            Outcome::Status { .. } => "5xx",
            Outcome::BodyRejected { .. } => "body_rejected",
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
            Outcome::Timeout(e)
            | Outcome::Connect(e)
            | Outcome::Tls(e)
            | Outcome::Blocked(e)
            | Outcome::Other(e) => (None, None, Some(e.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(status: u16, body: &str) -> Result<(u16, Option<Duration>, String), SendError> {
        Ok((status, None, body.to_string()))
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
