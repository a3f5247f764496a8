//! What deployments lean on: settings from flags and environment variables over the file,
//! `postbackd healthcheck`, and the systemd notifications (`NOTIFY_SOCKET`).

use crate::support::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "deploy-admin-token-0123456789";

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `postbackd run` with exactly these arguments and environment; stderr to `log`.
fn spawn(args: &[&str], env: &[(&str, &str)], log: &std::path::Path) -> Child {
    let mut c = Command::new(BIN);
    c.arg("run").args(args).env_remove("POSTBACKD_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits until `addr` answers `/-/healthy`.
async fn serving(addr: std::net::SocketAddr, log: &std::path::Path) {
    let start = Instant::now();
    loop {
        if let Ok(r) = client()
            .get(format!("http://{addr}/-/healthy"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing serves on {addr}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn flags_win_over_environment_variables_which_win_over_the_file() {
    let (file_addr, env_addr, flag_addr) = (free_addr(), free_addr(), free_addr());
    let cfg = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        &format!("listen: \"{file_addr}\"\nlog: {{ format: text, level: warn }}\n"),
        "postbacks: []\n",
    );
    let logs = tempfile::tempdir().unwrap();
    let dir = cfg.path().to_str().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let env_addr_s = env_addr.to_string();
    let env = [
        ("POSTBACKD_LISTEN", env_addr_s.as_str()),
        ("POSTBACKD_DATA_DIR", data_dir),
        ("POSTBACKD_LOG_FORMAT", "json"),
        ("POSTBACKD_LOG_LEVEL", "info"),
        ("POSTBACKD_ADMIN_TOKEN", TOKEN),
    ];
    // The environment over the file: its address, JSON logs at info, its admin token.
    let log = logs.path().join("env.log");
    let d = Killed(spawn(&[dir], &env, &log));
    serving(env_addr, &log).await;
    assert!(client()
        .get(format!("http://{file_addr}/-/healthy"))
        .send()
        .await
        .is_err());
    let (code, _) = send_json(
        client()
            .get(format!("http://{env_addr}/api/v1/deliveries"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(code, 200, "POSTBACKD_ADMIN_TOKEN is an admin token");
    let (code, _) = send_json(client().get(format!("http://{env_addr}/api/v1/deliveries"))).await;
    assert_eq!(code, 401);
    let text = std::fs::read_to_string(&log).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap())
        .unwrap_or_else(|e| panic!("POSTBACKD_LOG_FORMAT=json gives JSON lines ({e}): {text}"));
    assert_eq!(first["fields"]["message"], "listening", "{first}");
    assert!(
        data.path().join("postbackd.db").exists(),
        "POSTBACKD_DATA_DIR holds the store"
    );
    assert!(!text.contains(TOKEN), "the token never shows in the log");
    drop(d);

    // A flag over the environment.
    let log = logs.path().join("flag.log");
    let flag = flag_addr.to_string();
    let _d = Killed(spawn(
        &[dir, "--listen", &flag, "--log-format", "text"],
        &env,
        &log,
    ));
    serving(flag_addr, &log).await;
    assert!(client()
        .get(format!("http://{env_addr}/-/healthy"))
        .send()
        .await
        .is_err());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(" INFO ") && !text.starts_with('{'),
        "--log-format text wins: {text}"
    );

    // A token too short to resist guessing is refused at start.
    let out = Command::new(BIN)
        .args(["run", dir])
        .env("POSTBACKD_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("POSTBACKD_ADMIN_TOKEN: the admin token needs at least 16 characters"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_when_ready_and_1_with_the_reason_otherwise() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", "postbacks: []\n");
    let d = Daemon::start(cfg.path());
    let addr = d.addr.to_string();
    let (code, out, _) = run_cli(&["healthcheck", "--listen", &addr]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ready (config "), "{out}");
    // An unspecified address, as a container sets it, is asked on loopback.
    let any = format!("0.0.0.0:{}", d.addr.port());
    let out = Command::new(BIN)
        .arg("healthcheck")
        .env("POSTBACKD_LISTEN", &any)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(d);
    let (code, out, _) = run_cli(&["healthcheck", "--listen", &addr, "--timeout", "1s"]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!("unhealthy: http://{addr}/-/ready:")) && out.contains("refused"),
        "{out}"
    );
}

/// Reads the next datagram from the notify socket.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn systemd_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cfg = tempfile::tempdir().unwrap();
    write_config(cfg.path(), "", "postbacks: []\n");
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        cfg.path(),
        data.path(),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let ready = next(&sock);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=serving on {}", d.addr)),
        "{ready}"
    );
    // It was ready only once it answered.
    assert_eq!(
        client()
            .get(d.url("/-/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let pid = d.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = next(&sock);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("RELOADING=1 carries MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let again = next(&sock);
    assert!(
        again.lines().any(|l| l == "READY=1") && again.contains("reloaded by sighup"),
        "{again}"
    );

    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopping = next(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

/// The shipped unit passes `systemd-analyze verify` (with the binary where the install puts
/// it) and asks for what the daemon does: notify, check before start, SIGHUP to reload.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/postbackd.service")).unwrap();
    for want in [
        "Type=notify",
        "ExecStartPre=/usr/local/bin/postbackd check /etc/postbackd",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=postbackd",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service",
        "User=postbackd",
    ] {
        assert!(unit.lines().any(|l| l == want), "the unit lacks `{want}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postbackd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/postbackd", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
    // And it does notice a broken unit.
    std::fs::write(
        &path,
        unit.replace("Type=notify", "Type=notifyy")
            .replace("/usr/local/bin/postbackd", BIN),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "a bad Type= goes unnoticed"
    );
}

/// The manifests pass a Kubernetes schema checker (kubernetes-validate, from PyPI), strictly.
#[test]
fn the_kubernetes_manifests_validate() {
    let dir = repo().join("deploy/kubernetes");
    let validate = |files: &[&std::path::Path]| {
        Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", "1.29.0"])
            .args(files)
            .output()
            .expect(
                "kubernetes-validate (bash test.sh installs it: pip install kubernetes-validate)",
            )
    };
    let main = dir.join("postbackd.yaml");
    let secret = dir.join("secret.example.yaml");
    let out = validate(&[&main, &secret]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let m = std::fs::read_to_string(&main).unwrap();
    for want in [
        "kind: StatefulSet",
        "replicas: 1",
        "registry.k8s.io/git-sync/git-sync",
        "path: /-/healthy",
        "path: /-/ready",
        "secretRef: { name: postbackd }",
        "kind: Service",
        "prometheus.io/scrape",
    ] {
        assert!(m.contains(want), "postbackd.yaml lacks `{want}`");
    }
    // The checker does refuse a wrong manifest.
    let bad = tempfile::tempdir().unwrap();
    let wrong = bad.path().join("wrong.yaml");
    std::fs::write(&wrong, m.replace("replicas: 1", "replicas: one")).unwrap();
    assert!(
        !validate(&[&wrong]).status.success(),
        "kubernetes-validate accepts anything"
    );
}

/// The compose directory holds together: its rules pass `check`, Prometheus's config (with
/// the alerting rules beside it, as mounted) passes `promtool check config`, and every file
/// it mounts exists.
#[test]
fn the_compose_setup_holds_together() {
    let dir = repo().join("deploy/compose");
    let text = std::fs::read_to_string(dir.join("compose.yaml")).unwrap();
    let compose: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    for s in ["postbackd", "prometheus", "tracker"] {
        assert!(compose["services"].get(s).is_some(), "no service {s}");
    }
    assert!(dir
        .join(compose["services"]["postbackd"]["build"].as_str().unwrap())
        .join("Dockerfile")
        .exists());
    for (_, svc) in compose["services"].as_object().unwrap() {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if src.starts_with('.') {
                assert!(
                    dir.join(src).exists(),
                    "compose mounts {src}, which does not exist"
                );
            }
        }
    }
    let out = Command::new(BIN)
        .args(["check", dir.join("rules").to_str().unwrap()])
        .env("POSTBACKD_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prom = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.join("prometheus.yml"),
        prom.path().join("prometheus.yml"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("monitoring/alerts.yaml"),
        prom.path().join("alerts.yaml"),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(prom.path().join("prometheus.yml"))
        .output()
        .expect("promtool (bash test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes `sha` the way git-sync does: a worktree of its own under `.worktrees/`
/// (whose `.git` is a file), then the link swapped onto it in one rename.
fn publish(root: &std::path::Path, sha: &str) {
    git(root, &["fetch", "-q", "origin"]);
    let wt = format!(".worktrees/{sha}");
    git(root, &["worktree", "add", "-q", "--detach", &wt, sha]);
    assert!(
        root.join(&wt).join(".git").is_file(),
        "a worktree's .git is a file"
    );
    let tmp = root.join("rules.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&wt, &tmp).unwrap();
    std::fs::rename(&tmp, root.join("rules")).unwrap();
}

async fn config(d: &Daemon) -> serde_json::Value {
    let (code, body) = send_json(client().get(d.url("/api/v1/config")).bearer_auth(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    body
}

/// A git-sync volume: the rules are a worktree whose `.git` is a file, behind a symlink
/// that is swapped onto each new commit. The commit, author and date are right for the
/// config, for each postback and for each attempt, and a new commit is picked up.
#[tokio::test]
async fn a_git_sync_worktree_shows_its_commits_and_a_swapped_link_is_followed() {
    let sink = Sink::start().await;
    let remote = tempfile::tempdir().unwrap();
    git(remote.path(), &["init", "-q", "-b", "main"]);
    let rules = |path: &str| {
        format!(
            "postbacks:\n  - id: tracker\n    trigger: conversion\n    retry: [100ms]\n    http: {{ url: \"http://{}/{path}?cid={{clickid}}\" }}\n",
            sink.addr
        )
    };
    std::fs::write(
        remote.path().join("postbackd.yaml"),
        "api:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n",
    )
    .unwrap();
    std::fs::write(remote.path().join("rules.yaml"), rules("first")).unwrap();
    let first = commit_as(
        remote.path(),
        "Ana",
        "ana@example.com",
        "first rules",
        Some("2026-11-30T10:00:00Z"),
    );

    let root = tempfile::tempdir().unwrap();
    let url = remote.path().to_str().unwrap();
    Command::new("git")
        .args(["clone", "-q", "--no-checkout", url])
        .arg(root.path())
        .status()
        .unwrap();
    publish(root.path(), &first);
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        &root.path().join("rules"),
        data.path(),
        &[("POSTBACKD_ADMIN_TOKEN", TOKEN)],
    );
    let c = config(&d).await;
    assert_eq!(c["git"]["commit"], first.as_str(), "{c}");
    assert_eq!(c["git"]["author"], "Ana <ana@example.com>");
    assert!(c["git"]["date"].as_str().unwrap().starts_with("20"), "{c}");
    assert_eq!(
        c["postbacks"][0]["last_change"]["commit"],
        first.as_str(),
        "{c}"
    );
    assert_eq!(
        c["postbacks"][0]["last_change"]["author"], "Ana <ana@example.com>",
        "{c}"
    );
    send_json(client().get(d.url("/postback?clickid=a1&status=approved"))).await;
    sink.wait_for(Some("/first"), 1, Duration::from_secs(15))
        .await;

    // Bo pushes; git-sync publishes the new commit.
    std::fs::write(remote.path().join("rules.yaml"), rules("second")).unwrap();
    let second = commit_as(
        remote.path(),
        "Bo",
        "bo@example.com",
        "the second tracker path",
        Some("2026-12-01T10:00:00Z"),
    );
    assert!(
        d.wait_log("watching the config directory", Duration::from_secs(10))
            .await
    );
    publish(root.path(), &second);
    let start = Instant::now();
    let c = loop {
        let c = config(&d).await;
        if c["git"]["commit"] == second.as_str() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the swapped link was not followed: {c}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        c["postbacks"][0]["last_change"]["author"], "Bo <bo@example.com>",
        "{c}"
    );
    send_json(client().get(d.url("/postback?clickid=a2&status=approved"))).await;
    sink.wait_for(Some("/second"), 1, Duration::from_secs(15))
        .await;

    // Each attempt says which commit its rules were at.
    let (_, body) = send_json(client().get(d.url("/api/v1/deliveries")).bearer_auth(TOKEN)).await;
    let mut commits = Vec::new();
    for row in body["deliveries"].as_array().unwrap() {
        let (_, one) = send_json(
            client()
                .get(d.url(&format!("/api/v1/deliveries/{}", row["id"])))
                .bearer_auth(TOKEN),
        )
        .await;
        commits.push(
            one["attempt_log"][0]["config_commit"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    commits.sort();
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(commits, want);
}
