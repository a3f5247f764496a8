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
        assert!(
            !out.contains("0 passed"),
            "{}: no tests ran\n{out}",
            dir.display()
        );
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
    let (code, out, _) =
        tokio::task::spawn_blocking(move || run_cli(&["fire", &dir, event, "--send"]))
            .await
            .unwrap();
    assert_eq!(code, 1, "the CRM refused in its body, so fire fails: {out}");
    assert!(out.contains("<- delivered 200"), "{out}");
    assert!(out.contains("<- body_rejected 200"), "{out}");
    assert_eq!(sink.received().len(), 3, "each postback sent exactly once");
}
