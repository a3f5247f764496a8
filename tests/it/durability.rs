//! What survives a crash, and what order deliveries keep: each test runs on the embedded
//! store and on PostgreSQL.

use crate::pg::Backend;
use crate::support::*;
use std::collections::HashSet;
use std::time::Duration;

fn rules(dir: &std::path::Path, text: &str) {
    std::fs::write(dir.join("rules.yaml"), text).unwrap();
}

/// Webhooks flow while the daemon is SIGKILLed; after a restart on the same store, every
/// acknowledged conversion's postback arrives at the receiver.
async fn sigkill_under_load_loses_no_acknowledged_postback(b: Backend) {
    let env = b.env();
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    rules(
        cfg.path(),
        &format!("postbacks:\n  - id: pb\n    trigger: conversion\n    retry: [100ms, 200ms, 500ms]\n    http:\n      url: \"http://{}/pb?cid={{clickid}}\"\n", sink.addr),
    );
    // A delivery the killed daemon had claimed comes back after its lease (PostgreSQL; the
    // embedded store takes it back at the next start).
    std::fs::write(cfg.path().join("postbackd.yaml"), "store_lease: 5s\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(cfg.path(), data.path(), &env_refs(&env));
    let url = d.url("/postback");
    // The sender keeps 16 requests in flight until the daemon stops answering (the kill),
    // so the kill always lands mid-load.
    let sender = tokio::spawn(async move {
        let c = client();
        let mut acked = Vec::new();
        let mut failed = 0;
        let mut i = 0;
        while failed == 0 && i < 20_000 {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..16 {
                let (c, url, id) = (c.clone(), url.clone(), format!("k{i}"));
                i += 1;
                tasks.spawn(async move {
                    let ok = matches!(c.get(format!("{url}?clickid={id}&status=approved")).send().await, Ok(r) if r.status() == 200);
                    (id, ok)
                });
            }
            while let Some(Ok((id, ok))) = tasks.join_next().await {
                if ok {
                    acked.push(id);
                } else {
                    failed += 1;
                }
            }
        }
        (acked, failed)
    });
    // Kill once deliveries are flowing.
    sink.wait_for(None, 300, Duration::from_secs(20)).await;
    d.child.kill().unwrap(); // SIGKILL
    d.child.wait().unwrap();
    let (acked, failed) = sender.await.unwrap();
    assert!(
        acked.len() >= 20 && failed > 0,
        "the kill landed mid-load: {} acked, {failed} failed",
        acked.len()
    );
    let d2 = Daemon::start_with(cfg.path(), data.path(), &env_refs(&env));
    let start = std::time::Instant::now();
    loop {
        let got: HashSet<String> = sink
            .received()
            .iter()
            .filter_map(|r| r.param("cid"))
            .collect();
        let missing: Vec<_> = acked.iter().filter(|a| !got.contains(*a)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} acknowledged postbacks never arrived, e.g. {:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            d2.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At least once: a duplicate is allowed only for an attempt in flight at the kill, and
    // at most `concurrency` (64) attempts are in flight.
    let cids: Vec<String> = sink
        .received()
        .iter()
        .filter_map(|r| r.param("cid"))
        .collect();
    let distinct: HashSet<&String> = cids.iter().collect();
    assert!(
        cids.len() - distinct.len() <= 64,
        "{} duplicates",
        cids.len() - distinct.len()
    );
    eprintln!(
        "sigkill: {} acknowledged, {failed} refused at the kill, {} delivered ({} duplicates)",
        acked.len(),
        cids.len(),
        cids.len() - distinct.len()
    );
}

async fn a_delayed_postback_is_cancelled_when_the_conversion_changes(b: Backend) {
    let env = b.env();
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    rules(
        cfg.path(),
        &format!(
            "postbacks:\n  - id: held\n    trigger: conversion\n    statuses: [approved]\n    delay: 1s\n    http:\n      url: \"http://{a}/held?cid={{clickid}}\"\n",
            a = sink.addr
        ),
    );
    let d = Daemon::start_on(cfg.path(), &env);
    let (_, ok) = get_json(&d.url("/postback?clickid=kept&status=approved")).await;
    assert_eq!(ok["queued"], 1);
    let (_, r) = get_json(&d.url("/postback?clickid=fraud&status=approved")).await;
    assert_eq!(r["queued"], 1);
    let (_, r) = get_json(&d.url("/postback?clickid=fraud&status=rejected")).await;
    assert_eq!(r["matched"], serde_json::json!([]));
    let got = sink
        .wait_for(Some("/held"), 1, Duration::from_secs(10))
        .await;
    assert_eq!(got[0].param("cid").as_deref(), Some("kept"));
    assert!(
        d.wait_log(
            "conditions no longer hold after the delay (status now rejected)",
            Duration::from_secs(5)
        )
        .await,
        "{}",
        d.logs()
    );
    // A marker held after the others: once it has arrived, the rejected conversion's
    // postback, due a moment before it, would have too.
    let (_, m) = get_json(&d.url("/postback?clickid=marker&status=approved")).await;
    assert_eq!(m["queued"], 1);
    let got = sink
        .wait_for(Some("/held"), 2, Duration::from_secs(10))
        .await;
    let cids: Vec<String> = got.iter().filter_map(|r| r.param("cid")).collect();
    assert_eq!(
        cids,
        ["kept", "marker"],
        "the rejected conversion's postback went out"
    );
}

async fn deliveries_for_one_conversion_keep_their_order(b: Backend) {
    let env = b.env();
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    rules(
        cfg.path(),
        &format!(
            "postbacks:\n  - id: every-status\n    trigger: conversion\n    retry: [300ms, 300ms]\n    http:\n      url: \"http://{a}/s?tx={{txid}}&st={{status}}\"\n",
            a = sink.addr
        ),
    );
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = first.clone();
    // The first delivery (pending) fails once; approved must still come after it.
    sink.respond(move |r| {
        if r.param("tx").as_deref() == Some("A")
            && f.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            (503, "try later".into())
        } else {
            (200, "ok".into())
        }
    });
    let d = Daemon::start_on(cfg.path(), &env);
    get_json(&d.url("/postback?tid=A&clickid=c&status=pending")).await;
    get_json(&d.url("/postback?tid=A&status=approved")).await;
    get_json(&d.url("/postback?tid=B&clickid=c2&status=approved")).await;
    let got = sink.wait_for(Some("/s"), 4, Duration::from_secs(10)).await;
    let a: Vec<_> = got
        .iter()
        .filter(|r| r.param("tx").as_deref() == Some("A"))
        .map(|r| r.param("st").unwrap())
        .collect();
    assert_eq!(a, vec!["pending", "pending", "approved"], "{}", d.logs());
    // B was not held back by A's retry.
    let b_pos = got
        .iter()
        .position(|r| r.param("tx").as_deref() == Some("B"))
        .unwrap();
    assert!(b_pos < 2, "another conversion runs in parallel: {got:?}");
}

async fn sigterm_stops_cleanly(b: Backend) {
    let env = b.env();
    let cfg = tempfile::tempdir().unwrap();
    rules(cfg.path(), "postbacks: []\n");
    let mut d = Daemon::start_on(cfg.path(), &env);
    let (code, _) = get_json(&d.url("/-/ready")).await;
    assert_eq!(code, 200);
    let pid = d.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        d.wait_log("stopped", Duration::from_secs(2)).await,
        "{}",
        d.logs()
    );
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

on_both!(
    sigkill_under_load_loses_no_acknowledged_postback,
    a_delayed_postback_is_cancelled_when_the_conversion_changes,
    deliveries_for_one_conversion_keep_their_order,
    sigterm_stops_cleanly,
);
