//! Property tests of the template engine: generated templates (pieces of the checked-in
//! corpus, `fuzz/corpus/templates.txt`, mixed with generated text and macros) render the
//! same on the simple path as through minijinja, and nothing panics, for any field value.

use super::template::{expand_shorthand, Engine, Escape};
use minijinja::Value;
use proptest::prelude::*;

/// Cases per run: 400, or `PROPTEST_CASES` for a longer one.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn corpus() -> Vec<String> {
    include_str!("../../fuzz/corpus/templates.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

const FIELDS: [&str; 9] = [
    "clickid",
    "payout",
    "email",
    "phone",
    "none_field",
    "params.t",
    "params.missing",
    "n",
    "flag",
];
const FILTERS: [&str; 7] = [
    "raw",
    "lower",
    "upper",
    "sha256",
    "md5",
    "digits",
    "sha256_raw",
];

fn piece() -> impl Strategy<Value = String> {
    let field = proptest::sample::select(&FIELDS[..]);
    let filter = proptest::sample::select(&FILTERS[..]);
    prop_oneof![
        "[a-z/?&=.: {}%ü-]{0,8}",
        field.clone().prop_map(|f| format!("{{{f}}}")),
        (
            field.clone(),
            prop_oneof![Just("raw"), Just("hash"), Just("md5")]
        )
            .prop_map(|(f, m)| format!("{{{f}:{m}}}")),
        field.clone().prop_map(|f| format!("{{{{ {f} }}}}")),
        (field, filter).prop_map(|(f, x)| format!("{{{{ {f} | {x} }}}}")),
        proptest::sample::select(corpus()),
    ]
}

fn template() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 0..6).prop_map(|p| p.concat())
}

fn context(clickid: String, email: String, phone: String) -> Value {
    let mut m: std::collections::BTreeMap<String, Value> = Default::default();
    m.insert("clickid".into(), Value::from(clickid));
    m.insert("payout".into(), Value::from(12.5));
    m.insert(
        "__exact_payout".into(),
        Value::from_safe_string("12.50".into()),
    );
    m.insert("n".into(), Value::from(30));
    m.insert("flag".into(), Value::from(true));
    m.insert("email".into(), Value::from(email));
    m.insert("phone".into(), Value::from(phone));
    m.insert("none_field".into(), Value::from(()));
    let mut params = std::collections::BTreeMap::new();
    params.insert("t", "x y");
    m.insert("params".into(), Value::from_serialize(&params));
    Value::from(m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_simple_path_renders_as_minijinja_does(
        src in template(),
        clickid in any::<String>(),
        email in "\\PC{0,12}",
        phone in "[0-9 +()-]{0,12}",
    ) {
        let src = expand_shorthand(&src);
        let ctx = context(clickid, email, phone);
        for esc in [Escape::Url, Escape::Json, Escape::Plain, Escape::Html] {
            let mut fast = Engine::new();
            let mut slow = Engine::jinja_only();
            match (fast.add(&src, esc), slow.add(&src, esc)) {
                (Ok((a, va)), Ok((b, vb))) => {
                    prop_assert_eq!(va, vb);
                    prop_assert_eq!(fast.render(&a, &ctx), slow.render(&b, &ctx), "{} as {:?}", src, esc);
                }
                (Err(_), Err(_)) => {}
                (x, y) => prop_assert!(false, "{} compiles one way only: {:?} / {:?}", src, x.map(|_| ()), y.map(|_| ())),
            }
        }
    }

    #[test]
    fn any_text_compiles_or_fails_without_a_panic(src in "\\PC{0,40}") {
        let mut e = Engine::new();
        if let Ok((id, _)) = e.add(&expand_shorthand(&src), Escape::Url) {
            let _ = e.render(&id, &context("c".into(), "e".into(), "1".into()));
        }
        let _ = e.add_condition(&src);
    }
}
