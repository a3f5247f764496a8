//! The store's conformance suite: the guarantees every backend keeps (see `src/store/mod.rs`),
//! the same scenarios through the library's `Store` on the embedded SQLite file and on a real
//! PostgreSQL server. Where the shared backend has more to keep (a second instance, a lease
//! that runs out), the scenario uses it; the embedded one has one process per file.

use crate::pg::{shared, Backend};
use postbackd::ingest::event::{Event, FieldMap, Kind};
use postbackd::plan::Plan;
use postbackd::store::{
    Attempt, ClaimSpec, Claimed, DeliveryQuery, EventQuery, Lane, Location, Next, PgUrl,
    RetryFilter, State, Store,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Where a scenario's store lives; opening it again is another instance (PostgreSQL) or
/// the next start (SQLite).
struct Place {
    location: Location,
    _dir: tempfile::TempDir,
}

impl Place {
    fn new(b: Backend, lease: Duration) -> Place {
        let dir = tempfile::tempdir().unwrap();
        let location = match b {
            Backend::Sqlite => Location::Sqlite(dir.path().to_path_buf()),
            Backend::Postgres => {
                let mut pg = PgUrl::parse(&shared().database(), None).unwrap();
                pg.lease = lease;
                Location::Postgres(pg)
            }
        };
        Place {
            location,
            _dir: dir,
        }
    }

    async fn open(&self) -> Store {
        Store::open(&self.location).await.unwrap()
    }
}

fn plan() -> Arc<Plan> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        "postbacks:
  - id: every
    trigger: conversion
    http: { url: \"http://tracker.example/e?c={clickid}&s={status}&p={payout}\" }
  - id: later
    trigger: conversion
    statuses: [approved]
    delay: 1h
    http: { url: \"http://crm.example/l?c={clickid}\" }
",
    )
    .unwrap();
    Arc::new(postbackd::config::load_dir(dir.path()).unwrap())
}

fn conversion(pairs: &[(&str, &str)]) -> Event {
    let params = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Event::from_params(
        params,
        Kind::Conversion,
        "web",
        &FieldMap::default(),
        postbackd::now_ms(),
    )
    .unwrap()
}

fn spec(plan: &Arc<Plan>, held: Vec<i64>) -> ClaimSpec {
    ClaimSpec {
        now: postbackd::now_ms(),
        lane: Lane::Any,
        limit: 100,
        caps: HashMap::new(),
        plan: plan.clone(),
        held: Arc::new(held),
    }
}

async fn claim(store: &Store, plan: &Arc<Plan>, held: Vec<i64>) -> Vec<Claimed> {
    let mut all = store.claim(vec![spec(plan, held)]).await.unwrap();
    all.pop().unwrap().claimed
}

fn attempt(outcome: &str) -> Attempt {
    Attempt {
        started_at: postbackd::now_ms(),
        duration_ms: 3,
        method: "GET".into(),
        url: "http://tracker.example/e".into(),
        response_status: Some(if outcome == "delivered" { 200 } else { 500 }),
        outcome: outcome.into(),
        config_version: "v1".into(),
        ..Attempt::default()
    }
}

/// Guarantee 2: one delivery per (conversion, postback, offer, status), however many
/// instances receive the repeat at once; a new status is a new delivery.
async fn a_status_makes_one_delivery_whoever_receives_the_repeats(b: Backend) {
    let place = Place::new(b, Duration::from_secs(30));
    let (one, two) = (place.open().await, place.open().await);
    let plan = plan();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        let plan = plan.clone();
        tasks.spawn(async move {
            let e = conversion(&[
                ("clickid", "c1"),
                ("transaction_id", "T1"),
                ("status", "pending"),
            ]);
            store.ingest(e, plan).await.unwrap().queued
        });
    }
    let mut queued = 0;
    while let Some(q) = tasks.join_next().await {
        queued += q.unwrap();
    }
    assert_eq!(queued, 1, "24 repeats queued {queued} deliveries");
    let approved = conversion(&[("transaction_id", "T1"), ("status", "approved")]);
    let a = two.ingest(approved, plan.clone()).await.unwrap();
    assert_eq!(a.matched, ["every", "later"]);
    assert_eq!(a.queued, 2);
    let (rows, _) = one
        .deliveries(DeliveryQuery {
            transaction_id: Some("T1".into()),
            limit: 50,
            ..DeliveryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
}

/// A status update that reaches another instance keeps the fields the conversion had.
async fn an_update_merges_into_the_conversion_whoever_receives_it(b: Backend) {
    let place = Place::new(b, Duration::from_secs(30));
    let (one, two) = (place.open().await, place.open().await);
    let plan = plan();
    one.ingest(
        conversion(&[
            ("clickid", "c2"),
            ("transaction_id", "T2"),
            ("payout", "7.5"),
            ("status", "pending"),
        ]),
        plan.clone(),
    )
    .await
    .unwrap();
    let a = two
        .ingest(
            conversion(&[("transaction_id", "T2"), ("status", "approved")]),
            plan.clone(),
        )
        .await
        .unwrap();
    let later = a.deliveries.iter().max().copied().unwrap();
    let row = one.delivery(later, None).await.unwrap().unwrap();
    assert_eq!(row.clickid.as_deref(), Some("c2"));
    assert_eq!(row.status.as_deref(), Some("approved"));
}

/// Guarantee 3: one unfinished delivery per order key, in order; other conversions are not
/// held back.
async fn a_conversions_deliveries_go_one_at_a_time_in_order(b: Backend) {
    let place = Place::new(b, Duration::from_secs(30));
    let store = place.open().await;
    let plan = plan();
    let first = store
        .ingest(
            conversion(&[("transaction_id", "T3"), ("status", "pending")]),
            plan.clone(),
        )
        .await
        .unwrap();
    let second = store
        .ingest(
            conversion(&[("transaction_id", "T3"), ("status", "rejected")]),
            plan.clone(),
        )
        .await
        .unwrap();
    let other = store
        .ingest(
            conversion(&[("transaction_id", "T4"), ("status", "pending")]),
            plan.clone(),
        )
        .await
        .unwrap();
    // The first and the other conversion's go now; the second waits behind the first.
    let ids: Vec<i64> = claim(&store, &plan, vec![])
        .await
        .iter()
        .map(|c| c.id)
        .collect();
    let mut expect = vec![first.deliveries[0], other.deliveries[0]];
    expect.sort();
    let mut got = ids.clone();
    got.sort();
    assert_eq!(got, expect, "claimed {ids:?}");
    assert!(!ids.contains(&second.deliveries[0]));
    store
        .finish(
            first.deliveries[0],
            Some(attempt("5xx")),
            Next::Retry { due_at: 0 },
            None,
        )
        .await
        .unwrap();
    let held = vec![other.deliveries[0]];
    let ids: Vec<i64> = claim(&store, &plan, held.clone())
        .await
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, vec![first.deliveries[0]], "a retry keeps its place");
    store
        .finish(
            first.deliveries[0],
            Some(attempt("delivered")),
            Next::Delivered,
            None,
        )
        .await
        .unwrap();
    let ids: Vec<i64> = claim(&store, &plan, held)
        .await
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, vec![second.deliveries[0]]);
}

