//! Typed actions against peers in each API's role. Each stand-in answers the way its API's
//! documentation says, errors included; each test checks the exact request the API would
//! receive and the outcome postbackd records. E-mail goes to a real SMTP server
//! (aiosmtpd, `bash test.sh` installs it); Sheets' token endpoint checks the JWT's
//! signature as Google's does.

mod apis;
mod check;
mod email;
mod sheets;

use crate::delivery::{api, wait_state, TOKEN, WAIT};
use crate::support::*;
use serde_json::Value;
use sha2::Digest;
use std::process::Command;
use std::time::{Duration, Instant};

const SETTINGS: &str = "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n";

pub(crate) fn sha(v: &str) -> String {
    sha2::Sha256::digest(v.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn body_json(r: &Received) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

pub(crate) fn form(r: &Received) -> Vec<(String, String)> {
    form_urlencoded::parse(r.body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Starts the daemon on `rules` with the admin token and `env`.
pub(crate) fn daemon(
    rules: &str,
    env: &[(&str, &str)],
) -> (Daemon, tempfile::TempDir, tempfile::TempDir) {
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), SETTINGS, rules);
    let data = tempfile::tempdir().unwrap();
    let mut all = vec![("POSTBACKD_ADMIN_TOKEN", TOKEN)];
    all.extend_from_slice(env);
    let d = Daemon::start_with(cfg.path(), data.path(), &all);
    (d, cfg, data)
}

/// The one delivery of `postback`, once it is in `state`.
pub(crate) async fn finished(d: &Daemon, postback: &str, state: &str) -> Value {
    let start = Instant::now();
    loop {
        let (_, body) = send_json(api(
            d,
            reqwest::Method::GET,
            &format!("/api/v1/deliveries?postback={postback}"),
        ))
        .await;
        if let Some(id) = body["deliveries"][0]["id"].as_i64() {
            return wait_state(d, id, state).await;
        }
        assert!(
            start.elapsed() < WAIT,
            "no delivery of {postback}: {body}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `run_cli` with extra environment variables.
pub(crate) fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every dead delivery, in full, once there are `n` of them.
pub(crate) async fn dead_deliveries(d: &Daemon, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let (_, body) = send_json(api(
            d,
            reqwest::Method::GET,
            "/api/v1/deliveries?state=dead",
        ))
        .await;
        let rows = body["deliveries"].as_array().cloned().unwrap_or_default();
        if rows.len() >= n {
            let mut out = Vec::new();
            for r in rows {
                out.push(wait_state(d, r["id"].as_i64().unwrap(), "dead").await);
            }
            return out;
        }
        assert!(start.elapsed() < WAIT, "{body}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
