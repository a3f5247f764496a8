//! The store's vocabulary, shared by every backend: delivery states, what ingest answers,
//! a claimed delivery, an attempt, what comes next, the claim's request and answer, and the
//! delivery log's rows and filters. A claim's per-destination caps are applied here
//! ([`take`]), so both backends cap the same way.

use crate::ingest::event::Event;
use crate::plan::Plan;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// Delivery states, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Inflight,
    Delivered,
    Dead,
    Cancelled,
}

impl State {
    pub fn code(self) -> i64 {
        match self {
            State::Pending => 0,
            State::Inflight => 1,
            State::Delivered => 2,
            State::Dead => 3,
            State::Cancelled => 4,
        }
    }
    /// A state by its name: `pending`, `inflight`, `delivered`, `dead`, `cancelled`.
    pub fn parse(name: &str) -> Option<State> {
        Some(match name {
            "pending" => State::Pending,
            "inflight" => State::Inflight,
            "delivered" => State::Delivered,
            "dead" => State::Dead,
            "cancelled" => State::Cancelled,
            _ => return None,
        })
    }

    pub fn from_code(c: i64) -> State {
        match c {
            0 => State::Pending,
            1 => State::Inflight,
            2 => State::Delivered,
            3 => State::Dead,
            _ => State::Cancelled,
        }
    }
}

/// What accepting one event did.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub event_id: String,
    /// Postback ids the event (merged with its conversion's earlier fields) matched.
    pub matched: Vec<String>,
    /// How many of those are new deliveries (the rest were already sent for this status).
    pub queued: usize,
    /// The ids of the new deliveries, for `/api/v1/deliveries/{id}`.
    pub deliveries: Vec<i64>,
    /// New deliveries that can go at once (not held, no earlier one of the same conversion
    /// unfinished), handed to the dispatcher straight after the commit.
    #[serde(skip)]
    pub fresh: Vec<Claimed>,
}

/// A delivery handed to the dispatcher.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub postback_id: String,
    pub offer: String,
    pub event: Event,
    /// The conversion's latest state, for re-checking a delayed postback.
    pub latest: Option<Event>,
    pub attempts: u32,
    pub created_at: i64,
    pub delayed: bool,
    /// Since when (unix ms) its postback has been missing from the config, if it is.
    pub orphaned_at: Option<i64>,
    /// The host the postback goes to, for per-destination limits.
    pub destination: String,
}

impl Claimed {
    /// First attempts and retries have slots of their own, so neither starves the other.
    pub fn lane(&self) -> Lane {
        if self.attempts == 0 {
            Lane::Fresh
        } else {
            Lane::Retry
        }
    }
}

/// One attempt, for the delivery log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Attempt {
    pub started_at: i64,
    pub duration_ms: i64,
    pub method: String,
    pub url: String,
    pub request_body: Option<String>,
    pub response_status: Option<u16>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub outcome: String,
    pub config_version: String,
    /// The commit the rules directory was at (when it is a git checkout).
    pub config_commit: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Delivered,
    Retry {
        due_at: i64,
    },
    Dead,
    Cancelled,
    /// Its postback is not in the config: wait, unattempted, for a reload to bring it back,
    /// until `due_at` (the end of the grace period that began at `since`).
    Orphaned {
        since: i64,
        due_at: i64,
    },
}

/// A finish as the tables take it: the new state, due time and orphan mark, the attempt
/// count's increase and the outcome class to show.
pub(crate) struct FinishRow<'a> {
    pub state: State,
    pub due: Option<i64>,
    pub orphaned: Option<i64>,
    pub bump: i64,
    pub now: i64,
    pub outcome: Option<&'a str>,
    pub error: Option<&'a str>,
}

impl<'a> FinishRow<'a> {
    pub fn of(attempt: Option<&'a Attempt>, next: &Next, reason: Option<&'a str>) -> Self {
        let now = attempt
            .map(|a| a.started_at + a.duration_ms)
            .unwrap_or_else(crate::now_ms);
        let (state, due, orphaned) = match next {
            Next::Delivered => (State::Delivered, None, None),
            Next::Retry { due_at } => (State::Pending, Some(*due_at), None),
            Next::Dead => (State::Dead, None, None),
            Next::Cancelled => (State::Cancelled, None, None),
            Next::Orphaned { since, due_at } => (State::Pending, Some(*due_at), Some(*since)),
        };
        FinishRow {
            state,
            due,
            orphaned,
            bump: i64::from(attempt.is_some()),
            now,
            // An orphan's wait shows as its last outcome; a cancel at the end of the wait
            // keeps it.
            outcome: attempt
                .map(|a| a.outcome.as_str())
                .or(orphaned.map(|_| "orphaned")),
            error: reason.or(attempt.and_then(|a| a.error.as_deref())),
        }
    }
}

