//! What `check` knows of each kind, and macros declared for a tracker's own fields.

use crate::delivery::WAIT;
use crate::support::*;

#[test]
fn check_knows_each_kinds_required_fields_and_limits() {
    let cfg = tempfile::tempdir().unwrap();
    let params: String = (0..26).map(|i| format!("p{i}: x, ")).collect();
    write_config(
        cfg.path(),
        "",
        &format!(
            r#"postbacks:
  - id: ga
    trigger: conversion
    ga4: {{ measurement_id: G-1, api_secret: "${{env:X:-y}}", client_id: "{{clickid}}", event: first_visit, params: {{ {params} }} }}
  - id: meta
    trigger: conversion
    meta: {{ pixel_id: "12", access_token: literal-token, event_name: Purchase, user_data: {{ email: "{{email}}" }} }}
  - id: both
    trigger: conversion
    http: {{ url: "https://a.example/" }}
    slack: {{ webhook: "${{env:X:-https://hooks.slack.com/x}}", text: hi }}
  - id: mail
    trigger: conversion
    email: {{ smtp: {{ host: smtp.example.com, tls: sometimes }}, from: a@example.com, to: "{{email}}", subject: "{{subacc4}}", text: hi }}
  - id: sms
    trigger: conversion
    twilio: {{ account_sid: AC1, auth_token: "${{env:X:-y}}", to: "{{phone}}", body: hi }}
"#
        ),
    );
    let (code, out, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    let text = format!("{out}{err}");
    assert_ne!(code, 0, "{text}");
    for want in [
        "ga4.event `first_visit` is an event name GA4 keeps for itself",
        "ga4: 26 params; an event carries at most 25",
        "meta.access_token must not be written in the config",
        "meta.user_data: unknown field `email`",
        "postback has 2 actions (http, slack); give exactly one",
        "smtp.tls: unknown mode `sometimes`",
        "unknown macro `subacc4`",
        "twilio: give either `from` or `messaging_service_sid`",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    // Every error is located: file, line and column.
    assert!(text.contains("rules.yaml:"), "{text}");
}

/// Seed 001's own example passes `check` once the field is declared, and sends its value;
/// a misspelt canonical macro still fails.
#[tokio::test]
async fn a_declared_macro_renders_the_parameter_trackers_send() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let url = format!("http://{}/?clickid={{external_transaction_id}}", sink.addr);
    write_config(
        cfg.path(),
        "",
        &format!(
            "postbacks:\n  - id: seed\n    trigger: conversion\n    http: {{ url: \"{url}\" }}\n"
        ),
    );
    let (code, out, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        format!("{out}{err}").contains("macros: [external_transaction_id]"),
        "the hint says how: {out}{err}"
    );
    write_config(
        cfg.path(),
        "",
        &format!("macros: [external_transaction_id]\npostbacks:\n  - id: seed\n    trigger: conversion\n    http: {{ url: \"{url}\" }}\n"),
    );
    let (code, out, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let d = Daemon::start(cfg.path());
    let (code, body) = send_json(
        client().get(d.url("/postback?clickid=c1&external_transaction_id=EXT-77&status=approved")),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let got = sink.wait_for(Some("/"), 1, WAIT).await;
    assert_eq!(got[0].query, "clickid=EXT-77");
    // A source may declare it too; a misspelt canonical macro is still an error.
    write_config(
        cfg.path(),
        "",
        "sources:\n  - id: net\n    macros: [external_transaction_id]\npostbacks:\n  - id: seed\n    trigger: conversion\n    http: { url: \"https://a.example/?c={external_transaction_id}&s={subacc4}\" }\n",
    );
    let (code, out, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    let text = format!("{out}{err}");
    assert_ne!(code, 0);
    assert!(
        text.contains("unknown macro `subacc4`") && !text.contains("external_transaction_id`"),
        "{text}"
    );
}
