//! Config compilation and matching, through one `plan(files)` helper.

use super::*;
use crate::ingest::event::Event;

fn write(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn plan(files: &[(&str, &str)]) -> Plan {
    let dir = write(files);
    load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    let dir = write(files);
    match load_dir(dir.path()) {
        Ok(_) => panic!("expected errors"),
        Err(e) => {
            e.0.iter()
                .map(|e| {
                    let file = e.file.file_name().unwrap().to_string_lossy();
                    format!("{file}:{}:{}: {}", e.line, e.column, e.message)
                })
                .collect()
        }
    }
}

fn event(pairs: &[(&str, &str)]) -> Event {
    let params = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Event::from_params(params, Kind::Conversion, "default", &FieldMap::default(), 0).unwrap()
}

fn fired(p: &Plan, pairs: &[(&str, &str)]) -> Vec<String> {
    p.matches(&event(pairs))
        .into_iter()
        .map(|m| m.postback_id)
        .collect()
}

const OFFERS: &str = "offers:\n  - id: 1\n    goals: [lead, sale]\n  - id: 2\n    goals: [lead, sale]\n    goals_enabled: false\n";

fn pb(body: &str) -> String {
    format!("postbacks:\n{body}")
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert!(parse_duration("5").unwrap_err().contains("missing unit"));
    assert!(parse_duration("m5").is_err());
}

#[test]
fn scope_statuses_and_conditions() {
    let p = plan(&[
        ("offers.yaml", OFFERS),
        (
            "rules.yaml",
            &pb(r#"  - id: sales-of-1
    trigger: conversion
    statuses: [approved]
    offers: [1]
    when: { goal: sale, affiliate: [7, 8] }
    http: { url: "https://t.example/a?c={clickid}" }
  - id: global-not-us
    trigger: conversion
    unless: { country: US }
    if: payout > 1
    http: { url: "https://t.example/b?c={clickid}" }
  - id: clicks
    trigger: click
    http: { url: "https://t.example/c?c={clickid}" }
"#),
        ),
    ]);
    let base = [
        ("clickid", "c"),
        ("offer_id", "1"),
        ("goal", "sale"),
        ("affiliate_id", "7"),
        ("payout", "5"),
    ];
    assert_eq!(fired(&p, &base), vec!["sales-of-1", "global-not-us"]);
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        for (k, val) in extra {
            v.retain(|(x, _)| x != k);
            v.push((k, val));
        }
        fired(&p, &v)
    };
    assert_eq!(with(&[("status", "pending")]), vec!["global-not-us"]);
    assert_eq!(with(&[("affiliate_id", "9")]), vec!["global-not-us"]);
    assert_eq!(with(&[("offer_id", "3")]), vec!["global-not-us"]);
    assert_eq!(with(&[("country", "US")]), vec!["sales-of-1"]);
    assert_eq!(with(&[("payout", "0.5")]), vec!["sales-of-1"]);
    // A missing payout makes the expression false, not an error that fires everything.
    let no_payout: Vec<_> = base
        .iter()
        .filter(|(k, _)| *k != "payout")
        .copied()
        .collect();
    assert_eq!(fired(&p, &no_payout), vec!["sales-of-1"]);
}

#[test]
fn goals_switched_off_are_ignored_and_come_back() {
    let rules = pb(r#"  - id: sale-only
    trigger: conversion
    offers: [1, 2]
    when: { goal: sale }
    http: { url: "https://t.example/a?c={clickid}" }
"#);
    let p = plan(&[("offers.yaml", OFFERS), ("rules.yaml", &rules)]);
    assert_eq!(
        fired(&p, &[("clickid", "c"), ("offer_id", "1"), ("goal", "lead")]),
        Vec::<String>::new()
    );
    assert_eq!(
        fired(&p, &[("clickid", "c"), ("offer_id", "2"), ("goal", "lead")]),
        vec!["sale-only"]
    );
    // Switching goals back on restores the goal condition as written.
    let on = OFFERS.replace("goals_enabled: false", "goals_enabled: true");
    let p = plan(&[("offers.yaml", &on), ("rules.yaml", &rules)]);
    assert_eq!(
        fired(&p, &[("clickid", "c"), ("offer_id", "2"), ("goal", "lead")]),
        Vec::<String>::new()
    );
    assert_eq!(
        fired(&p, &[("clickid", "c"), ("offer_id", "2"), ("goal", "sale")]),
        vec!["sale-only"]
    );
}

#[test]
fn per_offer_overrides_and_disabled_entries() {
    let p = plan(&[
        ("offers.yaml", OFFERS),
        (
            "rules.yaml",
            &pb(r#"  - id: shared
    trigger: conversion
    offers: [1, 2]
    vars: { token: base }
    per_offer:
      "2": { vars: { token: two }, delay: 30s, when: { affiliate_id: 5 } }
    http: { url: "https://t.example/a?t={{ vars.token }}&c={clickid}" }
  - id: off
    enabled: false
    trigger: conversion
    http: { url: "https://t.example/off" }
"#),
        ),
    ]);
    let m = p.matches(&event(&[
        ("clickid", "c"),
        ("offer_id", "2"),
        ("affiliate_id", "5"),
    ]));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].delay, Duration::from_secs(30));
    let e = event(&[("clickid", "c d"), ("offer_id", "2"), ("affiliate_id", "5")]);
    let req = http_request(&p, &p.entries[m[0].entry], &e);
    assert_eq!(req.url, "https://t.example/a?t=two&c=c%20d");
    assert!(fired(
        &p,
        &[("clickid", "c"), ("offer_id", "2"), ("affiliate_id", "6")]
    )
    .is_empty());
    let m = p.matches(&event(&[("clickid", "c"), ("offer_id", "1")]));
    let req = http_request(&p, &p.entries[m[0].entry], &e);
    assert!(
        req.url.starts_with("https://t.example/a?t=base"),
        "{}",
        req.url
    );
}

#[test]
fn errors_are_collected_from_every_file_with_locations() {
    let errs = errors(&[
        ("offers.yaml", OFFERS),
        ("a.yaml", &pb("  - id: x\n    trigger: conversion\n    http: { url: \"https://t.example/{clikid}\" }\n")),
        ("b.yaml", &pb("  - id: x\n    trigger: conversion\n    http: { url: \"https://t.example/\" }\n")),
        ("c.yaml", "postbacks: [}"),
        (
            "d.yaml",
            &pb("  - id: y\n    trigger: click\n    statuses: [approved]\n    vars: { a: \"${env:POSTBACKD_UNSET_TEST_VAR}\" }\n    http: { url: \"https://t.example/{{ vars.b }}\" }\n"),
        ),
        (
            "e.yaml",
            &pb("  - id: z\n    trigger: conversion\n    http:\n      url: \"https://{clickid}.example\"\n      form: { a: b }\n"),
        ),
    ]);
    let all = errs.join("\n");
    for want in [
        "a.yaml:4:18: unknown macro `clikid`",
        "b.yaml:2:9: postback id is used twice",
        "c.yaml:1:12: mismatched bracket",
        "d.yaml:4:15: statuses only apply to conversions",
        "d.yaml:5:16: environment variable `POSTBACKD_UNSET_TEST_VAR` is not set",
        "d.yaml:6:18: unknown variable `vars.b`",
        "e.yaml:5:12: url: the host must be written out",
        "a GET request cannot carry a body",
    ] {
        assert!(all.contains(want), "missing `{want}` in:\n{all}");
    }
}

#[test]
fn unknown_keys_and_bad_values_in_settings() {
    let errs = errors(&[(
        "postbackd.yaml",
        "listen: nowhere\ndelivery:\n  retry: [5s, soon]\n",
    )]);
    assert!(
        errs[0].starts_with("postbackd.yaml:1:9: listen: `nowhere` is not an address"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("postbackd.yaml:3:15: bad duration `soon`"),
        "{errs:?}"
    );
    let errs = errors(&[("postbackd.yaml", "listn: 1.2.3.4:1\n")]);
    assert!(errs[0].contains("unknown field `listn`"), "{errs:?}");
}

#[test]
fn index_only_visits_candidate_entries() {
    let mut rules = String::from("offers:\n");
    for i in 0..200 {
        rules.push_str(&format!("  - id: {i}\n"));
    }
    rules.push_str("postbacks:\n");
    for i in 0..200 {
        rules.push_str(&format!(
            "  - id: p{i}\n    trigger: conversion\n    offers: [{i}]\n    http: {{ url: \"https://t.example/{i}\" }}\n"
        ));
    }
    let p = plan(&[("rules.yaml", &rules)]);
    assert_eq!(p.index.len(), 200);
    assert_eq!(
        fired(&p, &[("clickid", "c"), ("offer_id", "137")]),
        vec!["p137"]
    );
}

/// A secret in a file, for `${file:…}` (tests never set environment variables: they run
/// in parallel).
fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, value).unwrap();
    format!("${{file:{}}}", path.display())
}

