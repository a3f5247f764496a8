//! The rule-change tools against the real binary: `test`, `fire` and `diff`.

use crate::support::*;
use std::time::Duration;

fn shipped_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs = vec![repo().join("config")];
    for e in std::fs::read_dir(repo().join("examples")).unwrap() {
        dirs.push(e.unwrap().path());
    }
    dirs.sort();
    dirs
}

/// The shipped config and every example come with rule tests, and they pass.
#[test]
fn shipped_config_and_examples_pass_their_rule_tests() {
    for dir in shipped_dirs() {
        let (code, out, err) = run_cli(&["test", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{}:\n{out}{err}", dir.display());
        assert!(out.contains(" 0 failed"), "{out}");
        // The count of passed tests, read as a number: "10 passed" is not "0 passed".
        let passed: u32 = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1].trim_end_matches(',') == "passed")
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0);
        assert!(passed > 0, "{}: no tests ran\n{out}", dir.display());
    }
}

#[test]
fn a_failing_rule_test_says_what_differs() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        "postbacks:
  - id: a
    trigger: conversion
    http: { url: \"https://t.example/a?c={clickid}\" }
  - id: b
    trigger: conversion
    statuses: [rejected]
    http: { url: \"https://t.example/b?c={clickid}\" }
  - id: extra
    trigger: conversion
    http: { url: \"https://t.example/x?c={clickid}\" }
",
    );
    std::fs::create_dir(cfg.path().join("tests")).unwrap();
    std::fs::write(
        cfg.path().join("tests/t.yaml"),
        "tests:
  - name: passes
    event: { clickid: z, status: rejected }
    fires:
      - postback: a
      - postback: b
      - postback: extra
  - name: fails three ways
    event: { clickid: \"q 1\" }
    fires:
      - postback: a
        url: https://t.example/a?c=q1
      - postback: b
",
    )
    .unwrap();
    let (code, out, _) = run_cli(&["test", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ok      ") && out.contains("t.yaml:2: passes"),
        "{out}"
    );
    assert!(
        out.contains("FAILED  ") && out.contains("t.yaml:8: fails three ways"),
        "{out}"
    );
    assert!(
        out.contains("+ `extra` fired, but the test does not expect it"),
        "{out}"
    );
    assert!(out.contains("GET https://t.example/x?c=q%201"), "{out}");
    assert!(
        out.contains("- `b` was expected to fire; it did not"),
        "{out}"
    );
    assert!(out.contains("`a` url differs:\n          expected: https://t.example/a?c=q1\n               got: https://t.example/a?c=q%201"), "{out}");
    assert!(out.ends_with("1 passed, 1 failed\n"), "{out}");

    // A test file that is not valid says where.
    std::fs::write(
        cfg.path().join("tests/t.yaml"),
        "tests:\n  - name: x\n    evnt: {}\n",
    )
    .unwrap();
    let (code, out, _) = run_cli(&["test", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("t.yaml:3:5: unknown field `evnt`"), "{out}");
}

#[tokio::test]
async fn fire_shows_what_would_be_sent_and_sends_it_on_request() {
    let sink = Sink::start().await;
    let cfg = config_for(&repo().join("config"), sink.addr);
    let dir = cfg.path().to_str().unwrap().to_string();
    let event = "clickid=abc&tid=T-1&offer_id=1001&goal=deposit&affiliate_id=42&payout=12.5&status=approved";
    let (code, out, err) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || run_cli(&["fire", &dir, event, "--dry-run"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("-> aff42-deposits (offer 1001)"), "{out}");
    assert!(
        out.contains(&format!(
            "GET http://{}/aff42?clickid=abc&payout=12.5&status=1&txid=T-1",
            sink.addr
        )),
        "{out}"
    );
    assert!(
        out.contains("-> crm-deposits (offer 1001), held 60s before sending"),
        "{out}"
    );
    assert!(
        out.contains("authorization: Bearer ***"),
        "secrets are masked: {out}"
    );
    assert!(out.contains("dry run: nothing was sent"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sink.received().is_empty());

    // A status update needs the earlier conversion: --before.
    let (_, out, _) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            run_cli(&[
                "fire",
                &dir,
                r#"{"tid":"T-1","status":"rejected"}"#,
                "--before",
                event,
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.contains("status=2"), "{out}");

    sink.respond(|r| {
        if r.path == "/crm/leads" {
            (200, r#"{"ok":false}"#.into())
        } else {
            (200, "ok".into())
        }
    });
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "fire",
            &dir,
            event,
            "--send",
            "--allow-network",
            "127.0.0.1",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "the CRM refused in its body, so fire fails: {out}");
    assert!(out.contains("<- delivered 200"), "{out}");
    assert!(out.contains("<- body_rejected 200"), "{out}");
    assert_eq!(sink.received().len(), 3, "each postback sent exactly once");
}

/// The "Test" button: `POST /api/v1/test` shows what an event would send, and sends it
/// once on request, without queueing or logging a delivery.
#[tokio::test]
async fn the_test_endpoint_dry_runs_and_sends_once() {
    let sink = Sink::start().await;
    let cfg = config_for(&repo().join("config"), sink.addr);
    std::fs::write(
        cfg.path().join("postbackd.yaml"),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let token = "test-endpoint-token-0123456789";
    let d = Daemon::start_with(cfg.path(), data.path(), &[("POSTBACKD_ADMIN_TOKEN", token)]);
    let event = serde_json::json!({"clickid": "t1", "tid": "T-7", "offer_id": 1001, "goal": "deposit", "affiliate_id": 42, "payout": 3, "status": "approved"});
    let (code, v) = send_json(
        client()
            .post(d.url("/api/v1/test"))
            .bearer_auth(token)
            .json(&serde_json::json!({"event": event})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let ids: Vec<&str> = v["fired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["postback"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["affiliate-tracker", "aff42-deposits"]);
    assert_eq!(
        v["fired"][1]["request"]["url"],
        format!(
            "http://{}/aff42?clickid=t1&payout=3&status=1&txid=T-7",
            sink.addr
        )
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sink.received().is_empty(), "a dry run sends nothing");

    let (code, v) = send_json(
        client()
            .post(d.url("/api/v1/test"))
            .bearer_auth(token)
            .json(&serde_json::json!({"event": event, "send": true})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["fired"][1]["answer"]["outcome"], "delivered");
    assert_eq!(v["fired"][1]["answer"]["status"], 200);
    assert_eq!(sink.received().len(), 2);
    // Nothing was queued: a real webhook for the same conversion still fires.
    let (_, r) = get_json(&d.url("/postback?clickid=t1&tid=T-7&offer_id=1001&goal=deposit&affiliate_id=42&payout=3&status=approved")).await;
    assert_eq!(r["queued"], 2, "{r}");

    let (code, v) = send_json(
        client()
            .post(d.url("/api/v1/test"))
            .bearer_auth(token)
            .json(&serde_json::json!({"event": {"payout": "ten"}})),
    )
    .await;
    assert_eq!(code, 400, "{v}");
}

/// `POST /api/v1/test` (and `fire`, `test` and `diff`, which share its code) fires what the
/// daemon would queue for the same history: a status already sent for a conversion fires
/// nothing again.
#[tokio::test]
async fn the_tools_and_the_daemon_agree_on_repeated_statuses() {
    let sink = Sink::start().await;
    let cfg = config_for(&repo().join("config"), sink.addr);
    std::fs::write(
        cfg.path().join("postbackd.yaml"),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let token = "agree-endpoint-token-0123456789";
    let d = Daemon::start_with(cfg.path(), data.path(), &[("POSTBACKD_ADMIN_TOKEN", token)]);
    let histories: [&[&str]; 4] = [
        &["approved", "approved"],
        &["pending", "approved"],
        &["approved", "rejected", "approved"],
        &["pending", "pending", "approved", "approved"],
    ];
    for (n, statuses) in histories.iter().enumerate() {
        let event = |status: &str| {
            serde_json::json!({"clickid": format!("r{n}"), "tid": format!("R-{n}"), "offer_id": 1001,
                               "goal": "deposit", "affiliate_id": 42, "payout": 3, "status": status})
        };
        let (last, before) = statuses.split_last().unwrap();
        let (code, v) = send_json(
            client()
                .post(d.url("/api/v1/test"))
                .bearer_auth(token)
                .json(&serde_json::json!({
                    "event": event(last),
                    "before": before.iter().map(|s| event(s)).collect::<Vec<_>>(),
                })),
        )
        .await;
        assert_eq!(code, 200, "{v}");
        let fired = v["fired"].as_array().unwrap().len();
        let mut queued = None;
        for s in *statuses {
            let (code, r) = send_json(client().post(d.url("/postback")).json(&event(s))).await;
            assert_eq!(code, 200, "{r}");
            queued = r["queued"].as_u64();
        }
        assert_eq!(
            Some(fired as u64),
            queued,
            "{statuses:?}: the test endpoint fired {v}"
        );
        if n == 0 {
            assert_eq!(fired, 0, "a repeated approval fires nothing: {v}");
        }
    }
}

/// `diff` says which postbacks a change adds, removes and changes, and what sample events
/// would now send differently.
#[test]
fn diff_shows_what_a_change_does() {
    let sink: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let old = config_for(&repo().join("config"), sink);
    let new = config_for(&repo().join("config"), sink);
    let casino = new.path().join("offers/casino.yaml");
    let text = std::fs::read_to_string(&casino).unwrap();
    std::fs::write(
        &casino,
        text.replace("status={status:approved=1 rejected=2}", "status={status}"),
    )
    .unwrap();
    let global = new.path().join("global.yaml");
    let text = std::fs::read_to_string(&global).unwrap();
    let cut = text.find("  # Clicks are counted too").unwrap();
    let mut text = text[..cut].to_string();
    text.push_str("  - id: rejections\n    trigger: conversion\n    statuses: [rejected]\n    http: { url: \"https://hooks.example/r?tx={txid}\" }\n");
    std::fs::write(&global, text).unwrap();
    let events = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        events.path(),
        "{\"clickid\":\"e1\",\"tid\":\"X-1\",\"offer_id\":1001,\"goal\":\"deposit\",\"affiliate_id\":42,\"payout\":7,\"status\":\"rejected\"}\n{\"kind\":\"click\",\"clickid\":\"k1\",\"offer_id\":1001}\n{\"clickid\":\"u\",\"offer_id\":555,\"status\":\"pending\"}\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&[
        "diff",
        old.path().to_str().unwrap(),
        new.path().to_str().unwrap(),
        "--events",
        events.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("postbacks: 1 added, 1 removed, 1 changed, 3 unchanged\n"),
        "{out}"
    );
    assert!(out.contains("  + rejections  (global.yaml:"), "{out}");
    assert!(out.contains("  - click-counter  (global.yaml:"), "{out}");
    assert!(
        out.contains("  ~ aff42-deposits  (offers/casino.yaml:8)"),
        "{out}"
    );
    assert!(
        out.contains("events: 3 sample(s), 2 would be sent differently"),
        "{out}"
    );
    assert!(
        out.contains("+ starts  rejections: GET https://hooks.example/r?tx=X-1"),
        "{out}"
    );
    assert!(
        out.contains("was: GET http://127.0.0.1:9000/aff42?clickid=e1&payout=7&status=2&txid=X-1"),
        "{out}"
    );
    assert!(
        out.contains(
            "now: GET http://127.0.0.1:9000/aff42?clickid=e1&payout=7&status=rejected&txid=X-1"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "- stops   click-counter: GET http://127.0.0.1:9000/clicks?cid=k1&offer=1001&sub1="
        ),
        "{out}"
    );

    // Without --events, the rule tests of both directories are the samples.
    let (_, out, _) = run_cli(&[
        "diff",
        old.path().to_str().unwrap(),
        new.path().to_str().unwrap(),
    ]);
    assert!(
        out.contains("events: 5 sample(s), 3 would be sent differently"),
        "{out}"
    );
    assert!(out.contains("clicks are counted for every offer"), "{out}");

    // A broken side is reported like `check` does, exit 2.
    std::fs::write(new.path().join("broken.yaml"), "postbacks:\n  - id: x\n").unwrap();
    let (code, _, err) = run_cli(&[
        "diff",
        old.path().to_str().unwrap(),
        new.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("broken.yaml:2:"), "{err}");
}
