//! Generated webhooks over a real socket to the real binary on the shipped config: any
//! query, body and content type gets a 2xx or a 4xx with a JSON reason, never a 5xx, and
//! the daemon stays up. Seeds: `fuzz/corpus/params.txt`.

use crate::support::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[derive(Debug, Clone)]
struct Webhook {
    method: &'static str,
    path: &'static str,
    query: String,
    content_type: &'static str,
    body: Vec<u8>,
}

fn webhook() -> impl Strategy<Value = Webhook> {
    let seeds: Vec<String> = std::fs::read_to_string(repo().join("fuzz/corpus/params.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let query = prop_oneof![
        proptest::sample::select(seeds.clone()),
        (proptest::sample::select(seeds), "[ -~]{0,24}").prop_map(|(s, x)| format!("{s}&{x}")),
        "[ -~]{0,48}",
    ];
    let body = prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..96),
        "\\PC{0,64}".prop_map(String::into_bytes),
        Just(
            br#"[{"clickid":"f1"},{"clickid":"f2","status":"approved","payout":"1e400"}]"#.to_vec()
        ),
        Just(br#"{"clickid":{"nested":[1,2]},"params":{"a":{"b":1}}}"#.to_vec()),
    ];
    (
        prop_oneof![Just("GET"), Just("POST")],
        prop_oneof![
            Just("/postback"),
            Just("/postback/keitaro"),
            Just("/postback/affise"),
            Just("/postback/nosuch"),
            Just("/v1/events"),
        ],
        query,
        prop_oneof![
            Just("application/json"),
            Just("application/x-www-form-urlencoded"),
            Just(""),
            Just("text/xml"),
            Just("application/json; charset=utf-8"),
        ],
        body,
    )
        .prop_map(|(method, path, query, content_type, body)| Webhook {
            method,
            path,
            query,
            content_type,
            body,
        })
}

/// Sends one generated webhook by hand (so any bytes can be sent).
fn send(addr: std::net::SocketAddr, w: &Webhook) -> (u16, String) {
    let q: String = w
        .query
        .bytes()
        .map(|b| match b {
            // What the URI grammar forbids is percent-encoded, as an HTTP client does: a raw
            // `"`, `<` or `>` gets the HTTP parser's own 400 before any handler runs.
            b' ' | b'#' | b'"' | b'<' | b'>' | 0x7f.. | ..0x20 => format!("%{b:02X}"),
            _ => (b as char).to_string(),
        })
        .collect();
    let mut head = format!(
        "{} {}?{q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\ncontent-length: {}\r\n",
        w.method,
        w.path,
        w.body.len()
    );
    if !w.content_type.is_empty() {
        head.push_str(&format!("content-type: {}\r\n", w.content_type));
    }
    head.push_str("\r\n");
    raw_http(addr, &head, &w.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_webhooks_get_an_answer_never_a_5xx() {
    let sink = Sink::start().await;
    let cfg = config_for(&repo().join("config"), sink.addr);
    let d = Daemon::start(cfg.path());
    let addr = d.addr;
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        });
        runner.run(&webhook(), |w| {
            let (status, body) = send(addr, &w);
            prop_assert!((200..500).contains(&status), "{w:?} got {status}: {body}");
            if status >= 400 {
                let v: serde_json::Value = serde_json::from_str(&body)
                    .map_err(|e| TestCaseError::fail(format!("{w:?}: not JSON ({e}): {body}")))?;
                prop_assert!(v["error"].is_string(), "{w:?}: {body}");
            }
            Ok(())
        })
    })
    .await
    .unwrap();
    if let Err(e) = result {
        panic!("{e}\n{}", d.logs());
    }
    let (code, _) = get_json(&d.url("/-/healthy")).await;
    assert_eq!(code, 200);
    assert!(!d.logs().contains("panicked"), "{}", d.logs());
}
