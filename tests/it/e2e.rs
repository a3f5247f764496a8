//! From a tracker's webhook to a postback received by a real HTTP server.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn shipped() -> (Sink, tempfile::TempDir, Daemon) {
    let sink = Sink::start().await;
    let cfg = config_for(&repo().join("config"), sink.addr);
    let d = Daemon::start(cfg.path());
    (sink, cfg, d)
}

#[tokio::test]
async fn get_postback_fires_matching_postbacks_with_encoded_macros() {
    let (sink, _cfg, d) = shipped().await;
    let (code, body) = get_json(&d.url(
        "/postback?clickid=a%20b&tid=T-1&offer_id=1001&goal=deposit&affiliate_id=42&payout=12.5&status=approved&country=DE",
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["matched"],
        json!(["affiliate-tracker", "aff42-deposits", "crm-deposits"])
    );
    assert_eq!(body["queued"], 3);
    assert!(body["event_id"].as_str().unwrap().len() == 36);

    let aff = sink.wait_for(Some("/aff42"), 1, WAIT).await;
    assert_eq!(aff.len(), 1, "{}", d.logs());
    assert_eq!(aff[0].method, "GET");
    assert_eq!(aff[0].query, "clickid=a%20b&payout=12.5&status=1&txid=T-1");
    let tracker = sink.wait_for(Some("/tracker"), 1, WAIT).await;
    assert_eq!(tracker[0].param("camp").as_deref(), Some("spring"));
    assert_eq!(tracker[0].param("cid").as_deref(), Some("a b"));
    // crm-deposits is held for a minute: nothing yet.
    assert!(sink.on_path("/crm/leads").is_empty());
    assert!(
        d.wait_log(
            "postback=aff42-deposits attempt=1 outcome=\"delivered\"",
            WAIT
        )
        .await,
        "{}",
        d.logs()
    );
}

#[tokio::test]
async fn repeats_fire_nothing_and_status_updates_fire_what_now_matches() {
    let (sink, _cfg, d) = shipped().await;
    let base = "/postback?clickid=c1&tid=T-2&offer_id=1001&goal=deposit&affiliate_id=42&payout=5";
    let (_, first) = get_json(&d.url(&format!("{base}&status=pending"))).await;
    assert_eq!(
        first["matched"],
        json!([]),
        "pending matches nothing in the shipped rules"
    );
    let (_, approved) = get_json(&d.url("/postback?tid=T-2&status=approved")).await;
    // The update carries only the status; the rest comes from the earlier conversion.
    assert_eq!(
        approved["matched"],
        json!(["affiliate-tracker", "aff42-deposits"])
    );
    assert_eq!(approved["queued"], 2);
    let (_, again) = get_json(&d.url("/postback?tid=T-2&status=approved")).await;
    assert_eq!(
        again["queued"], 0,
        "the same status twice fires nothing new"
    );
    let (_, rejected) = get_json(&d.url("/postback?tid=T-2&status=declined")).await;
    assert_eq!(rejected["matched"], json!(["aff42-deposits"]));
    let got = sink.wait_for(Some("/aff42"), 2, WAIT).await;
    let statuses: Vec<_> = got.iter().map(|r| r.param("status").unwrap()).collect();
    assert_eq!(statuses, vec!["1", "2"], "approved then rejected, in order");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.on_path("/aff42").len(), 2);
    assert_eq!(sink.on_path("/tracker").len(), 1);
}

