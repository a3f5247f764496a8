//! Google Sheets as a service account, against a token endpoint that checks the JWT.

use super::*;
use crate::delivery::{api, post_events, WAIT};
use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use std::process::{Command, Stdio};

/// A fresh RSA key as a service-account key file, pointing at `token_uri`; and the public
/// key (PKCS#1 DER) the token endpoint checks signatures with.
fn service_account(
    dir: &std::path::Path,
    name: &str,
    token_uri: &str,
) -> (std::path::PathBuf, Vec<u8>) {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.der"));
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
        && Command::new("openssl")
            .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl could not make a key");
    let file = dir.join(format!("{name}.json"));
    let sa = json!({
        "type": "service_account",
        "project_id": "postbacks-test",
        "private_key_id": format!("{name}-key-id"),
        "private_key": std::fs::read_to_string(&key).unwrap(),
        "client_email": format!("{name}@postbacks-test.iam.gserviceaccount.com"),
        "client_id": "1",
        "token_uri": token_uri,
    });
    std::fs::write(&file, sa.to_string()).unwrap();
    (file, std::fs::read(&public).unwrap())
}

/// What Google's token endpoint checks of a JWT-bearer grant: the RS256 signature by the
/// account's key, the issuer, the scope, the audience and an hour's life.
fn verify_grant(body: &str, public: &[u8], email: &str, aud: &str) -> Result<(), String> {
    use base64::Engine;
    let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |k: &str| form.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    if get("grant_type").as_deref() != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return Err("unsupported_grant_type".into());
    }
    let jwt = get("assertion").ok_or("no assertion")?;
    let parts: Vec<&str> = jwt.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let sig = b64
        .decode(parts.get(2).ok_or("not a JWT")?)
        .map_err(|e| e.to_string())?;
    let signed = format!("{}.{}", parts[0], parts[1]);
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, public)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| "Invalid JWT Signature.".to_string())?;
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    if header["alg"] != "RS256"
        || claims["iss"] != email
        || claims["aud"] != aud
        || claims["scope"] != "https://www.googleapis.com/auth/spreadsheets"
        || claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0) != 3600
    {
        return Err(format!("bad claims: {header} {claims}"));
    }
    Ok(())
}

