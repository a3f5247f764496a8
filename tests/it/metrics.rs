//! Metrics checked by the real Prometheus tools: `promtool check metrics` on the exposition,
//! a real Prometheus server scraping the daemon and answering PromQL, and the shipped
//! alerting rules through `promtool check rules` and `promtool test rules`.

use crate::support::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A Prometheus tool from the PATH; `bash test.sh` (the README's test command) installs them.
fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: apt-get install prometheus (bash test.sh does it for you)"
    );
    Command::new(name)
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.trim().is_empty(), said)
}

fn daemon_config(sink: std::net::SocketAddr) -> tempfile::TempDir {
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            "sources:
  - id: keitaro
    fields: {{ clickid: visitor }}
postbacks:
  - id: ok
    trigger: conversion
    http: {{ url: \"http://{sink}/ok?cid={{clickid}}\" }}
  - id: refused
    trigger: conversion
    retry: []
    http: {{ url: \"http://{sink}/refused?cid={{clickid}}\" }}
"
        ),
    );
    cfg
}

#[tokio::test]
async fn the_exposition_passes_promtool_and_counts_what_happened() {
    let sink = Sink::start().await;
    sink.respond(|r| {
        if r.path == "/refused" {
            (400, "no".into())
        } else {
            (200, "ok".into())
        }
    });
    let cfg = daemon_config(sink.addr);
    let d = Daemon::start(cfg.path());

    // A fresh daemon: every series exists, at zero, and the exposition is clean.
    let fresh = scrape(&d).await;
    let (ok, said) = promtool_check(&fresh);
    assert!(ok, "promtool check metrics: {said}\n{fresh}");
    for series in [
        r#"postbackd_deliveries_total{postback="ok",outcome="dead"}"#,
        r#"postbackd_attempts_total{postback="refused",result="timeout"}"#,
        r#"postbackd_attempts_total{postback="ok",result="tls"}"#,
        r#"postbackd_events_received_total{source="keitaro",kind="conversion",result="accepted"}"#,
        r#"postbackd_events_received_total{source="default",kind="click",result="invalid"}"#,
        r#"postbackd_config_reloads_total{result="failure"}"#,
        r#"postbackd_postbacks_matched_total{postback="ok"}"#,
    ] {
        assert_eq!(
            metric_value(&fresh, series),
            Some(0.0),
            "{series} missing or not zero\n{fresh}"
        );
    }
    assert_eq!(metric_value(&fresh, "postbackd_queue_pending"), Some(0.0));
    assert_eq!(metric_value(&fresh, "postbackd_store_writable"), Some(1.0));
    assert_eq!(
        metric_value(&fresh, "postbackd_config_last_reload_successful"),
        Some(1.0)
    );
    assert!(fresh.contains(&format!(
        "postbackd_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(fresh.contains("postbackd_config_info{version=\""));
    for l in fresh.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !l.contains("http://") && !l.contains("cid="),
            "unbounded label: {l}"
        );
    }

    // Two accepted, one invalid, one for a source that does not exist.
    let c = client();
    c.get(d.url("/postback?clickid=m1")).send().await.unwrap();
    c.get(d.url("/postback/keitaro?visitor=m2"))
        .send()
        .await
        .unwrap();
    c.get(d.url("/postback?clickid=m3&payout=ten"))
        .send()
        .await
        .unwrap();
    c.get(d.url("/postback/nosuch?clickid=m4"))
        .send()
        .await
        .unwrap();
    sink.wait_for(None, 4, Duration::from_secs(10)).await;
    let start = Instant::now();
    let text = loop {
        let t = scrape(&d).await;
        if metric_value(
            &t,
            r#"postbackd_deliveries_total{postback="refused",outcome="dead"}"#,
        ) == Some(2.0)
            && metric_value(
                &t,
                r#"postbackd_deliveries_total{postback="ok",outcome="delivered"}"#,
            ) == Some(2.0)
            // Counted when decided, recorded just after: wait for the store too.
            && metric_value(&t, "postbackd_queue_pending") == Some(0.0)
        {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ok, said) = promtool_check(&text);
    assert!(ok, "{said}");
    let expected = [
        (
            r#"postbackd_events_received_total{source="default",kind="conversion",result="accepted"}"#,
            1.0,
        ),
        (
            r#"postbackd_events_received_total{source="keitaro",kind="conversion",result="accepted"}"#,
            1.0,
        ),
        (
            r#"postbackd_events_received_total{source="default",kind="conversion",result="invalid"}"#,
            1.0,
        ),
        (
            r#"postbackd_events_received_total{source="unknown",kind="conversion",result="unknown_source"}"#,
            1.0,
        ),
        (r#"postbackd_postbacks_matched_total{postback="ok"}"#, 2.0),
        (
            r#"postbackd_attempts_total{postback="ok",result="2xx"}"#,
            2.0,
        ),
        (
            r#"postbackd_attempts_total{postback="refused",result="4xx"}"#,
            2.0,
        ),
        (
            r#"postbackd_attempt_duration_seconds_count{postback="ok"}"#,
            2.0,
        ),
        (
            r#"postbackd_delivery_latency_seconds_count{postback="ok"}"#,
            2.0,
        ),
    ];
    for (series, want) in expected {
        assert_eq!(metric_value(&text, series), Some(want), "{series}\n{text}");
    }
    assert_eq!(metric_value(&text, "postbackd_queue_pending"), Some(0.0));
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_daemon_and_answers_promql() {
    let sink = Sink::start().await;
    let cfg = daemon_config(sink.addr);
    let d = Daemon::start(cfg.path());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: postbackd\n    static_configs: [{{ targets: [\"{}\"] }}]\n",
            d.addr
        ),
    )
    .unwrap();
    let mut prom = tool("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(std::mem::replace(
        &mut prom,
        Command::new("true").spawn().unwrap(),
    ));
    let c = client();
    for i in 0..5 {
        c.get(d.url(&format!("/postback?clickid=p{i}")))
            .send()
            .await
            .unwrap();
    }
    sink.wait_for(Some("/ok"), 5, Duration::from_secs(10)).await;
    let query = r#"sum(postbackd_deliveries_total{outcome="delivered",postback="ok"})"#;
    let start = Instant::now();
    loop {
        let r = c
            .get(format!("http://127.0.0.1:{port}/api/v1/query"))
            .query(&[("query", query)])
            .send()
            .await;
        if let Ok(r) = r {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if v["data"]["result"][0]["value"][1] == json!("5") {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Prometheus never saw 5 deliveries via {query}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And the target is healthy in Prometheus' eyes.
    let r: Value = c
        .get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", "up{job=\"postbackd\"}")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"]["result"][0]["value"][1], json!("1"), "{r}");
}

/// The shipped alerting rules are valid and fire when they should.
#[test]
fn the_shipped_alerting_rules_pass_promtool() {
    let dir = repo().join("monitoring");
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts_test.yaml"],
    ] {
        let out = tool("promtool")
            .current_dir(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