#[tokio::test]
async fn post_form_json_batches_and_clicks() {
    let (sink, _cfg, d) = shipped().await;
    let c = client();
    // A form POST from Keitaro, with its secret and status words.
    let r = c
        .post(d.url("/postback/keitaro"))
        .form(&[
            ("subid", "k1"),
            ("status", "sale"),
            ("payout", "30"),
            ("offer_id", "1002"),
            ("goal", "lead"),
            ("token", "change-me"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    // Offer 1002 has goals switched off, so nutra-sales' `goal: sale` is ignored.
    assert_eq!(body["matched"], json!(["affiliate-tracker", "nutra-sales"]));
    let nutra = sink.wait_for(Some("/nutra"), 1, WAIT).await;
    assert_eq!(nutra[0].method, "POST");
    assert_eq!(
        nutra[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    // Form and query parameters go out in alphabetical order of their names.
    assert_eq!(nutra[0].body, "amount=30&cid=k1&goal=lead");
    let tracker = sink.wait_for(Some("/tracker"), 1, WAIT).await;
    assert_eq!(
        tracker[0].param("camp").as_deref(),
        Some("nutra"),
        "per-offer override"
    );
    assert!(
        !tracker[0].query.contains("change-me"),
        "the secret is never forwarded"
    );

    // Affise with its secret in a header and a numeric status.
    let r = c
        .post(d.url("/postback/affise"))
        .header("X-Postback-Secret", "change-me-too")
        .json(&json!({"clickid": "af1", "status": 1, "offer": 1001, "goal": "registration", "payout": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["matched"], json!(["affiliate-tracker"]));

    // A batch of events: a click and a conversion.
    let r = c
        .post(d.url("/v1/events"))
        .json(&json!([{"kind": "click", "clickid": "c9", "offer_id": 1001, "sub1": "fb ads"}, {"clickid": "c10", "status": "pending"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["events"][0]["matched"], json!(["click-counter"]));
    let clicks = sink.wait_for(Some("/clicks"), 1, WAIT).await;
    assert_eq!(clicks[0].query, "cid=c9&offer=1001&sub1=fb%20ads");
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_reason() {
    let (_sink, _cfg, d) = shipped().await;
    let c = client();
    for (url, code, needle) in [
        ("/postback?clickid=x&payout=ten", 400, "payout"),
        ("/postback?payout=1", 400, "transaction_id or a clickid"),
        ("/postback?clickid=x&status=maybe", 400, "unknown status"),
        (
            "/postback?clickid=x&kind=purchase",
            400,
            "unknown event kind",
        ),
        ("/postback/keitaro?subid=x", 401, "requires its secret"),
        ("/postback/keitaro?subid=x&token=nope", 401, "wrong secret"),
        ("/postback/nosuch?clickid=x", 404, "unknown source"),
        ("/nowhere", 404, "no such endpoint"),
        // Found by the webhook fuzz test: a wrong method had a bodiless 405.
        ("/v1/events", 405, "GET is not allowed on /v1/events"),
    ] {
        let (got, body) = get_json(&d.url(url)).await;
        assert_eq!(got, code, "{url}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{url}: {body}"
        );
    }
    let r = c
        .post(d.url("/v1/events"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(d.url("/v1/events"))
        .json(&json!([{"clickid": "ok"}, {"clickid": "x", "payout": "ten"}, {"nested": {"a": 1}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(body["errors"][0]["index"], 1);
    let r = c
        .post(d.url("/postback"))
        .header("content-type", "text/xml")
        .body("<x/>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let (code, _) = get_json(&d.url("/postback?clickid=still-alive&status=approved")).await;
    assert_eq!(code, 200, "the daemon survives all of it");
}

#[tokio::test]
async fn json_post_with_auth_headers_typed_values_and_body_judged_success() {
    let sink = Sink::start().await;
    sink.respond(|r| {
        if r.body.contains("\"bad\"") {
            (200, r#"{"code":1}"#.into())
        } else {
            (200, r#"{"code":0}"#.into())
        }
    });
    let cfg = config_for(&repo().join("examples/json-post"), sink.addr);
    let d = Daemon::start(cfg.path());
    let (code, body) = get_json(&d.url(
        "/postback?clickid=c&tid=T9&payout=19.99&email=%20John@Example.COM&phone=%2B1%20(555)%20010-9999&ip=1.2.3.4&timestamp=1700000000",
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    let got = sink.wait_for(Some("/api/conversions"), 1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.header("authorization"), Some("Bearer dev-token"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id").unwrap().len(), 36);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        v["value"],
        json!(19.99),
        "a whole expression keeps its number type"
    );
    assert_eq!(v["event_id"], "T9");
    assert_eq!(v["currency"], "USD");
    assert_eq!(
        v["user"]["email"],
        "855f96e983f1f8e8be944692b6f719fd54329826cb62e98015efee8e2e071dd4"
    );
    assert_eq!(v["user"]["ip"], "1.2.3.4");
    assert_eq!(v["time"], "2023-11-14 23:13:20");
    assert!(
        d.wait_log("postback=crm-json attempt=1 outcome=\"delivered\"", WAIT)
            .await,
        "{}",
        d.logs()
    );

    // The API answers 200 with code 1: that is a failure, logged as such.
    let (code, _) = get_json(&d.url("/postback?clickid=c2&tid=bad&payout=1")).await;
    assert_eq!(code, 200);
    assert!(
        d.wait_log("outcome=\"body_rejected\"", WAIT).await,
        "{}",
        d.logs()
    );
}

#[tokio::test]
async fn failures_are_retried_and_dead_ends_are_not() {
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        format!(
            r#"postbacks:
  - id: flaky
    trigger: conversion
    retry: [100ms, 100ms]
    http:
      url: "http://{addr}/flaky?cid={{clickid}}"
  - id: refused
    trigger: conversion
    retry: [100ms]
    http:
      url: "http://{addr}/refused?cid={{clickid}}"
"#,
            addr = sink.addr
        ),
    )
    .unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen.clone();
    sink.respond(move |r| {
        if r.path == "/refused" {
            return (400, "bad click id".into());
        }
        if s.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            (503, "busy".into())
        } else {
            (200, "ok".into())
        }
    });
    let d = Daemon::start(dir.path());
    let (code, _) = get_json(&d.url("/postback?clickid=r1")).await;
    assert_eq!(code, 200);
    let flaky = sink.wait_for(Some("/flaky"), 3, WAIT).await;
    assert_eq!(flaky.len(), 3, "two 503s then a 200: {}", d.logs());
    assert!(
        d.wait_log("postback=flaky attempt=3 outcome=\"delivered\"", WAIT)
            .await
    );
    // The attempt's own record says no retry follows: the delivery is dead after it.
    assert!(
        d.wait_log(
            "postback=refused attempt=1 outcome=\"4xx\" status=400",
            WAIT
        )
        .await,
        "{}",
        d.logs()
    );
    let line = d
        .logs()
        .lines()
        .find(|l| l.contains("postback=refused attempt=1"))
        .unwrap()
        .to_string();
    assert!(line.contains("next=\"dead\""), "a 400 is final: {line}");
    // A marker sent after: once it has arrived, a retry of the first (due 100 ms after
    // the first attempt, long before the marker was sent) would have too.
    get_json(&d.url("/postback?clickid=r2")).await;
    let start = std::time::Instant::now();
    while sink
        .on_path("/refused")
        .iter()
        .all(|r| r.param("cid").as_deref() != Some("r2"))
    {
        assert!(start.elapsed() < WAIT, "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first: Vec<_> = sink
        .on_path("/refused")
        .into_iter()
        .filter(|r| r.param("cid").as_deref() == Some("r1"))
        .collect();
    assert_eq!(first.len(), 1, "a 400 is final");
}

#[tokio::test]
async fn a_dead_destination_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        "postbacks:\n  - id: nowhere\n    trigger: conversion\n    retry: [50ms]\n    http:\n      url: \"http://127.0.0.1:9/x?c={clickid}\"\n",
    )
    .unwrap();
    let d = Daemon::start(dir.path());
    let (code, _) = get_json(&d.url("/postback?clickid=z")).await;
    assert_eq!(code, 200);
    assert!(
        d.wait_log("postback=nowhere attempt=2 outcome=\"connect\"", WAIT)
            .await,
        "{}",
        d.logs()
    );
    assert!(d.wait_log("next=\"dead\"", WAIT).await, "{}", d.logs());
    let (code, _) = get_json(&d.url("/-/ready")).await;
    assert_eq!(code, 200);
}

/// Money is sent as it arrived: no float in between, from a query string or a JSON body.
#[tokio::test]
async fn amounts_are_sent_as_received() {
    let (sink, _cfg, d) = shipped().await;
    let (code, body) = get_json(&d.url(
        "/postback?clickid=m1&tid=M-1&offer_id=1001&goal=deposit&affiliate_id=42&payout=12345678901234567890&status=approved",
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    let r = client()
        .post(d.url("/postback"))
        .header("content-type", "application/json")
        .body(r#"{"clickid":"m2","tid":"M-2","offer_id":1001,"goal":"deposit","affiliate_id":42,"payout":12.50,"status":"approved"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let got = sink.wait_for(Some("/aff42"), 2, WAIT).await;
    let mut payouts: Vec<String> = got.iter().map(|r| r.param("payout").unwrap()).collect();
    payouts.sort();
    assert_eq!(payouts, ["12.50", "12345678901234567890"], "{}", d.logs());
}
