//! Loading the config, at start-up and on every reload: the same code path.
//!
//! A reload compiles the whole directory again. Only a config without a single error
//! replaces the running one, in one atomic swap of the `Arc<Plan>`; requests in progress
//! keep the plan they started with. A broken config is refused with every error, and the
//! running one keeps serving. Reloads come from SIGHUP, `POST /-/reload` and the directory
//! watcher, and run one at a time.
//!
//! `listen`, `data_dir` and `store` are fixed for the life of the process: a reload that changes them
//! applies everything else and says that those two wait for a restart.

use crate::config::{self, git, ConfigErrors};
use crate::plan::Plan;
use crate::Options;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Loads and compiles the config directory, applies the command line's overrides and reads
/// the git commit. Start-up and every reload go through here.
/// The overrides of `opts` (flags and environment variables) win over `postbackd.yaml`.
pub fn load(opts: &Options) -> Result<Plan, ConfigErrors> {
    let loaded = config::load_dir(&opts.config_dir);
    // The files' parsed forms are freed by now, in the parser threads' arenas: hand those
    // pages back, or a large rule set's parse stays in resident memory.
    crate::release_freed_memory();
    let mut plan = loaded?;
    if let Some(l) = opts.listen {
        plan.settings.listen = l;
    }
    if let Some(d) = &opts.data_dir {
        plan.settings.data_dir = d.clone();
    }
    if let Some(s) = &opts.store {
        // Checked by the command line before it gets here.
        plan.settings.postgres = match s.trim() {
            "" | "sqlite" => None,
            url => crate::store::PgUrl::parse(url, None).ok(),
        };
    }
    for a in &opts.allow_networks {
        crate::deliver::egress::allow(&mut plan.settings.delivery, a.clone());
    }
    if let Some(j) = opts.log_json {
        plan.settings.log_json = j;
    }
    if let Some(l) = &opts.log_level {
        plan.settings.log_level = l.clone();
    }
    if let Some(t) = &opts.admin_token {
        plan.settings.admin_tokens = vec![t.clone()];
        if !plan.secrets.contains(t) {
            plan.secrets.push(t.clone());
            plan.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }
    plan.git = git::head(&opts.config_dir);
    Ok(plan)
}

/// The last reload, for `/api/v1/config` and the logs.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReloadStatus {
    /// Whether the last reload succeeded (true until one fails).
    pub ok: bool,
    /// When the running config was loaded (unix ms).
    pub loaded_at: i64,
    /// When the last reload was tried (unix ms), if ever.
    pub last_attempt_at: Option<i64>,
    /// What triggered it: `sighup`, `http`, `watch`.
    pub last_trigger: Option<String>,
    /// Every error of the last failed reload, as `check` prints them.
    pub last_errors: Option<String>,
    pub succeeded: u64,
    pub failed: u64,
}

/// What a successful reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    pub changed: bool,
    pub previous: String,
    pub version: String,
    pub postbacks: usize,
    pub took_ms: u64,
    /// Settings that changed in the file but wait for a restart.
    pub needs_restart: Vec<String>,
}

/// `listen`, `data_dir`, `server.tls`, and `store` with its lease: what a reload cannot change.
type Pinned = (
    std::net::SocketAddr,
    PathBuf,
    Option<(PathBuf, PathBuf)>,
    (Option<crate::store::PgUrl>, Duration),
);

/// Replaces the running plan when asked to, if the new config is valid.
pub struct Reloader {
    opts: Options,
    pub plan: Arc<ArcSwap<Plan>>,
    /// `listen`, `data_dir`, `server.tls` and `store` as the process started with them.
    pinned: Pinned,
    running: tokio::sync::Mutex<()>,
    status: Mutex<ReloadStatus>,
    /// `git blame` of the running config's files, read on first use: (config hash, changes).
    blame: tokio::sync::Mutex<Option<(String, Arc<LineChanges>)>>,
    /// The daemon's metrics: reloads are counted, and a new plan's series made.
    telemetry: crate::telemetry::Telemetry,
}