/// Guarantee 4: a claimed delivery is attempted by one holder at a time, and one claimed and
/// never finished (its process died) is claimable again after a bounded time.
async fn a_claim_is_held_once_and_comes_back_when_its_holder_dies(b: Backend) {
    let place = Place::new(b, Duration::from_secs(1));
    let plan = plan();
    let first = place.open().await;
    let id = first
        .ingest(
            conversion(&[("transaction_id", "T5"), ("status", "pending")]),
            plan.clone(),
        )
        .await
        .unwrap()
        .deliveries[0];
    assert_eq!(claim(&first, &plan, vec![]).await.len(), 1);
    assert!(
        claim(&first, &plan, vec![id]).await.is_empty(),
        "the holder leaves it out"
    );
    if b == Backend::Postgres {
        let other = place.open().await;
        assert!(
            claim(&other, &plan, vec![]).await.is_empty(),
            "another instance waits"
        );
    }
    drop(first); // the holder dies without finishing
    let started = std::time::Instant::now();
    let next = place.open().await;
    loop {
        let got = claim(&next, &plan, vec![]).await;
        if got.iter().any(|c| c.id == id) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never claimable again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Attempts are logged; a dead delivery is queued again by hand; retention prunes finished
/// work but keeps a conversion's dedupe while one of its deliveries is pending.
async fn the_log_retries_by_hand_and_pruning(b: Backend) {
    let place = Place::new(b, Duration::from_secs(30));
    let store = place.open().await;
    let plan = plan();
    let a = store
        .ingest(
            conversion(&[
                ("transaction_id", "T6"),
                ("clickid", "k6"),
                ("status", "approved"),
            ]),
            plan.clone(),
        )
        .await
        .unwrap();
    let (now_id, later_id) = (a.deliveries[0], a.deliveries[1]);
    store
        .finish(
            now_id,
            Some(attempt("5xx")),
            Next::Dead,
            Some("gave up".into()),
        )
        .await
        .unwrap();
    let row = store.delivery(now_id, None).await.unwrap().unwrap();
    assert_eq!(row.state, State::Dead);
    assert_eq!(row.attempt_log.len(), 1);
    assert_eq!(row.attempt_log[0].recorded.response_status, Some(500));
    assert!(
        store
            .delivery(now_id, Some(vec!["later".into()]))
            .await
            .unwrap()
            .is_none(),
        "scoped read"
    );
    let ids = store.retry(RetryFilter::default()).await.unwrap();
    assert_eq!(ids, vec![now_id]);
    let got = claim(&store, &plan, vec![]).await;
    assert_eq!(
        got.iter().map(|c| (c.id, c.attempts)).collect::<Vec<_>>(),
        vec![(now_id, 1)]
    );
    store
        .finish(now_id, Some(attempt("delivered")), Next::Delivered, None)
        .await
        .unwrap();
    // Pruning everything finished: the delivered one goes; the held one and its conversion stay.
    eprintln!(
        "DEBUG later {:?}",
        store
            .delivery(later_id, None)
            .await
            .unwrap()
            .map(|r| (r.state, r.due_at))
    );
    let mut pruned = 0;
    loop {
        let n = store
            .prune(postbackd::now_ms() + 10_000, 100)
            .await
            .unwrap();
        pruned += n;
        if n == 0 {
            break;
        }
    }
    assert!(pruned >= 1);
    assert!(store.delivery(now_id, None).await.unwrap().is_none());
    assert!(store.delivery(later_id, None).await.unwrap().is_some());
    let again = store
        .ingest(
            conversion(&[("transaction_id", "T6"), ("status", "approved")]),
            plan.clone(),
        )
        .await
        .unwrap();
    assert_eq!(again.queued, 0, "the dedupe outlived pruning");
    let (events, _) = store
        .events(EventQuery {
            transaction_id: Some("T6".into()),
            limit: 10,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    assert!(!events.is_empty());
    // One search box: a transaction id or a click id finds the same conversion.
    for id in ["T6", "k6"] {
        let (by_id, _) = store
            .events(EventQuery {
                id: Some(id.into()),
                limit: 10,
                ..EventQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(by_id.len(), events.len(), "events by {id}");
        let (rows, _) = store
            .deliveries(DeliveryQuery {
                id: Some(id.into()),
                limit: 10,
                ..DeliveryQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "deliveries by {id}");
    }
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats.pending, 1);
    // What each postback made since a time, by state (the pruned one is gone): none made
    // in the future.
    let made = store.made_since(0).await.unwrap();
    assert_eq!(made, vec![("later".to_string(), State::Pending, 1)]);
    assert!(store
        .made_since(postbackd::now_ms() + 60_000)
        .await
        .unwrap()
        .is_empty());
    // Once nothing of the conversion is pending, pruning takes it too: the same status is a
    // new conversion after the retention period.
    store
        .finish(later_id, Some(attempt("delivered")), Next::Delivered, None)
        .await
        .unwrap();
    while store
        .prune(postbackd::now_ms() + 10_000, 100)
        .await
        .unwrap()
        > 0
    {}
    assert!(store.delivery(later_id, None).await.unwrap().is_none());
    let after = store
        .ingest(
            conversion(&[("transaction_id", "T6"), ("status", "approved")]),
            plan.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        after.queued, 2,
        "the conversion was pruned with its last event"
    );
}

/// An orphan waits for its postback; a reload that brings it back makes it due now.
async fn an_orphan_is_woken_when_its_postback_returns(b: Backend) {
    let place = Place::new(b, Duration::from_secs(30));
    let store = place.open().await;
    let plan = plan();
    let id = store
        .ingest(
            conversion(&[("transaction_id", "T7"), ("status", "pending")]),
            plan.clone(),
        )
        .await
        .unwrap()
        .deliveries[0];
    let now = postbackd::now_ms();
    store
        .finish(
            id,
            None,
            Next::Orphaned {
                since: now,
                due_at: now + 3_600_000,
            },
            Some("postback gone".into()),
        )
        .await
        .unwrap();
    assert!(claim(&store, &plan, vec![]).await.is_empty());
    assert_eq!(store.queue_stats().await.unwrap().orphaned, 1);
    assert_eq!(store.revive(vec!["every".into()]).await.unwrap(), 1);
    let got = claim(&store, &plan, vec![]).await;
    assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), vec![id]);
}

/// Refused webhooks are kept newest first, paged, and pruned with the rest.
async fn refused_webhooks_are_kept_paged_and_pruned(b: Backend) {
    let place = Place::new(b, Duration::from_secs(30));
    let store = place.open().await;
    for i in 0..3 {
        store
            .refuse(postbackd::store::Refused {
                id: 0,
                at: postbackd::now_ms(),
                source: "keitaro".into(),
                reason: "bad_secret".into(),
                status: 401,
                message: format!("wrong secret {i}"),
                method: "GET".into(),
                target: "/postback/keitaro?token=***".into(),
                client: Some("10.0.0.1".into()),
            })
            .await
            .unwrap();
    }
    let (first, next) = store.refused(None, 2).await.unwrap();
    assert_eq!(
        first.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
        ["wrong secret 2", "wrong secret 1"]
    );
    let (rest, none) = store.refused(next, 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(none.is_none());
    while store
        .prune(postbackd::now_ms() + 10_000, 100)
        .await
        .unwrap()
        > 0
    {}
    assert!(store.refused(None, 10).await.unwrap().0.is_empty());
}

on_both!(
    refused_webhooks_are_kept_paged_and_pruned,
    a_status_makes_one_delivery_whoever_receives_the_repeats,
    an_update_merges_into_the_conversion_whoever_receives_it,
    a_conversions_deliveries_go_one_at_a_time_in_order,
    a_claim_is_held_once_and_comes_back_when_its_holder_dies,
    the_log_retries_by_hand_and_pruning,
    an_orphan_is_woken_when_its_postback_returns,
);

/// A claim that reads more than it may take gives back only the leases it took: a fresh
/// delivery leased at its commit to the instance that made it (and handed to its dispatcher)
/// stays that instance's, so no other instance attempts it at the same time. (Shared store
/// only: the embedded one has no leases.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_claim_past_its_caps_keeps_fresh_leases() {
    let place = Place::new(Backend::Postgres, Duration::from_secs(30));
    let (one, two) = (place.open().await, place.open().await);
    let plan = plan();
    let id = one
        .ingest(
            conversion(&[("transaction_id", "T8"), ("status", "pending")]),
            plan.clone(),
        )
        .await
        .unwrap()
        .deliveries[0];
    // Reads the fresh delivery and takes nothing (limit 0): it must not give its lease back.
    let mut full = spec(&plan, vec![]);
    full.limit = 0;
    let taken = one.claim(vec![full]).await.unwrap().pop().unwrap();
    assert!(taken.claimed.is_empty() && taken.more);
    assert!(
        claim(&two, &plan, vec![]).await.is_empty(),
        "another instance got a delivery leased to the one that made it"
    );
    assert_eq!(
        claim(&one, &plan, vec![])
            .await
            .iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        vec![id]
    );
}