#[test]
fn secrets_are_masked_where_they_are_placed() {
    let dir = tempfile::tempdir().unwrap();
    // Characters that every encoding changes: / + = for URLs, " and \ for JSON.
    let tok = secret_file(&dir, "tok", "enc/sec+BBBB=2222\"q\\");
    let user = secret_file(&dir, "user", "api-user");
    let short = secret_file(&dir, "short", "z9");
    let rules = format!(
        r#"  - id: s
    trigger: conversion
    vars: {{ key: "{tok}" }}
    http:
      method: POST
      url: "https://t.example/{short}/?k={tok}&c={{clickid}}"
      params: {{ t: "{tok}", u: "{{{{ vars.key | upper }}}}", f: "{{{{ '{tok}' | lower }}}}" }}
      headers: {{ x-key: "{tok}" }}
      auth: {{ username: "{user}", password: "{tok}" }}
      json: {{ token: "{tok}", nested: ["{tok}", "{{{{ vars.key }}}}"], cid: "{{clickid}}" }}
  - id: b
    trigger: conversion
    http: {{ url: "https://t.example/b", auth: {{ bearer: "{tok}" }} }}
"#
    );
    let p = plan(&[("r.yaml", &pb(&rules))]);
    let e = event(&[("clickid", "c1")]);
    let secret = "enc/sec+BBBB=2222\"q\\";
    let forms = [
        secret.to_string(),
        crate::render::template::percent_encode(secret),
        form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>(),
        serde_json::to_string(secret).unwrap(),
        secret.to_uppercase(),
        form_urlencoded::byte_serialize(secret.to_uppercase().as_bytes()).collect::<String>(),
        "z9".to_string(),
    ];
    for m in p.matches(&e) {
        let r = p.render(&p.entries[m.entry], &e, 0).unwrap();
        let sent = crate::simulate::describe(&r.message);
        let shown = crate::simulate::describe(r.shown());
        assert!(sent.contains(secret) || sent.contains("Bearer"), "{sent}");
        for f in &forms {
            assert!(!shown.contains(f.as_str()), "`{f}` shows in:\n{shown}");
        }
        assert!(
            !shown.contains("YXBp"),
            "basic auth shows its base64:\n{shown}"
        );
        assert!(shown.contains("***"), "{shown}");
        if m.postback_id == "s" {
            assert!(
                shown.starts_with("POST https://t.example/***/?k=***&c=c1&f=***&t=***&u=***"),
                "{shown}"
            );
            assert!(shown.contains("authorization: Basic ***"), "{shown}");
            assert!(
                shown.contains(r#"{"cid":"c1","nested":["***","***"],"token":"***"}"#),
                "{shown}"
            );
            assert!(sent.contains("/z9/?k=enc/sec+BBBB=2222"), "{sent}");
        } else {
            assert!(shown.contains("authorization: Bearer ***"), "{shown}");
        }
    }
    // What comes back from a destination is scrubbed of every common form.
    for f in &forms[..4] {
        let out = p.scrub(&format!("echo {f} end"));
        assert!(
            out.contains("***") && !forms.iter().any(|f| out.contains(f.as_str())),
            "{out}"
        );
    }
}

#[test]
fn errors_name_a_secret_by_its_reference_not_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret_file(&dir, "s", "sup3rsecretvalue");
    let errs = errors(&[(
        "r.yaml",
        &pb(&format!(
            "  - id: s\n    trigger: conversion\n    http: {{ url: \"{s} not a url\" }}\n"
        )),
    )]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("${file:"), "{errs:?}");
    assert!(!errs[0].contains("sup3rsecretvalue"), "{errs:?}");
}

