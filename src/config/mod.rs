//! Configuration: a directory of YAML files compiled into an immutable [`Plan`].
//!
//! `postbackd.yaml` holds the daemon's settings; every other `*.yaml`/`*.yml` below the
//! directory (except hidden folders and `tests/`) is a rule file with `sources`, `offers` and
//! `postbacks`. Compiling is pure: it reads the files, collects *every* error with file, line
//! and column, and only returns a plan when there are none. Startup and reload both call
//! [`load_dir`].

pub mod git;
mod postbacks;
#[cfg(test)]
mod props;
pub mod raw;
mod secret;
mod settings;
mod sources;

use crate::ingest::event::{canonical_name, FieldMap, Kind, Status, CANONICAL};
use crate::plan::*;
use crate::render::template::{expand_shorthand, Engine, Escape};
use crate::render::EXTRA_NAMES;
use raw::*;
use serde_saphyr::Spanned;
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const SETTINGS_FILE: &str = "postbackd.yaml";

/// The names templates read placed secrets by (`__secret_0`, …).
pub use secret::PREFIX as SECRET_PREFIX;

/// One problem in the config, located.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub postback: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error about a file (or directory) as a whole, with no line.
    pub fn whole(file: &Path, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            postback: None,
            message: message.into(),
            hint: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(p) = &self.postback {
            write!(f, "postback `{p}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n    hint: {h}")?;
        }
        Ok(())
    }
}

/// All the problems found in one load.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and compiles a config directory.
pub fn load_dir(dir: &Path) -> Result<Plan, ConfigErrors> {
    let mut c = Compiler::default();
    let files = match list_files(dir) {
        Ok(f) => f,
        Err(e) => {
            return Err(ConfigErrors(vec![ConfigError {
                file: dir.to_path_buf(),
                line: 0,
                column: 0,
                postback: None,
                message: format!("cannot read config directory: {e}"),
                hint: Some(
                    "pass the directory that holds postbackd.yaml and the rule files".into(),
                ),
            }]))
        }
    };
    let mut hasher = sha2::Sha256::new();
    let mut settings_raw = RawSettings::default();
    let mut settings_file = dir.join(SETTINGS_FILE);
    let mut texts = Vec::with_capacity(files.len());
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                hasher.update(rel.to_string_lossy().as_bytes());
                hasher.update([0]);
                hasher.update(text.as_bytes());
                hasher.update([0]);
                let is_settings = rel == Path::new(SETTINGS_FILE);
                texts.push((path, is_settings, text));
            }
            Err(e) => c.err_at(&path, 0, 0, None, format!("cannot read file: {e}"), None),
        }
    }
    let mut rule_files = Vec::new();
    for ((path, _, _), parsed) in texts.iter().zip(parse_all(&texts)) {
        match parsed {
            Parsed::Settings(parsed) => {
                settings_file = path.clone();
                match *parsed {
                    Ok(s) => settings_raw = s,
                    Err(e) => c.yaml_error(path, e),
                }
            }
            Parsed::Rules(Ok(r)) => rule_files.push((path.clone(), r)),
            Parsed::Rules(Err(e)) => c.yaml_error(path, e),
            Parsed::Failed => {
                let msg = "the YAML parser failed on this file".to_string();
                c.err_at(path, 0, 0, None, msg, None)
            }
        }
    }
    let hash: String = hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let settings = c.settings(&settings_file, settings_raw, dir);
    for (path, file) in &rule_files {
        for m in file
            .sources
            .iter()
            .flat_map(|s| &s.macros)
            .chain(&file.macros)
        {
            c.declare_macro(path, m);
        }
    }
    for (path, file) in &rule_files {
        for s in &file.sources {
            c.source(path, s);
        }
        for o in &file.offers {
            c.offer(path, o);
        }
    }
    for (path, file) in &rule_files {
        for p in &file.postbacks {
            c.postback(path, p, &settings.delivery);
        }
    }
    c.check_destination_keys(&settings_file);
    let mut settings = settings;
    for p in &c.postbacks {
        if let Some(n) = p.action.concurrency() {
            let d = settings
                .delivery
                .destinations
                .entry(p.action.destination().to_string())
                .or_default();
            if d.concurrency.is_none() {
                d.concurrency = Some(n.max(settings.delivery.per_destination));
            }
        }
    }
    c.check_retention(&settings);
    if !c.errors.is_empty() {
        c.errors
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        return Err(ConfigErrors(c.errors));
    }
    let mut index: HashMap<(Kind, String), Vec<usize>> = HashMap::new();
    let mut entry_by_key = HashMap::new();
    for (i, e) in c.entries.iter().enumerate() {
        let pb = &c.postbacks[e.postback];
        index
            .entry((pb.trigger, e.offer.clone()))
            .or_default()
            .push(i);
        entry_by_key.insert((pb.id.clone(), e.offer.clone()), i);
    }
    let by_id = c
        .postbacks
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.clone(), i))
        .collect();
    let (mut postbacks, mut entries) = (c.postbacks, c.entries);
    postbacks.shrink_to_fit();
    entries.shrink_to_fit();
    let mut secrets = c.secrets;
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    Ok(Plan {
        hash,
        git: None,
        settings,
        sources: c.sources,
        offers: c.offers.into_iter().map(|(k, (o, _))| (k, o)).collect(),
        postbacks,
        by_id,
        entries,
        index,
        entry_by_key,
        engine: c.engine,
        secrets,
        template_secrets: c.template_secrets.into(),
        macros: c.macros.into_iter().collect(),
    })
}

