//! The web page for the logs, under `/ui`: deliveries (filtered, paged, one with its
//! attempts and a Retry button), incoming webhooks (received, with what each matched, and
//! refused, with the reason), the rules (each postback's file, line and last change, the
//! last reload) and health. Server-rendered with minijinja (HTML
//! auto-escaping), templates and style embedded in the binary: no build step, no CDN.
//!
//! A person signs in with a token (admin or affiliate) and gets a session cookie
//! (`HttpOnly`, `SameSite=Strict`, `Secure` behind TLS). An affiliate's session sees its own
//! postbacks' deliveries only, through the same query-level scope as the API. The Retry
//! form carries the session's CSRF token. Wrong tokens are limited per client address.
//! The page is off (404) until an admin or affiliate token is configured.

use crate::api::Access;
use crate::server::AppState;
use crate::store::{DeliveryQuery, DeliveryRow, RetryFilter, State as DeliveryState};
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::{context, Environment};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

const COOKIE: &str = "postbackd_session";
/// A session lasts this long (ms).
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// Wrong tokens allowed per client address per minute.
const LOGIN_TRIES: u32 = 5;
/// The page reloads itself this often (s) on the first page of deliveries.
const REFRESH_S: u32 = 10;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/deliveries") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/deliveries") }))
        .route("/ui/style.css", get(style))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", get(logout))
        .route("/ui/deliveries", get(deliveries))
        .route("/ui/deliveries/{id}", get(delivery))
        .route("/ui/deliveries/{id}/retry", post(retry))
        .route("/ui/health", get(health))
        .route("/ui/rules", get(rules))
        .route("/ui/incoming", get(incoming))
}

/// The page's templates, sessions and sign-in limits; one per daemon.
pub struct Ui {
    env: Environment<'static>,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, (u32, i64)>>,
}

#[derive(Clone)]
struct Session {
    access: Access,
    csrf: String,
    expires: i64,
}

impl Default for Ui {
    fn default() -> Self {
        let mut env = Environment::new();
        for (name, src) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("deliveries.html", include_str!("templates/deliveries.html")),
            ("delivery.html", include_str!("templates/delivery.html")),
            ("health.html", include_str!("templates/health.html")),
            ("rules.html", include_str!("templates/rules.html")),
            ("incoming.html", include_str!("templates/incoming.html")),
        ] {
            // The templates are part of the binary and tested; a broken one fails here
            // in every test run.
            env.add_template(name, src)
                .unwrap_or_else(|e| panic!("ui template {name}: {e}"));
        }
        Ui {
            env,
            sessions: Mutex::default(),
            failures: Mutex::default(),
        }
    }
}

/// A random token: 32 hex digits from the system's generator.
fn random() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Ui {
    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => Html(html).into_response(),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("page error: {e}"),
            )
                .into_response(),
        }
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut all = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::now_ms();
        all.retain(|_, s| s.expires > now);
        all.get(&id).cloned()
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the page is on: it needs a token to sign in with.
fn enabled(state: &AppState) -> bool {
    let p = state.plan.load();
    !p.settings.admin_tokens.is_empty() || !p.settings.affiliate_tokens.is_empty()
}

fn off() -> Response {
    (
        StatusCode::NOT_FOUND,
        "the web page is off: set api.admin_tokens (or affiliate tokens) in postbackd.yaml\n",
    )
        .into_response()
}

fn who(a: &Access) -> String {
    match a {
        Access::Admin => "admin".into(),
        Access::Affiliate(id) => format!("affiliate {id}"),
    }
}

/// The signed-in session, if there is one (and the page is on).
fn signed_in(state: &AppState, headers: &HeaderMap) -> Option<Session> {
    if !enabled(state) {
        return None;
    }
    state.ui.session(headers)
}

/// What a visit without a session gets: the sign-in page, or 404 when the page is off.
fn sign_in_first(state: &AppState) -> Response {
    if enabled(state) {
        Redirect::to("/ui/login").into_response()
    } else {
        off()
    }
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("style.css"),
    )
        .into_response()
}

async fn login_page(State(state): State<AppState>) -> Response {
    if !enabled(&state) {
        return off();
    }
    state.ui.render("login.html", context! {})
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AppState>,
    peer: Option<axum::Extension<crate::ingest::guard::Peer>>,
    Form(form): Form<LoginForm>,
) -> Response {
    if !enabled(&state) {
        return off();
    }
    let ip = peer
        .map(|p| p.0 .0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let now = crate::now_ms();
    {
        let failures = state.ui.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, since)) = failures.get(&ip) {
            if *n >= LOGIN_TRIES && now - since < 60_000 {
                let mut r = state.ui.render(
                    "login.html",
                    context! { error => "Too many wrong tokens from your address: wait a minute." },
                );
                *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
                return r;
            }
        }
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = format!("Bearer {}", form.token.trim()).parse() {
        headers.insert(header::AUTHORIZATION, v);
    }
    let access = match crate::api::authorize(&state, &headers) {
        Ok(a) => a,
        Err(_) => {
            let mut failures = state.ui.failures.lock().unwrap_or_else(|e| e.into_inner());
            // Addresses are many (IPv6): forget the ones whose minute is over before the
            // table grows past a bound.
            if failures.len() >= 10_000 {
                failures.retain(|_, (_, since)| now - *since < 60_000);
            }
            let entry = failures.entry(ip).or_insert((0, now));
            if now - entry.1 >= 60_000 {
                *entry = (0, now);
            }
            entry.0 += 1;
            tracing::warn!(client = %ip, "web page: wrong token");
            let mut r = state
                .ui
                .render("login.html", context! { error => "Wrong token." });
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            return r;
        }
    };
    let id = random();
    state
        .ui
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.clone(),
            Session {
                access,
                csrf: random(),
                expires: now + SESSION_MS,
            },
        );
    let secure = if state.plan.load().settings.server.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_MS / 1000
    );
    let mut r = Redirect::to("/ui/deliveries").into_response();
    if let Ok(v) = cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        state
            .ui
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    let mut r = Redirect::to("/ui/login").into_response();
    if let Ok(v) = format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0").parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The filters, as the URL carries them.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
