//! Delivery: claims due deliveries from the store, renders them with the live plan, sends
//! them and records every attempt.
//!
//! The dispatcher ([`dispatch`]) never blocks ingest: it only talks to the store's queue.
//! Concurrency is capped globally and per destination host ([`gate`]), so one slow tracker
//! cannot hold back others.

mod dispatch;
pub mod egress;
pub mod gate;
mod prune;
pub mod schedule;

pub use prune::prune_loop;

use crate::actions::email::Mailer;
use crate::actions::sheets::Appender;
use crate::actions::{self, Answer, HttpAnswer, Message, Request, SendError};
use crate::plan::Plan;
use crate::store::{Attempt, Claimed, Next, Store};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an attempt decided: the attempt to log (none if it never went out) and what comes
/// next for the delivery.
#[derive(Debug, Clone)]
pub struct Decision {
    pub attempt: Option<Attempt>,
    /// The action kind of the attempt (empty when nothing was attempted).
    pub kind: &'static str,
    pub next: Next,
    pub reason: Option<String>,
}

/// Everything an attempt needs.
#[derive(Clone)]
pub struct Deliverer {
    pub store: Store,
    pub plan: Arc<ArcSwap<Plan>>,
    pub client: reqwest::Client,
    pub egress: egress::Egress,
    /// SMTP connections for e-mail actions, pooled per relay.
    pub mailer: Mailer,
    /// Spreadsheet rows waiting for their batch, and service-account tokens.
    pub appender: Appender,
    /// The destinations paused now: (destination, since when in unix ms, failures in a row).
    pub paused: Paused,
    /// This daemon's metrics.
    pub telemetry: crate::telemetry::Telemetry,
}

/// The paused destinations, shared with the health and metrics pages.
pub type Paused = Arc<std::sync::Mutex<Vec<(String, i64, u32)>>>;

/// Builds the outgoing HTTP client (rustls, no redirects followed: a postback's answer is
/// the answer of the URL it was sent to).
///
/// Every name is resolved through `egress`, which drops the addresses the policy blocks, so
/// the client connects only to addresses that passed.
pub fn client(user_agent: &str, egress: egress::Egress) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(user_agent)
        .dns_resolver(Arc::new(egress))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(32)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default()
}

impl Deliverer {
    pub fn new(
        store: Store,
        plan: Arc<ArcSwap<Plan>>,
        telemetry: crate::telemetry::Telemetry,
    ) -> Deliverer {
        let ua = plan.load().settings.delivery.user_agent.clone();
        let egress = egress::Egress::new(plan.clone());
        Deliverer {
            store,
            plan,
            client: client(&ua, egress.clone()),
            egress,
            mailer: Mailer::default(),
            appender: Appender::default(),
            paused: Paused::default(),
            telemetry,
        }
    }

