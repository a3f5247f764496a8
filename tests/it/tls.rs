//! TLS on the listener against the real binary: webhooks over HTTPS with a certificate from
//! PEM files, a renewed certificate served from the next connection without a restart, and
//! a broken renewal that leaves the current one in place. Certificates are made with the
//! `openssl` command.

use crate::support::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for the TLS tests");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority of its own and a server certificate it signed for 127.0.0.1
/// and localhost, as `{name}.crt`/`{name}.key` in `dir`; returns the authority's PEM.
fn make_cert(dir: &Path, name: &str) -> String {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = format!("{name}-ca");
    let (ca_key, ca_crt) = (format!("{ca}.key"), format!("{ca}.crt"));
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-days",
        "2",
        "-subj",
        "/CN=test authority",
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
    ]);
    openssl(&a, dir);
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr]);
    openssl(&a, dir);
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ],
        dir,
    );
    std::fs::read_to_string(dir.join(ca_crt)).unwrap()
}

/// Installs `name`'s pair as the files the daemon reads, each in one rename.
fn install(dir: &Path, name: &str) {
    for (from, to) in [("crt", "cert.pem"), ("key", "key.pem")] {
        let tmp = dir.join(format!("{to}.new"));
        std::fs::copy(dir.join(format!("{name}.{from}")), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(to)).unwrap();
    }
}

fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn webhooks_over_tls_and_a_renewed_certificate_without_a_restart() {
    let sink = Sink::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let first = make_cert(certs.path(), "first");
    let second = make_cert(certs.path(), "second");
    install(certs.path(), "first");
    let settings = format!(
        "server:\n  tls:\n    cert: {}\n    key: {}\n",
        certs.path().join("cert.pem").display(),
        certs.path().join("key.pem").display()
    );
    write_config(
        cfg.path(),
        &settings,
        &format!(
            "postbacks:\n  - id: pb\n    trigger: conversion\n    http: {{ url: \"http://{}/pb?cid={{clickid}}\" }}\n",
            sink.addr
        ),
    );
    let d = Daemon::start(cfg.path());
    let url = format!("https://127.0.0.1:{}/postback?clickid=t1", d.addr.port());
    let r = trusting(&first).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    sink.wait_for(Some("/pb"), 1, Duration::from_secs(10)).await;
    // Plain HTTP on a TLS port gets no answer, and is counted.
    assert!(client().get(d.url("/-/healthy")).send().await.is_err());

    // The renewal lands: new connections get the new certificate.
    install(certs.path(), "second");
    let start = Instant::now();
    loop {
        if trusting(&second).get(&url).send().await.is_ok() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        trusting(&first).get(&url).send().await.is_err(),
        "the old certificate is gone"
    );
    assert!(
        d.logs().contains("TLS certificate reloaded"),
        "{}",
        d.logs()
    );

    // A renewal cut short (a key that is not PEM) keeps the current certificate serving.
    std::fs::write(certs.path().join("key.pem"), "not a key").unwrap();
    // The files are looked at during handshakes: keep making them until the log says so.
    let start = Instant::now();
    while !d.logs().contains("cannot read the renewed TLS certificate") {
        let _ = trusting(&second).get(&url).send().await;
        assert!(start.elapsed() < Duration::from_secs(10), "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = trusting(&second).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A certificate that cannot be read is a config error with its file and line: `check`
/// says so, and a daemon does not start on it.
#[test]
fn an_unreadable_certificate_is_a_config_error() {
    let cfg = tempfile::tempdir().unwrap();
    write_config(
        cfg.path(),
        "server:\n  tls:\n    cert: missing.pem\n    key: missing.key\n",
        "postbacks: []\n",
    );
    let (code, _, err) = run_cli(&["check", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("postbackd.yaml:3:11: server.tls:"), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
}
