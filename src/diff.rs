//! `postbackd diff`: what a rule change does. Postbacks added, removed and changed, and for
//! a set of sample events (the rule tests of both directories, or recorded events), which
//! deliveries would start, stop or be sent differently.

use crate::plan::Plan;
use crate::simulate::{self, Fired};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::path::Path;

/// One sample: a label, and the events of one conversion, oldest first.
#[derive(Debug, Clone)]
pub struct Sample {
    pub label: String,
    pub source: Option<String>,
    pub history: Vec<Map<String, Value>>,
}

/// What changed between two configs.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
    pub offers_changed: Vec<String>,
    pub settings_changed: bool,
    pub samples: usize,
    /// Per sample with a difference: its label and the lines describing it.
    pub effects: Vec<(String, Vec<String>)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.offers_changed.is_empty()
            && !self.settings_changed
            && self.effects.is_empty()
    }
}

fn located(plan: &Plan, id: &str, dir: &Path) -> String {
    match plan.postback(id) {
        Some(p) => format!(
            "{id}  ({}:{})",
            p.origin
                .file
                .strip_prefix(dir)
                .unwrap_or(&p.origin.file)
                .display(),
            p.origin.line
        ),
        None => id.to_string(),
    }
}

/// Compares two plans, and what each sample fires under them.
pub fn diff(old: &Plan, old_dir: &Path, new: &Plan, new_dir: &Path, samples: &[Sample]) -> Diff {
    let mut d = Diff::default();
    for p in &new.postbacks {
        match old.postback(&p.id) {
            None => d.added.push(located(new, &p.id, new_dir)),
            Some(o) if o.fingerprint != p.fingerprint => {
                d.changed.push(located(new, &p.id, new_dir))
            }
            Some(_) => d.unchanged += 1,
        }
    }
    for p in &old.postbacks {
        if new.postback(&p.id).is_none() {
            d.removed.push(located(old, &p.id, old_dir));
        }
    }
    let ids: BTreeSet<&String> = old.offers.keys().chain(new.offers.keys()).collect();
    for id in ids {
        if old.offers.get(id) != new.offers.get(id) {
            d.offers_changed.push(id.clone());
        }
    }
    // data_dir is resolved against each directory, so it is compared as written nowhere;
    // everything else must match.
    let mut a = old.settings.clone();
    a.data_dir = new.settings.data_dir.clone();
    d.settings_changed = format!("{a:?}") != format!("{:?}", new.settings);
    for s in samples {
        d.samples += 1;
        let (before, after) = (fire(old, s), fire(new, s));
        let lines = compare(&before, &after);
        if !lines.is_empty() {
            d.effects.push((s.label.clone(), lines));
        }
    }
    d
}

fn fire(plan: &Plan, s: &Sample) -> Result<Vec<Fired>, String> {
    let mut history = Vec::new();
    for (i, obj) in s.history.iter().enumerate() {
        history.push(crate::ingest::parse_event(
            plan,
            s.source.as_deref(),
            obj,
            i as i64,
        )?);
    }
    Ok(simulate::simulate(plan, &history))
}

fn one_line(f: &Fired) -> String {
    match &f.request {
        Ok(r) => simulate::describe(r.shown())
            .replace("\n\n", "  body: ")
            .replace('\n', "  "),
        Err(e) => format!("cannot render: {e}"),
    }
}

fn compare(before: &Result<Vec<Fired>, String>, after: &Result<Vec<Fired>, String>) -> Vec<String> {
    let (b, a) = match (before, after) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(e), Ok(_)) => return vec![format!("the event was invalid before: {e}")],
        (Ok(_), Err(e)) => return vec![format!("the event is invalid now: {e}")],
        (Err(_), Err(_)) => return Vec::new(),
    };
    let mut out = Vec::new();
    for f in a {
        match b.iter().find(|x| x.postback == f.postback) {
            None => out.push(format!("+ starts  {}: {}", f.postback, one_line(f))),
            Some(x) => {
                let (was, now) = (one_line(x), one_line(f));
                if was != now || x.delay != f.delay {
                    out.push(format!("~ changes {}:", f.postback));
                    out.push(format!("    was: {was}{}", held(x)));
                    out.push(format!("    now: {now}{}", held(f)));
                }
            }
        }
    }
    for x in b {
        if !a.iter().any(|f| f.postback == x.postback) {
            out.push(format!("- stops   {}: {}", x.postback, one_line(x)));
        }
    }
    out
}

