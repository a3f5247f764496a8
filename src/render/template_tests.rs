//! Unit tests of the template engine: shorthand, escapes, filters, conditions, and the
//! simple path against minijinja.

use super::*;

fn ctx() -> Value {
    let mut m: std::collections::BTreeMap<String, Value> = Default::default();
    m.insert("clickid".into(), Value::from("a b&c"));
    m.insert("payout".into(), Value::from(12.5));
    m.insert(
        "__exact_payout".into(),
        Value::from_safe_string("12.50".into()),
    );
    m.insert("status".into(), Value::from("approved"));
    m.insert("email".into(), Value::from("  John@Example.com "));
    m.insert("timestamp".into(), Value::from(1_700_000_000));
    m.insert("none".into(), Value::from(()));
    Value::from(m)
}

fn render(src: &str, esc: Escape) -> Result<String, String> {
    let mut e = Engine::new();
    let (id, _) = e.add(&expand_shorthand(src), esc)?;
    e.render(&id, &ctx())
}

#[test]
fn shorthand_and_url_encoding() {
    assert_eq!(
        render(
            "https://t.example/pb?cid={clickid}&sum={payout}",
            Escape::Url
        )
        .unwrap(),
        "https://t.example/pb?cid=a%20b%26c&sum=12.50"
    );
    assert_eq!(
        render("https://t.example/{clickid:raw}", Escape::Url).unwrap(),
        "https://t.example/a b&c"
    );
    assert_eq!(
        render("x={{ clickid }}", Escape::Url).unwrap(),
        "x=a%20b%26c"
    );
}

#[test]
fn value_map_date_and_hashes() {
    assert_eq!(
        render("{status:approved=1 pending=2}", Escape::Plain).unwrap(),
        "1"
    );
    assert_eq!(
        render("{date:%Y-%m-%d %H:%M,Europe/Berlin}", Escape::Plain).unwrap(),
        "2023-11-14 23:13"
    );
    // Meta's normalisation: trim and lower-case before hashing.
    assert_eq!(
        render("{email:hash}", Escape::Plain).unwrap(),
        "855f96e983f1f8e8be944692b6f719fd54329826cb62e98015efee8e2e071dd4"
    );
    assert_eq!(
        render("{{ 'abc' | md5 }}", Escape::Plain).unwrap(),
        "900150983cd24fb0d6963f7d28e17f72"
    );
    assert_eq!(render("{rand}", Escape::Plain).unwrap().len(), 36);
}

#[test]
fn json_bodies_escape_values() {
    assert_eq!(
        render(
            r#"{"cid": {{ clickid }}, "sum": {{ payout }}}"#,
            Escape::Json
        )
        .unwrap(),
        r#"{"cid": "a b&c", "sum": 12.50}"#
    );
}

#[test]
fn unknown_macros_are_errors_not_literals() {
    let err = render("https://t.example/?x={subacc4}", Escape::Url).unwrap_err();
    assert!(err.contains("undefined"), "{err}");
    let mut e = Engine::new();
    let (_, vars) = e
        .add(&expand_shorthand("{subacc4}&{params.foo}"), Escape::Url)
        .unwrap();
    assert_eq!(vars, vec!["params.foo".to_string(), "subacc4".to_string()]);
}

