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
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::Environment;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

mod deliveries;
mod incoming;
mod session;
mod status;

use deliveries::{deliveries, delivery, retry};
use incoming::incoming;
use session::{login, login_page, logout, Session};
use status::{health, rules};

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
