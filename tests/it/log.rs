//! The delivery log API and `postbackd deliveries`: every filter, pagination, retry by
//! hand, and the access rules (an affiliate sees its own postbacks and nothing else).

use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const ADMIN: &str = "log-admin-token-0123456789";
const AFF42: &str = "log-affiliate-42-token-0123";
const AFF7: &str = "log-affiliate-7-token-01234";

struct Setup {
    _sink: Sink,
    _cfg: tempfile::TempDir,
    _data: tempfile::TempDir,
    d: Daemon,
}

async fn setup() -> Setup {
    let sink = Sink::start().await;
    sink.respond(|r| {
        if r.path == "/crm" && r.param("tx").as_deref() == Some("T2") {
            (500, "crm down".into())
        } else {
            (200, "ok".into())
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:ADMIN}\"]\n  affiliate_tokens:\n    \"42\": \"${env:AFF42}\"\n    \"7\": \"${env:AFF7}\"\n",
        &format!(
            "postbacks:
  - id: aff42
    affiliate: 42
    trigger: conversion
    http: {{ url: \"http://{s}/a42?tx={{txid}}\" }}
  - id: aff7
    affiliate: 7
    trigger: conversion
    http: {{ url: \"http://{s}/a7?tx={{txid}}\" }}
  - id: crm
    trigger: conversion
    retry: []
    http: {{ url: \"http://{s}/crm?tx={{txid}}\" }}
",
            s = sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        cfg.path(),
        data.path(),
        &[("ADMIN", ADMIN), ("AFF42", AFF42), ("AFF7", AFF7)],
    );
    let events = json!([
        {"tid": "T1", "clickid": "c1", "offer_id": 1, "affiliate_id": 42, "goal": "sale", "status": "approved"},
        {"tid": "T2", "clickid": "c2", "offer_id": 1, "affiliate_id": 42, "goal": "lead", "status": "pending"},
        {"tid": "T3", "clickid": "c3", "offer_id": 2, "affiliate_id": 42, "goal": "sale", "status": "approved"},
        {"tid": "T4", "clickid": "c4", "offer_id": 2, "affiliate_id": 7, "goal": "sale", "status": "approved"},
        {"tid": "T5", "clickid": "c5", "offer_id": 1, "affiliate_id": 7, "goal": "lead", "status": "approved"},
        {"tid": "T6", "clickid": "c6", "offer_id": 3, "affiliate_id": 13, "status": "approved"},
    ]);
    let (code, body) = send_json(client().post(d.url("/v1/events")).json(&events)).await;
    assert_eq!(code, 200, "{body}");
    // 3 for affiliate 42, 2 for affiliate 7, 6 to the CRM: 11 deliveries, all finished.
    let start = Instant::now();
    loop {
        let v = list(&d, ADMIN, "limit=100").await;
        let rows = v["deliveries"].as_array().unwrap();
        if rows.len() == 11
            && rows
                .iter()
                .all(|r| r["state"] == "delivered" || r["state"] == "dead")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{v}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Setup {
        _sink: sink,
        _cfg: cfg,
        _data: data,
        d,
    }
}

async fn get(d: &Daemon, token: Option<&str>, path: &str) -> (u16, Value) {
    let rb = client().get(d.url(path));
    send_json(match token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    })
    .await
}

async fn list(d: &Daemon, token: &str, query: &str) -> Value {
    let (code, v) = get(d, Some(token), &format!("/api/v1/deliveries?{query}")).await;
    assert_eq!(code, 200, "{query}: {v}");
    v
}

/// (postback, transaction) of each delivery a query returns, sorted.
async fn found(d: &Daemon, token: &str, query: &str) -> Vec<String> {
    let v = list(d, token, query).await;
    let mut out: Vec<String> = v["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["postback"].as_str().unwrap(),
                r["transaction_id"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn every_filter_narrows_the_delivery_log() {
    let Setup { d, .. } = setup().await;
    assert_eq!(
        found(&d, ADMIN, "transaction_id=T1").await,
        ["aff42:T1", "crm:T1"]
    );
    assert_eq!(found(&d, ADMIN, "clickid=c4").await, ["aff7:T4", "crm:T4"]);
    assert_eq!(
        found(&d, ADMIN, "offer=2").await,
        ["aff42:T3", "aff7:T4", "crm:T3", "crm:T4"]
    );
    assert_eq!(found(&d, ADMIN, "affiliate=13").await, ["crm:T6"]);
    assert_eq!(
        found(&d, ADMIN, "goal=lead").await,
        ["aff42:T2", "aff7:T5", "crm:T2", "crm:T5"]
    );
    assert_eq!(
        found(&d, ADMIN, "postback=aff7").await,
        ["aff7:T4", "aff7:T5"]
    );
    assert_eq!(
        found(&d, ADMIN, "status=pending").await,
        ["aff42:T2", "crm:T2"]
    );
    assert_eq!(found(&d, ADMIN, "state=dead").await, ["crm:T2"]);
    assert_eq!(found(&d, ADMIN, "outcome=5xx").await, ["crm:T2"]);
    assert_eq!(
        found(&d, ADMIN, "postback=crm&goal=sale&offer=1").await,
        ["crm:T1"]
    );
    assert!(found(&d, ADMIN, "since=2100-01-01T00:00:00Z")
        .await
        .is_empty());
    assert!(found(&d, ADMIN, "until=2000-01-01T00:00:00Z")
        .await
        .is_empty());
    assert_eq!(
        found(&d, ADMIN, "since=2000-01-01T00:00:00Z&limit=100")
            .await
            .len(),
        11
    );
    // Bad filters are 400s with a reason, not empty pages.
    for bad in ["state=lost", "since=yesterday", "cursor=abc", "colour=red"] {
        let (code, v) = get(&d, Some(ADMIN), &format!("/api/v1/deliveries?{bad}")).await;
        assert_eq!(code, 400, "{bad}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
}

#[tokio::test]
async fn pages_follow_the_cursor_newest_first() {
    let Setup { d, .. } = setup().await;
    let mut ids = Vec::new();
    let mut query = "limit=4".to_string();
    let mut pages = 0;
    loop {
        let v = list(&d, ADMIN, &query).await;
        let rows = v["deliveries"].as_array().unwrap();
        assert!(rows.len() <= 4);
        ids.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => query = format!("limit=4&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 11);
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats: {ids:?}"
    );
}

#[tokio::test]
async fn an_affiliate_sees_its_own_postbacks_only() {
    let Setup { d, .. } = setup().await;
    assert_eq!(
        found(&d, AFF42, "limit=100").await,
        ["aff42:T1", "aff42:T2", "aff42:T3"]
    );
    assert_eq!(found(&d, AFF7, "").await, ["aff7:T4", "aff7:T5"]);
    // Asking for someone else's postback, or the admin's, finds nothing.
    assert!(found(&d, AFF42, "postback=aff7").await.is_empty());
    assert!(found(&d, AFF42, "postback=crm").await.is_empty());
    assert!(found(&d, AFF42, "affiliate=7").await.is_empty());
    let all = list(&d, ADMIN, "limit=100").await;
    for r in all["deliveries"].as_array().unwrap() {
        let (id, pb) = (r["id"].as_i64().unwrap(), r["postback"].as_str().unwrap());
        let (code, v) = get(&d, Some(AFF42), &format!("/api/v1/deliveries/{id}")).await;
        if pb == "aff42" {
            assert_eq!(code, 200, "{v}");
            assert_eq!(v["attempt_log"].as_array().unwrap().len(), 1);
        } else {
            assert_eq!(code, 404, "affiliate 42 read delivery {id} of {pb}: {v}");
        }
    }
    // Read only, and no event log, config or test button.
    let dead = list(&d, ADMIN, "state=dead").await["deliveries"][0]["id"]
        .as_i64()
        .unwrap();
    let (code, _) = send_json(
        client()
            .post(d.url(&format!("/api/v1/deliveries/{dead}/retry")))
            .bearer_auth(AFF42),
    )
    .await;
    assert_eq!(code, 403);
    for path in ["/api/v1/events", "/api/v1/config"] {
        assert_eq!(get(&d, Some(AFF42), path).await.0, 403, "{path}");
    }
    // No token, a wrong token: 401, no data.
    for token in [None, Some("not-a-token-at-all-0000")] {
        let (code, v) = get(&d, token, "/api/v1/deliveries").await;
        assert_eq!(code, 401);
        assert!(v.get("deliveries").is_none());
    }
}

#[tokio::test]
async fn the_event_log_shows_what_trackers_sent_and_what_it_matched() {
    let Setup { d, .. } = setup().await;
    let (code, v) = get(&d, Some(ADMIN), "/api/v1/events?transaction_id=T1").await;
    assert_eq!(code, 200, "{v}");
    let e = &v["events"][0];
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(e["clickid"], "c1");
    assert_eq!(e["source"], "default");
    assert_eq!(e["kind"], "conversion");
    assert_eq!(e["matched"], json!(["aff42", "crm"]));
    assert_eq!(e["event"]["fields"]["goal"], "sale");
    let (_, v) = get(&d, Some(ADMIN), "/api/v1/events?affiliate=7&limit=1").await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    let c = v["next_cursor"].as_str().unwrap().to_string();
    let (_, v2) = get(
        &d,
        Some(ADMIN),
        &format!("/api/v1/events?affiliate=7&limit=1&cursor={c}"),
    )
    .await;
    assert_eq!(v2["events"].as_array().unwrap().len(), 1);
    assert!(v2["next_cursor"].is_null());
    let seen: HashSet<&str> = [&v, &v2]
        .iter()
        .map(|x| x["events"][0]["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, HashSet::from(["T4", "T5"]));
}

#[tokio::test]
async fn the_deliveries_command_lists_shows_and_retries() {
    let Setup { d, _sink: sink, .. } = setup().await;
    let url = d.url("");
    let cli = move |args: Vec<String>| {
        let mut all = vec![
            "deliveries".to_string(),
            "--url".into(),
            url.clone(),
            "--token".into(),
            ADMIN.into(),
        ];
        all.extend(args);
        async move {
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                run_cli(&refs)
            })
            .await
            .unwrap()
        }
    };
    let (code, out, err) = cli(vec!["--state".into(), "dead".into()]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID "), "{out}");
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].contains("crm")
            && lines[1].contains("dead")
            && lines[1].contains("500 5xx")
            && lines[1].contains("T2"),
        "{out}"
    );
    let id = lines[1].split_whitespace().next().unwrap().to_string();

    let (code, out, _) = cli(vec!["show".into(), id.clone()]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("delivery {id}: postback crm")),
        "{out}"
    );
    assert!(out.contains("/crm?tx=T2 -> 500 5xx"), "{out}");
    assert!(out.contains("answer: crm down"), "{out}");

    sink.respond(|_| (200, "ok".into()));
    let (code, out, _) = cli(vec!["retry".into(), id.clone()]).await;
    assert_eq!((code, out.as_str()), (0, "queued again: 1 delivery\n"));
    let start = Instant::now();
    while !cli(vec!["show".into(), id.clone()])
        .await
        .1
        .contains("delivered")
    {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A wrong token is an error with the API's reason.
    let (code, _, err) = tokio::task::spawn_blocking({
        let url = d.url("");
        move || {
            run_cli(&[
                "deliveries",
                "--url",
                &url,
                "--token",
                "nope-nope-nope-nope",
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("401: unknown token"), "{err}");
}