#[test]
fn conditions() {
    let mut e = Engine::new();
    let (id, vars) = e
        .add_condition(r#"payout > 10 and status != "rejected""#)
        .unwrap();
    assert!(e.holds(&id, &ctx()).unwrap());
    assert_eq!(vars, vec!["payout".to_string(), "status".to_string()]);
    assert!(e.add_condition("payout >").is_err());
}

/// The simple path gives what minijinja gives, byte for byte, errors included.
#[test]
fn simple_path_renders_as_minijinja_does() {
    let simple = [
        "https://t.example/pb?cid={clickid}&sum={payout}",
        "https://t.example/{clickid:raw}/{_clickid}?e={email:hash}&m={email:md5}",
        "{{ clickid }}{{clickid|raw}}{{ email | lower | raw }}{{ email|upper }}",
        "{{ params.t }}-{{ params.missing }}-{{ none_field }}",
        "{{ none_field | raw }}|{{ none_field | sha256 }}|{{ none_field | lower }}|{{ none_field|digits }}",
        "{{ flag }} {{ n }} {{ payout }} {{ phone | digits }} {{ phone | sha256_raw }}",
        "a { b } c }} d {",
        "ü{clickid}\n",
        "{{ nope }}",
        "{{ clickid.deeper }}",
        "{{ params }}",
        "",
    ];
    let jinja = [
        "{{ params.t | default('x') }}",
        "{status:approved=1 pending=2}",
        "{{- clickid -}}",
        "{% if flag %}{{ clickid }}{% endif %}",
        "{{ none }}",
        "{{ clickid ~ 'x' }}",
    ];
    let mut m: std::collections::BTreeMap<String, Value> = Default::default();
    m.insert("clickid".into(), Value::from("a b&c/ü"));
    m.insert("payout".into(), Value::from(12.5));
    m.insert(
        "__exact_payout".into(),
        Value::from_safe_string("12.50".into()),
    );
    m.insert("n".into(), Value::from(30));
    m.insert("flag".into(), Value::from(true));
    m.insert("email".into(), Value::from("  John@Example.com "));
    m.insert("phone".into(), Value::from("+1 (555) 010-99"));
    m.insert("none".into(), Value::from(()));
    m.insert("none_field".into(), Value::from(()));
    let mut params = std::collections::BTreeMap::new();
    params.insert("t", "x y");
    m.insert("params".into(), Value::from_serialize(&params));
    let ctx = Value::from(m);
    for (sources, want_simple) in [(&simple[..], true), (&jinja[..], false)] {
        for src in sources {
            let src = expand_shorthand(src);
            for esc in [Escape::Url, Escape::Json, Escape::Plain] {
                let mut fast = Engine::new();
                let mut slow = Engine::jinja_only();
                let (a, va) = fast.add(&src, esc).unwrap();
                let (b, vb) = slow.add(&src, esc).unwrap();
                assert_eq!(fast.is_simple(&a), want_simple, "{src}");
                assert_eq!(va, vb, "variables of {src}");
                assert_eq!(
                    fast.render(&a, &ctx),
                    slow.render(&b, &ctx),
                    "{src} as {esc:?}"
                );
            }
        }
    }
}

#[test]
fn loops_and_macros_are_told_apart() {
    assert!(!repeats(
        "{{ params.t | default('') }}{% if x %}a{% endif %}"
    ));
    assert!(repeats("{% for c in clickid %}x{% endfor %}"));
    assert!(repeats("{%- for c in clickid -%}x{% endfor %}"));
    assert!(repeats("{% macro m() %}{% endmacro %}"));
    assert!(!repeats("{% set formula = 1 %}{{ formula }}"));
}

#[test]
fn braces_that_are_not_macros_pass_through() {
    assert_eq!(expand_shorthand("a {not a macro} b"), "a {not a macro} b");
    assert_eq!(expand_shorthand("{{ x }} {% if y %}"), "{{ x }} {% if y %}");
    assert_eq!(expand_shorthand("ü{clickid}"), "ü{{ clickid }}");
}

#[test]
fn a_condition_with_template_delimiters_is_an_error_not_a_panic() {
    let mut e = Engine::new();
    for expr in ["}}0", "a %} b", "{{ x }}", "x #}", "{% if %}"] {
        let err = e.add_condition(expr).unwrap_err();
        assert!(err.contains("delimiter"), "{expr}: {err}");
    }
    assert!(e.add_condition("payout > 0 and country != \"US\"").is_ok());
    assert!(
        e.add_condition("note == \"}}\"").is_ok(),
        "inside a string it is text"
    );
}

#[test]
fn an_opening_that_overlaps_its_close_is_an_error_not_a_panic() {
    let mut e = Engine::new();
    for src in ["{%}", "{{}", "a {%} b", "{{}}"] {
        let _ = e.add(src, Escape::Plain);
    }
}
