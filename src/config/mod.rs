//! Configuration: a directory of YAML files compiled into an immutable [`Plan`].
//!
//! `postbackd.yaml` holds the daemon's settings; every other `*.yaml`/`*.yml` below the
//! directory (except hidden folders and `tests/`) is a rule file with `sources`, `offers` and
//! `postbacks`. Compiling is pure: it reads the files, collects *every* error with file, line
//! and column, and only returns a plan when there are none. Startup and reload both call
//! [`load_dir`].

pub mod git;
pub mod raw;
mod secret;

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
        postbacks: c.postbacks,
        by_id,
        entries: c.entries,
        index,
        entry_by_key,
        engine: c.engine,
        secrets,
        template_secrets: c.template_secrets.into(),
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

/// The host (with its port when one is written) a URL is sent to, from the URL's static
/// prefix: `https://user:pw@Tracker.example:8443/pb?x={y}` gives `tracker.example:8443`.
pub fn destination_of(url: &str) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let authority = rest.split(['/', '?', '#', '{']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    host.to_ascii_lowercase()
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("bad duration `{s}`: expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration `{s}`"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            "" => {
                return Err(format!(
                    "bad duration `{s}`: missing unit (ms, s, m, h or d)"
                ))
            }
            u => {
                return Err(format!(
                    "bad duration `{s}`: unknown unit `{u}` (use ms, s, m, h or d)"
                ))
            }
        };
        total += d;
    }
    Ok(total)
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
            .map(|p| p.http.destination.clone())
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

    fn settings(&mut self, file: &Path, raw: RawSettings, dir: &Path) -> Settings {
        let cx = Ctx {
            file,
            postback: None,
        };
        let listen = match &raw.listen {
            Some(l) => match l.value.parse() {
                Ok(a) => a,
                Err(_) => {
                    self.err(
                        &cx,
                        l,
                        format!("listen: `{}` is not an address", l.value),
                        Some("write it as 127.0.0.1:8080 or 0.0.0.0:8080".into()),
                    );
                    default_listen()
                }
            },
            None => default_listen(),
        };
        let data_dir = match &raw.data_dir {
            Some(d) => {
                let p = PathBuf::from(&d.value);
                if p.is_absolute() {
                    p
                } else {
                    dir.join(p)
                }
            }
            None => dir.join("data"),
        };
        let mut delivery = DeliverySettings::default();
        if let Some(d) = &raw.delivery {
            if let Some(t) = &d.timeout {
                delivery.timeout = self.duration(&cx, t).unwrap_or(delivery.timeout);
            }
            if let Some(n) = &d.concurrency {
                if n.value == 0 {
                    self.err(&cx, n, "delivery.concurrency must be at least 1", None);
                }
                delivery.concurrency = n.value.max(1) as usize;
            }
            if let Some(n) = &d.per_destination {
                if n.value == 0 {
                    self.err(&cx, n, "delivery.per_destination must be at least 1", None);
                }
                delivery.per_destination = n.value.max(1) as usize;
            }
            if let Some(r) = &d.retry {
                delivery.retry = r.iter().filter_map(|s| self.duration(&cx, s)).collect();
            }
            if let Some(m) = &d.max_age {
                delivery.max_age = self.duration(&cx, m).unwrap_or(delivery.max_age);
            }
            if let Some(ua) = &d.user_agent {
                delivery.user_agent = ua.clone();
            }
            for (host, raw) in &d.destinations {
                let mut dest = DestinationSettings::default();
                if let Some(n) = &raw.concurrency {
                    if n.value == 0 {
                        self.err(
                            &cx,
                            n,
                            format!("delivery.destinations.{host}.concurrency must be at least 1"),
                            None,
                        );
                    }
                    dest.concurrency = Some(n.value.max(1) as usize);
                }
                if let Some(r) = &raw.rate {
                    match parse_rate(&r.value) {
                        Ok(v) => dest.rate = Some(v),
                        Err(m) => self.err(
                            &cx,
                            r,
                            m,
                            Some("write a rate like 10/s, 600/m or 3600/h".into()),
                        ),
                    }
                }
                let at = raw
                    .concurrency
                    .as_ref()
                    .map(|n| (n.referenced.line(), n.referenced.column()))
                    .or(raw
                        .rate
                        .as_ref()
                        .map(|r| (r.referenced.line(), r.referenced.column())));
                if let Some((l, c)) = at {
                    self.destination_keys
                        .push((host.to_ascii_lowercase(), l, c));
                }
                delivery
                    .destinations
                    .insert(host.to_ascii_lowercase(), dest);
            }
        }
        let retention = match &raw.retention {
            Some(r) => {
                self.retention_at = Some((
                    file.to_path_buf(),
                    r.referenced.line(),
                    r.referenced.column(),
                ));
                self.duration(&cx, r).unwrap_or(DEFAULT_RETENTION)
            }
            None => DEFAULT_RETENTION,
        };
        let mut admin_tokens = Vec::new();
        let mut affiliate_tokens = Vec::new();
        for (affiliate, t) in raw.api.iter().flat_map(|a| &a.affiliate_tokens) {
            if !t.value.trim_start().starts_with("${") {
                self.err(
                    &cx,
                    t,
                    format!("api.affiliate_tokens.{affiliate}: a token must not be written in the config"),
                    Some("read it from the environment or a file: ${env:AFFILIATE_42_TOKEN}".into()),
                );
                continue;
            }
            let token = self.expand(&cx, t);
            if token.len() < 16 && !token.is_empty() {
                self.err(
                    &cx,
                    t,
                    format!(
                        "api.affiliate_tokens.{affiliate}: a token needs at least 16 characters"
                    ),
                    None,
                );
            } else if !token.is_empty() {
                affiliate_tokens.push((token, affiliate.clone()));
            }
        }
        for t in raw.api.iter().flat_map(|a| &a.admin_tokens) {
            if !t.value.trim_start().starts_with("${") {
                self.err(
                    &cx,
                    t,
                    "api.admin_tokens: a token must not be written in the config",
                    Some("read it from the environment or a file: ${env:POSTBACKD_ADMIN_TOKEN} or ${file:/run/secrets/postbackd}".into()),
                );
                continue;
            }
            let token = self.expand(&cx, t);
            if token.len() < 16 && !token.is_empty() {
                self.err(
                    &cx,
                    t,
                    "api.admin_tokens: a token needs at least 16 characters",
                    Some("generate one with: openssl rand -hex 24".into()),
                );
            } else if !token.is_empty() {
                admin_tokens.push(token);
            }
        }
        let mut log_json = false;
        let mut log_level = "info".to_string();
        if let Some(l) = &raw.log {
            if let Some(f) = &l.format {
                match f.value.as_str() {
                    "json" => log_json = true,
                    "text" => {}
                    other => self.err(
                        &cx,
                        f,
                        format!("log.format: unknown format `{other}`"),
                        Some("use text or json".into()),
                    ),
                }
            }
            if let Some(lv) = &l.level {
                if let Some(bad) = bad_log_level(&lv.value) {
                    self.err(
                        &cx,
                        lv,
                        format!("log.level: `{bad}` is not a level"),
                        Some("use error, warn, info, debug or trace, or target=level pairs like info,postbackd::deliver=debug".into()),
                    );
                }
                log_level = lv.value.clone();
            }
        }
        Settings {
            listen,
            data_dir,
            delivery,
            log_json,
            log_level,
            retention,
            admin_tokens,
            affiliate_tokens,
        }
    }

    fn source(&mut self, file: &Path, s: &RawSource) {
        let cx = Ctx {
            file,
            postback: None,
        };
        if self.sources.contains_key(&s.id.value) {
            self.err(
                &cx,
                &s.id,
                format!("source `{}` is defined twice", s.id.value),
                Some("source ids must be unique across all files".into()),
            );
            return;
        }
        let secret = s.secret.as_ref().map(|v| self.expand(&cx, v));
        let mut map = FieldMap::default();
        for (canonical, param) in &s.fields {
            if !CANONICAL.contains(&canonical.as_str()) {
                let hint = suggest(canonical, CANONICAL.iter().copied());
                self.err(
                    &cx,
                    param,
                    format!("fields: `{canonical}` is not a canonical field"),
                    hint,
                );
                continue;
            }
            map.fields.insert(canonical.clone(), param.value.clone());
        }
        for (word, status) in &s.status_map {
            match Status::parse(&status.value) {
                Some(st)
                    if ["approved", "pending", "rejected"].contains(&status.value.as_str()) =>
                {
                    map.statuses.insert(word.clone(), st);
                    map.statuses.insert(word.to_ascii_lowercase(), st);
                }
                _ => self.err(
                    &cx,
                    status,
                    format!("status_map: `{}` is not a status", status.value),
                    Some("map to approved, pending or rejected".into()),
                ),
            }
        }
        let kind = match &s.kind {
            Some(k) => Kind::parse(&k.value).unwrap_or_else(|| {
                self.err(
                    &cx,
                    k,
                    format!("kind: unknown kind `{}`", k.value),
                    Some("use click, impression or conversion".into()),
                );
                Kind::Conversion
            }),
            None => Kind::Conversion,
        };
        self.sources.insert(
            s.id.value.clone(),
            Source {
                id: s.id.value.clone(),
                secret,
                secret_param: s.secret_param.clone().unwrap_or_else(|| "token".into()),
                secret_header: s.secret_header.clone(),
                map,
                kind,
            },
        );
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

    /// Checks a template's variables against what an event provides.
    fn check_vars(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        vars: &[String],
        declared: &BTreeMap<String, Spanned<String>>,
    ) {
        for v in vars {
            let (head, tail) = match v.split_once('.') {
                Some((h, t)) => (h, Some(t)),
                None => (v.as_str(), None),
            };
            if head == "params" || head.starts_with(secret::PREFIX) {
                continue;
            }
            if head == "vars" {
                if let Some(name) = tail {
                    let name = name.split('.').next().unwrap_or(name);
                    if !declared.contains_key(name) {
                        let hint =
                            suggest(name, declared.keys().map(String::as_str)).or_else(|| {
                                Some(format!(
                                    "declare it under `vars:` (declared: {})",
                                    list(declared.keys())
                                ))
                            });
                        self.err(cx, at, format!("unknown variable `vars.{name}`"), hint);
                    }
                }
                continue;
            }
            if canonical_name(head).is_some() || EXTRA_NAMES.contains(&head) {
                continue;
            }
            let hint = suggest(head, CANONICAL.iter().chain(EXTRA_NAMES).copied())
                .or_else(|| Some(format!("use a canonical field, or `params.{head}` for a raw parameter the tracker sends")));
            self.err(
                cx,
                at,
                format!("unknown macro `{head}`: it would never render"),
                hint,
            );
        }
    }

    fn template(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        text: &str,
        escape: Escape,
        shorthand: bool,
        declared: &BTreeMap<String, Spanned<String>>,
    ) -> Option<crate::render::template::TemplateId> {
        let src = if shorthand {
            expand_shorthand(text)
        } else {
            text.to_string()
        };
        match self.engine.add(&src, escape) {
            Ok((id, vars)) => {
                self.check_vars(cx, at, &vars, declared);
                Some(id)
            }
            Err(m) => {
                self.err(
                    cx,
                    at,
                    format!("template error: {m}"),
                    Some(
                        "macros are {name} or {{ name }}; filters like {{ email | sha256 }}".into(),
                    ),
                );
                None
            }
        }
    }

    fn conditions(
        &mut self,
        cx: &Ctx,
        when: &BTreeMap<String, Spanned<OneOrMany>>,
        unless: &BTreeMap<String, Spanned<OneOrMany>>,
    ) -> Conditions {
        let mut goal = None;
        let mut w = Vec::new();
        let mut u = Vec::new();
        for (which, map) in [(0, when), (1, unless)] {
            for (field, values) in map {
                let Some(canonical) =
                    canonical_name(field).or(if field == "kind" { Some("kind") } else { None })
                else {
                    let hint = suggest(field, CANONICAL.iter().copied());
                    self.err(
                        cx,
                        values,
                        format!("unknown field `{field}` in conditions"),
                        hint,
                    );
                    continue;
                };
                let vals: Vec<String> = values.value.0.iter().map(|i| i.0.clone()).collect();
                if canonical == "status" {
                    for v in &vals {
                        if Status::parse(v).is_none() {
                            self.err(
                                cx,
                                values,
                                format!("`{v}` is not a status"),
                                Some("use approved, pending or rejected".into()),
                            );
                        }
                    }
                }
                let vals: Vec<String> = if canonical == "status" {
                    vals.iter()
                        .filter_map(|v| Status::parse(v))
                        .map(|s| s.as_str().to_string())
                        .collect()
                } else {
                    vals
                };
                if which == 0 && canonical == "goal" {
                    goal = Some(vals);
                } else if which == 0 {
                    w.push((canonical.to_string(), vals));
                } else {
                    u.push((canonical.to_string(), vals));
                }
            }
        }
        Conditions {
            goal,
            when: w,
            unless: u,
            expr: None,
        }
    }

    fn postback(&mut self, file: &Path, p: &RawPostback, defaults: &DeliverySettings) {
        let id = p.id.value.clone();
        let cx = Ctx {
            file,
            postback: Some(&id),
        };
        if id.trim().is_empty() || id.contains(char::is_whitespace) {
            self.err(
                &cx,
                &p.id,
                "postback id must be a non-empty word",
                Some("use ids like keitaro-approved".into()),
            );
        }
        if let Some((f, l)) = self.postback_origin.get(&id) {
            let msg = format!("postback id is used twice (first at {}:{l})", f.display());
            self.err(&cx, &p.id, msg, Some("ids are how deliveries and logs refer to a postback: keep them unique and stable".into()));
            return;
        }
        self.postback_origin
            .insert(id.clone(), (file.to_path_buf(), p.id.referenced.line()));
        let errors_before = self.errors.len();
        self.postback_has_secret = false;

        let trigger = match Kind::parse(&p.trigger.value) {
            Some(k)
                if ["click", "impression", "conversion"].contains(&p.trigger.value.as_str()) =>
            {
                k
            }
            _ => {
                self.err(
                    &cx,
                    &p.trigger,
                    format!("unknown trigger `{}`", p.trigger.value),
                    Some("use click, impression or conversion".into()),
                );
                Kind::Conversion
            }
        };
        let statuses = p.statuses.as_ref().map(|s| {
            if trigger != Kind::Conversion {
                self.err(
                    &cx,
                    s,
                    "statuses only apply to conversions",
                    Some("remove `statuses` or set `trigger: conversion`".into()),
                );
            }
            s.value
                .0
                .iter()
                .filter_map(|v| {
                    let st = Status::parse(&v.0).filter(|st| st.as_str() == v.0);
                    if st.is_none() {
                        self.err(
                            &cx,
                            s,
                            format!("`{}` is not a status", v.0),
                            Some("use approved, pending or rejected".into()),
                        );
                    }
                    st
                })
                .collect::<Vec<_>>()
        });

        // Scope: which offers the postback applies to.
        let scope: Vec<String> = match &p.offers {
            None => vec![ALL_OFFERS.to_string()],
            Some(s)
                if s.value.0.len() == 1
                    && (s.value.0[0].0 == "all" || s.value.0[0].0 == ALL_OFFERS) =>
            {
                vec![ALL_OFFERS.to_string()]
            }
            Some(s) => {
                let mut v = Vec::new();
                for o in &s.value.0 {
                    if !self.offers.contains_key(&o.0) {
                        let hint = suggest(&o.0, self.offers.keys().map(String::as_str))
                            .or_else(|| Some("define the offer under `offers:` in any rule file, or use `offers: all`".into()));
                        self.err(&cx, s, format!("unknown offer `{}`", o.0), hint);
                    } else {
                        v.push(o.0.clone());
                    }
                }
                v
            }
        };
        for key in p.per_offer.keys() {
            if !scope.contains(key) {
                let msg = format!("per_offer: `{key}` is not one of this postback's offers");
                self.err(
                    &cx,
                    &p.id,
                    msg,
                    Some(format!("add it to `offers:` ({})", scope.join(", "))),
                );
            }
        }

        // Conditions, checked against each scoped offer's goals.
        let Conditions {
            goal, when, unless, ..
        } = self.conditions(&cx, &p.when, &p.unless);
        if let Some(goals) = &goal {
            for o in &scope {
                if let Some(offer_goals) = self.offers.get(o).map(|(offer, _)| offer.goals.clone())
                {
                    if offer_goals.is_empty() {
                        continue;
                    }
                    for g in goals {
                        if !offer_goals.contains(g) {
                            let msg = format!("goal `{g}` is not a goal of offer `{o}`");
                            let hint =
                                Some(format!("offer `{o}` has goals: {}", offer_goals.join(", ")));
                            let at = p
                                .when
                                .get("goal")
                                .map(|s| (s.referenced.line(), s.referenced.column()))
                                .unwrap_or((0, 0));
                            self.err_at(file, at.0, at.1, Some(&id), msg, hint);
                        }
                    }
                }
            }
        }
        let expr = p
            .expr
            .as_ref()
            .and_then(|e| match self.engine.add_condition(&e.value) {
                Ok((t, vars)) => {
                    self.check_vars(&cx, e, &vars, &BTreeMap::new());
                    Some(t)
                }
                Err(m) => {
                    self.err(
                        &cx,
                        e,
                        format!("if: {m}"),
                        Some(r#"write it like: payout > 0 and country != "US""#.into()),
                    );
                    None
                }
            });
        let delay = p
            .delay
            .as_ref()
            .and_then(|d| self.duration(&cx, d))
            .unwrap_or_default();
        self.longest_delay = self.longest_delay.max(delay);
        let retry = match &p.retry {
            Some(r) => r.iter().filter_map(|s| self.duration(&cx, s)).collect(),
            None => defaults.retry.clone(),
        };
        let mut declared = p.vars.clone();
        for o in p.per_offer.values() {
            for (k, v) in &o.vars {
                declared.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        for (k, v) in &declared {
            if CANONICAL.contains(&k.as_str()) {
                self.err(
                    &cx,
                    v,
                    format!("vars: `{k}` is an event field name"),
                    Some("pick another name; templates read vars as {{ vars.NAME }}".into()),
                );
            }
        }

        let http = match &p.http {
            Some(h) => self.http(&cx, h, &declared),
            None => {
                self.err(
                    &cx,
                    &p.id,
                    "postback has no action",
                    Some("add an `http:` block with at least a `url:`".into()),
                );
                None
            }
        };
        // Each var as sent and as shown (`***` for its secrets).
        let vars: BTreeMap<String, (String, String)> = p
            .vars
            .iter()
            .map(|(k, v)| {
                let (real, shown) = self.expand_pair(&cx, v);
                let shown = shown.unwrap_or_else(|| real.clone());
                (k.clone(), (real, shown))
            })
            .collect();
        if self.errors.len() > errors_before {
            return;
        }
        let Some(http) = http else { return };
        let pb_index = self.postbacks.len();
        self.postbacks.push(Postback {
            id: id.clone(),
            name: p.name.clone(),
            owner: p.affiliate.as_ref().map(|a| a.value.0.clone()),
            origin: Origin {
                file: file.to_path_buf(),
                line: p.id.referenced.line(),
            },
            trigger,
            statuses,
            http,
            retry,
            fingerprint: fingerprint(p),
            has_secret: self.postback_has_secret,
        });
        let base_enabled = p.enabled.unwrap_or(true);
        for offer in scope {
            let ov = p.per_offer.get(&offer);
            let mut entry_vars = vars.clone();
            let mut entry_delay = delay;
            let mut entry_enabled = base_enabled;
            let mut conds = Conditions {
                goal: goal.clone(),
                when: when.clone(),
                unless: unless.clone(),
                expr,
            };
            if let Some(ov) = ov {
                for (k, v) in &ov.vars {
                    let (real, shown) = self.expand_pair(&cx, v);
                    let shown = shown.unwrap_or_else(|| real.clone());
                    entry_vars.insert(k.clone(), (real, shown));
                }
                if let Some(d) = &ov.delay {
                    entry_delay = self.duration(&cx, d).unwrap_or(entry_delay);
                    self.longest_delay = self.longest_delay.max(entry_delay);
                }
                if let Some(e) = ov.enabled {
                    entry_enabled = e;
                }
                let Conditions {
                    goal: g, when: w, ..
                } = self.conditions(&cx, &ov.when, &BTreeMap::new());
                if g.is_some() {
                    conds.goal = g;
                }
                for (f, v) in w {
                    conds.when.retain(|(x, _)| *x != f);
                    conds.when.push((f, v));
                }
            }
            for (k, v) in &declared {
                if !entry_vars.contains_key(k) {
                    let msg = format!("vars: `{k}` has no value for offer `{offer}`");
                    self.err(
                        &cx,
                        v,
                        msg,
                        Some(
                            "give it a value under `vars:` or under this offer in `per_offer:`"
                                .into(),
                        ),
                    );
                }
            }
            let shown_vars = entry_vars
                .values()
                .any(|(real, shown)| real != shown)
                .then(|| {
                    Arc::new(
                        entry_vars
                            .iter()
                            .map(|(k, (_, s))| (k.clone(), s.clone()))
                            .collect(),
                    )
                });
            if shown_vars.is_some() {
                self.postbacks[pb_index].has_secret = true;
            }
            self.entries.push(Entry {
                postback: pb_index,
                offer,
                enabled: entry_enabled,
                delay: entry_delay,
                vars: Arc::new(entry_vars.into_iter().map(|(k, (r, _))| (k, r)).collect()),
                shown_vars,
                conditions: conds,
            });
        }
    }

    fn http(
        &mut self,
        cx: &Ctx,
        h: &RawHttp,
        declared: &BTreeMap<String, Spanned<String>>,
    ) -> Option<HttpAction> {
        let method = match h.method.as_ref().map(|m| m.value.to_ascii_uppercase()) {
            None => Method::Get,
            Some(m) => match m.as_str() {
                "GET" => Method::Get,
                "POST" => Method::Post,
                "PUT" => Method::Put,
                "PATCH" => Method::Patch,
                "DELETE" => Method::Delete,
                _ => {
                    if let Some(at) = &h.method {
                        self.err(
                            cx,
                            at,
                            format!("unknown method `{m}`"),
                            Some("use GET, POST, PUT, PATCH or DELETE".into()),
                        );
                    }
                    Method::Get
                }
            },
        };
        let (url_text, url_src) = self.template_text(cx, &h.url);
        // URL confinement: the scheme and host are written in the rule, never rendered from
        // event data, so a crafted click id cannot redirect a postback.
        let static_prefix = url_text.split("{").next().unwrap_or("");
        let after_scheme = static_prefix
            .strip_prefix("https://")
            .or_else(|| static_prefix.strip_prefix("http://"));
        match after_scheme {
            None => self.err(
                cx,
                &h.url,
                // The url as written: an expanded secret never goes into a message.
                format!(
                    "url must start with http:// or https://, got `{}`",
                    truncate(&h.url.value, 60)
                ),
                Some(
                    "write the full url, e.g. https://tracker.example/postback?cid={clickid}"
                        .into(),
                ),
            ),
            Some(rest) if !rest.contains(['/', '?']) && url_text.contains('{') => self.err(
                cx,
                &h.url,
                "url: the host must be written out, not templated",
                Some(
                    "keep macros in the path and query: https://tracker.example/pb?cid={clickid}"
                        .into(),
                ),
            ),
            Some("") => self.err(cx, &h.url, "url has no host", None),
            _ => {}
        }
        let url = self.template(cx, &h.url, &url_src, Escape::Url, true, declared);
        let mut params = Vec::new();
        for (k, v) in &h.params {
            let (_, text) = self.template_text(cx, v);
            if let Some(t) = self.template(cx, v, &text, Escape::Plain, true, declared) {
                params.push((k.clone(), t));
            }
        }
        let mut headers = Vec::new();
        for (k, v) in &h.headers {
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                self.err(cx, v, format!("`{k}` is not a valid header name"), None);
                continue;
            }
            let (_, text) = self.template_text(cx, v);
            if let Some(t) = self.template(cx, v, &text, Escape::Plain, true, declared) {
                headers.push((k.clone(), t));
            }
        }
        let bodies = [h.form.is_some(), h.json.is_some(), h.body.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if bodies > 1 {
            self.err(cx, &h.url, "give at most one of form, json and body", None);
        }
        if bodies > 0 && method == Method::Get {
            let at = h
                .method
                .as_ref()
                .map(|m| (m.referenced.line(), m.referenced.column()))
                .unwrap_or((h.url.referenced.line(), h.url.referenced.column()));
            self.err_at(
                cx.file,
                at.0,
                at.1,
                cx.postback,
                "a GET request cannot carry a body".into(),
                Some("set `method: POST`".into()),
            );
        }
        let body = if let Some(form) = &h.form {
            let mut fields = Vec::new();
            for (k, v) in form {
                let (_, text) = self.template_text(cx, v);
                if let Some(t) = self.template(cx, v, &text, Escape::Plain, true, declared) {
                    fields.push((k.clone(), t));
                }
            }
            Body::Form(fields)
        } else if let Some(j) = &h.json {
            let at = Spanned::new(String::new(), j.referenced, j.defined);
            Body::Json(self.json_template(cx, &at, &j.value, declared))
        } else if let Some(b) = &h.body {
            let (_, text) = self.template_text(cx, b);
            let ct = h
                .content_type
                .clone()
                .unwrap_or_else(|| "text/plain; charset=utf-8".into());
            let esc = if ct.contains("json") {
                Escape::Json
            } else {
                Escape::Plain
            };
            match self.template(cx, b, &text, esc, false, declared) {
                Some(t) => Body::Raw {
                    template: t,
                    content_type: ct,
                },
                None => Body::None,
            }
        } else {
            Body::None
        };
        let auth = h
            .auth
            .as_ref()
            .and_then(|a| match (&a.username, &a.password, &a.bearer) {
                (Some(u), Some(p), None) => {
                    let (username, u_shown) = self.expand_pair(cx, u);
                    let (password, p_shown) = self.expand_pair(cx, p);
                    Some(Auth::Basic {
                        username,
                        password,
                        masked: u_shown.is_some() || p_shown.is_some(),
                    })
                }
                (None, None, Some(b)) => {
                    let (token, shown) = self.expand_pair(cx, b);
                    Some(Auth::Bearer {
                        shown: shown.unwrap_or_else(|| token.clone()),
                        token,
                    })
                }
                _ => {
                    self.err(
                        cx,
                        &h.url,
                        "auth: give either username and password, or bearer",
                        Some("auth: { bearer: \"${env:CRM_TOKEN}\" }".into()),
                    );
                    None
                }
            });
        let timeout = h.timeout.as_ref().and_then(|t| self.duration(cx, t));
        let success = match &h.success {
            Some(s) => Success {
                status: s.status.clone().unwrap_or_default(),
                body_contains: s.body_contains.clone(),
                body_not_contains: s.body_not_contains.clone(),
                json: s.json.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            },
            None => Success::default(),
        };
        Some(HttpAction {
            method,
            destination: destination_of(&url_text),
            url: url?,
            params,
            headers,
            body,
            auth,
            timeout,
            success,
        })
    }

    fn json_template(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        v: &serde_json::Value,
        declared: &BTreeMap<String, Spanned<String>>,
    ) -> JsonTemplate {
        match v {
            serde_json::Value::String(s) => {
                let at_text = Spanned::new(s.clone(), at.referenced, at.defined);
                let (expanded, src) = self.template_text(cx, &at_text);
                let src = expand_shorthand(&src);
                if !src.contains("{{") && !src.contains("{%") {
                    return JsonTemplate::Static(serde_json::Value::String(expanded));
                }
                let trimmed = src.trim();
                let whole = trimmed.starts_with("{{")
                    && trimmed.ends_with("}}")
                    && trimmed.matches("{{").count() == 1;
                let (src, esc) = if whole {
                    (trimmed.to_string(), Escape::Json)
                } else {
                    (src, Escape::Plain)
                };
                match self.template(cx, &at_text, &src, esc, false, declared) {
                    Some(t) if whole => JsonTemplate::Whole(t),
                    Some(t) => JsonTemplate::Text(t),
                    None => JsonTemplate::Static(v.clone()),
                }
            }
            serde_json::Value::Array(a) => JsonTemplate::Array(
                a.iter()
                    .map(|x| self.json_template(cx, at, x, declared))
                    .collect(),
            ),
            serde_json::Value::Object(o) => JsonTemplate::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.json_template(cx, at, x, declared)))
                    .collect(),
            ),
            other => JsonTemplate::Static(other.clone()),
        }
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

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = items.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// "did you mean `sub4`?" for a name close to a known one.
pub fn suggest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<String> {
    let lname = name.to_ascii_lowercase();
    // Short names are too easily "close" to anything; longer ones tolerate more typos.
    let limit = match lname.chars().count() {
        0..=2 => 0,
        3..=4 => 1,
        n => n / 2,
    };
    known
        .map(|k| (levenshtein(&lname, &k.to_ascii_lowercase()), k))
        .filter(|(d, _)| *d > 0 && *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!("did you mean `{k}`?"))
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests;
