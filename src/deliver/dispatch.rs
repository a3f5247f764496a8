//! The dispatch loop: claims due deliveries a little ahead of the free slots, holds them
//! per destination and lane, and starts each one as soon as the [`Gate`] lets it.
//!
//! Claiming ahead means a finished attempt is replaced from memory at once, and the store
//! sees one claim per batch of deliveries rather than one per delivery. What is claimed
//! ahead is bounded per destination (its slots plus as many again, at least 64), and a paused
//! destination claims only its probe, so a dead destination's backlog stays in the store and
//! never crowds the others out. Deliveries claimed but not started when the
//! daemon stops are pending again at the next start, like any delivery in flight.

use super::gate::{Change, Gate, Verdict};
use super::Deliverer;
use crate::store::{ClaimSpec, Claimed, Lane};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How many handed-over deliveries may wait in memory for one destination.
const HANDOFF_ROOM: usize = 512;

/// How stale the loop's idea of the next due time may get while it is busy.
const DUE_RECHECK: Duration = Duration::from_millis(50);

/// What a running attempt tells the loop.
enum Done {
    /// The destination answered (or the attempt ended before sending): its slot is free,
    /// and how it went counts for its breaker.
    Released(Lane, String, Verdict),
    /// The outcome is in the store: the delivery may be claimed again (if it is to be retried).
    Recorded(i64),
    /// A new delivery, handed over by the store right after its commit. It comes through
    /// this channel so that it is always heard before its own `Recorded`.
    Fresh(Box<Claimed>),
}

/// Deliveries claimed and not yet recorded (the store still has them pending, so claims
/// leave them out), and the last ones recorded: a handover of one of those is stale.
#[derive(Default)]
struct Held {
    now: HashSet<i64>,
    recent: VecDeque<i64>,
    recent_set: HashSet<i64>,
}

/// How many recorded ids a dispatcher remembers.
const RECENT: usize = 4096;

impl Held {
    fn insert(&mut self, id: i64) {
        self.now.insert(id);
    }

    fn finished(&mut self, id: i64) {
        self.now.remove(&id);
        if self.recent_set.insert(id) {
            self.recent.push_back(id);
            if self.recent.len() > RECENT {
                if let Some(old) = self.recent.pop_front() {
                    self.recent_set.remove(&old);
                }
            }
        }
    }

    /// Whether `id` is held now or was recorded lately.
    fn seen(&self, id: i64) -> bool {
        self.now.contains(&id) || self.recent_set.contains(&id)
    }

    fn ids(&self) -> Vec<i64> {
        self.now.iter().copied().collect()
    }
}

/// Claimed deliveries waiting for a slot: per destination, first attempts and retries.
#[derive(Default)]
struct Waiting {
    queues: HashMap<String, [VecDeque<Claimed>; 2]>,
    counts: [usize; 2],
}

fn ix(lane: Lane) -> usize {
    usize::from(lane == Lane::Retry)
}

impl Waiting {
    fn push(&mut self, d: Claimed) {
        let i = ix(d.lane());
        self.counts[i] += 1;
        self.queues.entry(d.destination.clone()).or_default()[i].push_back(d);
    }

    fn count(&self, lane: Lane, destination: Option<&str>) -> usize {
        match destination {
            None => self.counts[ix(lane)],
            Some(d) => self.queues.get(d).map_or(0, |q| q[ix(lane)].len()),
        }
    }

    fn is_empty(&self) -> bool {
        self.counts == [0, 0]
    }

    fn total(&self) -> usize {
        self.counts[0] + self.counts[1]
    }
}

/// This instance's share of each destination's limits when several share the store
/// ([`crate::plan::DeliverySettings::divided`]), made again when the plan or the number of
/// live instances changes.
#[derive(Default)]
struct Share {
    key: (String, usize),
    settings: Option<Arc<crate::plan::DeliverySettings>>,
}

