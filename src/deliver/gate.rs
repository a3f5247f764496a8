//! The gate: how many attempts may start now, per lane and per destination.
//!
//! - **Lanes.** First attempts and retries each have a reserved share of the slots (retries
//!   a quarter, at least one), globally and per destination. A lane may borrow the other's
//!   idle slots, but a borrowed slot is held for one attempt only, so a burst of due retries
//!   after an outage never keeps new conversions waiting, and a flood of new conversions
//!   never starves retries.
//! - **Destinations.** Each destination host has its own cap on attempts in flight
//!   (`per_destination`, or its own `concurrency`) and optionally a rate (governor's GCRA,
//!   one second of burst). A dead or slow destination fills only its own slots.
//!
//! - **Paused destinations.** A destination whose attempts fail `pause_after` times in a
//!   row (timeouts, connection errors, 408, 429, 5xx) is paused: nothing more is started or
//!   claimed for it, its deliveries stay pending in the store, and one delivery goes out
//!   as a probe after 1 s, then 2, 4, 8 s… up to `probe_every` between probes. The probe's
//!   success resumes the destination.
//!
//! The gate is pure bookkeeping: the dispatcher asks it how much to claim ahead and whether
//! a claimed delivery may start, and tells it when attempts start and end.

use crate::plan::DeliverySettings;
use crate::store::Lane;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The share of a capacity reserved for retries: a quarter, at least one when there are
/// two slots or more (with a single slot both lanes share it, oldest due first).
pub fn retry_reserve(capacity: usize) -> usize {
    if capacity >= 2 {
        (capacity / 4).max(1)
    } else {
        0
    }
}

#[derive(Default)]
struct Dest {
    inflight: [usize; 2],
    bucket: Option<Bucket>,
    /// Failed attempts in a row.
    failures: u32,
    paused: Option<Pause>,
}

/// A paused destination: since when, and when its next probe may start.
#[derive(Debug, Clone)]
struct Pause {
    since: Instant,
    since_ms: i64,
    next_probe: Instant,
    /// The wait before the next probe: 1 s at first, doubled after each failed probe, up
    /// to `probe_every`, so a blip is over in a second and a long outage costs little.
    interval: Duration,
    probing: bool,
}

/// The first probe of a paused destination comes this soon (then 2, 4, 8 s… up to
/// `probe_every`).
const FIRST_PROBE: Duration = Duration::from_secs(1);

/// How an attempt went, for the destination's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// A failure that says the destination is unwell (timeout, connection, 408, 429, 5xx).
    Failure,
    /// Says nothing of its health (a final 4xx, a render error, nothing sent).
    Neutral,
}

/// A change of a destination's state, to log and publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Paused { failures: u32, since_ms: i64 },
    Resumed { paused_for: Duration },
}

/// A destination's rate: governor's GCRA limiter (a bucket holding one second's worth, at
/// least one), on a clock the gate moves to the time it is given, so the dispatcher and the
/// tests decide what "now" is.
struct Bucket {
    rate: f64,
    clock: governor::clock::FakeRelativeClock,
    at: Instant,
    limiter: governor::RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        governor::clock::FakeRelativeClock,
        governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
    >,
    /// When the next token comes, after a check found none.
    next_at: Option<Instant>,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Bucket {
        let clock = governor::clock::FakeRelativeClock::default();
        let period = Duration::from_secs_f64(1.0 / rate.max(1e-6));
        let burst = std::num::NonZeroU32::new(rate.ceil().clamp(1.0, u32::MAX as f64) as u32)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let quota = governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MIN))
            .allow_burst(burst);
        Bucket {
            rate,
            limiter: governor::RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            at: now,
            next_at: None,
        }
    }

    /// Takes a token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        use governor::clock::Clock;
        if now > self.at {
            self.clock.advance(now - self.at);
            self.at = now;
        }
        match self.limiter.check() {
            Ok(()) => {
                self.next_at = None;
                true
            }
            Err(not_until) => {
                self.next_at = Some(self.at + not_until.wait_time_from(self.clock.now()));
                false
            }
        }
    }
}

