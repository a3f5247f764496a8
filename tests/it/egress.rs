//! Where deliveries may connect, against the real binary: loopback, private and link-local
//! addresses are refused however a URL writes them (a literal, a name that resolves there,
//! a decimal number, IPv4 inside IPv6), the attempt is recorded as `blocked` and not
//! retried; `delivery.allow_networks` opens what a deployment needs; `check` warns.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const TOKEN: &str = "egress-admin-token-0123456789";

fn rules(port: u16) -> String {
    let mut out = String::from("postbacks:\n");
    for (id, url) in [
        ("literal", format!("http://127.0.0.1:{port}/literal")),
        ("named", format!("http://localhost:{port}/named")),
        ("decimal", format!("http://2130706433:{port}/decimal")),
        ("mapped", format!("http://[::ffff:127.0.0.1]:{port}/mapped")),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data".to_string(),
        ),
    ] {
        out.push_str(&format!(
            "  - id: {id}\n    trigger: conversion\n    retry: [100ms, 100ms]\n    http: {{ url: \"{url}?c={{clickid}}\" }}\n"
        ));
    }
    out
}

async fn final_state(d: &Daemon, id: i64) -> Value {
    let start = Instant::now();
    loop {
        let (_, v) = send_json(
            client()
                .get(d.url(&format!("/api/v1/deliveries/{id}")))
                .bearer_auth(TOKEN),
        )
        .await;
        if v["state"] != "pending" {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{v}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(allow: &str) -> (Sink, [tempfile::TempDir; 2], Daemon) {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let settings = format!("api:\n  admin_tokens: [\"${{env:POSTBACKD_ADMIN_TOKEN:-}}\"]\n{allow}");
    write_config(cfg.path(), &settings, &rules(sink.addr.port()));
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_exactly(
        cfg.path(),
        data.path(),
        &[("POSTBACKD_ADMIN_TOKEN", TOKEN)],
        &[],
    );
    (sink, [cfg, data], d)
}

#[tokio::test]
async fn internal_addresses_are_blocked_however_they_are_written() {
    let (sink, [cfg, _data], d) = start("").await;
    let (code, body) = get_json(&d.url("/postback?clickid=x1")).await;
    assert_eq!(code, 200, "{body}");
    let ids: Vec<i64> = serde_json::from_value(body["deliveries"].clone()).unwrap();
    assert_eq!(ids.len(), 5, "{body}");
    for id in ids {
        let v = final_state(&d, id).await;
        assert_eq!(v["state"], "dead", "{v}");
        let log = v["attempt_log"].as_array().unwrap();
        assert_eq!(log.len(), 1, "a blocked attempt is not retried: {v}");
        assert_eq!(log[0]["outcome"], "blocked", "{v}");
        let why = log[0]["error"].as_str().unwrap();
        assert!(why.contains("allow it with delivery.allow_networks"), "{v}");
        if v["postback"] == "metadata" {
            assert!(why.contains("169.254.169.254 is link-local"), "{v}");
        }
        if v["postback"] == "named" {
            assert!(why.contains("`localhost` resolves to"), "{v}");
        }
    }
    assert!(sink.received().is_empty(), "{:?}", sink.received());
    let text = scrape(&d).await;
    assert!(
        text.contains("postbackd_attempts_total{postback=\"metadata\",result=\"blocked\"} 1\n"),
        "{text}"
    );
    // `check` says so before a deploy, for the literal addresses.
    let (code, _, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for id in ["literal", "decimal", "mapped", "metadata"] {
        assert!(
            err.contains(&format!("postback `{id}` sends to")),
            "{id}: {err}"
        );
    }
    assert!(err.contains("169.254.169.254 is link-local"), "{err}");
}

#[tokio::test]
async fn allowed_networks_and_hosts_are_reached() {
    let (sink, _cfg, d) = start("delivery:\n  allow_networks: [127.0.0.1/32, localhost]\n").await;
    let (code, body) = get_json(&d.url("/postback?clickid=x2")).await;
    assert_eq!(code, 200, "{body}");
    for p in ["/literal", "/named", "/decimal"] {
        assert!(
            sink.wait_for(Some(p), 1, Duration::from_secs(5))
                .await
                .len()
                == 1,
            "{p} was not delivered: {}",
            d.logs()
        );
    }
    // The metadata address stays blocked: only what is named is opened.
    let ids: Vec<i64> = serde_json::from_value(body["deliveries"].clone()).unwrap();
    for id in ids {
        let v = final_state(&d, id).await;
        if v["postback"] == "metadata" {
            assert_eq!(v["last_outcome"], "blocked", "{v}");
        }
    }
}
