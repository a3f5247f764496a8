//! Incoming: the events trackers sent and what each matched, and (for an admin) the
//! webhooks that were refused, with the reason.

use super::*;
use axum::extract::Query;
use minijinja::context;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub(super) struct IncomingFilters {
    source: Option<String>,
    q: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<i64>,
    refused_before: Option<i64>,
}

pub(super) async fn incoming(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(f): Query<IncomingFilters>,
) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let admin = session.access == Access::Admin;
    let mut error = None;
    let (since, until) = match (instant("since", &f.since), instant("until", &f.until)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            error = Some(e);
            (None, None)
        }
    };
    let query = crate::store::EventQuery {
        source: if admin { set(&f.source) } else { None },
        // An affiliate sees the events of its own conversions.
        affiliate: session.access.affiliate().map(str::to_string),
        // The search box takes a transaction id or a click id.
        id: set(&f.q),
        since,
        until,
        before_rowid: f.before,
        limit: 50,
        ..crate::store::EventQuery::default()
    };
    let (events, events_next) = match state.store.events(query).await {
        Ok(r) => r,
        Err(e) => {
            error = Some(e.to_string());
            (Vec::new(), None)
        }
    };
    let events: Vec<EventView> = events.into_iter().map(event_view).collect();
    let (refused, refused_next) = if admin {
        state
            .store
            .refused(f.refused_before, 50)
            .await
            .unwrap_or_default()
    } else {
        (Vec::new(), None)
    };
    let refused: Vec<minijinja::Value> = refused.iter().map(|r| timed(r, r.at)).collect();
    let link = |key: &str, before: i64| {
        page_link(
            "/ui/incoming",
            &[
                ("source", &f.source),
                ("q", &f.q),
                ("since", &f.since),
                ("until", &f.until),
            ],
            (key, before),
        )
    };
    state.ui.render(
        "incoming.html",
        context! {
            who => who(&session.access),
            page => "incoming",
            admin,
            f => minijinja::Value::from_serialize(&f),
            events => minijinja::Value::from_serialize(&events),
            events_next => events_next.map(|b| link("before", b)),
            refused,
            refused_next => refused_next.map(|b| link("refused_before", b)),
            error,
            refresh => (f.before.is_none() && f.refused_before.is_none()).then_some(REFRESH_S),
        },
    )
}
