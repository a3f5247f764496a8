//! The web page in a real browser: Debian's chromium driven by playwright-core
//! (`tests/browser/ui.mjs`, installed by `test.sh`) against the real daemon with real
//! deliveries to a local sink. Screenshots of each page land in `target/ui-screenshots/`.

use crate::support::*;
use serde_json::json;
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-token-0123456789";
const AFF42: &str = "affiliate-42-token-abcdef";
const AFF7: &str = "affiliate-7-token-abcdefg";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_in_a_real_browser() {
    let sink = Sink::start().await;
    // Affiliate 42's tracker refuses T2 (a 400 is final: dead at once) until the test is
    // ready to retry it.
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let r = refuse.clone();
    sink.respond(move |req| {
        if req.path == "/a42"
            && req.param("tx").as_deref() == Some("T2")
            && r.load(std::sync::atomic::Ordering::SeqCst)
        {
            (400, "unknown click id".into())
        } else {
            (200, "ok".into())
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:ADMIN}\"]\n  affiliate_tokens:\n    \"42\": \"${env:AFF42}\"\n    \"7\": \"${env:AFF7}\"\n",
        &format!(
            "sources:
  - id: keitaro
    secret: ${{env:KSECRET}}
postbacks:
  - id: aff42
    affiliate: 42
    trigger: conversion
    http: {{ url: \"http://{s}/a42?tx={{txid}}&cid={{clickid}}\" }}
  - id: aff7
    affiliate: 7
    trigger: conversion
    http: {{ url: \"http://{s}/a7?tx={{txid}}&cid={{clickid}}\" }}
",
            s = sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        cfg.path(),
        data.path(),
        &[
            ("ADMIN", ADMIN),
            ("AFF42", AFF42),
            ("AFF7", AFF7),
            ("KSECRET", "the-keitaro-secret"),
        ],
    );
    // Two refused webhooks for the incoming page: a wrong secret, an unknown source.
    let r = client()
        .get(d.url("/postback/keitaro?clickid=k1&status=approved&token=not-the-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(d.url("/postback/nosuchsource?clickid=k2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let events = json!([
        {"tid": "T1", "clickid": "c1", "offer_id": 1, "affiliate_id": 42, "status": "approved"},
        {"tid": "T2", "clickid": "c2", "offer_id": 1, "affiliate_id": 42, "status": "approved"},
        {"tid": "T3", "clickid": "c3", "offer_id": 2, "affiliate_id": 42, "status": "approved"},
        {"tid": "T4", "clickid": "c4", "offer_id": 2, "affiliate_id": 7, "status": "approved"},
        {"tid": "T5", "clickid": "c5", "offer_id": 1, "affiliate_id": 7, "status": "approved"},
        {"tid": "T6", "clickid": "c6", "offer_id": 1, "affiliate_id": 7, "status": "approved"},
    ]);
    let (code, body) = send_json(client().post(d.url("/v1/events")).json(&events)).await;
    assert_eq!(code, 200, "{body}");
    // Wait until all six are finished; find the dead one and one of affiliate 7's.
    let started = Instant::now();
    let (dead, other) = loop {
        let (_, v) = send_json(
            client()
                .get(d.url("/api/v1/deliveries?limit=100"))
                .bearer_auth(ADMIN),
        )
        .await;
        let rows = v["deliveries"].as_array().cloned().unwrap_or_default();
        let done = rows.len() == 6
            && rows
                .iter()
                .all(|r| r["state"] == "delivered" || r["state"] == "dead");
        if done {
            let id = |f: &dyn Fn(&serde_json::Value) -> bool| {
                rows.iter()
                    .find(|r| f(r))
                    .map(|r| r["id"].as_i64().unwrap())
            };
            break (
                id(&|r| r["state"] == "dead").expect("T2 is dead"),
                id(&|r| r["postback"] == "aff7").expect("one of affiliate 7's"),
            );
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    let browser_dir = repo().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: bash test.sh installs it (npm ci in tests/browser)"
    );
    let shots = repo().join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let base = d.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("ui.mjs")
            .current_dir(&browser_dir)
            .env("BASE", base)
            .env("ADMIN", ADMIN)
            .env("AFF42", AFF42)
            .env("DEAD", dead.to_string())
            .env("OTHER", other.to_string())
            .env("SHOTS", &shots)
            .output()
            .expect("node (Debian's nodejs)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser's checks failed:\n{stdout}\n{stderr}\n{}",
        d.logs()
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    for shot in [
        "login",
        "deliveries",
        "deliveries-filtered",
        "delivery-dead",
        "delivery-retried",
        "health",
        "affiliate",
    ] {
        let p = repo().join(format!("target/ui-screenshots/{shot}.png"));
        assert!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "no screenshot {}",
            p.display()
        );
    }
}

/// Without a token configured the page is off; with one, wrong tokens are limited per
/// address (the sixth in a minute is refused before it is checked), and the session cookie
/// is what a browser must keep to itself.
#[tokio::test]
async fn the_page_is_off_without_tokens_and_limits_wrong_ones() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", "postbacks: []\n");
    let d = Daemon::start(cfg.path());
    let r = client().get(d.url("/ui/deliveries")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    drop(d);
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:ADMIN}\"]\n",
        "postbacks: []\n",
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("ADMIN", ADMIN)]);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .get(d.url("/ui/deliveries"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login");
    for _ in 0..5 {
        let r = no_redirects
            .post(d.url("/ui/login"))
            .form(&[("token", "wrong-wrong-wrong")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = no_redirects
        .post(d.url("/ui/login"))
        .form(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "even the right token waits out the minute");
    assert_eq!(r.headers()["retry-after"], "60");
}
