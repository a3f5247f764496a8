//! Property tests of the incoming parsers: query strings (seeded from the checked-in
//! `fuzz/corpus/params.txt`), form bodies, JSON bodies, field aliases and status words. Any
//! input gives an event or an error, never a panic, and an event's conversion key, status
//! and merge are defined.

use super::event::{Event, FieldMap, Kind};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

const KEYS: [&str; 24] = [
    "clickid",
    "click_id",
    "subid",
    "txid",
    "tid",
    "transaction_id",
    "status",
    "payout",
    "sum",
    "amount",
    "revenue",
    "currency",
    "offer",
    "offer_id",
    "goal",
    "aff_id",
    "affiliate",
    "affiliate_id",
    "kind",
    "ua",
    "ip",
    "sub1",
    "event_id",
    "timestamp",
];
const VALUES: [&str; 16] = [
    "approved",
    "1",
    "sale",
    "rejected",
    "trash",
    "-0",
    "1e308",
    "NaN",
    "12,50",
    "12.50",
    "12345678901234567890",
    "",
    " ",
    "click",
    "conversion",
    "\u{0}",
];

fn corpus() -> Vec<String> {
    include_str!("../../fuzz/corpus/params.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

fn params() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![
        proptest::sample::select(&KEYS[..]).prop_map(str::to_string),
        "\\PC{0,12}",
    ];
    let value = prop_oneof![
        proptest::sample::select(&VALUES[..]).prop_map(str::to_string),
        "\\PC{0,24}",
        any::<f64>().prop_map(|f| f.to_string()),
        any::<i128>().prop_map(|n| n.to_string()),
    ];
    let generated = proptest::collection::btree_map(key, value, 0..12);
    let seeded = (
        proptest::sample::select(corpus()),
        "[a-z_]{1,8}",
        "\\PC{0,8}",
    )
        .prop_map(|(q, k, v)| {
            let mut m: BTreeMap<String, String> =
                form_urlencoded::parse(q.as_bytes()).into_owned().collect();
            m.insert(k, v);
            m
        });
    prop_oneof![generated, seeded]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn check(e: &Event) {
    let _ = e.conversion_key();
    let _ = e.status();
    let again = e.merged_onto(e);
    assert_eq!(again.conversion_key(), e.conversion_key());
    let _ = serde_json::to_string(e).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_parameters_give_an_event_or_an_error(p in params(), kind in 0..3u8) {
        let kind = [Kind::Click, Kind::Impression, Kind::Conversion][kind as usize];
        if let Ok(e) = Event::from_params(p, kind, "web", &FieldMap::default(), 1_700_000_000_000) {
            check(&e);
        }
    }

    #[test]
    fn any_json_body_gives_an_event_or_an_error(
        fields in proptest::collection::btree_map(
            proptest::sample::select(&KEYS[..]).prop_map(str::to_string),
            json_value(),
            0..10,
        )
    ) {
        let mut obj = serde_json::Map::new();
        for (k, v) in fields {
            obj.insert(k, v);
        }
        let mut flat = BTreeMap::new();
        if super::json_params(&obj, &mut flat).is_ok() {
            if let Ok(e) = Event::from_params(flat, Kind::Conversion, "web", &FieldMap::default(), 1) {
                check(&e);
            }
        }
    }

    #[test]
    fn any_query_or_form_body_parses(raw in "\\PC{0,64}", bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut out = BTreeMap::new();
        super::query_params(Some(&raw), &mut out);
        let mut headers = axum::http::HeaderMap::new();
        for ct in ["application/x-www-form-urlencoded", "application/json", "", "text/xml"] {
            if let Ok(v) = axum::http::HeaderValue::from_str(ct) {
                headers.insert(axum::http::header::CONTENT_TYPE, v);
            }
            let _ = super::body_params(&headers, &bytes, &mut out);
            let _ = super::body_params(&headers, raw.as_bytes(), &mut out);
        }
    }
}