#[tokio::test]
async fn sheets_rows_go_in_batches_as_a_service_account_and_a_429_backs_off() {
    let google = Sink::start().await;
    let keys = tempfile::tempdir().unwrap();
    let token_uri = format!("http://{}/token", google.addr);
    let (good, public) = service_account(keys.path(), "postbacks", &token_uri);
    let (stranger, _) = service_account(keys.path(), "stranger", &token_uri);
    let appends = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = appends.clone();
    let uri = token_uri.clone();
    google.respond(move |r| {
        if r.path == "/token" {
            // Only the account whose public key this endpoint knows gets a token.
            return match verify_grant(&r.body, &public, "postbacks@postbacks-test.iam.gserviceaccount.com", &uri) {
                Ok(()) => (200, r#"{"access_token":"ya29.c.test-token","expires_in":3599,"token_type":"Bearer"}"#.into()),
                Err(e) => (400, json!({"error": "invalid_grant", "error_description": e}).to_string()),
            };
        }
        if r.header("authorization") != Some("Bearer ya29.c.test-token") {
            return (401, r#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#.into());
        }
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return (429, r#"{"error":{"code":429,"message":"Quota exceeded for quota metric 'Write requests' and limit 'Write requests per minute per user'","status":"RESOURCE_EXHAUSTED"}}"#.into());
        }
        let rows = serde_json::from_str::<Value>(&r.body).unwrap()["values"].as_array().unwrap().len();
        (200, json!({"spreadsheetId": "SHEET-1", "tableRange": "Conversions!A1:D1",
            "updates": {"spreadsheetId": "SHEET-1", "updatedRange": format!("Conversions!A2:D{}", rows + 1),
                        "updatedRows": rows, "updatedColumns": 4, "updatedCells": rows * 4}}).to_string())
    });
    let rules = format!(
        r#"postbacks:
  - id: ledger
    trigger: conversion
    retry: [300ms, 300ms, 300ms]
    sheets:
      spreadsheet_id: SHEET-1
      range: "Conversions!A:D"
      service_account: "${{file:{}}}"
      columns: ["{{transaction_id}}", "{{payout}}", "{{currency}}", "{{affiliate_id}}"]
      batch_rows: 50
      batch_wait: 300ms
      endpoint: "http://{addr}"
  - id: stranger
    trigger: conversion
    statuses: [rejected]
    retry: [100ms]
    sheets:
      spreadsheet_id: SHEET-1
      range: "Rejected!A:B"
      service_account: "${{file:{}}}"
      columns: ["{{transaction_id}}", "{{rejection_reason}}"]
      batch_wait: 50ms
      endpoint: "http://{addr}"
"#,
        good.display(),
        stranger.display(),
        addr = google.addr
    );
    let (d, _c, _data) = daemon(&rules, &[]);
    let events: Vec<Value> = (0..6)
        .map(|i| json!({"clickid": format!("c{i}"), "transaction_id": format!("T-{i}"), "status": "approved", "payout": format!("{i}.50"), "currency": "EUR", "affiliate_id": "42"}))
        .collect();
    post_events(&d, Value::Array(events)).await;
    let start = Instant::now();
    loop {
        let (_, body) = send_json(api(
            &d,
            reqwest::Method::GET,
            "/api/v1/deliveries?postback=ledger&state=delivered",
        ))
        .await;
        if body["deliveries"].as_array().map(Vec::len) == Some(6) {
            break;
        }
        assert!(start.elapsed() < WAIT, "{body}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = google.on_path("/v4/spreadsheets/SHEET-1/values/Conversions!A:D:append");
    assert_eq!(
        calls[0].param("valueInputOption").as_deref(),
        Some("USER_ENTERED")
    );
    assert_eq!(
        calls[0].param("insertDataOption").as_deref(),
        Some("INSERT_ROWS")
    );
    let first: Value = serde_json::from_str(&calls[0].body).unwrap();
    assert_eq!(
        first["values"].as_array().unwrap().len(),
        6,
        "the six rows went in one request: {first}"
    );
    // After the 429, every row was appended exactly once, in fewer requests than rows.
    let mut rows: Vec<Value> = calls[1..]
        .iter()
        .flat_map(|c| {
            serde_json::from_str::<Value>(&c.body).unwrap()["values"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    rows.sort_by_key(|r| r[0].as_str().unwrap().to_string());
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert_eq!(rows[0], json!(["T-0", "0.50", "EUR", "42"]));
    assert!(
        calls.len() - 1 < 6,
        "{} append requests for 6 rows",
        calls.len() - 1
    );
    assert_eq!(google.on_path("/token").len(), 1, "the token is cached");
    // Each delivery keeps its own record: the 429, then the append.
    let one = finished(&d, "ledger", "delivered").await;
    let log = one["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2, "{one}");
    assert!(
        log[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("sheets error 429 RESOURCE_EXHAUSTED"),
        "{one}"
    );
    assert_eq!(log[1]["response_status"], 200);
    assert!(
        !one.to_string().contains("ya29.c.test-token"),
        "the access token never shows: {one}"
    );

    // A key the token endpoint does not accept: dead, with Google's reason.
    post_events(&d, json!([{"clickid": "r1", "transaction_id": "T-R", "status": "rejected", "rejection_reason": "fraud"}])).await;
    let dead = finished(&d, "stranger", "dead").await;
    let e = dead["attempt_log"][0]["error"].as_str().unwrap();
    assert!(
        e.contains("invalid_grant") && e.contains("Invalid JWT Signature."),
        "{e}"
    );
    assert_eq!(dead["attempts"], 1, "a refused key is not retried: {dead}");
}