enum Parsed {
    Settings(Box<Result<RawSettings, serde_saphyr::Error>>),
    Rules(Result<RawRuleFile, serde_saphyr::Error>),
    /// The parser panicked.
    Failed,
}

/// Parses every file, on as many threads as there are cores: YAML parsing is most of the
/// time a reload of a large rule set takes. Results come back in the files' order, one per
/// file.
fn parse_all(texts: &[(PathBuf, bool, String)]) -> Vec<Parsed> {
    let one = |(_, is_settings, text): &(PathBuf, bool, String)| {
        std::panic::catch_unwind(|| {
            if *is_settings {
                Parsed::Settings(Box::new(parse(text)))
            } else {
                Parsed::Rules(parse(text))
            }
        })
        .unwrap_or(Parsed::Failed)
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(texts.len());
    if threads <= 1 {
        return texts.iter().map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<(usize, Parsed)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(t) = texts.get(i) else { break mine };
                        mine.push((i, one(t)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, p)| p).collect()
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    if text.trim().is_empty() {
        // An empty file is an empty rule set, not an error.
        return serde_saphyr::from_str("{}");
    }
    serde_saphyr::from_str(text)
}

/// Every YAML file below `dir`, sorted, skipping hidden folders and `tests/`.
fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let ft = std::fs::metadata(&path)?;
            if ft.is_dir() {
                if name != "tests" {
                    stack.push(path);
                }
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Parses `250ms`, `5s`, `1m`, `2h`, `1d` and sums like `1h30m`.
/// A hash of a postback as written, without positions (moving it in its file, or to
/// another file, does not change it).
fn fingerprint(p: &RawPostback) -> String {
    let text = serde_json::to_string(p).unwrap_or_default();
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A YAML error as (line, column, one-line message): serde-saphyr's own text repeats the
/// location and adds a snippet, which the caller prints its own way.
pub fn yaml_message(e: &serde_saphyr::Error) -> (u64, u64, String) {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let text = e.to_string();
    let mut first = text.lines().next().unwrap_or("invalid yaml").to_string();
    if let Some(rest) = first.strip_prefix("error: ") {
        first = match rest.split_once(": ") {
            Some((loc, msg)) if loc.starts_with("line ") => msg.to_string(),
            _ => rest.to_string(),
        };
    }
    (line, column, first)
}

/// Parses a rate such as `10/s`, `600/m` or `3600/h` into events per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let bad = || format!("bad rate `{s}`");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let n: f64 = n.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(format!("bad rate `{s}`: the unit must be s, m or h")),
    };
    if !(n > 0.0 && n.is_finite()) {
        return Err(format!("bad rate `{s}`: it must be above zero"));
    }
    Ok(n / per)
}

pub use crate::actions::destination_of;

/// A duration as the config writes them: `500ms`, `30s`, `5m`, `2h`, `1h30m`, `30d` (a day
/// is 24 hours). Parsed by jiff's "friendly" duration format.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "bad duration `{s}`: missing unit (ms, s, m, h or d)"
        ));
    }
    let span: jiff::Span = s.parse().map_err(|e| format!("bad duration `{s}`: {e}"))?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("bad duration `{s}`: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("bad duration `{s}`: it must not be negative"))
}

