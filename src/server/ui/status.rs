//! The rules (each postback, where it is written, its last change and its last 24 hours)
//! and health.

use super::*;
use crate::store::State as DeliveryState;
use minijinja::context;

pub(super) async fn health(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load();
    let q = state.store.queue_stats().await.unwrap_or_default();
    let health = state.store.health();
    let paused: Vec<String> = state
        .paused
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(d, since, n)| format!("{d}: since {} after {n} failures", crate::utc_text(since)))
        .collect();
    state.ui.render(
        "health.html",
        context! {
            who => who(&session.access),
            page => "health",
            ready => health.is_ok(),
            why => health.err(),
            version => plan.hash.clone(),
            commit => plan.git.as_ref().map(|g| g.commit.clone()),
            reload_ok => state.reloader.status().ok,
            store => state.store.location().to_string(),
            pending => q.pending,
            retries => q.retries,
            orphaned => q.orphaned,
            oldest => q.oldest.map(crate::utc_text),
            paused,
        },
    )
}

pub(super) async fn rules(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load_full();
    let mut postbacks = crate::api::postback_views(&state, &plan).await;
    if let Some(own) = session.access.postbacks(&plan) {
        postbacks.retain(|p| own.contains(&p.id));
    }
    // Each postback's deliveries of the last 24 hours, by state, for its bar.
    let mut day: HashMap<String, Day> = HashMap::new();
    let made = state
        .store
        .made_since(crate::now_ms() - 24 * 3600 * 1000)
        .await
        .unwrap_or_default();
    for (postback, st, n) in made {
        let d = day.entry(postback).or_default();
        match st {
            DeliveryState::Delivered => d.delivered += n,
            DeliveryState::Dead => d.dead += n,
            DeliveryState::Cancelled => d.cancelled += n,
            DeliveryState::Pending | DeliveryState::Inflight => d.pending += n,
        }
        d.total += n;
    }
    state.ui.render(
        "rules.html",
        context! {
            day => minijinja::Value::from_serialize(&day),
            who => who(&session.access),
            page => "rules",
            version => plan.hash.clone(),
            commit => plan.git.as_ref().map(|g| g.commit.clone()),
            reload => minijinja::Value::from_serialize(state.reloader.status()),
            postbacks => minijinja::Value::from_serialize(&postbacks),
        },
    )
}

/// One postback's deliveries of the last 24 hours.
#[derive(Debug, Default, serde::Serialize)]
struct Day {
    total: i64,
    delivered: i64,
    dead: i64,
    pending: i64,
    cancelled: i64,
}
