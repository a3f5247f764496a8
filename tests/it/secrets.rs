//! Secrets never show: not in the delivery log, the API, the tools, the logs, the store or a
//! config error, in any encoding a request gives them. And what is logged is what was sent.

use crate::support::*;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

const ADMIN: &str = "secrets-admin-token-0123456789";
/// Characters every encoding changes: `/ + =` in URLs, `"` and `\` in JSON.
const SECRET: &str = "enc/sec+BBBB=2222\"q\\";

/// Every form the secret could leak in.
fn forms() -> Vec<String> {
    let mut f = vec![
        SECRET.to_string(),
        form_urlencoded::byte_serialize(SECRET.as_bytes()).collect(),
        serde_json::to_string(SECRET).unwrap(),
        SECRET.to_uppercase(),
        "enc/sec".to_string(),
        "enc%2Fsec".to_string(),
        "ZW5jL3Nl".to_string(), // base64 of "enc/se", as in a Basic header
    ];
    f.push(f[1].replace('+', "%2B"));
    f
}

fn assert_clean(what: &str, text: &str) {
    for f in forms() {
        assert!(
            !text.contains(&f),
            "{what} shows the secret as `{f}`:\n{text}"
        );
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rules(port: u16) -> String {
    format!(
        r#"postbacks:
  - id: leaky
    trigger: conversion
    retry: []
    vars: {{ key: "${{env:S}}" }}
    http:
      method: POST
      url: "http://127.0.0.1:{port}/x?k=${{env:S}}&c={{clickid}}"
      params: {{ t: "${{env:S}}", u: "{{{{ vars.key | upper }}}}" }}
      auth: {{ username: "user", password: "${{env:S}}" }}
      json: {{ token: "${{env:S}}", cid: "{{clickid}}" }}
"#
    )
}

#[tokio::test]
async fn a_dead_destination_does_not_expose_the_secret_anywhere() {
    let port = closed_port();
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:ADMIN}\"]\n",
        &rules(port),
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(cfg.path(), data.path(), &[("S", SECRET), ("ADMIN", ADMIN)]);
    let (code, body) = get_json(&d.url("/postback?clickid=c1&tid=T1&status=approved")).await;
    assert_eq!(code, 200, "{body}");

    // The delivery dies at once (no retries): its error is the connection's.
    let start = Instant::now();
    let list = loop {
        let (_, v) = send_json(client().get(d.url("/api/v1/deliveries")).bearer_auth(ADMIN)).await;
        if v["deliveries"][0]["state"] == "dead" {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{v}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row = &list["deliveries"][0];
    assert!(
        row.to_string().contains("connect") || row.to_string().contains("refused"),
        "the error says what happened: {row}"
    );
    assert_clean("the delivery list", &list.to_string());
    let id = row["id"].as_i64().unwrap();
    let (_, one) = send_json(
        client()
            .get(d.url(&format!("/api/v1/deliveries/{id}")))
            .bearer_auth(ADMIN),
    )
    .await;
    assert!(one.to_string().contains("k=***"), "{one}");
    assert_clean("a delivery's attempts", &one.to_string());

    // The test endpoint, sending for real.
    let (code, tested) = send_json(
        client()
            .post(d.url("/api/v1/test"))
            .bearer_auth(ADMIN)
            .json(&json!({"event": {"clickid": "c2", "tid": "T2", "status": "approved"}, "send": true})),
    )
    .await;
    assert_eq!(code, 200, "{tested}");
    assert!(
        tested["fired"][0]["answer"]["error"].is_string(),
        "{tested}"
    );
    assert_clean("POST /api/v1/test", &tested.to_string());

    // `postbackd deliveries show` and `fire --send`.
    let bin = env!("CARGO_BIN_EXE_postbackd");
    let show = Command::new(bin)
        .args(["deliveries", "--url", &d.url(""), "show", &id.to_string()])
        .env("POSTBACKD_TOKEN", ADMIN)
        .output()
        .unwrap();
    let show_out =
        String::from_utf8_lossy(&show.stdout).to_string() + &String::from_utf8_lossy(&show.stderr);
    assert!(show_out.contains("***"), "{show_out}");
    assert_clean("deliveries show", &show_out);
    let fire = Command::new(bin)
        .args([
            "fire",
            cfg.path().to_str().unwrap(),
            "clickid=c3&tid=T3&status=approved",
            "--send",
            "--allow-network",
            "127.0.0.1",
        ])
        .env("S", SECRET)
        .env("ADMIN", ADMIN)
        .output()
        .unwrap();
    let fire_out =
        String::from_utf8_lossy(&fire.stdout).to_string() + &String::from_utf8_lossy(&fire.stderr);
    assert!(fire_out.contains("Basic ***"), "{fire_out}");
    assert_clean("fire --send", &fire_out);

    assert_clean("the daemon's log", &d.logs());
    // The store's files, log included.
    drop(d);
    for f in std::fs::read_dir(data.path()).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert_clean("the store", &String::from_utf8_lossy(&bytes));
    }
}

#[tokio::test]
async fn a_config_error_names_the_reference_not_the_value() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "api:\n  admin_tokens: [\"${env:ADMIN}\"]\n",
        "postbacks:\n  - id: ok\n    trigger: conversion\n    http: { url: \"http://127.0.0.1:9/ok\" }\n",
    );
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_args(
        cfg.path(),
        data.path(),
        &[("S", SECRET), ("ADMIN", ADMIN)],
        &["--no-watch"],
    );
    std::fs::write(
        cfg.path().join("rules.yaml"),
        "postbacks:\n  - id: bad\n    trigger: conversion\n    http: { url: \"${env:S} not a url\" }\n",
    )
    .unwrap();
    let r = client()
        .post(d.url("/-/reload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("${env:S}"), "{body}");
    assert_clean("the reload's answer", &body);
    assert!(
        d.wait_log("${env:S}", Duration::from_secs(5)).await,
        "{}",
        d.logs()
    );
    assert_clean("the log", &d.logs());
}

/// A click id with CR/LF cannot forge log lines, and the logged url is the one sent.
#[tokio::test]
async fn control_characters_cannot_forge_log_lines() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "",
        &format!(
            "postbacks:\n  - id: raw\n    trigger: conversion\n    http: {{ url: \"http://{}/x?c={{clickid:raw}}\" }}\n",
            sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    let (code, body) =
        get_json(&d.url("/postback?clickid=x%0D%0AHost:%20forged&tid=T1&status=approved")).await;
    assert_eq!(code, 200, "{body}");
    let got = sink.wait_for(Some("/x"), 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", d.logs());
    let sent = format!("http://{}/x?{}", sink.addr, got[0].query);
    assert!(
        d.wait_log("outcome=\"delivered\"", Duration::from_secs(5))
            .await,
        "{}",
        d.logs()
    );
    let logs = d.logs();
    assert!(
        !logs
            .lines()
            .any(|l| l.trim_start().starts_with("Host: forged")),
        "a forged line:\n{logs}"
    );
    let line = logs
        .lines()
        .find(|l| l.contains("delivery attempt"))
        .unwrap();
    assert!(
        line.contains(&format!("url={sent}")),
        "logged url differs from the one sent ({sent}):\n{line}"
    );
}