impl Share {
    fn of(
        &mut self,
        plan: &crate::plan::Plan,
        instances: usize,
    ) -> Arc<crate::plan::DeliverySettings> {
        match &self.settings {
            Some(s) if self.key.0 == plan.hash && self.key.1 == instances => s.clone(),
            _ => {
                let key = (plan.hash.clone(), instances);
                if instances > 1 && self.key.1 != instances {
                    tracing::info!(
                        instances,
                        "per-destination limits divided among the instances sharing the store"
                    );
                }
                let s = Arc::new(plan.settings.delivery.divided(instances));
                self.key = key;
                self.settings = Some(s.clone());
                s
            }
        }
    }
}

/// How an attempt's decision counts for its destination's breaker.
fn verdict_of(decision: &super::Decision) -> Verdict {
    let Some(a) = &decision.attempt else {
        return Verdict::Neutral;
    };
    match a.outcome.as_str() {
        "delivered" => Verdict::Success,
        "timeout" | "connect" | "tls" | "5xx" | "error" => Verdict::Failure,
        "4xx" if matches!(a.response_status, Some(408 | 429)) => Verdict::Failure,
        _ => Verdict::Neutral,
    }
}

impl Deliverer {
    /// Logs a destination's pause or resume once, and publishes the paused set (for
    /// `/-/ready` and `/metrics`).
    fn publish(
        &self,
        gate: &Gate,
        dest: &str,
        change: &Change,
        settings: &crate::plan::DeliverySettings,
    ) {
        match change {
            Change::Paused { failures, .. } => tracing::warn!(
                destination = %dest,
                failures,
                probe_every = %crate::duration_text(settings.probe_every),
                "destination paused: its deliveries wait, and one probe goes out at a time"
            ),
            Change::Resumed { paused_for } => tracing::info!(
                destination = %dest,
                paused_for = %crate::duration_text(Duration::from_secs(paused_for.as_secs())),
                "destination resumed: its deliveries drain"
            ),
        }
        let mut all = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        *all = gate.paused();
        all.sort();
        self.telemetry
            .destination_paused(dest, matches!(change, Change::Paused { .. }));
    }

