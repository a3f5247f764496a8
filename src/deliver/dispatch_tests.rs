//! The dispatch loop on paused time, over an in-memory store: when it claims, how long it
//! sleeps, and that each delivery it takes is recorded once. The destination is a loopback
//! address the default egress policy blocks, so an attempt ends at once (dead, `blocked`)
//! without any I/O that virtual time could outrun.

use super::super::Deliverer;
use crate::ingest::event::{Event, FieldMap, Kind};
use crate::store::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// One delivery in the memory store: due at a virtual instant.
struct Row {
    id: i64,
    due: Instant,
    finished: Vec<Next>,
}

/// A store in memory whose clock is tokio's (paused in these tests).
#[derive(Default)]
struct Memory {
    rows: Mutex<Vec<Row>>,
    claims: Mutex<usize>,
    signals: Arc<Signals>,
}

fn event() -> Event {
    let params = [("clickid", "c1"), ("status", "approved")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Event::from_params(params, Kind::Conversion, "web", &FieldMap::default(), 1).unwrap()
}

impl Memory {
    fn add(&self, id: i64, in_: Duration) {
        self.rows.lock().unwrap().push(Row {
            id,
            due: Instant::now() + in_,
            finished: Vec::new(),
        });
    }

    fn finished(&self, id: i64) -> Vec<Next> {
        let rows = self.rows.lock().unwrap();
        rows.iter()
            .find(|r| r.id == id)
            .map(|r| r.finished.clone())
            .unwrap_or_default()
    }
}

fn unused<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable("not in the memory store".into()))
}

#[async_trait::async_trait]
impl Backend for Memory {
    async fn ingest(
        &self,
        _: Vec<Event>,
        _: Vec<String>,
        _: Arc<crate::plan::Plan>,
    ) -> Result<Vec<Accepted>, StoreError> {
        unused()
    }
    async fn claim(&self, specs: Vec<ClaimSpec>) -> Result<Vec<Claim>, StoreError> {
        *self.claims.lock().unwrap() += 1;
        let now = Instant::now();
        let rows = self.rows.lock().unwrap();
        Ok(specs
            .iter()
            .map(|spec| Claim {
                claimed: rows
                    .iter()
                    .filter(|r| r.finished.is_empty() && r.due <= now && !spec.held.contains(&r.id))
                    .filter(|_| spec.lane != Lane::Retry)
                    .map(|r| Claimed {
                        id: r.id,
                        postback_id: "pb".into(),
                        offer: "*".into(),
                        event: event(),
                        latest: None,
                        attempts: 0,
                        created_at: crate::now_ms(),
                        delayed: false,
                        orphaned_at: None,
                        destination: "127.0.0.1:9".into(),
                    })
                    .collect(),
                more: false,
                unreadable: Vec::new(),
            })
            .collect())
    }
    async fn finish(
        &self,
        id: i64,
        _: Option<Attempt>,
        next: Next,
        _: Option<String>,
    ) -> Result<bool, StoreError> {
        let mut rows = self.rows.lock().unwrap();
        if let Some(r) = rows.iter_mut().find(|r| r.id == id) {
            r.finished.push(next);
        }
        Ok(false)
    }
    async fn next_due(&self, _after: i64) -> Result<Option<i64>, StoreError> {
        let now = Instant::now();
        let rows = self.rows.lock().unwrap();
        Ok(rows
            .iter()
            .filter(|r| r.finished.is_empty() && r.due > now)
            .map(|r| crate::now_ms() + (r.due - now).as_millis() as i64)
            .min())
    }
    async fn prune(&self, _: i64, _: usize) -> Result<usize, StoreError> {
        Ok(0)
    }
    async fn revive(&self, _: Vec<String>, _: i64) -> Result<usize, StoreError> {
        Ok(0)
    }
    async fn retry(&self, _: RetryFilter, _: i64) -> Result<Vec<i64>, StoreError> {
        unused()
    }
    async fn deliveries(
        &self,
        _: DeliveryQuery,
    ) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError> {
        unused()
    }
    async fn events(&self, _: EventQuery) -> Result<(Vec<EventRow>, Option<i64>), StoreError> {
        unused()
    }
    async fn delivery(
        &self,
        _: i64,
        _: Option<Vec<String>>,
    ) -> Result<Option<DeliveryRow>, StoreError> {
        unused()
    }
    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        Ok(QueueStats::default())
    }
    async fn made_since(&self, _: i64) -> Result<Vec<(String, State, i64)>, StoreError> {
        unused()
    }
    async fn refuse(&self, _: Refused) -> Result<(), StoreError> {
        unused()
    }
    async fn refused(
        &self,
        _: Option<i64>,
        _: usize,
    ) -> Result<(Vec<Refused>, Option<i64>), StoreError> {
        unused()
    }
}

/// A dispatcher over a memory store, running; the plan's one postback goes to a blocked
/// loopback address.
fn start() -> (Arc<Memory>, Store, tokio::sync::watch::Sender<bool>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        "postbacks:\n  - id: pb\n    trigger: conversion\n    http: { url: \"http://127.0.0.1:9/x?c={clickid}\" }\n",
    )
    .unwrap();
    let plan = crate::config::load_dir(dir.path()).unwrap();
    let plan = Arc::new(arc_swap::ArcSwap::from_pointee(plan));
    let memory = Arc::new(Memory {
        signals: Signals::new(),
        ..Memory::default()
    });
    let store = Store::with_backend(memory.clone(), memory.signals.clone(), "memory");
    let d = Deliverer::new(store.clone(), plan, crate::telemetry::Telemetry::new());
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(d.run(rx, Duration::from_secs(1)));
    (memory, store, stop)
}

/// A delivery due in five minutes is not attempted before then, the loop sleeps rather than
/// spins meanwhile (it looks at least once a second, no more often), and once due it is
/// attempted and recorded once.
#[tokio::test(start_paused = true)]
async fn a_delivery_waits_for_its_time_and_the_loop_sleeps_meanwhile() {
    let (memory, _store, stop) = start();
    memory.add(1, Duration::from_secs(300));
    tokio::time::sleep(Duration::from_secs(299)).await;
    assert!(memory.finished(1).is_empty(), "attempted early");
    let claims = *memory.claims.lock().unwrap();
    assert!(claims <= 310, "{claims} claims in 299 s: the loop spins");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(memory.finished(1), vec![Next::Dead], "blocked: dead, once");
    let _ = stop.send(true);
}

/// New work wakes the loop at once: a delivery that becomes due while the loop sleeps is
/// claimed when the store says so, not at the next tick.
#[tokio::test(start_paused = true)]
async fn a_wake_claims_at_once() {
    let (memory, store, stop) = start();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    memory.add(2, Duration::ZERO);
    store.wake.notify_one();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(memory.finished(2), vec![Next::Dead]);
    let _ = stop.send(true);
}

/// What a claim found is taken once: a delivery in flight is held, not claimed again, even
/// when the store answers every claim with everything due.
#[tokio::test(start_paused = true)]
async fn a_held_delivery_is_not_attempted_twice() {
    let (memory, store, stop) = start();
    for id in 10..20 {
        memory.add(id, Duration::ZERO);
    }
    store.wake.notify_one();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut counts = HashMap::new();
    for id in 10..20 {
        counts.insert(id, memory.finished(id).len());
    }
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let _ = stop.send(true);
}