#[test]
fn destinations_rates_retention_and_tokens() {
    let p = plan(&[
        (
            "postbackd.yaml",
            "retention: 7d\ndelivery:\n  per_destination: 3\n  destinations:\n    Tracker.Example: { concurrency: 1, rate: 120/m }\napi:\n  admin_tokens: [\"${env:PBD_TEST_UNSET_ADMIN_TOKEN:-0123456789abcdef0123}\"]\n",
        ),
        (
            "r.yaml",
            &pb("  - id: a\n    trigger: conversion\n    http: { url: \"https://user:pw@tracker.example/pb?c={clickid}\" }\n  - id: b\n    trigger: conversion\n    http: { url: \"http://127.0.0.1:9000\" }\n"),
        ),
    ]);
    assert_eq!(p.settings.retention, Duration::from_secs(7 * 86400));
    assert_eq!(p.destinations(), ["127.0.0.1:9000", "tracker.example"]);
    let d = &p.settings.delivery;
    assert_eq!(d.concurrency_for("tracker.example"), 1);
    assert_eq!(d.concurrency_for("127.0.0.1:9000"), 3);
    assert_eq!(d.destinations["tracker.example"].rate, Some(2.0));
    assert_eq!(p.settings.admin_tokens, ["0123456789abcdef0123"]);
    // The token is a secret: scrubbed from what destinations answer.
    assert_eq!(p.scrub("x 0123456789abcdef0123 y"), "x *** y");

    let errs = errors(&[(
        "postbackd.yaml",
        "delivery:\n  destinations:\n    a.example: { rate: fast }\napi:\n  admin_tokens: [\"hunter2hunter2hunter2\"]\n",
    )]);
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].starts_with("postbackd.yaml:3:24: bad rate `fast`"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("no postback sends to `a.example`"),
        "{errs:?}"
    );
    assert!(
        errs[2].starts_with("postbackd.yaml:5:18: api.admin_tokens: a token must not be written"),
        "{errs:?}"
    );
}