fn held(f: &Fired) -> String {
    if f.delay.is_zero() {
        String::new()
    } else {
        format!("  (held {}s)", f.delay.as_secs())
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "postbacks: {} added, {} removed, {} changed, {} unchanged",
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.unchanged
        );
        for a in &self.added {
            let _ = writeln!(s, "  + {a}");
        }
        for r in &self.removed {
            let _ = writeln!(s, "  - {r}");
        }
        for c in &self.changed {
            let _ = writeln!(s, "  ~ {c}");
        }
        if !self.offers_changed.is_empty() {
            let _ = writeln!(s, "offers changed: {}", self.offers_changed.join(", "));
        }
        if self.settings_changed {
            let _ = writeln!(s, "settings changed (postbackd.yaml)");
        }
        let _ = writeln!(
            s,
            "events: {} sample(s), {} would be sent differently",
            self.samples,
            self.effects.len()
        );
        for (label, lines) in &self.effects {
            let _ = writeln!(s, "  {label}");
            for l in lines {
                let _ = writeln!(s, "    {l}");
            }
        }
        f.write_str(&s)
    }
}

/// Samples from a file: JSON lines, a JSON array of events, a YAML list of events, or a
/// rule-test file (each test's `before` and `event` become one sample).
pub fn samples_from_file(path: &Path) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let name = path.display().to_string();
    let single = |i: usize, mut m: Map<String, Value>| Sample {
        label: format!("{name} #{}", i + 1),
        source: m
            .remove("source")
            .and_then(|v| v.as_str().map(str::to_string)),
        history: vec![m],
    };
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Vec<Map<String, Value>> =
            serde_json::from_str(trimmed).map_err(|e| format!("{name}: {e}"))?;
        return Ok(v
            .into_iter()
            .enumerate()
            .map(|(i, m)| single(i, m))
            .collect());
    }
    if trimmed.starts_with('{') {
        let mut out = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let m: Map<String, Value> =
                serde_json::from_str(line).map_err(|e| format!("{name}:{}: {e}", i + 1))?;
            out.push(single(i, m));
        }
        return Ok(out);
    }
    let v: Value = serde_saphyr::from_str(&text).map_err(|e| {
        let (l, c, m) = crate::config::yaml_message(&e);
        format!("{name}:{l}:{c}: {m}")
    })?;
    match v {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok(single(i, m)),
                _ => Err(format!("{name}: item {} is not an event", i + 1)),
            })
            .collect(),
        Value::Object(mut m) => {
            let Some(Value::Array(tests)) = m.remove("tests") else {
                return Err(format!("{name}: expected a list of events or `tests:`"));
            };
            Ok(tests
                .into_iter()
                .filter_map(|t| {
                    let Value::Object(mut t) = t else { return None };
                    let Some(Value::Object(event)) = t.remove("event") else {
                        return None;
                    };
                    let mut history: Vec<Map<String, Value>> = match t.remove("before") {
                        Some(Value::Array(b)) => b
                            .into_iter()
                            .filter_map(|v| match v {
                                Value::Object(m) => Some(m),
                                _ => None,
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    history.push(event);
                    let label = t
                        .get("name")
                        .and_then(Value::as_str)
                        .map(|n| format!("{name}: {n}"))
                        .unwrap_or_else(|| name.clone());
                    Some(Sample {
                        label,
                        source: t.get("source").and_then(Value::as_str).map(str::to_string),
                        history,
                    })
                })
                .collect())
        }
        _ => Err(format!("{name}: expected a list of events or `tests:`")),
    }
}
