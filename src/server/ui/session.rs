//! Signing in and out: a token becomes a session cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` behind TLS) with a CSRF token of its own; wrong tokens are limited per address.

use super::*;
use axum::extract::Form;
use minijinja::context;
use serde::Deserialize;

const COOKIE: &str = "postbackd_session";
/// A session lasts this long (ms).
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// Wrong tokens allowed per client address per minute.
const LOGIN_TRIES: u32 = 5;
#[derive(Clone)]
pub(super) struct Session {
    pub(super) access: Access,
    pub(super) csrf: String,
    expires: i64,
}

/// A random token: 64 hex digits from the system's generator.
fn random() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Ui {
    pub(super) fn session(&self, headers: &HeaderMap) -> Option<Session> {
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

pub(super) async fn login_page(State(state): State<AppState>) -> Response {
    if !enabled(&state) {
        return off();
    }
    state.ui.render("login.html", context! {})
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

pub(super) async fn login(
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

pub(super) async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
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
