//! `postbackd check` on the shipped configs and on broken ones.

use crate::support::{repo, run_cli};

#[test]
fn every_shipped_config_passes_check() {
    let mut dirs = vec![repo().join("config")];
    for e in std::fs::read_dir(repo().join("examples")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            dirs.push(e.path());
        }
    }
    assert!(
        dirs.len() >= 15,
        "config/ and fourteen examples expected (five use cases, nine action kinds), found {dirs:?}"
    );
    for d in dirs {
        let (code, out, err) = run_cli(&["check", d.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {err}", d.display());
        assert!(out.starts_with("ok: "), "{out}");
    }
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("offers.yaml"),
        "offers:\n  - id: 1\n    goals: [lead, sale]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        r#"postbacks:
  - id: a
    trigger: conversion
    offers: [1, 2]
    when:
      goal: sael
    delay: 5x
    http:
      url: "https://t.example/pb?cid={clickid}&s={subacc4}"
  - id: b
    trigger: clik
    http:
      url: "ftp://t.example/"
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("syntax.yaml"),
        "postbacks:\n  - id: c\n    trigerr: click\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let bad = dir.path().join("bad.yaml").display().to_string();
    for want in [
        format!("{bad}:4:13: postback `a`: unknown offer `2`"),
        format!("{bad}:6:13: postback `a`: goal `sael` is not a goal of offer `1`"),
        format!("{bad}:7:12: postback `a`: bad duration `5x`"),
        format!("{bad}:9:12: postback `a`: unknown macro `subacc4`"),
        "hint: did you mean `sub4`?".to_string(),
        format!("{bad}:11:14: postback `b`: unknown trigger `clik`"),
        "url must start with http:// or https://".to_string(),
        "syntax.yaml:3:5: unknown field `trigerr`".to_string(),
        "7 error(s)".to_string(),
    ] {
        assert!(err.contains(&want), "missing `{want}` in:\n{err}");
    }
}

#[test]
fn check_of_a_missing_directory_fails_clearly() {
    let (code, _, err) = run_cli(&["check", "/nonexistent/postbackd-rules"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read config directory"), "{err}");
}

#[test]
fn run_refuses_a_bad_config_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "postbacks:\n  - id: x\n    trigger: sale\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&[
        "run",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("r.yaml:3:14: postback `x`: unknown trigger `sale`"),
        "{err}"
    );
    assert!(err.contains("postback has no action"), "{err}");
}
