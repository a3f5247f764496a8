//! `postbackd test`: rule unit tests written in YAML. Each test sends one event (after
//! optional earlier events of the same conversion) through the rules and states every
//! postback that must fire, and, for each, as much of the rendered request as it cares
//! about. `fires: []` says nothing fires. Failures print what differs.
//!
//! ```yaml
//! tests:
//!   - name: an approved deposit pays affiliate 42
//!     event: { clickid: abc, tid: T-1, offer_id: 1001, goal: deposit, affiliate_id: 42, status: approved }
//!     fires:
//!       - postback: aff42-deposits
//!         url: http://127.0.0.1:9000/aff42?clickid=abc&status=1&txid=T-1
//! ```

use crate::config::ConfigErrors;
use crate::plan::Plan;
use crate::simulate::{self, Fired};
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: Spanned<String>,
    /// The source the event arrives from (its field names, status words and kind).
    source: Option<String>,
    /// Earlier events of the same conversion, oldest first.
    #[serde(default)]
    before: Vec<Map<String, Value>>,
    event: Map<String, Value>,
    /// Every postback that fires; `[]` for none.
    fires: Vec<Expected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    postback: String,
    offer: Option<String>,
    method: Option<String>,
    url: Option<String>,
    /// Headers that must be present with these values (others may be too).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// The exact body.
    body: Option<String>,
    /// The body as JSON, compared as values (key order and spacing do not matter).
    json: Option<Value>,
    /// The hold before sending, e.g. `1m`.
    delay: Option<String>,
    /// The action's kind: `http`, `email`, `slack`…
    kind: Option<String>,
    /// An e-mail's exact HTML body.
    html: Option<String>,
}

/// The outcome of a run: counts and the report to print.
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub text: String,
}

/// The test files to run: the ones given, or every YAML file under `<dir>/tests`.
pub fn test_files(dir: &Path, given: &[PathBuf]) -> Vec<PathBuf> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.join("tests")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs every test in `files` against the config in `dir`.
pub fn run(dir: &Path, files: &[PathBuf]) -> Result<Report, ConfigErrors> {
    let plan = crate::config::load_dir(dir)?;
    let mut report = Report {
        passed: 0,
        failed: 0,
        text: String::new(),
    };
    for file in files {
        let cases = match read(file) {
            Ok(c) => c,
            Err(e) => {
                report.failed += 1;
                let _ = writeln!(report.text, "FAILED  {}:{e}", file.display());
                continue;
            }
        };
        for case in cases {
            let problems = check_case(&plan, &case);
            let at = format!("{}:{}", file.display(), case.name.referenced.line());
            if problems.is_empty() {
                report.passed += 1;
                let _ = writeln!(report.text, "ok      {at}: {}", case.name.value);
            } else {
                report.failed += 1;
                let _ = writeln!(report.text, "FAILED  {at}: {}", case.name.value);
                for p in problems {
                    for line in p.lines() {
                        let _ = writeln!(report.text, "        {line}");
                    }
                }
            }
        }
    }
    Ok(report)
}

fn read(file: &Path) -> Result<Vec<TestCase>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!(" cannot read: {e}"))?;
    let parsed: TestFile = serde_saphyr::from_str(&text).map_err(|e| {
        let (line, column, msg) = crate::config::yaml_message(&e);
        format!("{line}:{column}: {msg}")
    })?;
    Ok(parsed.tests)
}

fn check_case(plan: &Plan, case: &TestCase) -> Vec<String> {
    let mut history = Vec::new();
    for (i, obj) in case.before.iter().chain([&case.event]).enumerate() {
        match crate::ingest::parse_event(plan, case.source.as_deref(), obj, i as i64) {
            Ok(e) => history.push(e),
            Err(e) => return vec![format!("the event is not valid: {e}")],
        }
    }
    let fired = simulate::simulate(plan, &history);
    compare(plan, &case.fires, &fired)
}

/// Every difference between what was expected to fire and what fired.
fn compare(plan: &Plan, expected: &[Expected], fired: &[Fired]) -> Vec<String> {
    let mut out = Vec::new();
    for f in fired {
        if !expected.iter().any(|e| e.postback == f.postback) {
            let mut msg = format!("+ `{}` fired, but the test does not expect it", f.postback);
            if let Ok(r) = &f.request {
                msg.push('\n');
                msg.push_str(&indent(&simulate::describe(r.shown())));
            }
            out.push(msg);
        }
    }
    for e in expected {
        let Some(f) = fired.iter().find(|f| f.postback == e.postback) else {
            let why = if plan.postback(&e.postback).is_none() {
                " (no postback has this id)"
            } else {
                ""
            };
            out.push(format!(
                "- `{}` was expected to fire; it did not{why}",
                e.postback
            ));
            continue;
        };
        out.extend(compare_one(e, f));
    }
    if expected.is_empty() && fired.is_empty() {
        return Vec::new();
    }
    out
}

/// One line of difference, if `want` and `got` differ.
fn diff(id: &str, what: &str, want: &str, got: &str) -> Option<String> {
    (want != got).then(|| format!("`{id}` {what} differs:\n  expected: {want}\n       got: {got}"))
}

fn compare_one(e: &Expected, f: &Fired) -> Vec<String> {
    let mut out = Vec::new();
    let id = e.postback.as_str();
    if let Some(o) = &e.offer {
        out.extend(diff(id, "offer", o, &f.offer));
    }
    if let Some(d) = &e.delay {
        match crate::config::parse_duration(d) {
            Ok(want) if want == f.delay => {}
            Ok(_) => out.extend(diff(id, "delay", d, &format!("{}s", f.delay.as_secs()))),
            Err(m) => out.push(format!("`{id}` delay: {m}")),
        }
    }
    let r = match &f.request {
        Ok(r) => r.shown().clone(),
        Err(err) => {
            out.push(format!("`{id}` cannot be rendered: {err}"));
            return out;
        }
    };
    if let Some(m) = &e.method {
        out.extend(diff(id, "method", &m.to_ascii_uppercase(), r.method()));
    }
    if let Some(u) = &e.url {
        out.extend(diff(id, "url", u, r.target()));
    }
    if let Some(k) = &e.kind {
        out.extend(diff(id, "kind", k, f.kind));
    }
    for (k, want) in &e.headers {
        match r.headers().iter().find(|(h, _)| h.eq_ignore_ascii_case(k)) {
            Some((_, got)) => out.extend(diff(id, &format!("header `{k}`"), want, got)),
            None => out.push(format!("`{id}` has no header `{k}` (expected `{want}`)")),
        }
    }
    let body = r
        .body()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    if let Some(want) = &e.html {
        out.extend(diff(
            id,
            "html body",
            want.trim_end(),
            r.html().unwrap_or_default().trim_end(),
        ));
    }
    if let Some(want) = &e.body {
        out.extend(diff(id, "body", want.trim_end(), body.trim_end()));
    }
    if let Some(want) = &e.json {
        match serde_json::from_str::<Value>(&body) {
            Ok(got) => out.extend(diff(id, "json body", &want.to_string(), &got.to_string())),
            Err(_) => out.push(format!("`{id}` body is not JSON: {body}")),
        }
    }
    out
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