/// In-flight counts and rate buckets.
#[derive(Default)]
pub struct Gate {
    inflight: [usize; 2],
    dests: HashMap<String, Dest>,
}

fn ix(lane: Lane) -> usize {
    match lane {
        Lane::Retry => 1,
        Lane::Fresh | Lane::Any => 0,
    }
}

/// How many attempts `lane` may start out of `capacity` when `inflight` are running.
fn lane_room(capacity: usize, inflight: [usize; 2], lane: Lane) -> usize {
    let total = inflight[0] + inflight[1];
    let free = capacity.saturating_sub(total);
    let reserve = retry_reserve(capacity);
    let share = match lane {
        Lane::Fresh => capacity - reserve,
        Lane::Retry => reserve,
        Lane::Any => return free,
    };
    share.saturating_sub(inflight[ix(lane)]).min(free)
}

/// Deliveries of one lane to hold claimed (in flight or waiting in memory): the capacity
/// plus as many again, and at least [`CLAIM_AHEAD`] more, whatever the lane's share. A lane
/// with no competition may then fill every slot by borrowing; the reserve is applied when
/// deliveries start, not when they are claimed.
///
/// Claiming well ahead of a small capacity is what lets a backlog drain at the
/// destination's pace: with only twice 8 slots held, the dispatcher claimed a handful of
/// deliveries at a time, and each claim reads past the ones it already holds, so a drain
/// spent most of its time reading the queue (BENCHMARKS.md, "Round two").
fn claim_target(capacity: usize) -> usize {
    let capacity = capacity.max(1);
    capacity + capacity.max(CLAIM_AHEAD)
}

/// The fewest deliveries claimed ahead of a lane's free slots.
const CLAIM_AHEAD: usize = 64;

impl Gate {
    /// Whether `destination` is paused and its probe may not start yet (or is out).
    fn held_back(&self, destination: &str, now: Instant) -> bool {
        self.dests
            .get(destination)
            .and_then(|d| d.paused.as_ref())
            .is_some_and(|p| p.probing || now < p.next_probe)
    }

    /// Whether `destination` is paused (a probe may be due).
    pub fn is_paused(&self, destination: &str) -> bool {
        self.dests
            .get(destination)
            .is_some_and(|d| d.paused.is_some())
    }

    /// When the next probe of a paused destination may start, if one is waiting.
    pub fn next_probe(&self, now: Instant) -> Option<Duration> {
        self.dests
            .values()
            .filter_map(|d| d.paused.as_ref())
            .filter(|p| !p.probing)
            .map(|p| p.next_probe.saturating_duration_since(now))
            .min()
    }

    /// Books how an attempt to `destination` went; says if that paused or resumed it.
    pub fn verdict(
        &mut self,
        settings: &DeliverySettings,
        destination: &str,
        v: Verdict,
        now: Instant,
    ) -> Option<Change> {
        // `take` made the entry when the attempt started; no key is allocated again.
        if !self.dests.contains_key(destination) {
            self.dests.insert(destination.to_string(), Dest::default());
        }
        let d = self.dests.get_mut(destination)?;
        match v {
            Verdict::Neutral => {
                if let Some(p) = &mut d.paused {
                    // The probe said nothing: another one later.
                    p.probing = false;
                }
                None
            }
            Verdict::Success => {
                d.failures = 0;
                d.paused.take().map(|p| Change::Resumed {
                    paused_for: now.saturating_duration_since(p.since),
                })
            }
            Verdict::Failure => {
                d.failures = d.failures.saturating_add(1);
                if let Some(p) = &mut d.paused {
                    p.probing = false;
                    p.interval = (p.interval * 2).min(settings.probe_every);
                    p.next_probe = now + p.interval;
                    return None;
                }
                if settings.pause_after > 0 && d.failures >= settings.pause_after {
                    let since_ms = crate::now_ms();
                    let interval = FIRST_PROBE.min(settings.probe_every);
                    d.paused = Some(Pause {
                        since: now,
                        since_ms,
                        next_probe: now + interval,
                        interval,
                        probing: false,
                    });
                    return Some(Change::Paused {
                        failures: d.failures,
                        since_ms,
                    });
                }
                None
            }
        }
    }

