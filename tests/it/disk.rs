//! When the store cannot write, webhooks get 503 (never a 2xx that would be lost), the
//! daemon says why, and it recovers by itself once writes succeed again.
//!
//! The failure is real: the daemon's file size limit (RLIMIT_FSIZE, what a quota or
//! `ulimit -f` imposes) is lowered to one byte with prlimit(2), so every write SQLite makes
//! fails in the kernel, exactly as on a full disk. Raising it again is the disk recovering.

use crate::support::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    set_limit(
        pid,
        libc::RLIMIT_FSIZE,
        bytes.unwrap_or(libc::RLIM_INFINITY),
        libc::RLIM_INFINITY,
    );
}

#[tokio::test]
async fn a_store_that_cannot_write_answers_503_and_recovers() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    let c = client();
    let post = |cid: &str| {
        c.post(d.url("/postback"))
            .json(&json!({"clickid": cid, "status": "approved"}))
    };
    let (code, _) = send_json(post("before")).await;
    assert_eq!(code, 200);
    sink.wait_for(Some("/pb"), 1, Duration::from_secs(10)).await;

    set_file_size_limit(d.child.id(), Some(1));
    let (code, body) = send_json(post("during")).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("store"), "{body}");
    let r = c.get(d.url("/-/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let why = r.text().await.unwrap();
    assert!(why.contains("store cannot write"), "{why}");
    assert!(why.contains("too large"), "the OS reason is given: {why}");
    assert!(
        d.wait_log("store cannot write", Duration::from_secs(5))
            .await
    );
    // Liveness is not readiness: the process is alive and says so.
    assert_eq!(
        c.get(d.url("/-/healthy")).send().await.unwrap().status(),
        200
    );

    set_file_size_limit(d.child.id(), None);
    let start = Instant::now();
    while c.get(d.url("/-/ready")).send().await.unwrap().status() != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never ready again\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _) = send_json(post("after")).await;
    assert_eq!(code, 200);
    let got = sink.wait_for(Some("/pb"), 2, Duration::from_secs(10)).await;
    let cids: Vec<_> = got.iter().filter_map(|r| r.param("cid")).collect();
    assert_eq!(
        cids,
        ["before", "after"],
        "the 503'd webhook was not acknowledged, so not sent"
    );
    assert!(
        d.wait_log("store writes again", Duration::from_secs(5))
            .await,
        "{}",
        d.logs()
    );
}

/// A store file that is not a database stops the start with the path and the reason, and
/// the file is left alone for the operator to inspect.
#[test]
fn a_corrupt_store_is_refused_with_the_reason() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", "postbacks: []\n");
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("postbackd.db");
    let garbage = "this is not a database, it is a text file. ".repeat(200);
    std::fs::write(&db, &garbage).unwrap();
    let (code, _, stderr) = run_cli(&[
        "run",
        cfg.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot open store"), "{stderr}");
    assert!(stderr.contains("not a database"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&db).unwrap(), garbage);
}

/// A `/v1/events` batch is one commit: when one event of it cannot be stored, none is, the
/// sender gets 503 and sends the batch again, and nothing of it goes out twice or half.
///
/// The failure is real: a trigger added to the daemon's own store refuses one click id, as
/// a constraint or a corrupt page would refuse one row.
#[tokio::test]
async fn a_batch_is_stored_whole_or_not_at_all() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[]);
    let db = rusqlite::Connection::open(data.path().join("postbackd.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.clickid = 'bad'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();
    let batch = json!([{"clickid": "first"}, {"clickid": "bad"}, {"clickid": "last"}]);
    let (code, body) = send_json(client().post(d.url("/v1/events")).json(&batch)).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no event of the batch was stored"),
        "{body}"
    );
    // A marker after the batch: once it has arrived, whatever the batch queued would have.
    let (code, _) = get_json(&d.url("/postback?clickid=marker")).await;
    assert_eq!(code, 200);
    let got = sink.wait_for(Some("/pb"), 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].param("cid").as_deref(), Some("marker"));
    let stored: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM events WHERE clickid IN ('first', 'last')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 0, "part of a refused batch was stored");
    assert_eq!(sink.on_path("/pb").len(), 1, "{:?}", sink.received());

    // The sender tries again once the cause is gone: all three, once each.
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    let (code, body) = send_json(client().post(d.url("/v1/events")).json(&batch)).await;
    assert_eq!(code, 200, "{body}");
    let got = sink.wait_for(Some("/pb"), 4, Duration::from_secs(10)).await;
    let mut cids: Vec<String> = got.iter().filter_map(|r| r.param("cid")).collect();
    cids.sort();
    assert_eq!(cids, ["bad", "first", "last", "marker"]);
}