/// The unfinished deliveries at a glance.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    pub pending: i64,
    /// Of which failed at least once.
    pub retries: i64,
    /// When the oldest was created (unix ms).
    pub oldest: Option<i64>,
    /// Of which wait for their postback to come back to the config.
    pub orphaned: i64,
}

/// Which deliveries a claim looks at: first attempts, retries, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Fresh,
    Retry,
    Any,
}

/// One claim: up to `limit` due deliveries of `lane`, and at most `caps[d]` for each
/// destination `d` (a destination missing from `caps` has no cap of its own), leaving out
/// the deliveries the dispatcher already holds.
pub struct ClaimSpec {
    pub now: i64,
    pub lane: Lane,
    pub limit: usize,
    pub caps: HashMap<String, usize>,
    pub plan: Arc<Plan>,
    /// Ids claimed before and not yet recorded as finished or rescheduled.
    pub held: Arc<Vec<i64>>,
}

impl ClaimSpec {
    /// Postbacks whose destination is full: left out in the query, so a large backlog for
    /// a dead destination does not eat the scan.
    pub(crate) fn blocked(&self) -> Vec<String> {
        self.plan
            .postbacks
            .iter()
            .filter(|p| self.caps.get(p.action.destination()) == Some(&0))
            .map(|p| p.id.clone())
            .collect()
    }

    /// How many due rows a claim reads to fill `limit` under the caps.
    pub(crate) fn scan(&self) -> i64 {
        (self.limit * 4 + 64 + self.held.len()) as i64
    }
}

/// What a claim found: the deliveries to send, whether more were due than it could take (a
/// limit or a cap was reached), and rows whose stored event cannot be read (to be recorded
/// dead rather than retried forever).
pub struct Claim {
    pub claimed: Vec<Claimed>,
    pub more: bool,
    pub unreadable: Vec<i64>,
}

/// A due row as a claim's query returns it, in claim order.
pub(crate) struct Candidate {
    pub id: i64,
    pub postback_id: String,
    pub offer: String,
    pub event: String,
    pub attempts: u32,
    pub created_at: i64,
    pub delayed: bool,
    pub latest: Option<String>,
    pub orphaned_at: Option<i64>,
}

/// The host a postback sends to (empty for a postback the plan no longer has).
pub(crate) fn destination_of(plan: &Plan, postback_id: &str) -> String {
    plan.postback(postback_id)
        .map(|p| p.action.destination().to_string())
        .unwrap_or_default()
}

/// Takes candidates in order up to the spec's limit and per-destination caps. Returns the
/// claim and the ids read but not taken (a backend that leased them gives them back).
/// Without `read_past_limit` it stops at the limit: a backend whose claim is a plain read
/// has nothing to give back, and each further row would be read for nothing.
pub(crate) fn take<E>(
    spec: &ClaimSpec,
    rows: impl IntoIterator<Item = Result<Candidate, E>>,
    read_past_limit: bool,
) -> Result<(Claim, Vec<i64>), E> {
    let mut caps = spec.caps.clone();
    let mut out = Vec::new();
    let mut unreadable = Vec::new();
    let mut left = Vec::new();
    let mut more = false;
    for row in rows {
        let c = row?;
        if out.len() >= spec.limit {
            more = true;
            if !read_past_limit {
                break;
            }
            left.push(c.id);
            continue;
        }
        let dest = destination_of(&spec.plan, &c.postback_id);
        if let Some(cap) = caps.get_mut(&dest) {
            if *cap == 0 {
                more = true;
                left.push(c.id);
                continue;
            }
            *cap -= 1;
        }
        let Ok(event) = serde_json::from_str::<Event>(&c.event) else {
            unreadable.push(c.id);
            continue;
        };
        out.push(Claimed {
            id: c.id,
            postback_id: c.postback_id,
            offer: c.offer,
            event,
            latest: c.latest.and_then(|l| serde_json::from_str(&l).ok()),
            attempts: c.attempts,
            created_at: c.created_at,
            delayed: c.delayed,
            orphaned_at: c.orphaned_at,
            destination: dest,
        });
    }
    // A destination left out because it is full may have due work: say there is more, so
    // the dispatcher claims again when an attempt ends.
    more |= !spec.blocked().is_empty();
    Ok((
        Claim {
            claimed: out,
            more,
            unreadable,
        },
        left,
    ))
}