    /// Whether an attempt of `lane` to `destination` may start now, slots-wise (a paused
    /// destination lets one probe through when it is due).
    pub fn room(&self, settings: &DeliverySettings, destination: &str, lane: Lane) -> bool {
        if self.held_back(destination, Instant::now()) {
            return false;
        }
        let dest = self
            .dests
            .get(destination)
            .map(|d| d.inflight)
            .unwrap_or_default();
        lane_room(settings.concurrency, self.inflight, lane) > 0
            && lane_room(settings.concurrency_for(destination), dest, lane) > 0
    }

    /// Takes a token of a rate-limited destination for an attempt starting at `now`
    /// (always true without a rate); false if it has none yet.
    pub fn take_token(
        &mut self,
        settings: &DeliverySettings,
        destination: &str,
        now: Instant,
    ) -> bool {
        let Some(rate) = settings.destinations.get(destination).and_then(|s| s.rate) else {
            return true;
        };
        let d = self.dests.entry(destination.to_string()).or_default();
        if d.bucket.as_ref().is_none_or(|b| b.rate != rate) {
            d.bucket = Some(Bucket::new(rate, now));
        }
        d.bucket.as_mut().is_some_and(|b| b.take(now))
    }

    /// How many deliveries of `lane` a claim may take: a global limit, and a cap for each of
    /// `destinations`. `buffered(d)` is how many of this lane are claimed but not started
    /// for destination `d` (`None`: all destinations).
    pub fn claim_quota(
        &self,
        settings: &DeliverySettings,
        destinations: &[String],
        lane: Lane,
        buffered: impl Fn(Option<&str>) -> usize,
    ) -> (usize, HashMap<String, usize>) {
        let held = |inflight: [usize; 2], waiting: usize| inflight[ix(lane)] + waiting;
        let global =
            claim_target(settings.concurrency).saturating_sub(held(self.inflight, buffered(None)));
        let now = Instant::now();
        let caps = destinations
            .iter()
            .map(|d| {
                let inflight = self.dests.get(d).map(|s| s.inflight).unwrap_or_default();
                let target = if self.held_back(d, now) {
                    0
                } else if self.is_paused(d) {
                    1 // the probe
                } else {
                    claim_target(settings.concurrency_for(d))
                };
                let cap = target.saturating_sub(held(inflight, buffered(Some(d))));
                (d.clone(), cap)
            })
            .collect();
        (global, caps)
    }

    /// An attempt of `lane` to `destination` starts.
    pub fn take(&mut self, lane: Lane, destination: &str) {
        self.inflight[ix(lane)] += 1;
        let d = self.dests.entry(destination.to_string()).or_default();
        d.inflight[ix(lane)] += 1;
        if let Some(p) = &mut d.paused {
            p.probing = true;
        }
    }

    /// The paused destinations: (destination, since when in unix ms, failures in a row).
    pub fn paused(&self) -> Vec<(String, i64, u32)> {
        self.dests
            .iter()
            .filter_map(|(k, d)| {
                d.paused
                    .as_ref()
                    .map(|p| (k.clone(), p.since_ms, d.failures))
            })
            .collect()
    }

    /// An attempt of `lane` to `destination` ended.
    pub fn release(&mut self, lane: Lane, destination: &str) {
        self.inflight[ix(lane)] = self.inflight[ix(lane)].saturating_sub(1);
        if let Some(d) = self.dests.get_mut(destination) {
            d.inflight[ix(lane)] = d.inflight[ix(lane)].saturating_sub(1);
        }
    }

