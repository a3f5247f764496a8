//! The deliveries: the list (filters in the URL, paged by cursor) and one delivery with its
//! attempts, why it waits, its conversion's history and, for an admin, Retry.

use super::*;
use crate::store::{DeliveryQuery, DeliveryRow, RetryFilter, State as DeliveryState};
use axum::extract::{Form, Path, Query};
use minijinja::context;
use serde::Deserialize;

/// The filters, as the URL carries them.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub(super) struct Filters {
    postback: Option<String>,
    offer: Option<String>,
    affiliate: Option<String>,
    goal: Option<String>,
    status: Option<String>,
    state: Option<String>,
    outcome: Option<String>,
    /// A destination host (as the postbacks' URLs write it).
    destination: Option<String>,
    /// A transaction or click id.
    q: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<i64>,
}

fn row(d: &DeliveryRow) -> minijinja::Value {
    timed(d, d.created_at)
}

pub(super) async fn deliveries(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(f): Query<Filters>,
) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load_full();
    let visible = session.access.postbacks(&plan);
    let mut postbacks: Vec<String> = match &visible {
        Some(v) => v.clone(),
        None => plan.postbacks.iter().map(|p| p.id.clone()).collect(),
    };
    postbacks.sort();
    let mut error = None;
    let (since, until) = match (instant("since", &f.since), instant("until", &f.until)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            error = Some(e);
            (None, None)
        }
    };
    // An affiliate's scope comes first: a postback filter outside it leaves nothing.
    let mut scope: Option<Vec<String>> = match (&visible, set(&f.postback)) {
        (Some(v), Some(p)) => Some(v.iter().filter(|x| **x == p).cloned().collect()),
        (Some(v), None) => Some(v.clone()),
        (None, Some(p)) => Some(vec![p]),
        (None, None) => None,
    };
    // A destination is the postbacks that send there.
    if let Some(dest) = set(&f.destination) {
        let there: Vec<String> = plan
            .postbacks
            .iter()
            .filter(|p| p.action.destination() == dest)
            .map(|p| p.id.clone())
            .collect();
        scope = Some(match scope {
            Some(s) => s.into_iter().filter(|p| there.contains(p)).collect(),
            None => there,
        });
    }
    let state_filter = set(&f.state).and_then(|s| DeliveryState::parse(&s));
    let query = DeliveryQuery {
        offer: set(&f.offer),
        affiliate: if visible.is_none() {
            set(&f.affiliate)
        } else {
            None
        },
        goal: set(&f.goal),
        postbacks: scope.clone(),
        status: set(&f.status),
        state: state_filter,
        outcome: set(&f.outcome),
        since,
        until,
        before_id: f.before,
        limit: 50,
        // The search box takes a transaction id or a click id.
        id: set(&f.q),
        ..DeliveryQuery::default()
    };
    let (rows, next) = match state.store.deliveries(query).await {
        Ok(r) => r,
        Err(e) => {
            error = Some(e.to_string());
            (Vec::new(), None)
        }
    };
    let next = next.map(|before| {
        page_link(
            "/ui/deliveries",
            &[
                ("postback", &f.postback),
                ("offer", &f.offer),
                ("affiliate", &f.affiliate),
                ("goal", &f.goal),
                ("status", &f.status),
                ("state", &f.state),
                ("outcome", &f.outcome),
                ("destination", &f.destination),
                ("q", &f.q),
                ("since", &f.since),
                ("until", &f.until),
            ],
            ("before", before),
        )
    });
    let rows: Vec<minijinja::Value> = rows.iter().map(row).collect();
    state.ui.render(
        "deliveries.html",
        context! {
            who => who(&session.access),
            page => "deliveries",
            admin => visible.is_none(),
            destinations => {
                let mut d: Vec<String> = plan
                    .postbacks
                    .iter()
                    .filter(|p| postbacks.contains(&p.id))
                    .map(|p| p.action.destination().to_string())
                    .collect();
                d.sort();
                d.dedup();
                d
            },
            postbacks,
            f => minijinja::Value::from_serialize(&f),
            rows,
            next,
            error,
            refresh => f.before.is_none().then_some(REFRESH_S),
        },
    )
}