    /// Records what an attempt decided. The outcome must reach the store, or the delivery
    /// would stay in flight until the next start: while the store cannot write, keep trying.
    pub async fn record(&self, id: i64, decision: Decision) {
        let Decision {
            attempt,
            next,
            reason,
            ..
        } = decision;
        let mut pause = Duration::from_millis(100);
        loop {
            match self
                .store
                .finish(id, attempt.clone(), next.clone(), reason.clone())
                .await
            {
                Ok(()) => return,
                Err(crate::store::StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(delivery = id, error = %e, "cannot record delivery outcome yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One attempt at one delivery: decides whether it still goes out, renders it, sends it
    /// and judges the answer. The caller frees the slot, then [`Deliverer::record`]s it.
    pub async fn attempt(&self, d: &Claimed) -> Decision {
        let plan = self.plan.load_full();
        let finish = |attempt: Option<Attempt>, next: Next, reason: Option<String>| Decision {
            attempt,
            kind: "",
            next,
            reason,
        };
        let Some(entry) = plan.entry(&d.postback_id, &d.offer) else {
            return orphaned(d, &plan, crate::now_ms());
        };
        if !entry.enabled {
            let reason = format!(
                "postback `{}` is disabled (config {})",
                d.postback_id, plan.hash
            );
            tracing::info!(delivery = d.id, postback = %d.postback_id, reason = %reason, "delivery cancelled");
            return finish(None, Next::Cancelled, Some(reason));
        }
        if d.delayed && d.attempts == 0 {
            // The hold is over: the conversion may have changed meanwhile (a fraud check
            // rejected it). Fire only if the postback still matches its latest state.
            let latest = d.latest.as_ref().unwrap_or(&d.event);
            if !plan.entry_holds(entry, latest, &std::cell::OnceCell::new()) {
                let reason = format!(
                    "conditions no longer hold after the delay (status now {})",
                    latest.field("status").unwrap_or("unknown")
                );
                tracing::info!(delivery = d.id, postback = %d.postback_id, reason = %reason, "delivery cancelled");
                return finish(None, Next::Cancelled, Some(reason));
            }
        }
        let pb = &plan.postbacks[entry.postback];
        let attempt_no = d.attempts + 1;
        let started = crate::now_ms();
        // A template minijinja runs is CPU work of unknown size (it may loop): it runs on
        // the blocking pool, never on the threads that serve HTTP, and its fuel bounds it.
        // Text and plain macros render in microseconds, here.
        let rendered = if plan.is_cheap(entry) {
            plan.render(entry, &d.event, started)
        } else {
            let (plan, event) = (plan.clone(), d.event.clone());
            let key = (d.postback_id.clone(), d.offer.clone());
            tokio::task::spawn_blocking(move || {
                let entry =
                    plan.entry(&key.0, &key.1)
                        .ok_or_else(|| actions::RenderError::Template {
                            part: "render".into(),
                            message: "the postback left the config".into(),
                        })?;
                plan.render(entry, &event, started)
            })
            .await
            .unwrap_or_else(|e| {
                Err(actions::RenderError::Template {
                    part: "render".into(),
                    message: format!("the render stopped unexpectedly: {e}"),
                })
            })
        };
        let mut rendered = match rendered {
            Ok(r) => r,
            Err(e) => {
                let next = schedule::next(
                    &pb.retry,
                    attempt_no,
                    d.created_at,
                    started,
                    &plan.settings.delivery,
                    None,
                    e.retryable(),
                );
                tracing::warn!(delivery = d.id, postback = %pb.id, attempt = attempt_no, error = %e, kind = pb.action.kind(), "render failed");
                let a = Attempt {
                    started_at: started,
                    outcome: "render_error".into(),
                    error: Some(plan.scrub(&e.to_string())),
                    config_version: plan.hash.clone(),
                    config_commit: plan.git.as_ref().map(|g| g.commit.clone()),
                    ..Attempt::default()
                };
                return Decision {
                    kind: pb.action.kind(),
                    ..finish(Some(a), next, None)
                };
            }
        };
        if let Some(keys) = pb.action.signing() {
            // One message id per delivery, the same on every retry, so a receiver can
            // drop a repeat; a fresh timestamp on each, as receivers bound its age.
            let id = format!("msg_{}_{}", d.event.id, d.id);
            rendered.sign(keys, &id, crate::now_ms() / 1000);
        }
        let timeout = pb
            .action
            .timeout()
            .unwrap_or(plan.settings.delivery.timeout);
        let t0 = Instant::now();
        let answer = self.send(&rendered.message, timeout).await;
        let duration_ms = t0.elapsed().as_millis() as i64;
        let out = pb.action.judge(answer);
        let retryable = out.retryable();
        let next = if out.is_success() {
            Next::Delivered
        } else {
            schedule::next(
                &pb.retry,
                attempt_no,
                d.created_at,
                started + duration_ms,
                &plan.settings.delivery,
                out.retry_after(),
                retryable,
            )
        };
        let (status, body, error) = out.parts();
        let shown = rendered.shown();
        tracing::info!(
            delivery = d.id,
            postback = %pb.id,
            attempt = attempt_no,
            outcome = out.class(),
            status = status.map(i64::from).unwrap_or(0),
            duration_ms,
            next = next_label(&next),
            url = %crate::render::escape_controls(shown.target()),
            kind = pb.action.kind(),
            "delivery attempt"
        );
        let a = Attempt {
            started_at: started,
            duration_ms,
            method: shown.method().into(),
            url: shown.target().to_string(),
            request_body: shown.logged_body(4096),
            response_status: status,
            response_body: body.map(|b| plan.scrub(&b)),
            error: error.map(|e| plan.scrub(&e)),
            outcome: out.class().into(),
            config_version: plan.hash.clone(),
            config_commit: plan.git.as_ref().map(|g| g.commit.clone()),
        };
        Decision {
            kind: pb.action.kind(),
            ..finish(Some(a), next, None)
        }
    }

    /// Sends one message by its transport: HTTP through the client, mail through the
    /// relay's pool.
    pub async fn send(&self, m: &Message, timeout: Duration) -> Answer {
        let t = Transports {
            client: &self.client,
            egress: &self.egress,
            mailer: &self.mailer,
            appender: &self.appender,
        };
        send(&t, m, timeout).await
    }
}

/// What sends messages: the HTTP client behind the egress policy, the SMTP pools, the
/// spreadsheet batches.
pub struct Transports<'a> {
    pub client: &'a reqwest::Client,
    pub egress: &'a egress::Egress,
    pub mailer: &'a Mailer,
    pub appender: &'a Appender,
}

/// Sends one message and returns what came back.
pub async fn send(t: &Transports<'_>, m: &Message, timeout: Duration) -> Answer {
    match m {
        Message::Http(r) => Answer::Http(send_request(t.client, t.egress, r, timeout).await),
        Message::Mail(mail) => Answer::Mail(t.mailer.send(mail, timeout).await),
        Message::Rows(row) => {
            let (client, egress) = (t.client.clone(), t.egress.clone());
            let send: actions::sheets::Send = Arc::new(move |req, timeout| {
                let (client, egress) = (client.clone(), egress.clone());
                Box::pin(async move { send_request(&client, &egress, &req, timeout).await })
            });
            Answer::Rows(t.appender.append(row, send, timeout).await)
        }
    }
}

/// Sends one request; returns the status, any `Retry-After`, and the first 64 KiB of the
/// body. A literal address the egress policy blocks is refused before anything is sent.
pub async fn send_request(
    client: &reqwest::Client,
    egress: &egress::Egress,
    req: &Request,
    timeout: Duration,
) -> Result<HttpAnswer, SendError> {
    // Parsed once: checked here, then handed to the client as it is.
    let url = reqwest::Url::parse(&req.url);
    if let Ok(u) = &url {
        egress
            .check_url(u)
            .map_err(|b| SendError::Blocked(b.to_string()))?;
    }
    match send_http(client, req, url, timeout).await {
        Ok((status, retry_after, body)) => Ok(HttpAnswer {
            status,
            retry_after,
            body,
        }),
        Err(e) => Err(match egress::blocked_in(&e) {
            Some(b) => SendError::Blocked(b.to_string()),
            // The error's url would carry what was placed in it, secrets included: the
            // attempt already records the url as shown.
            None => SendError::Http(e.without_url()),
        }),
    }
}

async fn send_http(
    client: &reqwest::Client,
    req: &Request,
    url: Result<reqwest::Url, url::ParseError>,
    timeout: Duration,
) -> Result<(u16, Option<Duration>, String), reqwest::Error> {
    let method =
        reqwest::Method::from_bytes(req.method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET);
    // A url that does not parse is left to the client, whose error says why.
    let rb = match url {
        Ok(u) => client.request(method, u),
        Err(_) => client.request(method, &req.url),
    };
    let mut rb = rb.timeout(timeout);
    for (k, v) in &req.headers {
        rb = rb.header(k, v);
    }
    if let Some(b) = &req.body {
        rb = rb.body(b.clone());
    }
    let resp = rb.send().await?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(schedule::parse_retry_after);
    let body = read_prefix(resp, 64 * 1024).await?;
    Ok((status, retry_after, body))
}

/// Counts an attempt's decision in the metrics: the attempt's result class and duration,
/// and the delivery's final outcome (with its latency from the webhook) when it has one.
pub fn observe(t: &crate::telemetry::Telemetry, d: &Claimed, decision: &Decision) {
    let postback = d.postback_id.clone();
    if let Some(a) = &decision.attempt {
        let result = match a.outcome.as_str() {
            "delivered" => "2xx",
            other => other,
        };
        t.attempt(&postback, result);
        t.action_attempt(decision.kind, result);
        if result != "render_error" {
            t.attempt_seconds(postback.clone(), a.duration_ms as f64 / 1000.0);
        }
    }
    let outcome = match decision.next {
        Next::Delivered => "delivered",
        Next::Dead => "dead",
        Next::Cancelled => "cancelled",
        Next::Retry { .. } | Next::Orphaned { .. } => return,
    };
    t.delivery(&postback, outcome);
    if outcome == "delivered" {
        let secs = (crate::now_ms() - d.created_at).max(0) as f64 / 1000.0;
        t.latency_seconds(postback, secs);
    }
}

/// What one send outside the queue got back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tried {
    pub outcome: String,
    pub status: Option<u16>,
    pub body: Option<String>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// Sends a postback's message once, outside the queue and the delivery log, and judges the
/// answer by the postback's own rules (`fire --send`, `POST /api/v1/test`). An action with
/// a validation endpoint (GA4) sends there instead.
pub async fn send_once(
    t: &Transports<'_>,
    plan: &Plan,
    postback_id: &str,
    message: &Message,
) -> Tried {
    let Some(pb) = plan.postback(postback_id) else {
        return Tried {
            outcome: "error".into(),
            status: None,
            body: None,
            error: Some(format!("postback `{postback_id}` is not in the config")),
            duration_ms: 0,
        };
    };
    let timeout = pb
        .action
        .timeout()
        .unwrap_or(plan.settings.delivery.timeout);
    let mut rendered = actions::Rendered {
        message: pb.action.for_test(message.clone()),
        shown: None,
    };
    if let Some(keys) = pb.action.signing() {
        let id = format!("msg_test_{}", uuid::Uuid::new_v4().simple());
        rendered.sign(keys, &id, crate::now_ms() / 1000);
    }
    let t0 = Instant::now();
    let answer = send(t, &rendered.message, timeout).await;
    let duration_ms = t0.elapsed().as_millis() as u64;
    let out = pb.action.judge_test(answer);
    let (status, body, error) = out.parts();
    Tried {
        outcome: out.class().to_string(),
        status,
        body: body.map(|b| plan.scrub(&b)),
        error: error.map(|e| plan.scrub(&e)),
        duration_ms,
    }
}

/// A delivery whose postback is not in the running config: a reload may have loaded a
/// half-written file or a bad merge. It waits, unattempted, for the grace period from when
/// it was first found missing, and goes on if a reload brings the postback back (the
/// dispatcher wakes it then); after that it is cancelled with the reason.
fn orphaned(d: &Claimed, plan: &Plan, now: i64) -> Decision {
    let grace = plan.settings.delivery.orphan_grace.as_millis() as i64;
    let since = d.orphaned_at.unwrap_or(now);
    let missing = format!(
        "postback `{}` for offer `{}` is not in the config (version {}) since {}",
        d.postback_id,
        d.offer,
        plan.hash,
        crate::utc_text(since)
    );
    if now >= since + grace {
        let reason = format!(
            "{missing} and did not come back within delivery.orphan_grace ({})",
            crate::duration_text(plan.settings.delivery.orphan_grace)
        );
        tracing::info!(delivery = d.id, postback = %d.postback_id, reason = %reason, "delivery cancelled");
        return Decision {
            attempt: None,
            kind: "",
            next: Next::Cancelled,
            reason: Some(reason),
        };
    }
    let reason = format!(
        "{missing}; waiting for a reload to bring it back, cancelled at {} if none does",
        crate::utc_text(since + grace)
    );
    if d.orphaned_at.is_none() {
        tracing::warn!(delivery = d.id, postback = %d.postback_id, reason = %reason, "delivery orphaned");
    }
    Decision {
        attempt: None,
        kind: "",
        next: Next::Orphaned {
            since,
            due_at: since + grace,
        },
        reason: Some(reason),
    }
}

fn next_label(n: &Next) -> &'static str {
    match n {
        Next::Delivered => "delivered",
        Next::Retry { .. } | Next::Orphaned { .. } => "retry",
        Next::Dead => "dead",
        Next::Cancelled => "cancelled",
    }
}

/// Reads at most `limit` bytes of a response body; the rest is dropped unread.
async fn read_prefix(mut resp: reqwest::Response, limit: usize) -> Result<String, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let take = (limit - buf.len()).min(chunk.len());
        buf.extend_from_slice(&chunk[..take]);
        if buf.len() >= limit {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
