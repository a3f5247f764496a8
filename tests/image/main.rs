//! The container image, for real as far as this machine allows: a base image made from
//! Debian's packages (debootstrap, imported into podman) stands for the runtime stage's
//! base; the Dockerfile's runtime stage is built on it with the binary this suite built;
//! and the image runs its own entrypoint, command, user and environment (read from the
//! image) under chroot, since this sandbox refuses `podman run`. It receives a webhook,
//! delivers the postback to a local sink, passes its HEALTHCHECK, stops on SIGTERM, and
//! leaves its store in the volume folder.
//!
//! The base image is kept in podman's storage between runs; the first run makes it. A test
//! binary of its own, so its disk-heavy build does not run beside the timing tests of `it`.

#[path = "../it/support.rs"]
#[allow(dead_code)]
mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const BASE: &str = "localhost/postbackd-test-base:bookworm";

fn podman(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("podman")
        .args(["--storage-driver", "vfs"])
        .args(args)
        .output()
        .expect("podman (bash test.sh installs it: apt-get install podman)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The base image: Debian bookworm from Debian's packages, made once.
fn base_image() {
    if podman(&["image", "exists", BASE]).0 {
        return;
    }
    let cache = PathBuf::from(
        std::env::var("POSTBACKD_TEST_CACHE")
            .unwrap_or_else(|_| "/var/cache/postbackd-tests".into()),
    );
    let rootfs = cache.join("rootfs");
    if !rootfs.join("etc/os-release").exists() {
        let tmp = cache.join("rootfs.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&cache).unwrap();
        let ok = Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&tmp)
            .arg("http://deb.debian.org/debian")
            .stdout(Stdio::null())
            .status()
            .expect("debootstrap (bash test.sh installs it: apt-get install debootstrap)")
            .success();
        assert!(ok, "debootstrap failed");
        std::fs::rename(&tmp, &rootfs).unwrap();
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ok = Command::new("podman")
        .args(["--storage-driver", "vfs", "import", "-", BASE])
        .stdin(tar.stdout.take().unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(
        tar.wait().unwrap().success() && ok,
        "podman import of the base image failed"
    );
}

/// Removes the test's container and image however the test ends.
struct Cleanup {
    container: Option<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            podman(&["umount", c]);
            podman(&["rm", "-f", c]);
        }
        podman(&["rmi", "-f", &self.image]);
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one of the image's commands the way a container runtime would: as the image's user,
/// in its root, with its environment (and `env` on top, as `-e` would).
fn in_image(
    root: &Path,
    user: &str,
    image_env: &[String],
    env: &[(&str, &str)],
    argv: &[String],
) -> Command {
    let mut c = Command::new("chroot");
    c.arg(format!("--userspec={user}"))
        .arg(root)
        .args(argv)
        .env_clear();
    for kv in image_env {
        if let Some((k, v)) = kv.split_once('=') {
            c.env(k, v);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_its_own_user_delivers_passes_its_healthcheck_and_stops_on_sigterm() {
    base_image();
    // The build stage's output, as the Dockerfile's build stage leaves it.
    let stage = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(stage.path().join("out/data")).unwrap();
    std::fs::copy(BIN, stage.path().join("out/postbackd")).unwrap();
    let image = format!("localhost/postbackd-test:{}", std::process::id());
    let mut cleanup = Cleanup {
        container: None,
        image: image.clone(),
    };
    let context = format!("build={}", stage.path().display());
    let base_arg = format!("RUNTIME_IMAGE={BASE}");
    let (ok, out, err) = podman(&[
        "build",
        "--isolation",
        "chroot",
        "--format",
        "docker",
        "--target",
        "runtime",
        "--build-arg",
        &base_arg,
        "--build-context",
        &context,
        "-t",
        &image,
        repo().to_str().unwrap(),
    ]);
    assert!(ok, "the runtime stage did not build:\n{out}\n{err}");

    let (ok, out, err) = podman(&["image", "inspect", &image]);
    assert!(ok, "{err}");
    let inspect: Value = serde_json::from_str(&out).unwrap();
    let config = &inspect[0]["Config"];
    let user = config["User"].as_str().unwrap().to_string();
    assert_eq!(
        user, "10001:10001",
        "it runs as a user of its own, not root: {config}"
    );
    assert!(
        config["Volumes"].get("/var/lib/postbackd").is_some(),
        "{config}"
    );
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    // Docker's format keeps the HEALTHCHECK in the config; podman shows it beside it.
    let health = match config.get("Healthcheck") {
        Some(h) => strings(&h["Test"]),
        None => strings(&inspect[0]["Healthcheck"]["Test"]),
    };
    assert_eq!(health, ["CMD", "postbackd", "healthcheck"], "{config}");
    let env = strings(&config["Env"]);
    for want in [
        "POSTBACKD_CONFIG=/etc/postbackd",
        "POSTBACKD_DATA_DIR=/var/lib/postbackd",
        "POSTBACKD_LISTEN=0.0.0.0:8080",
    ] {
        assert!(env.iter().any(|e| e == want), "{want} in {env:?}");
    }
    let mut argv = strings(&config["Entrypoint"]);
    argv.extend(strings(&config["Cmd"]));
    assert_eq!(argv, ["postbackd", "run"]);

    let (ok, id, err) = podman(&["create", &image]);
    assert!(ok, "{err}");
    let id = id.trim().to_string();
    cleanup.container = Some(id.clone());
    let (ok, root, err) = podman(&["mount", &id]);
    assert!(ok, "{err}");
    let root = PathBuf::from(root.trim());
    let binary = std::fs::read(root.join("usr/local/bin/postbackd")).unwrap();
    assert_eq!(binary.len() as u64, std::fs::metadata(BIN).unwrap().len());
    assert!(
        Command::new("chroot")
            .arg(&root)
            .args(["git", "--version"])
            .output()
            .unwrap()
            .status
            .success(),
        "git is in the image"
    );

    // The rules, as a read-only mount would put them.
    let sink = Sink::start().await;
    let etc = root.join("etc/postbackd");
    std::fs::write(etc.join("postbackd.yaml"), "delivery:\n  allow_networks: [127.0.0.1]\napi:\n  admin_tokens: [\"${env:POSTBACKD_ADMIN_TOKEN}\"]\n").unwrap();
    std::fs::write(
        etc.join("rules.yaml"),
        format!("postbacks:\n  - id: tracker\n    trigger: conversion\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n", sink.addr),
    )
    .unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listen_s = listen.to_string();
    let token = "image-admin-token-0123456789";
    let overrides = [
        ("POSTBACKD_LISTEN", listen_s.as_str()),
        ("POSTBACKD_ADMIN_TOKEN", token),
    ];
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut daemon = in_image(&root, &user, &env, &overrides, &argv)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let start = Instant::now();
    while client()
        .get(format!("http://{listen}/-/healthy"))
        .send()
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the image's daemon did not start:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = send_json(
        client()
            .post(format!("http://{listen}/v1/events"))
            .json(&json!([{"clickid": "img-1", "status": "approved"}])),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let got = sink.wait_for(Some("/pb"), 1, Duration::from_secs(15)).await;
    assert_eq!(got[0].query, "cid=img-1");
    let first: Value =
        serde_json::from_str(logs().lines().next().unwrap()).expect("the image logs JSON lines");
    assert_eq!(first["fields"]["message"], "listening");

    // Its HEALTHCHECK, run as the runtime would.
    let health: Vec<String> = health[1..].to_vec();
    let out = in_image(&root, &user, &env, &overrides, &health)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "HEALTHCHECK failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // SIGTERM stops it cleanly.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "it did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}:\n{}", logs());
    assert!(logs().contains("\"stopped\""), "{}", logs());

    // The store is in the volume folder, owned by the image's user, and holds the delivery.
    let db = root.join("var/lib/postbackd/postbackd.db");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&db).unwrap().uid(), 10001);
    // Started again on the same volume, it still has it.
    let mut again = in_image(&root, &user, &env, &overrides, &argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let body = loop {
        if let Ok(r) = client()
            .get(format!("http://{listen}/api/v1/deliveries"))
            .bearer_auth(token)
            .send()
            .await
        {
            break r.json::<Value>().await.unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "it did not start again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    let _ = again.wait();
    let rows = body["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["state"], "delivered", "{body}");
    assert_eq!(rows[0]["clickid"], "img-1", "{body}");
}