struct Filters {
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

fn set(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn instant(name: &str, v: &Option<String>) -> Result<Option<i64>, String> {
    match set(v) {
        None => Ok(None),
        Some(s) => crate::render::template::parse_instant(&s)
            .map(|t| Some(t.as_millisecond()))
            .ok_or_else(|| format!("{name}: `{s}` is not a time (RFC 3339 or unix seconds)")),
    }
}

/// A row as a page shows it: its fields, and its time as text (`when`).
#[derive(serde::Serialize)]
struct Timed<'a, T> {
    #[serde(flatten)]
    item: &'a T,
    when: String,
}

fn timed<T: serde::Serialize>(item: &T, at: i64) -> minijinja::Value {
    minijinja::Value::from_serialize(Timed {
        item,
        when: crate::utc_text(at),
    })
}

fn row(d: &DeliveryRow) -> minijinja::Value {
    timed(d, d.created_at)
}

/// A link to the next page: the filters that are set, and the cursor.
fn page_link(path: &str, filters: &[(&str, &Option<String>)], cursor: (&str, i64)) -> String {
    let mut params: Vec<(String, String)> = filters
        .iter()
        .filter_map(|(k, v)| set(v).map(|v| (k.to_string(), v)))
        .collect();
    params.push((cursor.0.to_string(), cursor.1.to_string()));
    let qs = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    format!("{path}?{qs}")
}

async fn deliveries(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(f): Query<Filters>,
) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load_full();
    let visible = match &session.access {
        Access::Admin => None,
        Access::Affiliate(a) => Some(plan.owned_by(a)),
    };
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
    let q = set(&f.q);
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
        transaction_id: q.clone(),
        ..DeliveryQuery::default()
    };
    // The search box takes a transaction id or a click id: the transaction first.
    let mut result = state.store.deliveries(query.clone()).await;
    if let (Some(q), Ok((rows, _))) = (&q, &result) {
        if rows.is_empty() {
            result = state
                .store
                .deliveries(DeliveryQuery {
                    transaction_id: None,
                    clickid: Some(q.clone()),
                    ..query
                })
                .await;
        }
    }
    let (rows, next) = match result {
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
struct Notice {
    retried: Option<String>,
}

async fn delivery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(n): Query<Notice>,
) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load_full();
    let visible = match &session.access {
        Access::Admin => None,
        Access::Affiliate(a) => Some(plan.owned_by(a)),
    };
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
        let affiliate = match &session.access {
            Access::Affiliate(a) => Some(a.clone()),
            Access::Admin => None,
        };
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
                postbacks: match &session.access {
                    Access::Affiliate(a) => Some(plan.owned_by(a)),
                    Access::Admin => None,
                },
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
struct RetryForm {
    csrf: String,
}

async fn retry(
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

async fn health(State(state): State<AppState>, headers: HeaderMap) -> Response {
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

async fn rules(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(session) = signed_in(&state, &headers) else {
        return sign_in_first(&state);
    };
    let plan = state.plan.load_full();
    let mut postbacks = crate::api::postback_views(&state, &plan).await;
    if let Access::Affiliate(a) = &session.access {
        let own = plan.owned_by(a);
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

#[derive(Debug, Default, Deserialize, serde::Serialize)]
struct IncomingFilters {
    source: Option<String>,
    q: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<i64>,
    refused_before: Option<i64>,
}

/// An event as the incoming page shows it.
#[derive(serde::Serialize)]
struct EventView {
    when: String,
    source: String,
    kind: String,
    transaction_id: Option<String>,
    clickid: Option<String>,
    offer_id: Option<String>,
    affiliate_id: Option<String>,
    status: Option<String>,
    matched: Vec<String>,
}

fn event_view(e: crate::store::EventRow) -> EventView {
    EventView {
        when: crate::utc_text(e.received_at),
        status: e
            .event
            .get("fields")
            .and_then(|f| f.get("status"))
            .and_then(|s| s.as_str())
            .map(str::to_string),
        matched: e
            .matched
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        source: e.source,
        kind: e.kind,
        transaction_id: e.transaction_id,
        clickid: e.clickid,
        offer_id: e.offer_id,
        affiliate_id: e.affiliate_id,
    }
}

async fn incoming(
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
    let q = set(&f.q);
    let query = crate::store::EventQuery {
        source: if admin { set(&f.source) } else { None },
        // An affiliate sees the events of its own conversions.
        affiliate: match &session.access {
            Access::Affiliate(a) => Some(a.clone()),
            Access::Admin => None,
        },
        transaction_id: q.clone(),
        since,
        until,
        before_rowid: f.before,
        limit: 50,
        ..crate::store::EventQuery::default()
    };
    let mut result = state.store.events(query.clone()).await;
    if let (Some(q), Ok((rows, _))) = (&q, &result) {
        if rows.is_empty() {
            result = state
                .store
                .events(crate::store::EventQuery {
                    transaction_id: None,
                    clickid: Some(q.clone()),
                    ..query
                })
                .await;
        }
    }
    let (events, events_next) = match result {
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