#[test]
fn a_limit_for_a_host_nobody_sends_to_is_an_error() {
    let errs = errors(&[
        (
            "postbackd.yaml",
            "delivery:\n  destinations:\n    trackr.example: { rate: 5/s }\n",
        ),
        (
            "r.yaml",
            &pb("  - id: a\n    trigger: conversion\n    http: { url: \"https://tracker.example/pb\" }\n"),
        ),
    ]);
    assert_eq!(
        errs,
        ["postbackd.yaml:3:29: delivery.destinations: no postback sends to `trackr.example`"]
    );
}

#[test]
fn amounts_are_sent_exactly_as_received() {
    let p = plan(&[(
        "r.yaml",
        &pb(r#"  - id: m
    trigger: conversion
    if: "payout > 10"
    http:
      method: POST
      url: "https://t.example/?sum={payout}&r={{ revenue }}"
      json: { amount: "{{ payout }}", text: "sum {payout}", double: "{{ payout | float * 2 }}" }
"#),
    )]);
    for (payout, url, amount) in [
        ("12.50", "sum=12.50&r=", "12.50"),
        (
            "12345678901234567890",
            "sum=12345678901234567890&r=",
            "12345678901234567890",
        ),
        ("1e308", "sum=1e308&r=", "1e308"),
    ] {
        let e = event(&[("clickid", "c"), ("payout", payout)]);
        let m = p.matches(&e);
        assert_eq!(m.len(), 1, "{payout} > 10 holds");
        let r = http_request(&p, &p.entries[m[0].entry], &e);
        assert!(r.url.ends_with(url), "{payout}: {}", r.url);
        let body = String::from_utf8(r.body.unwrap()).unwrap();
        assert!(body.contains(&format!(r#""amount":{amount},"#)), "{body}");
        assert!(
            body.contains(&format!(r#""text":"sum {amount}""#)),
            "{body}"
        );
    }
    let e = event(&[("clickid", "c"), ("payout", "12.50"), ("revenue", "3")]);
    let r = http_request(&p, &p.entries[p.matches(&e)[0].entry], &e);
    assert!(r.url.ends_with("sum=12.50&r=3"), "{}", r.url);
    assert!(String::from_utf8(r.body.unwrap())
        .unwrap()
        .contains(r#""double":25.0"#));
    assert!(p
        .matches(&event(&[("clickid", "c"), ("payout", "9.99")]))
        .is_empty());
}

#[test]
fn retention_must_outlive_deliveries_and_log_level_must_be_a_level() {
    let errs = errors(&[
        ("postbackd.yaml", "retention: 1h\ndelivery:\n  max_age: 50m\nlog:\n  level: verbose\n"),
        ("r.yaml", &pb("  - id: a\n    trigger: conversion\n    delay: 20m\n    http: { url: \"https://t.example/a\" }\n")),
    ]);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].starts_with("postbackd.yaml:1:12: retention (3600s) is shorter than delivery.max_age plus the longest delay (4200s)"), "{errs:?}");
    assert!(
        errs[1].starts_with("postbackd.yaml:5:10: log.level: `verbose` is not a level"),
        "{errs:?}"
    );
    plan(&[
        ("postbackd.yaml", "retention: 2h\ndelivery:\n  max_age: 50m\nlog:\n  level: info,postbackd::deliver=debug\n"),
        ("r.yaml", &pb("  - id: a\n    trigger: conversion\n    delay: 20m\n    http: { url: \"https://t.example/a\" }\n")),
    ]);
}

#[test]
fn an_unknown_filter_is_a_check_error() {
    let errs = errors(&[(
        "r.yaml",
        &pb("  - id: a\n    trigger: conversion\n    http: { url: \"https://t.example/?t={{ transaction_id | nosuchfilter }}&u={{ clickid | uper }}\" }\n"),
    )]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("unknown filter `nosuchfilter`"),
        "{errs:?}"
    );
    // Known filters, and a `|` inside a string, are fine.
    plan(&[(
        "r.yaml",
        &pb("  - id: a\n    trigger: conversion\n    http: { url: \"https://t.example/?t={{ clickid | default('a|b') | upper }}&s={status:approved=1}\" }\n"),
    )]);
}

/// The HTTP request an entry renders for an event.
fn http_request(p: &Plan, entry: &crate::plan::Entry, e: &Event) -> crate::actions::Request {
    match p.render(entry, e, 0).unwrap().message {
        crate::actions::Message::Http(r) => r,
        other => panic!("not an HTTP request: {other:?}"),
    }
}
