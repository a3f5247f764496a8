//! Hot reload against the real binary: files edited, added and deleted while webhooks flow,
//! a broken push, SIGHUP and `POST /-/reload`, and what happens to queued deliveries.

use crate::support::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "reload-admin-token-0123456789";

fn rule(id: &str, sink: std::net::SocketAddr, path: &str) -> String {
    format!(
        "postbacks:\n  - id: {id}\n    trigger: conversion\n    http: {{ url: \"http://{sink}{path}?cid={{clickid}}\" }}\n"
    )
}

/// Sends conversions without pause until stopped; counts answers that were not 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    bad: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(d: &Daemon) -> Load {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let bad: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let url = d.url("/postback");
        let (s, n, b) = (stop.clone(), sent.clone(), bad.clone());
        let task = tokio::spawn(async move {
            let c = client();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    i += 1;
                    let req = c.get(format!("{url}?clickid=l{i}&status=approved")).send();
                    set.spawn(async move {
                        match req.await {
                            Ok(r) if r.status() == 200 => None,
                            Ok(r) => Some(format!(
                                "{} {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => Some(e.to_string()),
                        }
                    });
                }
                while let Some(Ok(r)) = set.join_next().await {
                    n.fetch_add(1, Ordering::Relaxed);
                    if let Some(e) = r {
                        b.lock().unwrap().push(e);
                    }
                }
            }
        });
        Load {
            stop,
            sent,
            bad,
            task,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.sent.load(Ordering::Relaxed),
            self.bad.lock().unwrap().clone(),
        )
    }
}

