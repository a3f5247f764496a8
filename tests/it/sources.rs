//! Who may send webhooks, against the real binary: HMAC signatures of the raw body (with a
//! signed timestamp), address allow-lists behind and without a trusted proxy, a rate limit
//! per source, and the size limit. Every refusal is a 4xx with a JSON reason, counted by
//! source and reason.

use crate::support::*;
use hmac::{Hmac, Mac};
use serde_json::Value;

fn sign_sha256_hex(secret: &str, payload: &[u8]) -> String {
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(payload);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sign_sha1_base64(secret: &str, payload: &[u8]) -> String {
    use base64::Engine;
    let mut m = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(payload);
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

const SOURCES: &str = r#"sources:
  - id: signed
    signature:
      header: X-Signature
      secret: "${env:SIGNED_SECRET}"
      prefix: "sha256="
      timestamp_header: X-Timestamp
      tolerance: 60s
  - id: legacy
    signature:
      header: X-Hub-Signature
      secret: "${env:LEGACY_SECRET}"
      algorithm: sha1
      encoding: base64
  - id: office
    allow_ips: [10.9.9.0/24, "2001:db8::/32"]
  - id: strict
    secret: "${env:STRICT_TOKEN}"
    allow_ips: [127.0.0.0/8]
    rate: 2/s
"#;

async fn start(settings: &str) -> (Sink, tempfile::TempDir, Daemon) {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(cfg.path().join("sources.yaml"), SOURCES).unwrap();
    write_config(
        cfg.path(),
        settings,
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        cfg.path(),
        data.path(),
        &[
            ("SIGNED_SECRET", "s3cr3t-signing-key"),
            ("LEGACY_SECRET", "legacy-key"),
            ("STRICT_TOKEN", "strict-token-value"),
        ],
    );
    (sink, cfg, d)
}

async fn refused(r: reqwest::RequestBuilder, code: u16, reason: &str) -> Value {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_over_the_raw_body_and_time() {
    let (_sink, _cfg, d) = start("").await;
    let c = client();
    let body = br#"{"clickid":"s1","status":"approved","payout":"12.50"}"#;
    let now = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs())
    .to_string();
    let signed = |ts: &str, sig: String| {
        c.post(d.url("/postback/signed"))
            .header("content-type", "application/json")
            .header("X-Timestamp", ts)
            .header("X-Signature", sig)
            .body(body.to_vec())
    };
    let payload = [now.as_bytes(), b".", body].concat();
    let good = format!("sha256={}", sign_sha256_hex("s3cr3t-signing-key", &payload));
    let (code, v) = send_json(signed(&now, good.clone())).await;
    assert_eq!(code, 200, "{v}");

    // The same signature over another body, another key, a missing prefix, an old time.
    let other = format!("sha256={}", sign_sha256_hex("another-key", &payload));
    refused(signed(&now, other), 401, "bad_signature").await;
    refused(
        signed(&now, good.replace("sha256=", "")),
        401,
        "bad_signature",
    )
    .await;
    let old = (now.parse::<i64>().unwrap() - 600).to_string();
    let replayed = format!(
        "sha256={}",
        sign_sha256_hex("s3cr3t-signing-key", &[old.as_bytes(), b".", body].concat())
    );
    refused(signed(&old, replayed), 401, "stale_signature").await;
    refused(
        c.post(d.url("/postback/signed")).body(body.to_vec()),
        401,
        "missing_signature",
    )
    .await;
    let tampered = br#"{"clickid":"s1","status":"approved","payout":"99.00"}"#;
    refused(
        c.post(d.url("/postback/signed"))
            .header("content-type", "application/json")
            .header("X-Timestamp", &now)
            .header("X-Signature", good)
            .body(tampered.to_vec()),
        401,
        "bad_signature",
    )
    .await;

    // SHA-1 in base64, the body alone, on /v1/events too.
    let events = br#"[{"clickid":"l1"},{"clickid":"l2"}]"#;
    let sig = sign_sha1_base64("legacy-key", events);
    let (code, v) = send_json(
        c.post(d.url("/v1/events?source=legacy"))
            .header("content-type", "application/json")
            .header("X-Hub-Signature", &sig)
            .body(events.to_vec()),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    refused(
        c.post(d.url("/v1/events?source=legacy"))
            .header("X-Hub-Signature", sig)
            .body(br#"[{"clickid":"l3"}]"#.to_vec()),
        401,
        "bad_signature",
    )
    .await;

    let text = scrape(&d).await;
    for (series, n) in [
        (
            "postbackd_webhooks_refused_total{source=\"signed\",reason=\"bad_signature\"}",
            3,
        ),
        (
            "postbackd_webhooks_refused_total{source=\"signed\",reason=\"stale_signature\"}",
            1,
        ),
        (
            "postbackd_webhooks_refused_total{source=\"signed\",reason=\"missing_signature\"}",
            1,
        ),
        (
            "postbackd_webhooks_refused_total{source=\"legacy\",reason=\"bad_signature\"}",
            1,
        ),
        (
            "postbackd_webhooks_refused_total{source=\"office\",reason=\"ip_not_allowed\"}",
            0,
        ),
    ] {
        assert!(
            text.contains(&format!("{series} {n}\n")),
            "{series} {n}\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_rates_and_sizes_are_limited_per_source() {
    // 127.0.0.1 is a trusted proxy here: what it forwards for is the client.
    let (_s, _c, d) = start("server:\n  trusted_proxies: [127.0.0.1]\n").await;
    let c = client();
    let office = |xff: Option<&str>| {
        let r = c.get(d.url("/postback/office?clickid=o1"));
        match xff {
            Some(x) => r.header("X-Forwarded-For", x),
            None => r,
        }
    };
    refused(office(None), 403, "ip_not_allowed").await;
    refused(office(Some("10.9.8.1")), 403, "ip_not_allowed").await;
    let (code, v) = send_json(office(Some("198.51.100.1, 10.9.9.5"))).await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = send_json(
        c.get(d.url("/postback/office?clickid=o2"))
            .header("Forwarded", "for=\"[2001:db8::7]:4711\";proto=https"),
    )
    .await;
    assert_eq!(code, 200, "{v}");

    // A secret, an address and a rate at once: each is required.
    let strict = |token: &str, cid: &str| {
        c.get(d.url(&format!("/postback/strict?clickid={cid}&token={token}")))
    };
    refused(strict("wrong", "x"), 401, "bad_secret").await;
    let mut answers = Vec::new();
    for i in 0..4 {
        let r = strict("strict-token-value", &format!("r{i}"))
            .send()
            .await
            .unwrap();
        answers.push((r.status().as_u16(), r.headers().get("retry-after").cloned()));
    }
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[1].0, 200);
    assert_eq!(answers[3].0, 429, "{answers:?}");
    let after: u64 = answers[3]
        .1
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&after), "Retry-After {after}");
    refused(strict("strict-token-value", "r9"), 429, "rate_limited").await;

    // The body limit is a 413 with a reason, for JSON as for forms. The daemon may answer
    // and close before the whole body is written, so this writes it raw and reads the
    // answer whatever the write did.
    for (path, extra) in [
        (
            "/postback/office",
            "X-Forwarded-For: 10.9.9.5\r\ncontent-type: application/x-www-form-urlencoded\r\n",
        ),
        ("/v1/events", "content-type: application/json\r\n"),
    ] {
        let (status, body) = oversized(&d, path, extra).await;
        assert_eq!(status, 413, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(v["reason"], "too_large", "{path}: {body}");
    }
}

/// POSTs a 2 MiB body by hand; returns the answer's status and body.
async fn oversized(d: &Daemon, path: &str, extra: &str) -> (u16, String) {
    let len = 2 << 20;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}content-length: {len}\r\nconnection: close\r\n\r\n"
    );
    let addr = d.addr;
    tokio::task::spawn_blocking(move || raw_http(addr, &head, &vec![b'a'; len]))
        .await
        .unwrap()
}

/// Without `trusted_proxies`, a forwarded-for header is anyone's claim and is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_header_from_an_untrusted_peer_is_ignored() {
    let (_s, _c, d) = start("").await;
    refused(
        client()
            .get(d.url("/postback/office?clickid=o1"))
            .header("X-Forwarded-For", "10.9.9.5"),
        403,
        "ip_not_allowed",
    )
    .await;
    let (code, v) = send_json(
        client()
            .get(d.url("/postback/strict?clickid=ok&token=strict-token-value"))
            .header("X-Forwarded-For", "10.9.9.5"),
    )
    .await;
    assert_eq!(code, 200, "{v}");
}

/// Only a sender that proved who it is spends its source's rate: refused batches take no
/// token, so the real sender is not locked out by someone guessing.
#[tokio::test]
async fn refused_webhooks_do_not_spend_the_rate() {
    let (_s, _c, d) = start("").await;
    for _ in 0..5 {
        refused(
            client()
                .post(d.url("/v1/events?source=strict&token=wrong"))
                .json(&serde_json::json!([{"clickid": "g1"}])),
            401,
            "bad_secret",
        )
        .await;
    }
    let (code, v) = send_json(
        client()
            .post(d.url("/v1/events?source=strict&token=strict-token-value"))
            .json(&serde_json::json!([{"clickid": "g2"}])),
    )
    .await;
    assert_eq!(code, 200, "{v}");
}