    /// Attempts in flight, all lanes.
    pub fn inflight(&self) -> usize {
        self.inflight[0] + self.inflight[1]
    }

    /// How long until a rate-limited destination without tokens gets one.
    pub fn next_token(&self, now: Instant) -> Option<Duration> {
        self.dests
            .values()
            .filter_map(|s| s.bucket.as_ref()?.next_at)
            .map(|t| t.saturating_duration_since(now))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DestinationSettings;

    fn settings(concurrency: usize, per_destination: usize) -> DeliverySettings {
        DeliverySettings {
            concurrency,
            per_destination,
            ..DeliverySettings::default()
        }
    }

    #[test]
    fn lanes_have_reserved_shares_and_borrow_idle_slots() {
        let s = settings(8, 8);
        let mut g = Gate::default();
        for _ in 0..6 {
            assert!(g.room(&s, "a", Lane::Fresh));
            g.take(Lane::Fresh, "a");
        }
        // Fresh work used its share; retries still have theirs.
        assert!(!g.room(&s, "a", Lane::Fresh));
        assert!(g.room(&s, "a", Lane::Retry));
        // With no retries waiting, fresh work may borrow the idle retry slots.
        assert!(g.room(&s, "a", Lane::Any));
        g.take(Lane::Fresh, "a");
        g.take(Lane::Fresh, "a");
        assert!(!g.room(&s, "a", Lane::Retry));
        assert!(!g.room(&s, "a", Lane::Any));
        // A borrowed slot comes back to retries when its attempt ends.
        g.release(Lane::Fresh, "a");
        assert!(g.room(&s, "a", Lane::Retry));
        assert!(!g.room(&s, "a", Lane::Fresh));
    }

    #[test]
    fn a_full_destination_does_not_limit_others() {
        let s = settings(16, 2);
        let mut g = Gate::default();
        g.take(Lane::Fresh, "dead");
        g.take(Lane::Retry, "dead");
        assert!(!g.room(&s, "dead", Lane::Any));
        assert!(g.room(&s, "ok", Lane::Fresh));
        assert!(g.room(&s, "ok", Lane::Retry));
    }

    #[test]
    fn claims_run_ahead_of_the_slots_by_a_bounded_amount() {
        let s = settings(8, 4);
        let mut g = Gate::default();
        let dests = vec!["a".to_string(), "b".to_string()];
        // The capacity and CLAIM_AHEAD more per lane: 8 + 64 globally, 4 + 64 per
        // destination.
        let (global, caps) = g.claim_quota(&s, &dests, Lane::Fresh, |_| 0);
        assert_eq!((global, caps["a"], caps["b"]), (72, 68, 68));
        let (global, caps) = g.claim_quota(&s, &dests, Lane::Retry, |_| 0);
        assert_eq!((global, caps["a"]), (72, 68));
        // A large capacity runs ahead by as much again.
        let big = settings(200, 100);
        assert_eq!(g.claim_quota(&big, &dests, Lane::Fresh, |_| 0).0, 400);
        g.take(Lane::Fresh, "a");
        let (global, caps) = g.claim_quota(&s, &dests, Lane::Fresh, |d| match d {
            Some("b") => 68,
            Some(_) => 67,
            None => 60,
        });
        assert_eq!((global, caps["a"], caps["b"]), (11, 0, 0));
    }

    #[test]
    fn rate_limits_refill_over_time() {
        let mut s = settings(16, 16);
        s.destinations.insert(
            "slow".into(),
            DestinationSettings {
                concurrency: None,
                rate: Some(2.0),
            },
        );
        let mut g = Gate::default();
        let t0 = Instant::now();
        assert!(g.take_token(&s, "slow", t0));
        assert!(g.take_token(&s, "slow", t0));
        assert!(!g.take_token(&s, "slow", t0));
        let wait = g.next_token(t0).unwrap();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(g.take_token(&s, "slow", t0 + Duration::from_millis(500)));
        // The bucket never holds more than one second of tokens.
        let later = t0 + Duration::from_secs(60);
        assert!(g.take_token(&s, "slow", later));
        assert!(g.take_token(&s, "slow", later));
        assert!(!g.take_token(&s, "slow", later));
        assert!(g.take_token(&s, "other", later));
    }

    #[test]
    fn failing_destinations_pause_and_a_probe_resumes_them() {
        let mut s = settings(8, 4);
        s.pause_after = 3;
        s.probe_every = Duration::from_secs(30);
        let mut g = Gate::default();
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(g.verdict(&s, "d", Verdict::Failure, t0), None);
        }
        // A success in between starts the count again.
        assert_eq!(g.verdict(&s, "d", Verdict::Success, t0), None);
        for _ in 0..2 {
            assert_eq!(g.verdict(&s, "d", Verdict::Failure, t0), None);
        }
        assert!(matches!(
            g.verdict(&s, "d", Verdict::Failure, t0),
            Some(Change::Paused { failures: 3, .. })
        ));
        assert!(g.is_paused("d"));
        assert!(g.held_back("d", t0));
        assert_eq!(
            g.claim_quota(&s, &["d".into()], Lane::Fresh, |_| 0).1["d"],
            0
        );
        // Probe time (after 1 s): one may go, then none while it is out.
        let later = t0 + Duration::from_millis(1001);
        assert!(g.held_back("d", t0 + Duration::from_millis(900)));
        assert!(!g.held_back("d", later));
        g.take(Lane::Fresh, "d");
        assert!(g.held_back("d", later));
        // It fails: the next probe waits twice as long.
        assert_eq!(g.verdict(&s, "d", Verdict::Failure, later), None);
        assert!(g.held_back("d", later + Duration::from_millis(1900)));
        let probe = later + Duration::from_millis(2001);
        assert!(!g.held_back("d", probe));
        g.take(Lane::Fresh, "d");
        assert!(matches!(
            g.verdict(&s, "d", Verdict::Success, probe),
            Some(Change::Resumed { .. })
        ));
        assert!(!g.is_paused("d"));
        assert!(!g.is_paused("other"));
    }

