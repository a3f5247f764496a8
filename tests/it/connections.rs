//! The listener under clients that hold connections: silent ones, half-sent headers, idle
//! keep-alive, slow bodies, and more connections than the process has file descriptors.
//! Normal webhooks must still be answered, and the process metrics show the descriptors.

use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rules(sink: std::net::SocketAddr) -> String {
    format!(
        "postbacks:\n  - id: pb\n    trigger: conversion\n    http: {{ url: \"http://{sink}/pb?cid={{clickid}}\" }}\n"
    )
}

/// Waits until the daemon closes `s` (EOF or reset); returns how long that took.
async fn closed_after(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A header sent in part is cut off after `server.header_timeout`; an idle keep-alive
/// connection after `server.idle_timeout`; a body sent slowly after
/// `server.request_timeout`. Each is counted by reason.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_on_time() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "server:\n  header_timeout: 1s\n  idle_timeout: 3s\n  request_timeout: 2s\n",
        &rules(sink.addr),
    );
    let d = Daemon::start(cfg.path());

    let mut half = TcpStream::connect(d.addr).await.unwrap();
    half.write_all(b"GET /postback?clickid=h HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A trickle of header bytes does not reset the clock.
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if half.write_all(b"X-A: b\r\n").await.is_err() {
                break;
            }
        }
        half
    });
    let mut keep = TcpStream::connect(d.addr).await.unwrap();
    keep.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = keep.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let mut slow = TcpStream::connect(d.addr).await.unwrap();
    slow.write_all(b"POST /postback HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();

    let mut half = trickle.await.unwrap();
    let (h, k, s) = tokio::join!(
        closed_after(&mut half, Duration::from_secs(10)),
        closed_after(&mut keep, Duration::from_secs(10)),
        closed_after(&mut slow, Duration::from_secs(10)),
    );
    let h = h.expect("a half-sent header was never cut off");
    let k = k.expect("an idle keep-alive connection was never closed");
    let s = s.expect("a slow body was never cut off");
    // The trickle ended at about 4 s; the header had 1 s from its first byte.
    assert!(
        h < Duration::from_millis(1500),
        "header cut off {h:?} after the trickle"
    );
    assert!(k > Duration::from_secs(1), "idle closed too early: {k:?}");
    assert!(s < Duration::from_secs(3), "slow body cut off after {s:?}");

    let text = scrape(&d).await;
    for reason in ["header_timeout", "idle_timeout", "request_timeout"] {
        let series = format!("postbackd_http_connections_closed_total{{reason=\"{reason}\"}}");
        assert!(
            metric_value(&text, &series) >= Some(1.0),
            "{series}\n{text}"
        );
    }
}

/// With 128 file descriptors and 300 connections that send nothing, webhooks are still
/// answered and their postbacks still go out: the listener keeps its connections below the
/// limit and closes the longest-idle one when a new one comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_use_up_the_descriptors() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "delivery:\n  concurrency: 8\n",
        &rules(sink.addr),
    );
    let d = Daemon::start(cfg.path());
    set_limit(d.child.id(), libc::RLIMIT_NOFILE, 128, 128);

    let mut silent = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(d.addr).await {
            Ok(s) => silent.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20 {
        let c = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let r = c
            .get(d.url(&format!("/postback?clickid=n{i}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("webhook {i} got no answer: {e}\n{}", d.logs()));
        assert_eq!(r.status(), 200, "webhook {i}");
    }
    let got = sink
        .wait_for(Some("/pb"), 20, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 20, "{}", d.logs());

    let text = scrape(&d).await;
    assert_eq!(
        metric_value(&text, "process_max_fds"),
        Some(128.0),
        "{text}"
    );
    let open = metric_value(&text, "process_open_fds").expect("process_open_fds");
    assert!(open < 128.0, "{open} descriptors open");
    assert!(
        metric_value(&text, "process_resident_memory_bytes") > Some(0.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );
    let limit = metric_value(&text, "postbackd_http_connections_limit").unwrap();
    assert!(limit < 128.0, "limit {limit}");
    assert!(
        metric_value(
            &text,
            "postbackd_http_connections_closed_total{reason=\"evicted\"}"
        ) >= Some(200.0),
        "{text}"
    );
    drop(silent);
}
