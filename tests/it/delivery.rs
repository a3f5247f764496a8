//! Delivery under trouble: dead and slow destinations, rate limits, retries by hand and
//! retention of the delivery log.

use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub(crate) const TOKEN: &str = "test-admin-token-0123456789";
pub(crate) const WAIT: Duration = Duration::from_secs(15);

fn conversions(n: usize, prefix: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"clickid": format!("{prefix}{i}"), "status": "approved"}))
            .collect(),
    )
}

pub(crate) async fn post_events(d: &Daemon, events: Value) -> Value {
    let (code, body) = send_json(client().post(d.url("/v1/events")).json(&events)).await;
    assert_eq!(code, 200, "{body}");
    body
}

/// The first delivery of each event of a `/v1/events` answer.
fn first_deliveries(body: &Value) -> Vec<i64> {
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["deliveries"][0].as_i64().unwrap())
        .collect()
}

pub(crate) fn api(d: &Daemon, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    client().request(method, d.url(path)).bearer_auth(TOKEN)
}

/// A destination that accepts connections and never answers holds only its own slots:
/// every postback to a healthy destination arrives while the dead one hangs.
#[tokio::test]
async fn a_dead_destination_does_not_slow_a_healthy_one() {
    let sink = Sink::start().await;
    let hole = BlackHole::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "delivery:\n  concurrency: 8\n  per_destination: 2\n",
        &format!(
            "postbacks:
  - id: dead
    trigger: conversion
    http: {{ url: \"http://{hole}/x?cid={{clickid}}\", timeout: 60s }}
  - id: ok
    trigger: conversion
    http: {{ url: \"http://{sink}/ok?cid={{clickid}}\" }}
",
            hole = hole.addr,
            sink = sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    post_events(&d, conversions(40, "c")).await;
    let got = sink.wait_for(Some("/ok"), 40, WAIT).await;
    assert_eq!(got.len(), 40, "{}", d.logs());
    // The dead destination never had more than its own two slots.
    assert!(
        hole.connections() <= 2,
        "{} connections",
        hole.connections()
    );
    assert!(hole.connections() >= 1);
}

/// New deliveries go to the dispatcher straight from the commit; past what it holds in
/// memory for one destination they wait in the store for a claim. Either way each one is
/// sent once, with no crash in between.
#[tokio::test]
async fn a_burst_past_the_handoff_buffer_is_delivered_exactly_once() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "delivery:\n  per_destination: 2\n",
        &format!(
            "postbacks:\n  - id: ok\n    trigger: conversion\n    http: {{ url: \"http://{}/ok?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    // Three batches of 1,000 land faster than two slots drain them: the dispatcher holds
    // 512 and the rest are claimed from the store.
    for b in 0..3 {
        post_events(&d, conversions(1000, &format!("b{b}-"))).await;
    }
    let got = sink
        .wait_for(Some("/ok"), 3000, Duration::from_secs(60))
        .await;
    assert_eq!(got.len(), 3000, "{}", d.logs());
    // A marker queued after the burst: once it has arrived, a duplicate of the burst
    // would have too (the queue goes out in order of due time).
    post_events(&d, conversions(1, "marker-")).await;
    let start = Instant::now();
    while !sink
        .on_path("/ok")
        .iter()
        .any(|r| r.param("cid").as_deref() == Some("marker-0"))
    {
        assert!(
            start.elapsed() < WAIT,
            "the marker never arrived: {}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cids: Vec<String> = sink
        .on_path("/ok")
        .iter()
        .filter_map(|r| r.param("cid"))
        .filter(|c| c != "marker-0")
        .collect();
    let distinct: std::collections::HashSet<&String> = cids.iter().collect();
    assert_eq!(distinct.len(), 3000);
    assert_eq!(cids.len(), 3000, "duplicates were sent");
}

/// `rate: 5/s` on a destination: a burst of one second, then five a second.
#[tokio::test]
async fn a_destination_rate_limit_spaces_attempts() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        &format!(
            "delivery:\n  destinations:\n    \"{}\": {{ rate: 5/s }}\n",
            sink.addr
        ),
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    post_events(&d, conversions(15, "r")).await;
    let got = sink.wait_for(Some("/pb"), 15, WAIT).await;
    assert_eq!(got.len(), 15, "{}", d.logs());
    // 5 at once, then 10 more at 5/s: at least two seconds from first to last.
    let spread = got[14].at - got[0].at;
    assert!(spread >= Duration::from_millis(1600), "{spread:?}");
    let first_second = got
        .iter()
        .filter(|r| r.at - got[0].at < Duration::from_millis(900))
        .count();
    assert!(first_second <= 10, "{first_second} in the first second");
}

/// A 429 with `Retry-After: 2` postpones the retry for two seconds, whatever the schedule.
#[tokio::test]
async fn retry_after_is_honoured() {
    let sink = Sink::start().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = calls.clone();
    sink.respond(move |_| {
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            (429, "slow down".into())
        } else {
            (200, "ok".into())
        }
    });
    sink.set_headers(&[("retry-after", "2")]);
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    retry: [100ms, 100ms]\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    post_events(&d, conversions(1, "t")).await;
    let got = sink.wait_for(Some("/pb"), 2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", d.logs());
    let waited = got[1].at - got[0].at;
    assert!(
        waited >= Duration::from_millis(1900),
        "retried after {waited:?}"
    );
    assert!(
        d.wait_log("outcome=\"4xx\" status=429", Duration::from_secs(5))
            .await,
        "{}",
        d.logs()
    );
}

/// A dead delivery stays in the log with its attempts, and an admin can queue it again,
/// one by one or in bulk.
#[tokio::test]
async fn dead_deliveries_are_kept_and_retried_by_hand() {
    let sink = Sink::start().await;
    sink.respond(|_| (500, "down".into()));
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    retry: [100ms]\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("POSTBACKD_ADMIN_TOKEN", TOKEN)]);
    let body = post_events(&d, conversions(3, "h")).await;
    let ids = first_deliveries(&body);
    // Two attempts each (the first and one retry), then dead.
    assert_eq!(sink.wait_for(Some("/pb"), 6, WAIT).await.len(), 6);
    let dead = wait_state(&d, ids[0], "dead").await;
    assert_eq!(dead["attempts"], 2);
    let log = dead["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["response_status"], 500);
    assert_eq!(log[0]["response_body"], "down");
    assert_eq!(log[1]["outcome"], "5xx");
    assert!(log[0]["url"].as_str().unwrap().ends_with("/pb?cid=h0"));
    assert_eq!(log[0]["config_version"].as_str().unwrap().len(), 12);

    // No token, a wrong token: 401 and nothing queued.
    let path = format!("/api/v1/deliveries/{}/retry", ids[0]);
    let (code, _) = send_json(client().post(d.url(&path))).await;
    assert_eq!(code, 401);
    let (code, _) = send_json(client().post(d.url(&path)).bearer_auth("nope")).await;
    assert_eq!(code, 401);
    let (code, _) = send_json(client().get(d.url(&format!("/api/v1/deliveries/{}", ids[0])))).await;
    assert_eq!(code, 401);

    sink.respond(|_| (200, "ok".into()));
    let (code, body) = send_json(api(&d, reqwest::Method::POST, &path)).await;
    assert_eq!((code, &body["queued"]), (200, &json!([ids[0]])), "{body}");
    let done = wait_state(&d, ids[0], "delivered").await;
    assert_eq!(done["attempts"], 3);
    assert_eq!(done["attempt_log"][2]["outcome"], "delivered");
    // Only finished deliveries can be retried; unknown ones are 404.
    let (code, _) = send_json(api(
        &d,
        reqwest::Method::POST,
        "/api/v1/deliveries/999/retry",
    ))
    .await;
    assert_eq!(code, 404);

    // Bulk: every dead delivery of `pb` since an hour ago.
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    let (code, body) = send_json(
        api(&d, reqwest::Method::POST, "/api/v1/deliveries/retry")
            .json(&json!({"postback": "pb", "since": since})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let mut queued: Vec<i64> = serde_json::from_value(body["queued"].clone()).unwrap();
    queued.sort();
    let mut rest = ids[1..].to_vec();
    rest.sort();
    assert_eq!(queued, rest);
    for id in &ids[1..] {
        wait_state(&d, *id, "delivered").await;
    }
    // A filter naming an unknown postback is a 400, not an empty success.
    let (code, body) = send_json(
        api(&d, reqwest::Method::POST, "/api/v1/deliveries/retry")
            .json(&json!({"postback": "pbb"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
}

/// Finished deliveries leave the log after `retention`; pending ones stay.
#[tokio::test]
async fn retention_prunes_finished_deliveries_only() {
    let sink = Sink::start().await;
    sink.respond(|r| {
        if r.path == "/fail" {
            (503, "busy".into())
        } else {
            (200, "ok".into())
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "retention: 3s\ndelivery:\n  max_age: 2s\napi:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
        &format!(
            "postbacks:
  - id: ok
    trigger: conversion
    http: {{ url: \"http://{sink}/ok?cid={{clickid}}\" }}
  - id: failing
    trigger: conversion
    retry: [300ms, 300ms, 300ms, 300ms, 300ms, 300ms, 300ms, 300ms, 300ms, 300ms, 300ms, 300ms]
    http: {{ url: \"http://{sink}/fail?cid={{clickid}}\" }}
",
            sink = sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("POSTBACKD_ADMIN_TOKEN", TOKEN)]);
    let body = post_events(&d, conversions(1, "p")).await;
    let ok = body["events"][0]["deliveries"][0].as_i64().unwrap();
    let failing = body["events"][0]["deliveries"][1].as_i64().unwrap();
    wait_state(&d, ok, "delivered").await;
    // Gone once a second has passed since it finished.
    let start = Instant::now();
    loop {
        let (code, _) = send_json(api(
            &d,
            reqwest::Method::GET,
            &format!("/api/v1/deliveries/{ok}"),
        ))
        .await;
        if code == 404 {
            break;
        }
        assert!(start.elapsed() < WAIT, "delivery {ok} was never pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The failing one was retried until max_age and finished later than the one delivered:
    // kept for now.
    let (code, body) = send_json(api(
        &d,
        reqwest::Method::GET,
        &format!("/api/v1/deliveries/{failing}"),
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body["attempts"].as_u64().unwrap() >= 2, "{body}");
    // Its event is older than the retention too, yet kept while the delivery is: the log
    // still finds the delivery by the event's click id.
    let (code, body) = send_json(api(
        &d,
        reqwest::Method::GET,
        "/api/v1/deliveries?clickid=p0",
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    let ids: Vec<i64> = body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [failing], "{body}");
}

pub(crate) async fn wait_state(d: &Daemon, id: i64, state: &str) -> Value {
    let start = Instant::now();
    loop {
        let (code, body) = send_json(api(
            d,
            reqwest::Method::GET,
            &format!("/api/v1/deliveries/{id}"),
        ))
        .await;
        assert_eq!(code, 200, "{body}");
        if body["state"] == state {
            return body;
        }
        assert!(
            start.elapsed() < WAIT,
            "delivery {id} never became {state}: {body}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A template that loops over a long value passes `check`, but its render stops after a
/// bounded number of steps and fails as a render error; meanwhile health checks, webhooks and
/// other postbacks are served, because renders run off the threads that serve HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_template_fails_as_a_render_error_and_stalls_nothing() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let settings = "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN:-}\"]\n";
    write_config(
        cfg.path(),
        settings,
        &format!(
            "postbacks:
  - id: heavy
    trigger: conversion
    retry: [1s]
    http:
      url: \"http://{s}/heavy?n={{% for a in clickid %}}{{% for b in clickid %}}{{% for c in clickid %}}{{% endfor %}}{{% endfor %}}{{% endfor %}}{{{{ clickid | length }}}}\"
  - id: light
    trigger: conversion
    http: {{ url: \"http://{s}/light?cid={{clickid}}\" }}
",
            s = sink.addr
        ),
    );
    let (code, out, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 0, "the template is valid: {out}{err}");
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("POSTBACKD_ADMIN_TOKEN", TOKEN)]);
    let long = "x".repeat(600);
    let mut ids = Vec::new();
    for i in 0..2 {
        let (code, body) =
            get_json(&d.url(&format!("/postback?clickid={long}{i}&status=approved"))).await;
        assert_eq!(code, 200, "{body}");
        ids.push(body["deliveries"][0].as_i64().unwrap());
    }
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for i in 0..10 {
        let r = quick.get(d.url("/-/healthy")).send().await;
        assert!(
            r.map(|r| r.status() == 200).unwrap_or(false),
            "health check {i} was not answered within 2 s"
        );
        let r = quick
            .get(d.url(&format!("/postback?clickid=small{i}")))
            .send()
            .await;
        assert!(
            r.map(|r| r.status() == 200).unwrap_or(false),
            "webhook {i} was not answered within 2 s"
        );
    }
    let got = sink.wait_for(Some("/light"), 12, WAIT).await;
    assert_eq!(got.len(), 12);
    for id in ids {
        let start = Instant::now();
        let attempt = loop {
            let (_, v) = send_json(api(
                &d,
                reqwest::Method::GET,
                &format!("/api/v1/deliveries/{id}"),
            ))
            .await;
            if let Some(a) = v["attempt_log"].as_array().and_then(|l| l.first()).cloned() {
                break a;
            }
            assert!(start.elapsed() < WAIT, "{v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(attempt["outcome"], "render_error", "{attempt}");
        assert!(
            attempt["error"]
                .as_str()
                .unwrap()
                .contains("stopped after 100000 steps"),
            "{attempt}"
        );
    }
    // Only the short click ids rendered (each is 6 characters long).
    for r in sink.on_path("/heavy") {
        assert_eq!(r.param("n").as_deref(), Some("6"), "{r:?}");
    }
}

/// A destination that keeps failing is paused: its deliveries stay pending (never dead,
/// however short their schedule), one probe goes out at a time, `/-/ready` and `/metrics`
/// say so, and once a probe succeeds the backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_is_paused_probed_and_resumed() {
    let sink = Sink::start().await;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let u = up.clone();
    sink.respond(move |_| {
        if u.load(std::sync::atomic::Ordering::SeqCst) {
            (200, "ok".into())
        } else {
            (503, "down".into())
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\ndelivery:\n  pause_after: 3\n  probe_every: 1s\n  per_destination: 1\n",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    retry: [50ms, 50ms]\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("POSTBACKD_ADMIN_TOKEN", TOKEN)]);
    let body = post_events(&d, conversions(10, "p")).await;
    let ids = first_deliveries(&body);
    assert!(d.wait_log("destination paused", WAIT).await, "{}", d.logs());
    let dest = sink.addr.to_string();
    let ready = client().get(d.url("/-/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "paused is not unready");
    let text = ready.text().await.unwrap();
    assert!(
        text.contains(&format!("destination {dest} paused since")),
        "{text}"
    );
    let metrics = scrape(&d).await;
    assert!(
        metrics.contains(&format!(
            "postbackd_destination_paused{{destination=\"{dest}\"}} 1\n"
        )),
        "{metrics}"
    );

    // Paused: about one probe a second, and nothing dies.
    let before = sink.received().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let probes = sink.received().len() - before;
    assert!(
        (1..=4).contains(&probes),
        "{probes} requests in 2.5 s while paused"
    );
    for id in &ids {
        let (_, v) = send_json(api(
            &d,
            reqwest::Method::GET,
            &format!("/api/v1/deliveries/{id}"),
        ))
        .await;
        assert_eq!(
            v["state"], "pending",
            "a paused destination's delivery died: {v}"
        );
    }

    // It comes back: the next probe succeeds and the backlog drains.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        d.wait_log("destination resumed", WAIT).await,
        "{}",
        d.logs()
    );
    for id in &ids {
        wait_state(&d, *id, "delivered").await;
    }
    let metrics = scrape(&d).await;
    assert!(
        metrics.contains(&format!(
            "postbackd_destination_paused{{destination=\"{dest}\"}} 0\n"
        )),
        "{metrics}"
    );
    let text = client()
        .get(d.url("/-/ready"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("paused"), "{text}");
}