/// Who last changed each line, by (file, line).
pub type LineChanges = std::collections::HashMap<(PathBuf, u64), git::LineChange>;

/// Each postback's last change: the newest commit among the lines of its block, from its
/// `id:` line to the line before the next postback of its file (or the file's end).
pub fn postback_changes(
    plan: &Plan,
    changes: &LineChanges,
) -> std::collections::HashMap<String, git::LineChange> {
    use std::collections::HashMap;
    // Per file: the postbacks' first lines, and the changed lines, both sorted, so each
    // block is found by two binary searches.
    let mut starts: HashMap<&std::path::Path, Vec<u64>> = HashMap::new();
    for p in &plan.postbacks {
        starts
            .entry(&p.origin.file)
            .or_default()
            .push(p.origin.line);
    }
    let mut lines: HashMap<&std::path::Path, Vec<(u64, &git::LineChange)>> = HashMap::new();
    for ((f, line), c) in changes {
        lines.entry(f.as_path()).or_default().push((*line, c));
    }
    starts.values_mut().for_each(|v| v.sort_unstable());
    lines
        .values_mut()
        .for_each(|v| v.sort_unstable_by_key(|(l, _)| *l));
    let head = plan.git.as_ref().map(|g| &g.commit);
    let mut out = HashMap::new();
    for p in &plan.postbacks {
        let file = p.origin.file.as_path();
        let Some(changed) = lines.get(file) else {
            continue;
        };
        let s = &starts[file];
        let end = s[s.partition_point(|l| *l <= p.origin.line)..]
            .first()
            .copied()
            .unwrap_or(u64::MAX);
        let from = changed.partition_point(|(l, _)| *l < p.origin.line);
        let to = changed.partition_point(|(l, _)| *l < end);
        let newest = changed[from..to]
            .iter()
            .map(|(_, c)| *c)
            // Newest first; within one second, the checkout's own commit is the newest.
            .max_by_key(|c| (c.date.as_str(), Some(&c.commit) == head));
        if let Some(c) = newest {
            out.insert(p.id.clone(), c.clone());
        }
    }
    out
}

impl Reloader {
    pub fn new(
        opts: Options,
        plan: Arc<ArcSwap<Plan>>,
        telemetry: crate::telemetry::Telemetry,
    ) -> Reloader {
        let p = plan.load();
        let pinned = (
            p.settings.listen,
            p.settings.data_dir.clone(),
            p.settings.server.tls.clone(),
            (p.settings.postgres.clone(), p.settings.store_lease),
        );
        drop(p);
        Reloader {
            opts,
            plan,
            pinned,
            running: tokio::sync::Mutex::new(()),
            blame: tokio::sync::Mutex::new(None),
            telemetry,
            status: Mutex::new(ReloadStatus {
                ok: true,
                loaded_at: crate::now_ms(),
                ..ReloadStatus::default()
            }),
        }
    }

    /// Who last changed each line of the plan's rule files (empty outside a git checkout).
    /// Read once per config version.
    pub async fn line_changes(&self, plan: &Plan) -> Arc<LineChanges> {
        let mut cache = self.blame.lock().await;
        if let Some((hash, c)) = cache.as_ref() {
            if *hash == plan.hash {
                return c.clone();
            }
        }
        let mut files: Vec<PathBuf> = plan
            .postbacks
            .iter()
            .map(|p| p.origin.file.clone())
            .collect();
        files.sort();
        files.dedup();
        let changes = if plan.git.is_some() {
            tokio::task::spawn_blocking(move || {
                let mut all = LineChanges::new();
                for f in files {
                    for (line, c) in git::blame(&f) {
                        all.insert((f.clone(), line), c);
                    }
                }
                all
            })
            .await
            .unwrap_or_default()
        } else {
            LineChanges::new()
        };
        let changes = Arc::new(changes);
        *cache = Some((plan.hash.clone(), changes.clone()));
        changes
    }

