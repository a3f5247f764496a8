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
