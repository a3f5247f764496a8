//! A batch of outcomes: the deliveries updated, their attempts added, and the instances
//! notified when the next delivery of an order key may go, in one round trip.

use super::{execute, query, Prepared};
use crate::store::{Attempt, FinishRow, Next, State};
use deadpool_postgres::Transaction;
use std::collections::HashSet;

/// Every finish of the batch; per finish, whether a later delivery of its order key waited.
/// The update, the attempts, the notification and the question of who waited are sent
/// together (one round trip): each statement sees the ones before it.
pub(super) async fn finish(
    tx: &Transaction<'_>,
    p: &Prepared,
    jobs: &[(i64, Option<&Attempt>, &Next, Option<&str>)],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let n = jobs.len();
    let mut ids = Vec::with_capacity(n);
    let mut state = Vec::with_capacity(n);
    let mut bump = Vec::with_capacity(n);
    let mut due: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut now = Vec::with_capacity(n);
    let mut err: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut status: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut outcome: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut orphaned: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut a = AttemptRows::default();
    let mut ended: Vec<i64> = Vec::new();
    for (id, attempt, next, reason) in jobs {
        let f = FinishRow::of(*attempt, next, *reason);
        ids.push(*id);
        state.push(f.state.code());
        bump.push(f.bump);
        due.push(f.due);
        now.push(f.now);
        err.push(f.error);
        status.push(attempt.and_then(|a| a.response_status).map(i64::from));
        outcome.push(f.outcome);
        orphaned.push(f.orphaned);
        if let Some(at) = attempt {
            a.push(*id, at);
        }
        if f.state != State::Pending {
            ended.push(*id);
        }
    }
    let (_, _, _, waiting) = tokio::try_join!(
        async {
            execute(
                tx,
                &p.finish,
                &[
                    &ids, &state, &bump, &due, &now, &err, &status, &outcome, &orphaned,
                ],
            )
            .await
        },
        async {
            if a.delivery_id.is_empty() {
                return Ok(0);
            }
            // Numbered by the delivery's attempt count, just updated; a delivery that is
            // gone (pruned) takes no attempt.
            execute(
                tx,
                &p.insert_attempts,
                &[
                    &a.delivery_id,
                    &a.started_at,
                    &a.duration_ms,
                    &a.method,
                    &a.url,
                    &a.request_body,
                    &a.response_status,
                    &a.response_body,
                    &a.error,
                    &a.outcome,
                    &a.config_version,
                    &a.config_commit,
                ],
            )
            .await
        },
        async {
            if ended.is_empty() {
                return Ok(0);
            }
            // The next delivery of an order key that just ended may now go, from any
            // instance.
            execute(
                tx,
                &p.notify_waiting,
                &[&crate::store::postgres::CHANNEL, &ended],
            )
            .await
        },
        async {
            if ended.is_empty() {
                return Ok(Vec::new());
            }
            query(tx, &p.waiting, &[&ended]).await
        },
    )?;
    let waiting: HashSet<i64> = waiting.iter().map(|r| r.get(0)).collect();
    Ok(jobs.iter().map(|(id, ..)| waiting.contains(id)).collect())
}

#[derive(Default)]
struct AttemptRows<'a> {
    delivery_id: Vec<i64>,
    started_at: Vec<i64>,
    duration_ms: Vec<i64>,
    method: Vec<&'a str>,
    url: Vec<&'a str>,
    request_body: Vec<Option<&'a str>>,
    response_status: Vec<Option<i64>>,
    response_body: Vec<Option<&'a str>>,
    error: Vec<Option<&'a str>>,
    outcome: Vec<&'a str>,
    config_version: Vec<&'a str>,
    config_commit: Vec<Option<&'a str>>,
}

impl<'a> AttemptRows<'a> {
    fn push(&mut self, id: i64, a: &'a Attempt) {
        self.delivery_id.push(id);
        self.started_at.push(a.started_at);
        self.duration_ms.push(a.duration_ms);
        self.method.push(&a.method);
        self.url.push(&a.url);
        self.request_body.push(a.request_body.as_deref());
        self.response_status.push(a.response_status.map(i64::from));
        self.response_body.push(a.response_body.as_deref());
        self.error.push(a.error.as_deref());
        self.outcome.push(&a.outcome);
        self.config_version.push(&a.config_version);
        self.config_commit.push(a.config_commit.as_deref());
    }
}
