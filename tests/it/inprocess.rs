//! Daemons started in the test process through the library's `run`, the way the command
//! line starts one: each has its own metrics, so two can share a process (and a database).

use crate::pg::shared;
use crate::support::*;
use std::time::Duration;

fn options(config: &std::path::Path, store: &str) -> postbackd::Options {
    postbackd::Options {
        config_dir: config.to_path_buf(),
        listen: None,
        data_dir: None,
        store: Some(store.to_string()),
        watch: false,
        allow_networks: vec![postbackd::deliver::egress::parse_allowed("127.0.0.0/8").unwrap()],
        log_json: None,
        log_level: None,
        admin_token: None,
    }
}

/// Two daemons in one process on one database: a webhook to the first is counted by the
/// first only, its postback is delivered once, and both stop when told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_in_one_process_count_their_own() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    http:\n      url: \"http://{}/pb?cid={{clickid}}\"\n",
            sink.addr
        ),
    );
    let db = shared().database();
    let mut stops = Vec::new();
    let mut daemons = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = postbackd::run(listener, options(cfg.path(), &db), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        stops.push(tx);
        daemons.push(handle);
    }
    let url = |i: usize, path: &str| format!("http://{}{path}", daemons[i].addr());
    let (code, body) = get_json(&url(0, "/postback?clickid=in1&status=approved")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["queued"], 1);
    let got = sink.wait_for(Some("/pb"), 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].param("cid").as_deref(), Some("in1"));
    let accepted = "postbackd_events_received_total{source=\"default\",kind=\"conversion\",result=\"accepted\"}";
    let scrape = |i: usize| {
        let u = url(i, "/metrics");
        async move { client().get(u).send().await.unwrap().text().await.unwrap() }
    };
    let (first, second) = (scrape(0).await, scrape(1).await);
    assert_eq!(metric_value(&first, accepted), Some(1.0), "{first}");
    assert_eq!(metric_value(&second, accepted), Some(0.0), "{second}");
    // The delivery log is the database's: the second daemon shows the first's delivery.
    let (rows, _) = daemons[1]
        .store()
        .deliveries(postbackd::store::DeliveryQuery {
            clickid: Some("in1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    for tx in stops {
        let _ = tx.send(());
    }
    for d in daemons {
        tokio::time::timeout(Duration::from_secs(15), d.wait())
            .await
            .expect("stops when told")
            .unwrap();
    }
    assert_eq!(sink.on_path("/pb").len(), 1, "delivered once");
}