/// Waits until a request arrives at `path` after `since`; returns how long that took.
async fn arrives(sink: &Sink, path: &str, since: Instant, within: Duration) -> Option<Duration> {
    while since.elapsed() < within {
        if sink
            .received()
            .iter()
            .any(|r| r.path == path && r.at >= since)
        {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_additions_and_deletions_apply_while_webhooks_flow() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", &rule("main", sink.addr, "/a"));
    let d = Daemon::start(cfg.path());
    let load = Load::start(&d);
    sink.wait_for(Some("/a"), 5, Duration::from_secs(10)).await;

    // Saved the way editors do: a hidden temporary file renamed over the rule file.
    let t = Instant::now();
    let tmp = cfg.path().join(".rules.yaml.swp");
    std::fs::write(&tmp, rule("main", sink.addr, "/b")).unwrap();
    std::fs::rename(&tmp, cfg.path().join("rules.yaml")).unwrap();
    let took = arrives(&sink, "/b", t, Duration::from_secs(5)).await;
    assert!(took.is_some(), "the edit never applied\n{}", d.logs());
    eprintln!("edit applied after {:?}", took.unwrap());

    // A new file: its postback fires too.
    let t = Instant::now();
    std::fs::write(
        cfg.path().join("extra.yaml"),
        rule("extra", sink.addr, "/c"),
    )
    .unwrap();
    assert!(
        arrives(&sink, "/c", t, Duration::from_secs(5))
            .await
            .is_some(),
        "{}",
        d.logs()
    );

    // Deleted: it stops firing.
    std::fs::remove_file(cfg.path().join("extra.yaml")).unwrap();
    let t = Instant::now();
    while d.logs().matches("config reloaded").count() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the deletion never applied\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    assert!(arrives(&sink, "/b", t, Duration::from_secs(5))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, bad) = load.finish().await;
    assert!(
        bad.is_empty(),
        "{} of {sent} webhooks failed during reloads: {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(sent > 50, "only {sent} webhooks sent");
    let late_c = sink
        .received()
        .iter()
        .filter(|r| r.path == "/c" && r.at > t)
        .count();
    assert_eq!(late_c, 0, "a deleted postback still fired");
}

/// A symlink swapped onto the config directory (how many deploy tools publish a release)
/// is followed.
#[tokio::test]
async fn a_symlink_swap_is_followed() {
    let sink = Sink::start().await;
    let root = tempfile::tempdir().unwrap();
    let (v1, v2, live) = (
        root.path().join("v1"),
        root.path().join("v2"),
        root.path().join("live"),
    );
    for (dir, path) in [(&v1, "/v1"), (&v2, "/v2")] {
        std::fs::create_dir(dir).unwrap();
        write_config(dir, "", &rule("pb", sink.addr, path));
    }
    std::os::unix::fs::symlink(&v1, &live).unwrap();
    let d = Daemon::start(&live);
    let c = client();
    c.get(d.url("/postback?clickid=s1")).send().await.unwrap();
    sink.wait_for(Some("/v1"), 1, Duration::from_secs(5)).await;
    // ln -sfn v2 live: a new link renamed over the old one.
    let tmp = root.path().join("live.tmp");
    std::os::unix::fs::symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &live).unwrap();
    assert!(
        d.wait_log("config reloaded", Duration::from_secs(5)).await,
        "{}",
        d.logs()
    );
    c.get(d.url("/postback?clickid=s2")).send().await.unwrap();
    assert_eq!(
        sink.wait_for(Some("/v2"), 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    // And edits in the new target are seen.
    write_config(&v2, "", &rule("pb", sink.addr, "/v2b"));
    let t = Instant::now();
    loop {
        c.get(d.url(&format!("/postback?clickid=s{}", t.elapsed().as_millis())))
            .send()
            .await
            .unwrap();
        if !sink.on_path("/v2b").is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "edit in the new target not seen\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_broken_push_is_refused_and_the_old_rules_keep_serving() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", &rule("main", sink.addr, "/a"));
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(cfg.path(), data.path(), &[], &["--no-watch"]);
    let broken = format!(
        "postbacks:\n  - id: main\n    trigger: conversion\n    http: {{ url: \"http://{}/a?cid={{clikid}}\" }}\n  - id: second\n    trigger: sale\n",
        sink.addr
    );
    std::fs::write(cfg.path().join("rules.yaml"), broken).unwrap();
    let (code, body) = send_json(client().post(d.url("/-/reload"))).await;
    assert_eq!(code, 400, "{body}");
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{body}");
    assert_eq!(errors[0]["line"], 4);
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown macro `clikid`"),
        "{body}"
    );
    assert_eq!(errors[0]["hint"], "did you mean `clickid`?");
    assert!(
        body["text"].as_str().unwrap().contains("rules.yaml:4:"),
        "{body}"
    );
    assert!(
        d.wait_log("config reload refused", Duration::from_secs(5))
            .await
    );
    // Still serving the old rules, still ready.
    let (code, _) = get_json(&d.url("/postback?clickid=old")).await;
    assert_eq!(code, 200);
    let got = sink.wait_for(Some("/a"), 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].param("cid").as_deref(), Some("old"));
    assert_eq!(
        client()
            .get(d.url("/-/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn sighup_and_http_reload_without_the_watcher() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", &rule("main", sink.addr, "/a"));
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(cfg.path(), data.path(), &[], &["--no-watch"]);
    // A watching daemon beside it, given the same edit, is the marker: once it has
    // reloaded, the other would have too if it watched.
    let watched = tempfile::tempdir().unwrap();
    write_config(watched.path(), "", &rule("main", sink.addr, "/a"));
    let w = Daemon::start(watched.path());
    assert!(
        w.wait_log("watching the config directory", Duration::from_secs(10))
            .await,
        "{}",
        w.logs()
    );
    std::fs::write(cfg.path().join("rules.yaml"), rule("main", sink.addr, "/b")).unwrap();
    std::fs::write(
        watched.path().join("rules.yaml"),
        rule("main", sink.addr, "/b"),
    )
    .unwrap();
    assert!(
        w.wait_log("config reloaded", Duration::from_secs(10)).await,
        "{}",
        w.logs()
    );
    assert!(
        !d.logs().contains("config reloaded"),
        "--no-watch still watched"
    );
    get_json(&d.url("/postback?clickid=h0")).await;
    let got = sink.wait_for(Some("/a"), 1, Duration::from_secs(5)).await;
    assert_eq!(
        got[0].param("cid").as_deref(),
        Some("h0"),
        "the old rule serves"
    );

    // SAFETY: kill(2) on the child we started.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    assert!(
        d.wait_log("trigger=\"sighup\"", Duration::from_secs(5))
            .await,
        "{}",
        d.logs()
    );
    get_json(&d.url("/postback?clickid=h1")).await;
    assert_eq!(
        sink.wait_for(Some("/b"), 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );

    std::fs::write(cfg.path().join("rules.yaml"), rule("main", sink.addr, "/c")).unwrap();
    let (code, body) = send_json(client().post(d.url("/-/reload"))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["changed"], true);
    assert_ne!(body["version"], body["previous"]);
    // Nothing changed: 200, changed false.
    let (code, again) = send_json(client().post(d.url("/-/reload"))).await;
    assert_eq!((code, &again["changed"]), (200, &json!(false)));
    assert_eq!(again["version"], body["version"]);
    get_json(&d.url("/postback?clickid=h2")).await;
    assert_eq!(
        sink.wait_for(Some("/c"), 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
}

/// A retry is rendered with the rule as it is when it goes out, so fixing a URL fixes the
/// pending retries; a removed postback's pending deliveries are cancelled with the reason
/// once `delivery.orphan_grace` is over.
#[tokio::test]
async fn queued_deliveries_follow_the_new_rules() {
    let sink = Sink::start().await;
    sink.respond(|r| {
        if r.path == "/fixed" {
            (200, "ok".into())
        } else {
            (500, "no".into())
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    let settings =
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\ndelivery:\n  orphan_grace: 2s\n";
    let two = |first: &str| {
        format!(
            "postbacks:
  - id: fixme
    trigger: conversion
    retry: [1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]
    http: {{ url: \"http://{s}{first}?cid={{clickid}}\" }}
  - id: doomed
    trigger: conversion
    retry: [1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]
    http: {{ url: \"http://{s}/doomed?cid={{clickid}}\" }}
",
            s = sink.addr
        )
    };
    write_config(cfg.path(), settings, &two("/broken"));
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(
        cfg.path(),
        data.path(),
        &[("POSTBACKD_ADMIN_TOKEN", TOKEN)],
        &["--no-watch"],
    );
    let (_, body) = get_json(&d.url("/postback?clickid=q1")).await;
    let ids: Vec<i64> = serde_json::from_value(body["deliveries"].clone()).unwrap();
    sink.wait_for(Some("/broken"), 1, Duration::from_secs(5))
        .await;
    sink.wait_for(Some("/doomed"), 1, Duration::from_secs(5))
        .await;

    // Fix the URL and drop the other postback.
    let fixed = two("/fixed");
    let only_fixed = &fixed[..fixed.find("  - id: doomed").unwrap()];
    std::fs::write(cfg.path().join("rules.yaml"), only_fixed).unwrap();
    let (code, body) = send_json(client().post(d.url("/-/reload")).bearer_auth(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let got = sink
        .wait_for(Some("/fixed"), 1, Duration::from_secs(5))
        .await;
    assert_eq!(got[0].param("cid").as_deref(), Some("q1"));

    let state = |id: i64| {
        let d = &d;
        async move {
            let (_, v) = send_json(
                client()
                    .get(d.url(&format!("/api/v1/deliveries/{id}")))
                    .bearer_auth(TOKEN),
            )
            .await;
            v
        }
    };
    let start = Instant::now();
    let (fixed_d, doomed_d) = loop {
        let (a, b): (Value, Value) = (state(ids[0]).await, state(ids[1]).await);
        if a["state"] == "delivered" && b["state"] == "cancelled" {
            break (a, b);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{a}\n{b}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = fixed_d["attempt_log"].as_array().unwrap();
    assert_ne!(
        log[0]["config_version"],
        log[log.len() - 1]["config_version"]
    );
    let why = doomed_d["last_error"].as_str().unwrap();
    assert!(
        why.contains("postback `doomed` for offer `*` is not in the config")
            && why.contains("did not come back within delivery.orphan_grace (2s)"),
        "{doomed_d}"
    );
    assert_eq!(doomed_d["last_outcome"], "orphaned", "{doomed_d}");
    // Waiting out the grace did not send it again.
    assert_eq!(sink.on_path("/doomed").len(), 1);
}

/// A rule file emptied by a half-finished pull must not cancel queued work: the deliveries
/// of the postbacks it lost wait, shown as orphaned, and go out once a reload brings the
/// postbacks back.
#[tokio::test]
async fn an_emptied_rule_file_holds_deliveries_until_the_postback_returns() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let rules = format!(
        "postbacks:\n  - id: held\n    trigger: conversion\n    delay: 1s\n    http: {{ url: \"http://{}/held?cid={{clickid}}\" }}\n",
        sink.addr
    );
    let settings = "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n";
    write_config(cfg.path(), settings, &rules);
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(
        cfg.path(),
        data.path(),
        &[("POSTBACKD_ADMIN_TOKEN", TOKEN)],
        &["--no-watch"],
    );
    let api = |path: String| {
        let d = &d;
        async move {
            send_json(client().get(d.url(&path)).bearer_auth(TOKEN))
                .await
                .1
        }
    };
    let reload = || {
        let d = &d;
        async move { send_json(client().post(d.url("/-/reload")).bearer_auth(TOKEN)).await }
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, body) = get_json(&d.url(&format!("/postback?clickid=o{i}"))).await;
        assert_eq!(code, 200, "{body}");
        ids.push(body["deliveries"][0].as_i64().unwrap());
    }
    std::fs::write(cfg.path().join("rules.yaml"), "").unwrap();
    let (code, body) = reload().await;
    assert_eq!((code, &body["postbacks"]), (200, &json!(0)), "{body}");

    // Each delivery's hold ends while its postback is gone: it waits instead.
    let start = Instant::now();
    loop {
        let mut orphans = 0;
        let mut seen = Vec::new();
        for id in &ids {
            let v = api(format!("/api/v1/deliveries/{id}")).await;
            seen.push(v.clone());
            assert_ne!(v["state"], "cancelled", "{v}");
            if v["state"] == "pending" && v["orphaned_at"].is_i64() {
                assert_eq!(v["last_outcome"], "orphaned", "{v}");
                let why = v["last_error"].as_str().unwrap();
                assert!(
                    why.contains("postback `held` for offer `*` is not in the config")
                        && why.contains("waiting for a reload to bring it back"),
                    "{v}"
                );
                orphans += 1;
            }
        }
        if orphans == ids.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{seen:?}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = scrape(&d).await;
    assert!(
        metrics.contains("\npostbackd_deliveries_orphaned 3\n"),
        "{metrics}"
    );
    let listed = api("/api/v1/deliveries?outcome=orphaned".into()).await;
    assert_eq!(
        listed["deliveries"].as_array().unwrap().len(),
        3,
        "{listed}"
    );
    assert!(sink.on_path("/held").is_empty());

    // The fix lands: the three go out at once, not at the end of the grace period.
    std::fs::write(cfg.path().join("rules.yaml"), &rules).unwrap();
    let (code, body) = reload().await;
    assert_eq!(code, 200, "{body}");
    let got = sink
        .wait_for(Some("/held"), 3, Duration::from_secs(5))
        .await;
    let mut cids: Vec<String> = got.iter().filter_map(|r| r.param("cid")).collect();
    cids.sort();
    assert_eq!(cids, ["o0", "o1", "o2"], "{}", d.logs());
    for id in &ids {
        let start = Instant::now();
        loop {
            let v = api(format!("/api/v1/deliveries/{id}")).await;
            if v["state"] == "delivered" {
                assert!(v["orphaned_at"].is_null(), "{v}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The reload endpoint needs the admin token once tokens are configured.
#[tokio::test]
async fn reload_needs_the_token_when_there_is_one() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
        "postbacks: []\n",
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(
        cfg.path(),
        data.path(),
        &[("POSTBACKD_ADMIN_TOKEN", TOKEN)],
        &[],
    );
    let (code, _) = send_json(client().post(d.url("/-/reload"))).await;
    assert_eq!(code, 401);
    let (code, _) = send_json(client().post(d.url("/-/reload")).bearer_auth(TOKEN)).await;
    assert_eq!(code, 200);
}

/// In a git checkout the config version carries the commit, and every postback says who
/// last changed it (the seeds' "created at / author").
#[tokio::test]
async fn the_config_version_carries_the_git_commit_and_authors() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    git(cfg.path(), &["init", "-q"]);
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
        &rule("first", sink.addr, "/a"),
    );
    let c1 = commit_as(
        cfg.path(),
        "Alice",
        "alice@example.com",
        "first postback",
        None,
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(
        cfg.path(),
        data.path(),
        &[("POSTBACKD_ADMIN_TOKEN", TOKEN)],
        &["--no-watch"],
    );

    std::fs::write(
        cfg.path().join("more.yaml"),
        rule("second", sink.addr, "/b"),
    )
    .unwrap();
    let c2 = commit_as(
        cfg.path(),
        "Bob",
        "bob@example.com",
        "a second postback",
        None,
    );
    let (code, r) = send_json(client().post(d.url("/-/reload")).bearer_auth(TOKEN)).await;
    assert_eq!(code, 200, "{r}");
    assert!(
        d.wait_log(&format!("commit={}", &c2[..12]), Duration::from_secs(5))
            .await,
        "{}",
        d.logs()
    );

    let (code, v) = send_json(client().get(d.url("/api/v1/config")).bearer_auth(TOKEN)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["git"]["commit"], c2);
    assert_eq!(v["git"]["author"], "Bob <bob@example.com>");
    assert_eq!(v["git"]["subject"], "a second postback");
    assert_eq!(v["git"]["dirty"], false);
    assert_eq!(v["version"], r["version"]);
    assert_eq!(v["reload"]["last_trigger"], "http");
    let pbs = v["postbacks"].as_array().unwrap();
    let first = pbs.iter().find(|p| p["id"] == "first").unwrap();
    assert_eq!(first["file"], "rules.yaml");
    assert_eq!(first["line"], 2);
    assert_eq!(first["last_change"]["commit"], c1);
    assert_eq!(first["last_change"]["author"], "Alice <alice@example.com>");
    let second = pbs.iter().find(|p| p["id"] == "second").unwrap();
    assert_eq!(second["last_change"]["author"], "Bob <bob@example.com>");
    assert_eq!(second["destination"], sink.addr.to_string());

    // An uncommitted edit shows as dirty.
    std::fs::write(
        cfg.path().join("more.yaml"),
        rule("second", sink.addr, "/c"),
    )
    .unwrap();
    send_json(client().post(d.url("/-/reload")).bearer_auth(TOKEN)).await;
    let (_, v) = send_json(client().get(d.url("/api/v1/config")).bearer_auth(TOKEN)).await;
    assert_eq!(v["git"]["dirty"], true);
    let (code, _) = send_json(client().get(d.url("/api/v1/config"))).await;
    assert_eq!(code, 401);
}