    /// A config was installed (at start or by a reload): orphaned deliveries of the
    /// postbacks it has are due again, in the background.
    fn revive_orphans(&self, plan: &crate::plan::Plan) {
        let ids: Vec<String> = plan.postbacks.iter().map(|p| p.id.clone()).collect();
        let store = self.store.clone();
        let version = plan.hash.clone();
        tokio::spawn(async move {
            match store.revive(ids).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(deliveries = n, version = %version, "orphaned deliveries resume: their postbacks are back")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot wake orphaned deliveries; they wait for their grace period to end")
                }
            }
        });
    }

    /// The dispatch loop; returns after `shutdown` flips, once in-flight attempts finish or
    /// `grace` runs out (unfinished ones are retried at the next start).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let mut gate = Gate::default();
        let mut waiting = Waiting::default();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let handoff = done_tx.clone();
        self.store.on_fresh(move |d| {
            let _ = handoff.send(Done::Fresh(Box::new(d)));
        });
        let mut tasks = JoinSet::new();
        // Claimed and not yet recorded: the store still has them pending, so claims leave
        // them out.
        let mut held = Held::default();
        let mut claim_failing = false;
        // Claim when new work was committed, a due time passed, or an attempt ended while
        // the last claim left due work behind (a full destination, a full lane).
        let mut need_claim = true;
        let mut woken = true;
        let mut left_behind = false;
        let mut next_due: Option<i64> = None;
        let mut due_checked: Option<Instant> = None;
        // The config version whose postbacks' orphans were last woken.
        let mut revived_for = String::new();
        let mut share = Share::default();
        loop {
            if *shutdown.borrow() {
                break;
            }
            while let Ok(done) = done_rx.try_recv() {
                self.heard(
                    done,
                    &mut gate,
                    &mut held,
                    &mut waiting,
                    &mut need_claim,
                    left_behind,
                );
            }
            // Claims come in batches: after an attempt ends, only once fewer deliveries wait
            // in memory than are in flight (new work, a due time or a timer claim at once).
            let refill = waiting.total() < gate.inflight().max(1);
            while tasks.try_join_next().is_some() {}
            let plan = self.plan.load_full();
            let settings = &*share.of(&plan, self.store.instances());
            if plan.hash != revived_for {
                revived_for = plan.hash.clone();
                self.revive_orphans(&plan);
            }

            if need_claim && (refill || woken) {
                need_claim = false;
                woken = false;
                let destinations = plan.destinations();
                let mut lane_full = false;
                let held_ids = Arc::new(held.ids());
                let specs: Vec<ClaimSpec> = [Lane::Fresh, Lane::Retry]
                    .into_iter()
                    .filter_map(|lane| {
                        let (limit, caps) = gate
                            .claim_quota(settings, &destinations, lane, |d| waiting.count(lane, d));
                        lane_full |= limit == 0;
                        (limit > 0).then(|| ClaimSpec {
                            now: crate::now_ms(),
                            lane,
                            limit: limit.min(512),
                            caps,
                            plan: plan.clone(),
                            held: held_ids.clone(),
                        })
                    })
                    .collect();
                left_behind = lane_full;
                if !specs.is_empty() {
                    match self.store.claim(specs).await {
                        Ok(claims) => {
                            tracing::debug!(
                                n = claims.iter().map(|c| c.claimed.len()).sum::<usize>(),
                                more = claims.iter().any(|c| c.more),
                                inflight = gate.inflight(),
                                "claimed"
                            );
                            claim_failing = false;
                            left_behind |= claims.iter().any(|c| c.more);
                            for c in claims {
                                for d in c.claimed {
                                    held.insert(d.id);
                                    waiting.push(d);
                                }
                                for id in c.unreadable {
                                    held.insert(id);
                                    let (me, done) = (self.clone(), done_tx.clone());
                                    tasks.spawn(async move {
                                        let dead = super::Decision {
                                            kind: "",
                                            attempt: None,
                                            next: crate::store::Next::Dead,
                                            reason: Some("the stored event cannot be read".into()),
                                        };
                                        me.record(id, dead).await;
                                        let _ = done.send(Done::Recorded(id));
                                    });
                                }
                            }
                        }
                        Err(e) => {
                            left_behind = true;
                            if !claim_failing {
                                tracing::error!(error = %e, "cannot claim deliveries; will keep trying");
                            }
                            claim_failing = true;
                        }
                    }
                }
            }

            self.start_waiting(settings, &mut gate, &mut waiting, &mut tasks, &done_tx);

            // Sleep until an attempt ends, new work is committed, the next delivery falls
            // due, a rate-limited destination earns a token, or shutdown.
            // The next due time is a query; under load the loop turns for every delivery,
            // so it is asked at most every DUE_RECHECK (a retry may start that much late).
            let mut wait = Duration::from_secs(1);
            if !claim_failing {
                let now = crate::now_ms();
                if due_checked.is_none_or(|t: Instant| t.elapsed() >= DUE_RECHECK) {
                    next_due = self.store.next_due(now).await.ok().flatten();
                    due_checked = Some(Instant::now());
                }
                if let Some(due) = next_due {
                    wait = wait.min(Duration::from_millis((due - now).max(1) as u64));
                }
            }
            if let Some(t) = gate.next_token(Instant::now()) {
                wait = wait.min(t.max(Duration::from_millis(1)));
            }
            if let Some(t) = gate.next_probe(Instant::now()) {
                wait = wait.min(t.max(Duration::from_millis(1)));
            }
            // Not kept across the sleep: a reload's old plan is freed when its users let go.
            drop(plan);
            tokio::select! {
                Some(done) = done_rx.recv() => {
                    self.heard(done, &mut gate, &mut held, &mut waiting, &mut need_claim, left_behind);
                }
                _ = self.store.wake.notified() => {
                    need_claim = true;
                    woken = true;
                    due_checked = None;
                }
                _ = tokio::time::sleep(wait) => {
                    need_claim = true;
                    woken = true;
                    due_checked = None;
                }
                _ = shutdown.changed() => {}
            }
        }
        if gate.inflight() > 0 {
            tracing::info!(
                inflight = gate.inflight(),
                grace_ms = grace.as_millis() as u64,
                "waiting for attempts in flight"
            );
        }
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    }

    /// Books what an attempt or the store reported. A freed slot means claiming again when
    /// the last claim left due work behind.
    fn heard(
        &self,
        done: Done,
        gate: &mut Gate,
        held: &mut Held,
        waiting: &mut Waiting,
        need_claim: &mut bool,
        left_behind: bool,
    ) {
        match done {
            Done::Released(lane, dest, verdict) => {
                gate.release(lane, &dest);
                *need_claim |= left_behind;
                let plan = self.plan.load();
                if let Some(change) =
                    gate.verdict(&plan.settings.delivery, &dest, verdict, Instant::now())
                {
                    self.publish(gate, &dest, &change, &plan.settings.delivery);
                    // A resumed destination's backlog is in the store: claim it.
                    *need_claim = true;
                }
            }
            Done::Recorded(id) => {
                held.finished(id);
            }
            Done::Fresh(d) => {
                if held.seen(d.id) {
                    // A claim got there first (and maybe finished it already: a backend
                    // whose ingests and finishes commit on two connections can report an
                    // outcome just before the handover).
                    return;
                }
                // Held in memory up to HANDOFF_ROOM per destination (the delivery is in
                // memory already; a claim would read it back). Beyond that it stays in the
                // store for a claim to find, so a dead destination's backlog stays there.
                if waiting.count(Lane::Fresh, Some(&d.destination)) >= HANDOFF_ROOM {
                    *need_claim = true;
                    return;
                }
                held.insert(d.id);
                waiting.push(*d);
            }
        }
    }

    /// Starts every waiting delivery the gate lets through. Each lane first uses its own
    /// share; then idle slots go to whichever lane still has deliveries waiting.
    fn start_waiting(
        &self,
        settings: &crate::plan::DeliverySettings,
        gate: &mut Gate,
        waiting: &mut Waiting,
        tasks: &mut JoinSet<()>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        if waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        for (dest, queues) in waiting.queues.iter_mut() {
            loop {
                let pick = if !queues[0].is_empty() && gate.room(settings, dest, Lane::Fresh) {
                    0
                } else if !queues[1].is_empty() && gate.room(settings, dest, Lane::Retry) {
                    1
                } else if gate.room(settings, dest, Lane::Any) {
                    match (queues[0].is_empty(), queues[1].is_empty()) {
                        (false, _) => 0,
                        (true, false) => 1,
                        (true, true) => break,
                    }
                } else {
                    break;
                };
                if !gate.take_token(settings, dest, now) {
                    break;
                }
                let Some(d) = queues[pick].pop_front() else {
                    break;
                };
                waiting.counts[pick] -= 1;
                let lane = d.lane();
                gate.take(lane, dest);
                let me = self.clone();
                let done = done.clone();
                let dest = dest.clone();
                let probe = gate.is_paused(&dest);
                let probe_every = settings.probe_every;
                tasks.spawn(async move {
                    let mut decision = me.attempt(&d).await;
                    let verdict = verdict_of(&decision);
                    // A probe that fails leaves the destination paused: the delivery waits
                    // for the next probe or the resume, however old it is.
                    if probe && verdict == Verdict::Failure {
                        decision.next = crate::store::Next::Retry {
                            due_at: crate::now_ms() + probe_every.as_millis() as i64,
                        };
                    }
                    super::observe(&me.telemetry, &d, &decision);
                    // The destination's slot is free once it has answered; recording the
                    // outcome is the store's business and need not hold the slot.
                    let _ = done.send(Done::Released(lane, dest, verdict));
                    me.record(d.id, decision).await;
                    let _ = done.send(Done::Recorded(d.id));
                });
            }
        }
        waiting
            .queues
            .retain(|_, q| !q[0].is_empty() || !q[1].is_empty());
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
