//! E-mail through a real SMTP server (aiosmtpd).

use super::*;
use crate::delivery::{post_events, WAIT};
use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A real SMTP server on `port`, writing what it accepts to a file.
struct Smtp {
    child: Child,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Smtp {
    fn start(port: u16) -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("mail.jsonl");
        let mut child = Command::new("python3")
            .arg(repo().join("tests/it/peers/smtp.py"))
            .arg(port.to_string())
            .arg(&out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the SMTP server did not start (bash test.sh installs python3-aiosmtpd): {err}");
        }
        Smtp {
            child,
            out,
            _dir: dir,
        }
    }

    fn mails(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn wait(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        while self.mails().len() < n && start.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.mails()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn email_reaches_a_real_smtp_server_a_550_is_dead_and_a_down_relay_is_waited_for() {
    let port = free_port();
    let rules = format!(
        r#"postbacks:
  - id: mail
    trigger: conversion
    retry: [200ms, 200ms, 300ms, 500ms, 500ms, 1s, 1s, 1s, 1s, 1s]
    email:
      smtp: {{ host: 127.0.0.1, port: {port}, tls: none }}
      from: "Postbacks <postbacks@network.example>"
      to: "{{params.to}}"
      cc: "finance@network.example"
      bcc: "audit@network.example"
      reply_to: "support@network.example"
      subject: "Conversion {{transaction_id}} approved: {{payout}} {{currency}}"
      text: |
        Affiliate {{affiliate_id}} earned {{payout}} {{currency}}.
      html: "<p>Affiliate <b>{{affiliate_id}}</b> earned {{payout}}</p>"
"#
    );
    let (d, _c, _data) = daemon(&rules, &[]);
    // The relay is down: the first conversion waits and is retried.
    post_events(&d, json!([{"clickid": "c1", "transaction_id": "T-1", "status": "approved", "payout": "7", "currency": "EUR", "affiliate_id": "<42>", "to": "aff42@partner.example"}])).await;
    assert!(
        d.wait_log("outcome=\"connect\"", WAIT).await,
        "{}",
        d.logs()
    );
    let smtp = Smtp::start(port);
    let mails = smtp.wait(1).await;
    assert_eq!(mails.len(), 1, "{}", d.logs());
    let m = &mails[0];
    assert_eq!(m["mail_from"], "postbacks@network.example");
    let mut rcpt: Vec<&str> = m["rcpt_tos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    rcpt.sort();
    assert_eq!(
        rcpt,
        [
            "aff42@partner.example",
            "audit@network.example",
            "finance@network.example"
        ]
    );
    let h = &m["headers"];
    assert_eq!(h["from"], "Postbacks <postbacks@network.example>");
    assert_eq!(h["to"], "aff42@partner.example");
    assert_eq!(h["cc"], "finance@network.example");
    assert!(
        h.get("bcc").is_none(),
        "Bcc is in the envelope, not the headers: {h}"
    );
    assert_eq!(h["reply-to"], "support@network.example");
    assert_eq!(h["subject"], "Conversion T-1 approved: 7 EUR");
    assert_eq!(
        m["text"].as_str().unwrap().trim_end(),
        "Affiliate <42> earned 7 EUR."
    );
    assert_eq!(
        m["html"].as_str().unwrap().trim_end(),
        "<p>Affiliate <b>&lt;42&gt;</b> earned 7</p>"
    );
    let done = finished(&d, "mail", "delivered").await;
    let log = done["attempt_log"].as_array().unwrap();
    assert_eq!(log[0]["outcome"], "connect");
    let last = log.last().unwrap();
    assert_eq!(last["method"], "SMTP");
    let logged = last["request_body"].as_str().unwrap();
    assert!(
        logged.starts_with(
            "From: Postbacks <postbacks@network.example>\nTo: aff42@partner.example\n"
        ) && logged
            .contains("Subject: Conversion T-1 approved: 7 EUR\n\nAffiliate <42> earned 7 EUR.")
            && logged.contains("--- html ---\n<p>Affiliate <b>&lt;42&gt;</b>"),
        "the log keeps the message as rendered: {logged}"
    );

    // An unknown user: 550, dead after one attempt, with the server's reply.
    post_events(&d, json!([{"clickid": "c2", "transaction_id": "T-2", "status": "approved", "to": "reject@partner.example"}])).await;
    let dead = dead_deliveries(&d, 1).await.remove(0);
    assert_eq!(dead["attempts"], 1, "{dead}");
    let e = dead["attempt_log"][0]["error"].as_str().unwrap();
    assert!(
        e.starts_with("smtp 550") && e.contains("User unknown"),
        "{e}"
    );
    assert_eq!(smtp.mails().len(), 1);
}
