//! Several instances on one PostgreSQL database, and the database going away: real daemons,
//! a real server, SIGKILL and `pg_ctl stop -m immediate`.

use crate::pg::{shared, Cluster};
use crate::support::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A config whose one postback fires on every status of a conversion, with a short lease so
/// a killed instance's deliveries come back quickly.
fn fleet_config(sink: std::net::SocketAddr) -> tempfile::TempDir {
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "store_lease: 5s\n",
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    retry: [100ms, 200ms, 500ms, 1s]\n    http:\n      url: \"http://{sink}/pb?cid={{clickid}}&st={{status}}\"\n"
        ),
    );
    cfg
}

fn start(cfg: &std::path::Path, url: &str) -> Daemon {
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg, data.path(), &[("POSTBACKD_STORE", url)]);
    std::mem::forget(data); // the store is the database; the directory stays empty
    d
}

/// What the load acknowledged: (click id, status) pairs answered 200, and how the others
/// were answered.
#[derive(Default)]
struct Load {
    acked: Vec<(String, String)>,
    refused: HashMap<String, usize>,
}

/// Sends conversions until `stop`: each a `pending` then an `approved` status, the two to
/// different instances, 12 conversions at a time.
fn load(
    urls: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Load> {
    tokio::spawn(async move {
        let c = client();
        let out = Arc::new(Mutex::new(Load::default()));
        let mut i = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..12 {
                let (c, urls, out) = (c.clone(), urls.clone(), out.clone());
                let cid = format!("f{i}");
                i += 1;
                tasks.spawn(async move {
                    for (n, status) in ["pending", "approved"].into_iter().enumerate() {
                        let url = {
                            let u = urls.lock().unwrap();
                            u[(i + n) % u.len()].clone()
                        };
                        let r = c
                            .get(format!(
                                "{url}/postback?clickid={cid}&tid={cid}&status={status}"
                            ))
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await;
                        let mut o = out.lock().unwrap();
                        match r {
                            Ok(r) if r.status() == 200 => {
                                o.acked.push((cid.clone(), status.into()))
                            }
                            Ok(r) => {
                                *o.refused
                                    .entry(r.status().as_u16().to_string())
                                    .or_default() += 1;
                                return;
                            }
                            Err(_) => {
                                *o.refused.entry("no answer".into()).or_default() += 1;
                                return;
                            }
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        let o = std::mem::take(&mut *out.lock().unwrap());
        o
    })
}

/// Every daemon's log, one after the other.
fn all_logs(daemons: &[Daemon]) -> String {
    daemons
        .iter()
        .map(|d| d.logs())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Waits until every acknowledged (click id, status) reached the sink; then checks the
/// duplicates' bound and each conversion's order.
async fn check_arrivals(
    sink: &Sink,
    acked: &[(String, String)],
    dup_bound: usize,
    logs: &dyn Fn() -> String,
) {
    let started = Instant::now();
    loop {
        let got: HashSet<(String, String)> = sink
            .received()
            .iter()
            .filter_map(|r| Some((r.param("cid")?, r.param("st")?)))
            .collect();
        let missing: Vec<_> = acked.iter().filter(|a| !got.contains(*a)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "{} of {} acknowledged postbacks never arrived, e.g. {:?}\n{}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)],
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Vec<(String, String)> = sink
        .received()
        .iter()
        .filter_map(|r| Some((r.param("cid")?, r.param("st")?)))
        .collect();
    let distinct: HashSet<&(String, String)> = all.iter().collect();
    let dups = all.len() - distinct.len();
    assert!(
        dups <= dup_bound,
        "{dups} duplicates (at most {dup_bound} attempts were in flight)"
    );
    // Per conversion, every `pending` arrives before any `approved`.
    let mut seen: HashMap<&str, Vec<&str>> = HashMap::new();
    for (cid, st) in &all {
        seen.entry(cid).or_default().push(st);
    }
    for (cid, sts) in &seen {
        let last_pending = sts.iter().rposition(|s| *s == "pending");
        let first_approved = sts.iter().position(|s| *s == "approved");
        if let (Some(p), Some(a)) = (last_pending, first_approved) {
            let late: Vec<String> = logs()
                .lines()
                .filter(|l| l.contains("renewed late"))
                .map(str::to_string)
                .collect();
            assert!(
                p < a,
                "{cid}'s postbacks arrived out of order: {sts:?}; late renewals: {late:?}"
            );
        }
    }
    eprintln!(
        "fleet: {} acknowledged, {} arrived, {} duplicates, {} conversions",
        acked.len(),
        all.len(),
        dups,
        seen.len()
    );
}

/// Three instances on one database take load through all three; one at a time is killed
/// with SIGKILL and started again, three rounds. Every acknowledged status arrives, at most
/// the attempts in flight at the kills arrive twice, and each conversion's arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_survive_sigkill_rounds() {
    let sink = Sink::start().await;
    let cfg = fleet_config(sink.addr);
    let db = shared().database();
    let mut daemons: Vec<Daemon> = (0..3).map(|_| start(cfg.path(), &db)).collect();
    let urls = Arc::new(Mutex::new(
        daemons.iter().map(|d| d.url("")).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = load(urls.clone(), stop.clone());
    let mut killed_logs = String::new();
    for round in 0..3 {
        let before = sink.received().len();
        sink.wait_for(None, before + 150, Duration::from_secs(30))
            .await;
        let victim = round % 3;
        daemons[victim].child.kill().unwrap(); // SIGKILL
        daemons[victim].child.wait().unwrap();
        killed_logs.push_str(&daemons[victim].logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let fresh = start(cfg.path(), &db);
        urls.lock().unwrap()[victim] = fresh.url("");
        daemons[victim] = fresh;
    }
    let before = sink.received().len();
    sink.wait_for(None, before + 100, Duration::from_secs(30))
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let load = sender.await.unwrap();
    assert!(
        load.acked.len() >= 500,
        "too little load: {} acked",
        load.acked.len()
    );
    let logs = || format!("{killed_logs}\n---\n{}", all_logs(&daemons));
    // At most `delivery.concurrency` (64) attempts of the killed instance were in flight.
    check_arrivals(&sink, &load.acked, 3 * 64, &logs).await;
    eprintln!("fleet: refused at the kills: {:?}", load.refused);
}

/// The database stops under load: webhooks get 503 with the reason and `/-/ready` says why;
/// nothing answered 200 is missing from the database; when it is back, everything recovers
/// by itself and every acknowledged postback arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stops_and_returns_under_load() {
    let cluster = Cluster::start();
    let db = cluster.database();
    let sink = Sink::start().await;
    let cfg = fleet_config(sink.addr);
    let daemons: Vec<Daemon> = (0..2).map(|_| start(cfg.path(), &db)).collect();
    let urls = Arc::new(Mutex::new(
        daemons.iter().map(|d| d.url("")).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = load(urls.clone(), stop.clone());
    sink.wait_for(None, 100, Duration::from_secs(30)).await;
    cluster.stop();
    // While it is down: 503s with the reason, and not ready.
    let started = Instant::now();
    let (code, body) = loop {
        let r = client()
            .get(daemons[0].url("/postback?clickid=down&status=pending"))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let body = r.text().await.unwrap();
        if code == 503 {
            break (code, body);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still {code} with the database down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503);
    assert!(body.contains("not stored"), "{body}");
    let r = client()
        .get(daemons[1].url("/-/ready"))
        .send()
        .await
        .unwrap();
    let (ready, why) = (r.status().as_u16(), r.text().await.unwrap());
    assert_eq!(ready, 503, "{why}");
    assert!(why.contains("store"), "{why}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart();
    // Back by itself: ready again, webhooks accepted.
    let started = Instant::now();
    for d in &daemons {
        loop {
            let r = client().get(d.url("/-/ready")).send().await.unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "not ready again: {}",
                d.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let before = sink.received().len();
    sink.wait_for(None, before + 100, Duration::from_secs(30))
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let load = sender.await.unwrap();
    assert!(
        load.refused.get("503").copied().unwrap_or(0) > 0,
        "{:?}",
        load.refused
    );
    // No 200 for anything not committed: every acknowledged event is in the database.
    let acked_events: HashSet<(String, String)> = load.acked.iter().cloned().collect();
    let stored: HashSet<(String, String)> = cluster
        .sql(
            &db,
            "SELECT clickid || ' ' || (event::json->'fields'->>'status') FROM events",
        )
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let unstored: Vec<_> = acked_events.difference(&stored).collect();
    assert!(
        unstored.is_empty(),
        "answered 200 but not stored: {:?}",
        &unstored[..unstored.len().min(5)]
    );
    let logs = || all_logs(&daemons);
    // An attempt whose outcome could not be recorded while the database was away is sent
    // again once its lease runs out: at most the attempts in flight (64 per instance).
    check_arrivals(&sink, &load.acked, 2 * 64, &logs).await;
    eprintln!("database outage: refused {:?}", load.refused);
}

/// A destination's concurrency holds for the fleet: two instances under `concurrency: 2`
/// never have more than two requests open at a slow destination together, where each alone
/// would take two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destinations_concurrency_holds_for_the_whole_fleet() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (open, most, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (o, m, d) = (open.clone(), most.clone(), done.clone());
    let app = axum::Router::new().fallback(move || {
        let (o, m, d) = (o.clone(), m.clone(), d.clone());
        async move {
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            o.fetch_sub(1, Ordering::SeqCst);
            d.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        &format!("store_lease: 3s\ndelivery:\n  destinations:\n    \"{addr}\": {{ concurrency: 2 }}\n"),
        &format!("postbacks:\n  - id: pb\n    trigger: conversion\n    http:\n      url: \"http://{addr}/pb?cid={{clickid}}\"\n"),
    );
    let db = shared().database();
    let daemons: Vec<Daemon> = (0..2).map(|_| start(cfg.path(), &db)).collect();
    // Both have counted each other (a heartbeat is every sixth of the lease).
    for d in &daemons {
        assert!(
            d.wait_log("divided among the instances", Duration::from_secs(10))
                .await,
            "{}",
            d.logs()
        );
    }
    let c = client();
    for i in 0..40 {
        let d = &daemons[i % 2];
        let r = c
            .get(d.url(&format!("/postback?clickid=s{i}&status=approved")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let started = Instant::now();
    while done.load(Ordering::SeqCst) < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} arrived",
            done.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= 2,
        "{most} requests were open at once at a destination limited to 2"
    );
    assert!(most >= 1);
}

/// A daemon whose database is not up yet starts anyway: webhooks get 503 and `/-/ready`
/// says why until the database answers, then the tables are made and it serves. A database
/// that refuses it (one that does not exist) stops the start with the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_waits_for_a_database_that_is_not_up_yet() {
    let cluster = Cluster::start();
    let db = cluster.database();
    cluster.stop();
    let sink = Sink::start().await;
    let cfg = fleet_config(sink.addr);
    let d = start(cfg.path(), &db);
    let r = client()
        .get(d.url("/postback?clickid=early&status=pending"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = client().get(d.url("/-/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let why = r.text().await.unwrap();
    assert!(why.contains("store cannot write"), "{why}");
    cluster.restart();
    let started = Instant::now();
    loop {
        let (code, _) = get_json(&d.url("/postback?clickid=late&status=pending")).await;
        if code == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never served: {}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = sink.wait_for(Some("/pb"), 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].param("cid").as_deref(), Some("late"));
    // A database that does not exist is a mistake to fix, not to wait for.
    let missing = cluster.url("no_such_database");
    let (code, _, err) = run_cli(&[
        "run",
        cfg.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        &missing,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no_such_database") && err.contains("does not exist"),
        "{err}"
    );
}
