//! The gate: how many attempts may start now, per lane and per destination.
//!
//! - **Lanes.** First attempts and retries each have a reserved share of the slots (retries
//!   a quarter, at least one), globally and per destination. A lane may borrow the other's
//!   idle slots, but a borrowed slot is held for one attempt only, so a burst of due retries
//!   after an outage never keeps new conversions waiting, and a flood of new conversions
//!   never starves retries.
//! - **Destinations.** Each destination host has its own cap on attempts in flight
//!   (`per_destination`, or its own `concurrency`) and optionally a rate (token bucket, one
//!   second of burst). A dead or slow destination fills only its own slots.
//!
//! The gate is pure bookkeeping: the dispatcher asks it for quotas, claims that many
//! deliveries from the store, and tells it when attempts start and end.

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
}

struct Bucket {
    tokens: f64,
    at: Instant,
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

impl Gate {
    /// What a claim for `lane` may take now: a global limit, and a cap per destination for
    /// every destination in `destinations`.
    pub fn quota(
        &mut self,
        settings: &DeliverySettings,
        destinations: &[String],
        lane: Lane,
        now: Instant,
    ) -> (usize, HashMap<String, usize>) {
        let global = lane_room(settings.concurrency, self.inflight, lane);
        let mut caps = HashMap::with_capacity(destinations.len());
        for d in destinations {
            let state = self.dests.entry(d.clone()).or_default();
            let mut room = lane_room(settings.concurrency_for(d), state.inflight, lane);
            if let Some(rate) = settings.destinations.get(d).and_then(|s| s.rate) {
                let b = state.bucket.get_or_insert(Bucket {
                    tokens: rate.max(1.0),
                    at: now,
                });
                b.tokens = (b.tokens + rate * (now - b.at).as_secs_f64()).min(rate.max(1.0));
                b.at = now;
                room = room.min(b.tokens.floor() as usize);
            }
            caps.insert(d.clone(), room);
        }
        (global, caps)
    }

    /// An attempt of `lane` to `destination` starts.
    pub fn take(&mut self, lane: Lane, destination: &str) {
        self.inflight[ix(lane)] += 1;
        let d = self.dests.entry(destination.to_string()).or_default();
        d.inflight[ix(lane)] += 1;
        if let Some(b) = &mut d.bucket {
            b.tokens -= 1.0;
        }
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
    pub fn next_token(&self, settings: &DeliverySettings) -> Option<Duration> {
        self.dests
            .iter()
            .filter_map(|(d, s)| {
                let rate = settings.destinations.get(d)?.rate?;
                let b = s.bucket.as_ref()?;
                (b.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - b.tokens) / rate))
            })
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
        let dests = vec!["a".to_string()];
        let mut g = Gate::default();
        let now = Instant::now();
        assert_eq!(g.quota(&s, &dests, Lane::Fresh, now).0, 6);
        assert_eq!(g.quota(&s, &dests, Lane::Retry, now).0, 2);
        for _ in 0..6 {
            g.take(Lane::Fresh, "a");
        }
        // Fresh work used its share; retries still have theirs.
        assert_eq!(g.quota(&s, &dests, Lane::Fresh, now).0, 0);
        let (global, caps) = g.quota(&s, &dests, Lane::Retry, now);
        assert_eq!((global, caps["a"]), (2, 2));
        // With no retries due, fresh work may borrow the idle retry slots.
        assert_eq!(g.quota(&s, &dests, Lane::Any, now).0, 2);
        g.take(Lane::Fresh, "a");
        g.take(Lane::Fresh, "a");
        assert_eq!(g.quota(&s, &dests, Lane::Retry, now).0, 0);
        // A borrowed slot comes back to retries when its attempt ends.
        g.release(Lane::Fresh, "a");
        assert_eq!(g.quota(&s, &dests, Lane::Retry, now).0, 1);
        assert_eq!(g.quota(&s, &dests, Lane::Fresh, now).0, 0);
    }

    #[test]
    fn a_full_destination_does_not_limit_others() {
        let s = settings(16, 2);
        let dests = vec!["dead".to_string(), "ok".to_string()];
        let mut g = Gate::default();
        let now = Instant::now();
        g.take(Lane::Fresh, "dead");
        let (_, caps) = g.quota(&s, &dests, Lane::Fresh, now);
        // per_destination 2: one fresh slot (the other is the retry reserve).
        assert_eq!((caps["dead"], caps["ok"]), (0, 1));
        let (_, caps) = g.quota(&s, &dests, Lane::Any, now);
        assert_eq!((caps["dead"], caps["ok"]), (1, 2));
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
        let dests = vec!["slow".to_string()];
        let mut g = Gate::default();
        let t0 = Instant::now();
        assert_eq!(g.quota(&s, &dests, Lane::Any, t0).1["slow"], 2);
        g.take(Lane::Fresh, "slow");
        g.take(Lane::Fresh, "slow");
        g.release(Lane::Fresh, "slow");
        g.release(Lane::Fresh, "slow");
        assert_eq!(g.quota(&s, &dests, Lane::Any, t0).1["slow"], 0);
        let wait = g.next_token(&s).unwrap();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        let later = t0 + Duration::from_millis(500);
        assert_eq!(g.quota(&s, &dests, Lane::Any, later).1["slow"], 1);
        // The bucket never holds more than one second of tokens.
        let much_later = t0 + Duration::from_secs(60);
        assert_eq!(g.quota(&s, &dests, Lane::Any, much_later).1["slow"], 2);
    }

    #[test]
    fn a_single_slot_is_shared() {
        assert_eq!(retry_reserve(1), 0);
        assert_eq!(retry_reserve(2), 1);
        assert_eq!(retry_reserve(64), 16);
        let s = settings(1, 1);
        let mut g = Gate::default();
        let now = Instant::now();
        assert_eq!(g.quota(&s, &[], Lane::Fresh, now).0, 1);
        assert_eq!(g.quota(&s, &[], Lane::Any, now).0, 1);
    }
}
