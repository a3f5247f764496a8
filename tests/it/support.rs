//! Test harness: the real `postbackd` binary on a free port, and a real HTTP receiver that
//! records what arrives.

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_postbackd");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

type Responder = Arc<dyn Fn(&Received) -> (u16, String) + Send + Sync>;

/// A real HTTP server standing in for trackers and APIs.
pub struct Sink {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
    responder: Arc<Mutex<Responder>>,
    headers: Arc<Mutex<Vec<(String, String)>>>,
}

impl Sink {
    pub async fn start() -> Sink {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let responder: Arc<Mutex<Responder>> =
            Arc::new(Mutex::new(Arc::new(|_: &Received| (200, "ok".to_string()))));
        let extra: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (g, r, x) = (got.clone(), responder.clone(), extra.clone());
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (g, r, x) = (g.clone(), r.clone(), x.clone());
                async move {
                    let rec = Received {
                        method: method.to_string(),
                        path: uri.path().to_string(),
                        query: uri.query().unwrap_or("").to_string(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect(),
                        body: String::from_utf8_lossy(&body).into_owned(),
                        at: Instant::now(),
                    };
                    let f = r.lock().unwrap().clone();
                    let (status, body) = f(&rec);
                    g.lock().unwrap().push(rec);
                    let mut out = HeaderMap::new();
                    for (k, v) in x.lock().unwrap().iter() {
                        out.insert(
                            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                            v.parse().unwrap(),
                        );
                    }
                    (StatusCode::from_u16(status).unwrap(), out, body)
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Sink {
            addr,
            got,
            responder,
            headers: extra,
        }
    }

    /// Headers added to every answer from now on.
    pub fn set_headers(&self, headers: &[(&str, &str)]) {
        *self.headers.lock().unwrap() = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    pub fn respond(&self, f: impl Fn(&Received) -> (u16, String) + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(f);
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    pub fn on_path(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until `n` requests arrived at `path` (or any path when None).
    pub async fn wait_for(&self, path: Option<&str>, n: usize, within: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got: Vec<Received> = self
                .received()
                .into_iter()
                .filter(|r| path.is_none_or(|p| r.path == p))
                .collect();
            if got.len() >= n || start.elapsed() > within {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Copies a config directory, pointing every `127.0.0.1:9000` destination at `sink`.
pub fn config_for(src: &Path, sink: SocketAddr) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(src, dir.path(), sink);
    dir
}

fn copy_dir(src: &Path, dst: &Path, sink: SocketAddr) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "data" {
                copy_dir(&e.path(), &to, sink);
            }
        } else {
            let text = std::fs::read_to_string(e.path()).unwrap();
            std::fs::write(to, text.replace("127.0.0.1:9000", &sink.to_string())).unwrap();
        }
    }
}

/// The real binary, running.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    _data_guard: Option<tempfile::TempDir>,
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let path = data.path().to_path_buf();
        let mut d = Daemon::start_with(config, &path, &[]);
        d._data_guard = Some(data);
        d
    }

    /// Starts on a fresh data directory with this environment (for instance a store).
    pub fn start_on(config: &Path, env: &[(String, String)]) -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut d = Daemon::start_with(config, data.path(), &env);
        d._data_guard = Some(data);
        d
    }

    pub fn start_with(config: &Path, data: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_args(config, data, env, &[])
    }

    /// Starts with extra arguments for `postbackd run`. The tests' receivers listen on
    /// 127.0.0.1, which deliveries may not reach unless allowed: this says so, as a
    /// deployment that needs it would.
    pub fn start_args(config: &Path, data: &Path, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let mut all = vec!["--allow-network", "127.0.0.0/8"];
        all.extend_from_slice(args);
        Daemon::start_exactly(config, data, env, &all)
    }

    /// Starts with exactly these arguments after the config, listen address and data
    /// directory: no network is allowed but what the config allows.
    pub fn start_exactly(
        config: &Path,
        data: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(args);
        cmd.env("POSTBACKD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start postbackd");
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = line
                    .contains(" listening ")
                    .then(|| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix("addr="))
                            .map(str::to_string)
                    })
                    .flatten();
                l.lock().unwrap().push(line);
                if addr.is_some() {
                    let _ = tx.send(addr);
                }
            }
            let _ = tx.send(None);
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(a)) => a.parse().unwrap(),
            _ => panic!(
                "postbackd did not start:\n{}",
                logs.lock().unwrap().join("\n")
            ),
        };
        Daemon {
            child,
            addr,
            logs,
            _data_guard: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// GETs a URL and returns (status, JSON body).
pub async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A destination that accepts connections and never answers: the worst kind of dead
/// tracker. Counts the connections it holds.
pub struct BlackHole {
    pub addr: SocketAddr,
    pub connections: Arc<Mutex<usize>>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<usize>> = Arc::default();
        let c = connections.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                *c.lock().unwrap() += 1;
                held.push(sock);
            }
        });
        BlackHole { addr, connections }
    }

    pub fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

/// Writes `rules.yaml` (and `postbackd.yaml` when `settings` is not empty) into `dir`.
pub fn write_config(dir: &Path, settings: &str, rules: &str) {
    if !settings.is_empty() {
        std::fs::write(dir.join("postbackd.yaml"), settings).unwrap();
    }
    std::fs::write(dir.join("rules.yaml"), rules).unwrap();
}

/// Sends one request with a JSON answer: (status, body).
pub async fn send_json(rb: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The daemon's `/metrics` page.
pub async fn scrape(d: &Daemon) -> String {
    client()
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series in an exposition, by its name and labels as written.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Sends one request by hand, any bytes at all: `head` is the request line and headers
/// (ending in a blank line). A write the daemon cuts short (it may answer and close before
/// a large body is all sent) is not an error: the answer is read whatever the write did.
/// Returns the status (0 for none) and the body.
pub fn raw_http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// Sets a resource limit of a running process (prlimit(2)): what `ulimit`, a quota or a
/// container runtime would impose on the daemon.
pub fn set_limit(pid: u32, resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (old limits pointer is null).
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, resource, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// `git -C dir args` with no user or system config, the author and committer date set when
/// `date` is given; its output, trimmed.
pub fn git_at(dir: &Path, args: &[&str], date: Option<&str>) -> String {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1");
    if let Some(d) = date {
        c.env("GIT_AUTHOR_DATE", d).env("GIT_COMMITTER_DATE", d);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    git_at(dir, args, None)
}

/// Commits everything in `dir` as `who <email>` (at `date`, if given); the new commit.
pub fn commit_as(dir: &Path, who: &str, email: &str, message: &str, date: Option<&str>) -> String {
    git(dir, &["add", "-A"]);
    let (name, mail) = (format!("user.name={who}"), format!("user.email={email}"));
    git_at(
        dir,
        &["-c", &name, "-c", &mail, "commit", "-q", "-m", message],
        date,
    );
    git(dir, &["rev-parse", "HEAD"])
}