    /// Whether the directory watcher should run.
    pub fn watching(&self) -> bool {
        self.opts.watch
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.opts.config_dir
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Loads the directory again and swaps the plan in if it is valid and differs.
    pub async fn reload(&self, trigger: &str) -> Result<Reloaded, ConfigErrors> {
        let _one_at_a_time = self.running.lock().await;
        crate::notify::reloading();
        let result = self.reload_now(trigger).await;
        let running = self.plan.load().hash.clone();
        crate::notify::ready(&match &result {
            Ok(_) => format!("serving, config {running} (reloaded by {trigger})"),
            Err(e) => format!(
                "serving, config {running}: the last reload was refused ({} errors)",
                e.0.len()
            ),
        });
        result
    }

    async fn reload_now(&self, trigger: &str) -> Result<Reloaded, ConfigErrors> {
        let started = Instant::now();
        let opts = self.opts.clone();
        let result = tokio::task::spawn_blocking(move || load(&opts))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigErrors(vec![config::ConfigError::whole(
                    &self.opts.config_dir,
                    format!("the reload stopped unexpectedly: {e}"),
                )]))
            });
        let now = crate::now_ms();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt_at = Some(now);
        status.last_trigger = Some(trigger.to_string());
        let mut plan = match result {
            Ok(p) => p,
            Err(errors) => {
                self.telemetry.reload(false);
                status.ok = false;
                status.failed += 1;
                status.last_errors = Some(errors.to_string());
                let running = self.plan.load().hash.clone();
                tracing::error!(
                    trigger,
                    errors = errors.0.len(),
                    running = %running,
                    "config reload refused; the running config keeps serving"
                );
                for e in &errors.0 {
                    let line = e.to_string().replace("\n    hint: ", " (hint: ");
                    let close = if e.hint.is_some() { ")" } else { "" };
                    tracing::error!("config error: {line}{close}");
                }
                return Err(errors);
            }
        };
        let mut needs_restart = Vec::new();
        if plan.settings.listen != self.pinned.0 {
            needs_restart.push("listen".to_string());
            plan.settings.listen = self.pinned.0;
        }
        if plan.settings.data_dir != self.pinned.1 {
            needs_restart.push("data_dir".to_string());
            plan.settings.data_dir = self.pinned.1.clone();
        }
        if plan.settings.server.tls != self.pinned.2 {
            needs_restart.push("server.tls".to_string());
            plan.settings.server.tls = self.pinned.2.clone();
        }
        if (&plan.settings.postgres, plan.settings.store_lease)
            != (&self.pinned.3 .0, self.pinned.3 .1)
        {
            needs_restart.push("store".to_string());
            plan.settings.postgres = self.pinned.3 .0.clone();
            plan.settings.store_lease = self.pinned.3 .1;
        }
        self.telemetry.reload(true);
        status.ok = true;
        status.succeeded += 1;
        status.last_errors = None;
        let previous = self.plan.load().hash.clone();
        let changed = previous != plan.hash || self.plan.load().git != plan.git;
        let out = Reloaded {
            changed,
            previous: previous.clone(),
            version: plan.hash.clone(),
            postbacks: plan.postbacks.len(),
            took_ms: started.elapsed().as_millis() as u64,
            needs_restart: needs_restart.clone(),
        };
        if changed {
            status.loaded_at = now;
            let commit = plan
                .git
                .as_ref()
                .map(|g| g.commit[..12.min(g.commit.len())].to_string());
            tracing::info!(
                trigger,
                previous = %previous,
                version = %plan.hash,
                commit = %commit.as_deref().unwrap_or("-"),
                postbacks = plan.postbacks.len(),
                took_ms = out.took_ms,
                "config reloaded"
            );
            self.telemetry.register_plan(&plan);
            let old = self.plan.swap(Arc::new(plan));
            tokio::spawn(release(old));
        } else {
            tracing::debug!(trigger, version = %previous, "config unchanged");
        }
        for s in &needs_restart {
            tracing::warn!(setting = %s, "{s} changed in postbackd.yaml; it takes effect at the next restart");
        }
        Ok(out)
    }
}

