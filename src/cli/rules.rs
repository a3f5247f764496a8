//! The commands for changing rules safely: `test` (rule unit tests), `fire` (what one event
//! would send, and optionally send it) and `diff` (what a change does).

use crate::simulate;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `postbackd test <dir> [<tests>…]`.
pub fn test(dir: &Path, files: &[PathBuf]) -> ExitCode {
    let files = crate::testing::test_files(dir, files);
    if files.is_empty() {
        eprintln!(
            "no tests: put them in {}/tests/*.yaml or name the files",
            dir.display()
        );
        return ExitCode::from(1);
    }
    match crate::testing::run(dir, &files) {
        Err(errs) => {
            eprintln!("{errs}");
            eprintln!("{} config error(s) in {}", errs.0.len(), dir.display());
            ExitCode::from(1)
        }
        Ok(r) => {
            print!("{}", r.text);
            println!("{} passed, {} failed", r.passed, r.failed);
            if r.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `postbackd diff <old> <new> [--events <file>…]`. Exits 0 whether or not anything
/// changed (like `git diff`), 2 when either side does not load.
pub fn diff(old: &Path, new: &Path, events: &[PathBuf]) -> ExitCode {
    let load = |dir: &Path| {
        crate::config::load_dir(dir).map_err(|errs| {
            eprintln!("{errs}");
            eprintln!("{} config error(s) in {}", errs.0.len(), dir.display());
        })
    };
    let (Ok(a), Ok(b)) = (load(old), load(new)) else {
        return ExitCode::from(2);
    };
    let files: Vec<PathBuf> = if events.is_empty() {
        let mut f = crate::testing::test_files(new, &[]);
        f.extend(crate::testing::test_files(old, &[]));
        f
    } else {
        events.to_vec()
    };
    let mut samples: Vec<crate::diff::Sample> = Vec::new();
    for f in &files {
        match crate::diff::samples_from_file(f) {
            Ok(s) => samples.extend(s),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    // The same test in both directories is one sample.
    let mut seen = std::collections::HashSet::new();
    samples.retain(|s| seen.insert(format!("{:?}{:?}", s.source, s.history)));
    print!("{}", crate::diff::diff(&a, old, &b, new, &samples));
    ExitCode::SUCCESS
}

/// Reads an event given on the command line: a JSON object, a query string (or a whole
/// URL), or `@file` holding either.
pub fn event_arg(arg: &str) -> Result<Map<String, Value>, String> {
    let text = match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?
        }
        None => arg.to_string(),
    };
    let text = text.trim();
    if text.starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("the event must be a JSON object".into()),
            Err(e) => Err(format!("the event is not valid JSON: {e}")),
        };
    }
    let query = text.split_once('?').map_or(text, |(_, q)| q);
    let m: Map<String, Value> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    if m.is_empty() {
        return Err("give the event as JSON ('{\"clickid\":\"abc\"}') or a query string ('clickid=abc&status=approved')".into());
    }
    Ok(m)
}

/// How `fire` runs: send each postback once, and print JSON rather than text.
pub struct FireOptions {
    pub send: bool,
    pub json: bool,
}

/// `postbackd fire <dir> <event> [--send] [--json]`. Exits 1 when a postback cannot be
/// rendered or (with `--send`) was not accepted, 2 for a bad argument.
pub fn fire(
    dir: &Path,
    event: &str,
    before: &[String],
    source: Option<&str>,
    opts: FireOptions,
    allow_networks: &[String],
) -> ExitCode {
    let FireOptions { send, json } = opts;
    let mut plan = match crate::config::load_dir(dir) {
        Ok(p) => p,
        Err(errs) => {
            if json {
                let errors: Vec<Value> = errs
                    .0
                    .iter()
                    .map(|e| serde_json::json!(e.to_string()))
                    .collect();
                println!("{}", serde_json::json!({ "errors": errors }));
            } else {
                eprintln!("{errs}");
            }
            return ExitCode::from(1);
        }
    };
    for a in allow_networks {
        match crate::deliver::egress::parse_allowed(a) {
            Ok(a) => crate::deliver::egress::allow(&mut plan.settings.delivery, a),
            Err(e) => {
                eprintln!("error: --allow-network: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut history = Vec::new();
    for (i, arg) in before.iter().map(String::as_str).chain([event]).enumerate() {
        let parsed = event_arg(arg).and_then(|m| {
            crate::ingest::parse_event(&plan, source, &m, crate::now_ms() + i as i64)
        });
        match parsed {
            Ok(e) => history.push(e),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let fired = simulate::simulate(&plan, &history);
    if fired.is_empty() && !json {
        println!("nothing fires");
        return ExitCode::SUCCESS;
    }
    let Some(rt) = super::runtime() else {
        return ExitCode::from(1);
    };
    let plan = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(plan));
    let egress = crate::deliver::egress::Egress::new(plan.clone());
    let plan = plan.load_full();
    let client = crate::deliver::client(&plan.settings.delivery.user_agent, egress.clone());
    let mailer = crate::actions::email::Mailer::default();
    let appender = crate::actions::sheets::Appender::default();
    let transports = crate::deliver::Transports {
        client: &client,
        egress: &egress,
        mailer: &mailer,
        appender: &appender,
    };
    let mut failed = false;
    let mut out = Vec::new();
    for f in &fired {
        let mut v = serde_json::json!(simulate::FiredJson::new(f));
        if !json {
            print_fired(f);
        }
        let Ok(rendered) = &f.request else {
            failed = true;
            out.push(v);
            continue;
        };
        if send {
            let t = rt.block_on(crate::deliver::send_once(
                &transports,
                &plan,
                &f.postback,
                &rendered.message,
            ));
            failed |= t.outcome != "delivered";
            if json {
                v["answer"] = serde_json::json!(t);
            } else {
                let status = t
                    .status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into());
                println!("  <- {} {status} in {} ms", t.outcome, t.duration_ms);
                if let Some(b) = t.body.filter(|b| !b.is_empty()) {
                    println!("     {}", b.lines().next().unwrap_or_default());
                }
                if let Some(e) = t.error {
                    println!("     {e}");
                }
            }
        }
        if !json {
            println!();
        }
        out.push(v);
    }
    if json {
        let doc = serde_json::json!({ "version": plan.hash, "fired": out, "sent": send });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if !send {
        println!("(dry run: nothing was sent; add --send to send each once)");
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_fired(f: &simulate::Fired) {
    let mut head = format!("-> {}", f.postback);
    if f.kind != crate::actions::http::KIND {
        head.push_str(&format!(" [{}]", f.kind));
    }
    if f.offer != crate::plan::ALL_OFFERS {
        head.push_str(&format!(" (offer {})", f.offer));
    }
    if !f.delay.is_zero() {
        head.push_str(&format!(", held {}s before sending", f.delay.as_secs()));
    }
    println!("{head}");
    match &f.request {
        Ok(r) => {
            for l in simulate::describe(r.shown()).lines() {
                println!("   {l}");
            }
        }
        Err(e) => println!("   cannot render: {e}"),
    }
}