#[derive(Default)]
struct Compiler {
    errors: Vec<ConfigError>,
    engine: Engine,
    sources: HashMap<String, Source>,
    offers: HashMap<String, (Offer, (PathBuf, u64))>,
    postbacks: Vec<Postback>,
    postback_origin: HashMap<String, (PathBuf, u64)>,
    entries: Vec<Entry>,
    /// Every secret value, for scrubbing what comes back from destinations.
    secrets: Vec<String>,
    /// Secret values by number, as templates read them (`__secret_N`).
    template_secrets: Vec<String>,
    /// Whether the postback being compiled places a secret anywhere.
    postback_has_secret: bool,
    /// Where `retention` was written, checked against the longest life of a delivery.
    retention_at: Option<(PathBuf, u64, u64)>,
    /// The longest `delay` of any postback.
    longest_delay: Duration,
    /// `delivery.destinations` keys with where they were written, checked once every
    /// postback's destination is known.
    destination_keys: Vec<(String, u64, u64)>,
    /// Parameter names declared under `macros:` (in a rule file or a source).
    macros: std::collections::BTreeSet<String>,
}

/// Where a postback's errors point and what they are about.
struct Ctx<'a> {
    file: &'a Path,
    postback: Option<&'a str>,
}

impl Compiler {
    fn err_at(
        &mut self,
        file: &Path,
        line: u64,
        column: u64,
        postback: Option<&str>,
        message: String,
        hint: Option<String>,
    ) {
        self.errors.push(ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            postback: postback.map(str::to_string),
            message,
            hint,
        });
    }

    fn err<T>(
        &mut self,
        cx: &Ctx,
        at: &Spanned<T>,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let (l, c) = (at.referenced.line(), at.referenced.column());
        self.err_at(cx.file, l, c, cx.postback, message.into(), hint);
    }

    /// A conversion must outlive its deliveries: retention below the longest a delivery can
    /// stay unfinished (held for its delay, then retried until `max_age`) would forget what a
    /// conversion has already fired while its postbacks are still going out.
    fn check_retention(&mut self, settings: &Settings) {
        let Some((file, line, column)) = self.retention_at.clone() else {
            return;
        };
        let needed = settings.delivery.max_age + self.longest_delay;
        if settings.retention < needed {
            self.err_at(
                &file,
                line,
                column,
                None,
                format!(
                    "retention ({}s) is shorter than delivery.max_age plus the longest delay ({}s)",
                    settings.retention.as_secs(),
                    needed.as_secs()
                ),
                Some("raise retention, or lower delivery.max_age or the delays".into()),
            );
        }
    }

    /// A limit for a host no postback sends to is a typo or a leftover: say so.
    fn check_destination_keys(&mut self, file: &Path) {
        let known: Vec<String> = self
            .postbacks
            .iter()
            .map(|p| p.action.destination().to_string())
            .collect();
        for (host, line, column) in std::mem::take(&mut self.destination_keys) {
            if known.contains(&host) {
                continue;
            }
            let hint = suggest(&host, known.iter().map(String::as_str))
                .map(|s| format!("did you mean `{s}`?"))
                .or_else(|| {
                    Some(
                        "write the host (and port, if the URL has one) as the postbacks' URLs do"
                            .into(),
                    )
                });
            self.err_at(
                file,
                line,
                column,
                None,
                format!("delivery.destinations: no postback sends to `{host}`"),
                hint,
            );
        }
    }

    /// `macros: [name]`: a parameter trackers send that templates may use as `{name}`. A
    /// canonical field or a name templates already have cannot be declared again.
    fn declare_macro(&mut self, file: &Path, m: &Spanned<String>) {
        let cx = Ctx {
            file,
            postback: None,
        };
        let name = m.value.as_str();
        let word = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !word {
            self.err(
                &cx,
                m,
                format!("macros: `{name}` is not a name"),
                Some("use letters, digits and underscores, like external_transaction_id".into()),
            );
        } else if canonical_name(name).is_some() || EXTRA_NAMES.contains(&name) {
            self.err(
                &cx,
                m,
                format!("macros: `{name}` is already a field templates know"),
                Some("use it as it is; declare only names postbackd has no field for".into()),
            );
        } else {
            self.macros.insert(name.to_string());
        }
    }

    fn yaml_error(&mut self, file: &Path, e: serde_saphyr::Error) {
        let (line, column, first) = yaml_message(&e);
        let hint = if first.contains("unknown field") {
            Some("check the spelling; README.md lists every key".to_string())
        } else if first.contains("budget breached") {
            Some("one file may hold at most 250,000 YAML nodes (roughly 25,000 postbacks): split the rules into several files".to_string())
        } else {
            None
        };
        self.err_at(file, line, column, None, first, hint);
    }

    /// Expands `${env:NAME}` / `${file:PATH}` into the value; records it for scrubbing.
    fn expand(&mut self, cx: &Ctx, s: &Spanned<String>) -> String {
        self.expand_pair(cx, s).0
    }

    /// The value to send and, when it holds a secret, the same with `***` for showing.
    fn expand_pair(&mut self, cx: &Ctx, s: &Spanned<String>) -> (String, Option<String>) {
        let pieces = self.pieces(cx, s);
        let shown = secret::has_secret(&pieces).then(|| secret::masked(&pieces));
        (secret::real(&pieces), shown)
    }

    /// A template's text: the value with secrets in place (for checks of what is sent) and
    /// the source to compile, where each secret is a variable (see [`secret::template_source`]).
    fn template_text(&mut self, cx: &Ctx, s: &Spanned<String>) -> (String, String) {
        let pieces = self.pieces(cx, s);
        self.placed(cx, s, &pieces)
    }

    fn placed(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        pieces: &[secret::Piece],
    ) -> (String, String) {
        let real = secret::real(pieces);
        if !secret::has_secret(pieces) {
            return (real.clone(), real);
        }
        match secret::template_source(pieces, self.template_secrets.len()) {
            Ok((src, values)) => {
                self.template_secrets.extend(values);
                (real, src)
            }
            Err(m) => {
                self.err(
                    cx,
                    at,
                    m,
                    Some("or declare it under `vars:` and use {{ vars.NAME }}".into()),
                );
                (real, secret::masked(pieces))
            }
        }
    }

    /// Reads a string's references; records the secrets found.
    fn pieces(&mut self, cx: &Ctx, s: &Spanned<String>) -> Vec<secret::Piece> {
        match secret::expand(&s.value) {
            Ok(pieces) => {
                for p in &pieces {
                    if let secret::Piece::Secret { value, .. } = p {
                        self.secrets.push(value.clone());
                        self.postback_has_secret = true;
                    }
                }
                pieces
            }
            Err(msg) => {
                self.err(
                    cx,
                    s,
                    msg,
                    Some(
                        "set the variable in the daemon's environment, or point at a readable file"
                            .into(),
                    ),
                );
                Vec::new()
            }
        }
    }

    fn duration(&mut self, cx: &Ctx, s: &Spanned<String>) -> Option<Duration> {
        match parse_duration(&s.value) {
            Ok(d) => Some(d),
            Err(m) => {
                self.err(
                    cx,
                    s,
                    m,
                    Some("write durations like 500ms, 30s, 5m, 2h or 1h30m".into()),
                );
                None
            }
        }
    }

    fn offer(&mut self, file: &Path, o: &RawOffer) {
        let cx = Ctx {
            file,
            postback: None,
        };
        let id = o.id.value.0.clone();
        if let Some((_, (f, l))) = self.offers.get(&id) {
            let msg = format!(
                "offer `{id}` is defined twice (first at {}:{l})",
                f.display()
            );
            self.err(
                &cx,
                &o.id,
                msg,
                Some("offer ids must be unique across all files".into()),
            );
            return;
        }
        if id == ALL_OFFERS || id == "all" {
            self.err(
                &cx,
                &o.id,
                format!("`{id}` cannot be an offer id: it means every offer"),
                None,
            );
        }
        let offer = Offer {
            id: id.clone(),
            name: o.name.clone(),
            goals: o.goals.iter().map(|g| g.value.0.clone()).collect(),
            goals_enabled: o.goals_enabled.unwrap_or(true),
        };
        self.offers
            .insert(id, (offer, (file.to_path_buf(), o.id.referenced.line())));
    }
}

/// The first directive of a `log.level` that names no level, if any.
fn bad_log_level(spec: &str) -> Option<String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    spec.split(',').map(str::trim).find_map(|d| {
        let level = d.rsplit_once('=').map(|(_, l)| l).unwrap_or(d);
        (!LEVELS.contains(&level.to_ascii_lowercase().as_str())).then(|| d.to_string())
    })
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = items.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

pub use crate::suggest::suggest;

#[cfg(test)]
mod tests;