    #[test]
    fn a_single_slot_is_shared() {
        assert_eq!(retry_reserve(1), 0);
        assert_eq!(retry_reserve(2), 1);
        assert_eq!(retry_reserve(64), 16);
        let s = settings(1, 1);
        let mut g = Gate::default();
        assert!(g.room(&s, "a", Lane::Fresh));
        assert!(g.room(&s, "a", Lane::Any));
        // Retries have no reserve of their own with one slot, but are still claimed.
        assert_eq!(g.claim_quota(&s, &[], Lane::Retry, |_| 0).0, 65);
        g.take(Lane::Fresh, "a");
        assert!(!g.room(&s, "a", Lane::Any));
    }

    /// Instances sharing a store split each destination's limits: three instances under
    /// `per_destination: 8` get 2 slots each, a 9/s rate 3/s each, and a limit smaller than
    /// the fleet still leaves each one slot.
    #[test]
    fn a_fleet_divides_each_destinations_limits() {
        let mut s = settings(64, 8);
        s.destinations.insert(
            "slow".into(),
            DestinationSettings {
                concurrency: Some(2),
                rate: Some(9.0),
            },
        );
        let one = s.divided(1);
        assert_eq!(one.per_destination, 8);
        let three = s.divided(3);
        assert_eq!(
            three.concurrency, 64,
            "the global limit is each instance's own"
        );
        assert_eq!(three.concurrency_for("any"), 2);
        assert_eq!(three.concurrency_for("slow"), 1);
        assert_eq!(three.destinations["slow"].rate, Some(3.0));
        let mut g = Gate::default();
        g.take(Lane::Fresh, "slow");
        assert!(!g.room(&three, "slow", Lane::Any));
        assert!(g.room(&one, "slow", Lane::Any));
    }
}
