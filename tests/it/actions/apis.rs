//! The HTTP APIs: Slack, Telegram, Twilio, Meta's Conversions API, TikTok's Events API
//! and GA4's Measurement Protocol, each against a stand-in that answers as documented.

use super::*;
use crate::delivery::{api, post_events, wait_state, TOKEN, WAIT};
use crate::support::*;
use serde_json::{json, Value};

#[tokio::test]
async fn slack_gets_its_message_and_a_named_refusal_is_final() {
    let slack = Sink::start().await;
    // Slack's incoming webhooks: 200 `ok`; a payload without text is `no_text`; an
    // archived channel's hook is 410 `channel_is_archived`.
    slack.respond(|r| {
        let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
        if r.path.ends_with("/archived") {
            (410, "channel_is_archived".into())
        } else if v["text"].as_str().unwrap_or_default().is_empty() && v.get("blocks").is_none() {
            (400, "no_text".into())
        } else {
            (200, "ok".into())
        }
    });
    let rules = r#"postbacks:
  - id: sales-channel
    trigger: conversion
    retry: [100ms]
    slack:
      webhook: "${env:SLACK_SALES}"
      text: "Sale {transaction_id}: {payout} {currency} from affiliate {affiliate_id}"
      blocks:
        - type: section
          text: { type: mrkdwn, text: "*{{ transaction_id }}* paid {{ payout }}" }
  - id: old-channel
    trigger: conversion
    retry: [100ms]
    slack:
      webhook: "${env:SLACK_OLD}"
      text: "Sale {transaction_id}"
"#;
    let sales = format!("http://{}/services/T0001/B0001/sales", slack.addr);
    let old = format!("http://{}/services/T0001/B0002/archived", slack.addr);
    let (d, _c, _data) = daemon(rules, &[("SLACK_SALES", &sales), ("SLACK_OLD", &old)]);
    let before = scrape(&d).await;
    assert_eq!(
        metric_value(
            &before,
            r#"postbackd_action_attempts_total{kind="slack",result="2xx"}"#
        ),
        Some(0.0),
        "per-kind series exist at zero"
    );
    post_events(
        &d,
        json!([{"clickid": "c1", "transaction_id": "T-1", "payout": "12.50", "currency": "EUR", "affiliate_id": "42", "status": "approved"}]),
    )
    .await;
    let got = slack
        .wait_for(Some("/services/T0001/B0001/sales"), 1, WAIT)
        .await;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    assert_eq!(
        body_json(&got[0]),
        json!({
            "text": "Sale T-1: 12.50 EUR from affiliate 42",
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*T-1* paid 12.50"}}]
        })
    );
    let done = finished(&d, "sales-channel", "delivered").await;
    let attempt = &done["attempt_log"][0];
    assert_eq!(attempt["response_body"], "ok");
    // The webhook URL is the secret: the log shows it masked.
    assert_eq!(attempt["url"], "***", "{attempt}");

    let dead = finished(&d, "old-channel", "dead").await;
    assert_eq!(
        dead["attempts"], 1,
        "a named refusal is not retried: {dead}"
    );
    let a = &dead["attempt_log"][0];
    assert_eq!(a["response_status"], 410);
    assert!(
        a["error"].as_str().unwrap().contains("channel_is_archived"),
        "{a}"
    );
    let after = scrape(&d).await;
    assert_eq!(
        metric_value(
            &after,
            r#"postbackd_action_attempts_total{kind="slack",result="2xx"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &after,
            r#"postbackd_action_attempts_total{kind="slack",result="4xx"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn telegram_sends_to_the_bot_api_and_logs_its_description() {
    let tg = Sink::start().await;
    // The Bot API: `{"ok":true,"result":{…}}`, or `ok: false` with an error code and a
    // description.
    tg.respond(|r| {
        if !r.path.starts_with("/bot123456:ABC-DEF/") {
            return (401, r#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#.into());
        }
        let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
        if v["chat_id"] == json!(-1001234567890_i64) {
            (200, r#"{"ok":true,"result":{"message_id":7,"chat":{"id":-1001234567890,"type":"channel"},"date":1700000000,"text":"x"}}"#.into())
        } else {
            (400, r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#.into())
        }
    });
    let rules = format!(
        r#"postbacks:
  - id: tg-ops
    trigger: conversion
    retry: [100ms]
    telegram:
      bot_token: "${{env:TG_TOKEN}}"
      chat_id: "-1001234567890"
      parse_mode: HTML
      text: "<b>Sale</b> {{transaction_id}} by {{sub1}}"
      endpoint: "http://{0}"
  - id: tg-wrong-chat
    trigger: conversion
    retry: [100ms]
    telegram:
      bot_token: "${{env:TG_TOKEN}}"
      chat_id: "@nobody_here"
      text: "Sale {{transaction_id}}"
      endpoint: "http://{0}"
"#,
        tg.addr
    );
    let (d, _c, _data) = daemon(&rules, &[("TG_TOKEN", "123456:ABC-DEF")]);
    post_events(&d, json!([{"clickid": "c1", "transaction_id": "T-9", "sub1": "<script>", "status": "approved"}])).await;
    let ok = finished(&d, "tg-ops", "delivered").await;
    let sent: Vec<Received> = tg
        .received()
        .into_iter()
        .filter(|r| body_json(r)["chat_id"] == json!(-1001234567890_i64))
        .collect();
    assert_eq!(sent[0].path, "/bot123456:ABC-DEF/sendMessage");
    assert_eq!(
        body_json(&sent[0]),
        json!({"chat_id": -1001234567890_i64, "text": "<b>Sale</b> T-9 by &lt;script&gt;", "parse_mode": "HTML"}),
        "values are escaped for parse_mode HTML; the rule's own markup is not"
    );
    assert!(
        ok["attempt_log"][0]["url"]
            .as_str()
            .unwrap()
            .ends_with("/bot***/sendMessage"),
        "{ok}"
    );
    let dead = finished(&d, "tg-wrong-chat", "dead").await;
    assert_eq!(dead["attempts"], 1);
    assert_eq!(
        dead["attempt_log"][0]["error"],
        "telegram error 400: Bad Request: chat not found"
    );
}

#[tokio::test]
async fn twilio_gets_a_form_with_basic_auth_and_its_error_codes_decide() {
    let tw = Sink::start().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    // The Messages API: 201 with the message; errors as `{code, message, more_info,
    // status}`; 20429 when too many requests are queued.
    tw.respond(move |r| {
        let f: Vec<(String, String)> = form_urlencoded::parse(r.body.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let to = f.iter().find(|(k, _)| k == "To").map(|(_, v)| v.clone()).unwrap_or_default();
        if to == "+15005550001" {
            return (400, r#"{"code": 21211, "message": "The 'To' number +15005550001 is not a valid phone number.", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#.into());
        }
        if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return (429, r#"{"code": 20429, "message": "Too Many Requests", "more_info": "https://www.twilio.com/docs/errors/20429", "status": 429}"#.into());
        }
        (201, r#"{"sid": "SM1f0e8ae6ade43cb3c0ce4525424e404f", "status": "queued"}"#.into())
    });
    let rules = format!(
        r#"postbacks:
  - id: sms
    trigger: conversion
    retry: [100ms, 100ms]
    twilio:
      account_sid: ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX
      auth_token: "${{env:TWILIO_TOKEN}}"
      from: "+15017122661"
      to: "{{phone}}"
      body: "Your order {{transaction_id}} is confirmed"
      endpoint: "http://{}"
"#,
        tw.addr
    );
    let (d, _c, _data) = daemon(&rules, &[("TWILIO_TOKEN", "your_auth_token")]);
    post_events(&d, json!([{"clickid": "c1", "transaction_id": "T-1", "phone": "+15558675310", "status": "approved"}])).await;
    let done = finished(&d, "sms", "delivered").await;
    assert_eq!(done["attempts"], 2, "20429 is tried again: {done}");
    let got = tw.received();
    let r = &got[1];
    assert_eq!(
        r.path,
        "/2010-04-01/Accounts/ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX/Messages.json"
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD
        .encode("ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:your_auth_token");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(
        form(r),
        vec![
            ("To".to_string(), "+15558675310".to_string()),
            ("From".into(), "+15017122661".into()),
            ("Body".into(), "Your order T-1 is confirmed".into())
        ]
    );
    assert_eq!(
        done["attempt_log"][0]["error"],
        "twilio error 20429: Too Many Requests"
    );
    // Another conversion to an invalid number: final, with Twilio's code and message.
    post_events(&d, json!([{"clickid": "c2", "transaction_id": "T-2", "phone": "+15005550001", "status": "approved"}])).await;
    let dead = dead_deliveries(&d, 1).await.remove(0);
    assert_eq!(dead["attempts"], 1);
    assert_eq!(
        dead["attempt_log"][0]["error"],
        "twilio error 21211: The 'To' number +15005550001 is not a valid phone number."
    );
    // The auth token never shows.
    assert!(!dead.to_string().contains("your_auth_token"), "{dead}");
}

fn meta_rules(endpoint: &str) -> String {
    format!(
        r#"postbacks:
  - id: meta-purchase
    trigger: conversion
    statuses: [approved]
    retry: [100ms]
    meta:
      pixel_id: "1234567890"
      access_token: "${{env:META_TOKEN}}"
      event_name: Purchase
      event_id: "{{transaction_id}}"
      event_source_url: "https://shop.example/thanks"
      user_data:
        em: "{{email}}"
        ph: "{{phone}}"
        fn: "{{params.first_name}}"
        zp: "{{params.zip}}"
        country: "{{country}}"
        client_ip_address: "{{ip}}"
        client_user_agent: "{{user_agent}}"
        fbc: "{{params.fbc}}"
      custom_data:
        value: "{{payout}}"
        currency: "{{currency}}"
        order_id: "{{transaction_id}}"
      endpoint: "{endpoint}"
"#
    )
}

#[tokio::test]
async fn meta_gets_hashed_user_data_and_its_error_object_is_logged() {
    let meta = Sink::start().await;
    // The Conversions API: `events_received`; an error object for what it refuses.
    meta.respond(|r| {
        let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
        if v["data"][0]["custom_data"]["order_id"] == "T-BAD" {
            return (400, r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804019,"error_user_title":"Invalid Currency Code","error_user_msg":"The currency code is not valid.","fbtrace_id":"AbCdEf"}}"#.into());
        }
        (200, r#"{"events_received":1,"messages":[],"fbtrace_id":"AbCdEf"}"#.into())
    });
    let (d, _c, _data) = daemon(
        &meta_rules(&format!("http://{}", meta.addr)),
        &[("META_TOKEN", "EAAB-secret-token")],
    );
    let now = jiff::Timestamp::now().as_second();
    post_events(
        &d,
        json!([{"clickid": "c1", "transaction_id": "T-1", "status": "approved", "payout": "49.90", "currency": "USD",
                "email": "  John.Doe@Example.COM ", "phone": "+1 (650) 555-1212", "first_name": "Mary-Jane",
                "zip": "94025-1234", "country": "US", "ip": "203.0.113.9", "user_agent": "Mozilla/5.0",
                "fbc": "fb.1.1554763741205.AbCdEf", "timestamp": now.to_string()}]),
    )
    .await;
    let done = finished(&d, "meta-purchase", "delivered").await;
    let got = meta
        .wait_for(Some("/v24.0/1234567890/events"), 1, WAIT)
        .await;
    assert_eq!(
        got[0].param("access_token").as_deref(),
        Some("EAAB-secret-token")
    );
    let v = body_json(&got[0]);
    assert_eq!(
        v,
        json!({"data": [{
            "event_name": "Purchase",
            "event_time": now,
            "event_id": "T-1",
            "action_source": "website",
            "event_source_url": "https://shop.example/thanks",
            "user_data": {
                "em": [sha("john.doe@example.com")],
                "ph": [sha("16505551212")],
                "fn": [sha("maryjane")],
                "zp": [sha("94025")],
                "country": [sha("us")],
                "client_ip_address": "203.0.113.9",
                "client_user_agent": "Mozilla/5.0",
                "fbc": "fb.1.1554763741205.AbCdEf"
            },
            "custom_data": {"value": serde_json::from_str::<Value>("49.90").unwrap(), "currency": "USD", "order_id": "T-1"}
        }]})
    );
    let a = &done["attempt_log"][0];
    assert!(
        a["url"]
            .as_str()
            .unwrap()
            .ends_with("/events?access_token=***"),
        "{a}"
    );
    assert!(
        a["request_body"]
            .as_str()
            .unwrap()
            .contains(&sha("john.doe@example.com")),
        "the log shows the JSON after hashing"
    );
    assert!(
        !a["request_body"].as_str().unwrap().contains("John.Doe"),
        "{a}"
    );

    // Meta's error object: final, with its message and code.
    post_events(&d, json!([{"clickid": "c2", "transaction_id": "T-BAD", "status": "approved", "email": "a@b.co", "timestamp": now.to_string()}])).await;
    // An event older than Meta's 7-day window is dead before anything is sent.
    let old = now - 8 * 86400;
    post_events(&d, json!([{"clickid": "c3", "transaction_id": "T-OLD", "status": "approved", "email": "a@b.co", "timestamp": old.to_string()}])).await;
    let dead = dead_deliveries(&d, 2).await;
    let mut errors = Vec::new();
    for row in dead {
        let full = wait_state(&d, row["id"].as_i64().unwrap(), "dead").await;
        assert_eq!(full["attempts"], 1, "{full}");
        errors.push(
            full["attempt_log"][0]["error"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    errors.sort();
    assert!(
        errors[0].starts_with("event_time ") && errors[0].contains("7 days"),
        "{errors:?}"
    );
    assert_eq!(errors[1], "meta error 100 (subcode 2804019): Invalid parameter (Invalid Currency Code: The currency code is not valid.)");
    assert_eq!(meta.received().len(), 2, "the old event was never sent");
}

#[tokio::test]
async fn tiktok_gets_its_events_api_call_and_a_nonzero_code_is_logged() {
    let tt = Sink::start().await;
    // The Events API: HTTP 200 always, `code: 0` for success.
    tt.respond(|r| {
        if r.header("access-token") != Some("tt-token") {
            return (200, r#"{"code":40105,"message":"Access token is incorrect or has been revoked.","request_id":"r1","data":{}}"#.into());
        }
        let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
        if v["event_source_id"] != "CPIXEL123" {
            return (200, r#"{"code":40001,"message":"Invalid pixel code","request_id":"r2","data":{}}"#.into());
        }
        (200, r#"{"code":0,"message":"OK","request_id":"r3","data":{}}"#.into())
    });
    let rules = format!(
        r#"postbacks:
  - id: tt
    trigger: conversion
    retry: [100ms]
    tiktok:
      pixel_code: CPIXEL123
      access_token: "${{env:TT_TOKEN}}"
      event: CompletePayment
      user: {{ ttclid: "{{clickid}}", email: "{{email}}", phone: "{{phone}}", ip: "{{ip}}" }}
      properties: {{ value: "{{payout}}", currency: "{{currency}}" }}
      endpoint: "http://{0}"
  - id: tt-wrong
    trigger: conversion
    retry: [100ms]
    tiktok:
      pixel_code: CWRONG
      access_token: "${{env:TT_TOKEN}}"
      event: CompletePayment
      user: {{ ttclid: "{{clickid}}" }}
      endpoint: "http://{0}"
"#,
        tt.addr
    );
    let (d, _c, _data) = daemon(&rules, &[("TT_TOKEN", "tt-token")]);
    post_events(&d, json!([{"clickid": "E.C.P.abc", "transaction_id": "T-1", "status": "approved", "payout": "10", "currency": "USD",
        "email": "A@B.co", "phone": "+1 213 373 4253", "ip": "203.0.113.9", "timestamp": "1700000000"}])).await;
    finished(&d, "tt", "delivered").await;
    let got: Vec<Received> = tt
        .received()
        .into_iter()
        .filter(|r| body_json(r)["event_source_id"] == "CPIXEL123")
        .collect();
    assert_eq!(got[0].path, "/open_api/v1.3/event/track/");
    assert_eq!(
        body_json(&got[0]),
        json!({"event_source": "web", "event_source_id": "CPIXEL123", "data": [{
            "event": "CompletePayment", "event_time": 1700000000, "event_id": "T-1",
            "user": {"ttclid": "E.C.P.abc", "email": sha("a@b.co"), "phone": sha("+12133734253"), "ip": "203.0.113.9"},
            "properties": {"value": 10, "currency": "USD"}
        }]})
    );
    let dead = finished(&d, "tt-wrong", "dead").await;
    assert_eq!(
        dead["attempt_log"][0]["error"],
        "tiktok error 40001: Invalid pixel code"
    );
    assert_eq!(dead["attempt_log"][0]["outcome"], "body_rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ga4_collects_and_a_test_send_goes_to_the_validation_endpoint() {
    let ga = Sink::start().await;
    // /mp/collect answers 204 whatever it drops; /debug/mp/collect says why.
    ga.respond(|r| {
        if r.path == "/debug/mp/collect" {
            let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
            if v["events"][0]["params"]["currency"].as_str().map(str::len) != Some(3) {
                return (200, r#"{"validationMessages":[{"fieldPath":"events.params.currency","description":"Currency must be a 3-letter ISO 4217 code.","validationCode":"VALUE_INVALID"}]}"#.into());
            }
            return (200, r#"{"validationMessages":[]}"#.into());
        }
        (204, String::new())
    });
    let rules = format!(
        r#"postbacks:
  - id: ga
    trigger: conversion
    ga4:
      measurement_id: G-TEST123
      api_secret: "${{env:GA_SECRET}}"
      client_id: "{{params.cid}}"
      event: purchase
      params: {{ transaction_id: "{{transaction_id}}", value: "{{payout}}", currency: "{{currency}}" }}
      endpoint: "http://{}"
"#,
        ga.addr
    );
    let (d, cfg, _data) = daemon(&rules, &[("GA_SECRET", "s3cr3t")]);
    post_events(&d, json!([{"clickid": "c1", "transaction_id": "T-1", "status": "approved", "payout": "5.5", "currency": "EUR", "cid": "123.456"}])).await;
    finished(&d, "ga", "delivered").await;
    let got = ga.wait_for(Some("/mp/collect"), 1, WAIT).await;
    assert_eq!(got[0].param("measurement_id").as_deref(), Some("G-TEST123"));
    assert_eq!(got[0].param("api_secret").as_deref(), Some("s3cr3t"));
    assert_eq!(
        body_json(&got[0]),
        json!({"client_id": "123.456", "events": [{"name": "purchase", "params": {"transaction_id": "T-1", "value": 5.5, "currency": "EUR"}}]})
    );
    // `fire --send --json`: the validation endpoint, and its messages.
    let dir = cfg.path().to_str().unwrap();
    let (code, out, err) = run_cli_env(
        &[
            "fire",
            dir,
            r#"{"clickid":"c2","status":"approved","currency":"EURO","cid":"1.2"}"#,
            "--send",
            "--json",
            "--allow-network",
            "127.0.0.1",
        ],
        &[("GA_SECRET", "s3cr3t"), ("POSTBACKD_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(code, 1, "a validation message fails the send: {out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let f = &v["fired"][0];
    assert_eq!(f["kind"], "ga4");
    assert!(
        f["request"]["url"]
            .as_str()
            .unwrap()
            .contains("api_secret=***"),
        "{f}"
    );
    assert_eq!(f["answer"]["outcome"], "body_rejected", "{f}");
    assert!(
        f["answer"]["error"].as_str().unwrap().contains(
            "Currency must be a 3-letter ISO 4217 code. (VALUE_INVALID at events.params.currency)"
        ),
        "{f}"
    );
    // POST /api/v1/test with "send": the same, from the running daemon.
    let (code, body) = send_json(api(&d, reqwest::Method::POST, "/api/v1/test").json(&json!({
        "event": {"clickid": "c3", "status": "approved", "currency": "USD", "cid": "1.3"}, "send": true
    })))
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["fired"][0]["kind"], "ga4");
    assert_eq!(body["fired"][0]["answer"]["outcome"], "delivered", "{body}");
    assert_eq!(ga.on_path("/debug/mp/collect").len(), 2);
    assert_eq!(
        ga.on_path("/mp/collect").len(),
        1,
        "a test send never reaches the collect endpoint"
    );
}
