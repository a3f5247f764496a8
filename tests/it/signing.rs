//! Outgoing postbacks signed the Standard Webhooks way, checked by an implementation
//! nobody here wrote: the `standardwebhooks` package from PyPI (`bash test.sh` installs it).

use crate::support::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const NEW: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD: &str = "whsec_dGhlIG9sZCBrZXkgc3RpbGwgaW4gdXNl";

const VERIFY: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
req = json.load(sys.stdin)
try:
    Webhook(sys.argv[1]).verify(req["body"], req["headers"], json_parse=False)
except Exception as e:
    print(f"refused: {e}")
    sys.exit(1)
print("verified")
"#;

/// Asks the reference implementation whether `secret` verifies the request.
fn verifies(secret: &str, r: &Received) -> bool {
    let headers: serde_json::Map<String, serde_json::Value> = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let input = serde_json::json!({"headers": headers, "body": r.body});
    let mut child = Command::new("python3")
        .args(["-c", VERIFY, secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("No module named"),
        "the standardwebhooks package is missing: bash test.sh installs it\n{text}"
    );
    out.status.success()
}

#[tokio::test]
async fn signed_postbacks_verify_with_the_reference_library_under_both_keys() {
    let sink = Sink::start().await;
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = first.clone();
    sink.respond(move |_| {
        if f.swap(false, std::sync::atomic::Ordering::SeqCst) {
            (503, "busy".into())
        } else {
            (200, "ok".into())
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            r#"postbacks:
  - id: signed
    trigger: conversion
    retry: [100ms]
    http:
      method: POST
      url: "http://{}/hook"
      json: {{ event: conversion, clickid: "{{{{ clickid }}}}", payout: "{{{{ payout }}}}" }}
      sign: {{ secrets: ["${{env:WH_NEW}}", "${{env:WH_OLD}}"] }}
"#,
            sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("WH_NEW", NEW), ("WH_OLD", OLD)]);
    let (code, body) = get_json(&d.url("/postback?clickid=sig1&payout=12.50")).await;
    assert_eq!(code, 200, "{body}");
    let got = sink
        .wait_for(Some("/hook"), 2, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 2, "a 503, then the retry: {}", d.logs());
    for r in &got {
        assert!(r.body.contains("\"payout\":12.50"), "{}", r.body);
        assert!(verifies(NEW, r), "the new key verifies: {r:?}");
        assert!(
            verifies(OLD, r),
            "the old key verifies while it rotates: {r:?}"
        );
        assert!(
            !verifies("whsec_c29tZSBvdGhlciBrZXkgZW50aXJlbHk=", r),
            "another key does not"
        );
        assert_eq!(r.header("webhook-signature").unwrap().split(' ').count(), 2);
    }
    // The retry is the same message: the receiver can drop it if it already has it.
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));

    // A tampered body no longer verifies.
    let mut tampered = got[1].clone();
    tampered.body = tampered.body.replace("12.50", "99.00");
    assert!(!verifies(NEW, &tampered));
}