/// How long the directory must be quiet before a reload: editors save in pieces and a
/// `git pull` writes many files.
const QUIET: Duration = Duration::from_millis(300);
/// A reload happens at the latest this long after the first change, even if writes go on.
const MAX_DEFER: Duration = Duration::from_secs(2);

/// The paths the watcher compares events against, each as written and resolved.
struct Filter {
    roots: Vec<PathBuf>,
    data: Vec<PathBuf>,
    name: Option<std::ffi::OsString>,
}

fn both(p: &std::path::Path) -> Vec<PathBuf> {
    let abs = std::path::absolute(p).unwrap_or(p.to_path_buf());
    let canon = std::fs::canonicalize(p).unwrap_or(abs.clone());
    vec![abs, canon]
}

impl Filter {
    /// Whether a changed path can matter to the config: YAML files and directories under the
    /// config directory, not hidden ones (`.git`, editor swap files), not the store if it
    /// lives inside; and the config directory itself being replaced in its parent.
    fn relevant(&self, path: &std::path::Path) -> bool {
        if self.data.iter().any(|d| path.starts_with(d)) {
            return false;
        }
        let Some(rel) = self.roots.iter().find_map(|r| path.strip_prefix(r).ok()) else {
            return path.file_name() == self.name.as_deref();
        };
        if rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        {
            return false;
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => true,
            Some(_) => false,
            None => !path.to_string_lossy().ends_with('~'),
        }
    }
}

/// Drops a replaced plan once the last task using it lets go, then hands the freed memory
/// back to the system: glibc keeps what a thread frees in that thread's arena, and without
/// this each reload of a large rule set left its size in resident memory.
async fn release(old: Arc<Plan>) {
    for _ in 0..300 {
        if Arc::strong_count(&old) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tokio::task::spawn_blocking(move || {
        drop(old);
        crate::release_freed_memory();
    })
    .await;
}

/// Watches the config directory (and its parent, for a symlink swapped onto it) and
/// reloads after each burst of changes, until `shutdown` flips.
pub async fn watch(reloader: Arc<Reloader>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    use notify::{RecursiveMode, Watcher};
    let dir = std::path::absolute(reloader.dir()).unwrap_or(reloader.dir().to_path_buf());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let filter = Filter {
        roots: both(&dir),
        data: both(&reloader.pinned.1),
        name: dir.file_name().map(|n| n.to_os_string()),
    };
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        // Reading the files (a reload does) is not a change.
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return;
        }
        if ev.paths.iter().any(|p| filter.relevant(p)) {
            let _ = tx.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config directory; reload with SIGHUP or POST /-/reload");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::Recursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP or POST /-/reload");
        return;
    }
    if let Some(p) = dir.parent() {
        let _ = watcher.watch(p, RecursiveMode::NonRecursive);
    }
    tracing::info!(dir = %dir.display(), "watching the config directory");
    let mut target = std::fs::canonicalize(&dir).unwrap_or(dir.clone());
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = shutdown.changed() => return,
        }
        // Debounce: wait for a quiet moment, but not forever.
        let first = Instant::now();
        loop {
            let left = MAX_DEFER.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = rx.recv() => continue,
                _ = tokio::time::sleep(QUIET.min(left)) => break,
            }
        }
        while rx.try_recv().is_ok() {}
        // A symlink swapped onto the directory: watch its new target.
        if let Ok(now) = std::fs::canonicalize(&dir) {
            if now != target {
                let _ = watcher.unwatch(&dir);
                if watcher.watch(&dir, RecursiveMode::Recursive).is_ok() {
                    tracing::info!(target_dir = %now.display(), "the config directory points elsewhere now; watching it");
                }
                target = now;
            }
        }
        let _ = reloader.reload("watch").await;
    }
}

/// Reloads on every SIGHUP until `shutdown` flips.
pub async fn on_sighup(reloader: Arc<Reloader>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                _ = shutdown.changed() => return,
            }
            let _ = reloader.reload("sighup").await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, shutdown.changed().await);
    }
}