/// Which finished deliveries a hand retry puts back in the queue.
#[derive(Debug, Clone, Default)]
pub struct RetryFilter {
    pub id: Option<i64>,
    pub postback: Option<String>,
    /// Which finished state (dead by default); ignored when `id` is given.
    pub state: Option<State>,
    /// Unix ms: deliveries created at or after.
    pub since: Option<i64>,
    /// Unix ms: deliveries created before.
    pub until: Option<i64>,
}

impl RetryFilter {
    /// The finished state to retry, or `None` when the filter names an unfinished one.
    pub(crate) fn finished_state(&self) -> Option<State> {
        match self.state {
            None | Some(State::Dead) => Some(State::Dead),
            Some(s @ (State::Cancelled | State::Delivered)) => Some(s),
            Some(_) => None,
        }
    }
}

/// One delivery as the log shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub postback: String,
    pub offer: String,
    pub event_id: String,
    pub state: State,
    pub status: Option<String>,
    pub attempts: u32,
    pub created_at: i64,
    pub due_at: i64,
    pub updated_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// The last attempt's result class (`delivered`, `5xx`, `timeout`…).
    pub last_outcome: Option<String>,
    pub clickid: Option<String>,
    pub transaction_id: Option<String>,
    pub offer_id: Option<String>,
    pub affiliate_id: Option<String>,
    pub goal: Option<String>,
    /// Since when (unix ms) its postback has been missing from the config, while it waits
    /// for it to come back.
    pub orphaned_at: Option<i64>,
    pub attempt_log: Vec<AttemptRow>,
}

/// One attempt as the log shows it: its number, then what was recorded.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub attempt: u32,
    #[serde(flatten)]
    pub recorded: Attempt,
}

/// Filters for the delivery log; every one that is set must hold.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub transaction_id: Option<String>,
    pub clickid: Option<String>,
    /// A transaction id or a click id, whichever it is (a search box).
    pub id: Option<String>,
    pub offer: Option<String>,
    pub affiliate: Option<String>,
    pub goal: Option<String>,
    /// Only these postbacks (an affiliate's token sees its own only). `None`: all.
    pub postbacks: Option<Vec<String>>,
    pub status: Option<String>,
    pub state: Option<State>,
    pub outcome: Option<String>,
    /// Created at or after (unix ms).
    pub since: Option<i64>,
    /// Created before (unix ms).
    pub until: Option<i64>,
    /// Older than this id (the cursor of the previous page).
    pub before_id: Option<i64>,
    pub limit: usize,
}

/// One received event as the log shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: String,
    pub received_at: i64,
    pub source: String,
    pub kind: String,
    pub clickid: Option<String>,
    pub transaction_id: Option<String>,
    pub offer_id: Option<String>,
    pub affiliate_id: Option<String>,
    /// The event as received (after field mapping), secrets removed.
    pub event: serde_json::Value,
    /// The postbacks it matched.
    pub matched: serde_json::Value,
}

/// Filters for the event log.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub source: Option<String>,
    pub kind: Option<String>,
    pub clickid: Option<String>,
    pub transaction_id: Option<String>,
    /// A transaction id or a click id, whichever it is (a search box).
    pub id: Option<String>,
    pub offer: Option<String>,
    pub affiliate: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub before_rowid: Option<i64>,
    pub limit: usize,
}

/// A webhook that was refused, as the incoming log keeps it: when, from which source, why
/// (the reason label and the message the sender got), and the request line with secrets
/// masked.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    /// Its row id (0 until stored).
    pub id: i64,
    pub at: i64,
    pub source: String,
    pub reason: String,
    pub status: u16,
    pub message: String,
    pub method: String,
    /// The path and query, secrets masked, at most 1 KiB.
    pub target: String,
    pub client: Option<String>,
}

/// How many refused webhooks the store keeps at most: they are bounded in rate where they
/// are recorded, and in number here, so nobody can fill the disk with them.
pub const REFUSED_KEPT: i64 = 10_000;

/// A page's rows and the cursor of the next page, from `limit + 1` rows read.
pub(crate) fn page<T>(
    mut rows: Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<i64>) {
    let next = (rows.len() > limit).then(|| {
        rows.truncate(limit);
        rows.last().map(&cursor).unwrap_or_default()
    });
    (rows, next)
}