/// Why a pending delivery waits.
fn waiting(
    d: &DeliveryRow,
    paused: &[(String, i64, u32)],
    plan: &crate::plan::Plan,
) -> Option<String> {
    if d.state != DeliveryState::Pending {
        return None;
    }
    let now = crate::now_ms();
    if let Some(since) = d.orphaned_at {
        return Some(format!(
            "its postback is not in the config since {}; it waits for it until {}",
            crate::utc_text(since),
            crate::utc_text(d.due_at)
        ));
    }
    let dest = plan
        .postback(&d.postback)
        .map(|p| p.action.destination().to_string())
        .unwrap_or_default();
    if let Some((_, since, failures)) = paused.iter().find(|(p, _, _)| *p == dest) {
        return Some(format!(
            "its destination {dest} is paused since {} after {failures} failures in a row",
            crate::utc_text(*since)
        ));
    }
    if d.due_at > now {
        return Some(if d.attempts > 0 {
            format!("retry at {}", crate::utc_text(d.due_at))
        } else {
            format!("held until {}", crate::utc_text(d.due_at))
        });
    }
    Some("due now: in flight, or behind an earlier delivery of the same conversion".into())
}

#[derive(Deserialize, Default)]
pub(super) struct Notice {
    retried: Option<String>,
}

pub(super) async fn delivery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(n): Query<Notice>,
) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load_full();
    let visible = session.access.postbacks(&plan);
    let d = match state.store.delivery(id, visible).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return (StatusCode::NOT_FOUND, format!("no delivery {id}\n")).into_response();
        }
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let paused = state.paused.lock().map(|p| p.clone()).unwrap_or_default();
    let attempts: Vec<minijinja::Value> = d
        .attempt_log
        .iter()
        .map(|a| timed(a, a.recorded.started_at))
        .collect();
    let finished = matches!(
        d.state,
        DeliveryState::Dead | DeliveryState::Delivered | DeliveryState::Cancelled
    );
    // The conversion's history: its events (what each said and matched) and its other
    // deliveries, found by its transaction id (else its click id), in the caller's scope.
    let (by_tx, by_click) = match (&d.transaction_id, &d.clickid) {
        (Some(t), _) => (Some(t.clone()), None),
        (None, Some(c)) => (None, Some(c.clone())),
        (None, None) => (None, None),
    };
    let mut history_events: Vec<EventView> = Vec::new();
    let mut history_deliveries: Vec<minijinja::Value> = Vec::new();
    if by_tx.is_some() || by_click.is_some() {
        let affiliate = session.access.affiliate().map(str::to_string);
        if let Ok((events, _)) = state
            .store
            .events(crate::store::EventQuery {
                transaction_id: by_tx.clone(),
                clickid: by_click.clone(),
                affiliate,
                limit: 50,
                ..crate::store::EventQuery::default()
            })
            .await
        {
            history_events = events.into_iter().map(event_view).collect();
        }
        if let Ok((rows, _)) = state
            .store
            .deliveries(DeliveryQuery {
                transaction_id: by_tx,
                clickid: by_click,
                postbacks: session.access.postbacks(&plan),
                limit: 50,
                ..DeliveryQuery::default()
            })
            .await
        {
            history_deliveries = rows.iter().filter(|r| r.id != d.id).map(row).collect();
        }
    }
    state.ui.render(
        "delivery.html",
        context! {
            who => who(&session.access),
            page => "deliveries",
            waiting => waiting(&d, &paused, &plan),
            created => crate::utc_text(d.created_at),
            can_retry => finished && session.access == Access::Admin,
            csrf => session.csrf.clone(),
            notice => n.retried.map(|_| "Queued again: the new attempt shows here once it is made."),
            history_events => minijinja::Value::from_serialize(&history_events),
            history_deliveries,
            attempts,
            d => minijinja::Value::from_serialize(&d),
        },
    )
}

#[derive(Deserialize)]
pub(super) struct RetryForm {
    csrf: String,
}

pub(super) async fn retry(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<RetryForm>,
) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    use subtle::ConstantTimeEq;
    let csrf_ok: bool = session.csrf.as_bytes().ct_eq(form.csrf.as_bytes()).into();
    if !csrf_ok {
        return (
            StatusCode::FORBIDDEN,
            "the form is stale or not from this page\n",
        )
            .into_response();
    }
    if session.access != Access::Admin {
        return (StatusCode::FORBIDDEN, "retrying needs an admin token\n").into_response();
    }
    match state
        .store
        .retry(RetryFilter {
            id: Some(id),
            ..RetryFilter::default()
        })
        .await
    {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(delivery = id, "delivery queued again by hand (web page)");
            Redirect::to(&format!("/ui/deliveries/{id}?retried=1")).into_response()
        }
        Ok(_) => (
            StatusCode::CONFLICT,
            format!("delivery {id} is not finished, or does not exist\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
