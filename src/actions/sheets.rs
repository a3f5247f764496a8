//! `sheets:`: appends a row (one template per column) to a range of a Google spreadsheet,
//! as a service account. The key file (a secret: `${file:…}`) signs an RS256 JWT that is
//! exchanged at the key's `token_uri` for an access token, cached until shortly before it
//! expires.
//!
//! Google allows about 60 writes a minute per user, so rows bound for the same range go
//! together in one append request: a row waits up to `batch_wait` for others, and a batch
//! goes as soon as it holds `batch_rows`. Each delivery still keeps its own record,
//! attempts and outcome: every row of a batch gets the batch's answer. A 429 backs off.

use super::outcome::{unanswered, HttpAnswer, SendError};
use super::{Action, Answer, Build, Message, Outcome, RenderError, Request, Scope, Target};
use crate::render::template::TemplateId;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub const KIND: &str = "sheets";
pub const ENDPOINT: &str = "https://sheets.googleapis.com";
pub const SCOPE: &str = "https://www.googleapis.com/auth/spreadsheets";
const TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub spreadsheet_id: Spanned<String>,
    /// A sheet and columns in A1 notation: `Conversions!A:F`.
    pub range: Spanned<String>,
    /// The service account's key file, read with `${file:/run/secrets/…json}`.
    pub service_account: Spanned<String>,
    /// One template per column, left to right.
    pub columns: Vec<Spanned<String>>,
    /// `USER_ENTERED` (default: Sheets parses numbers and dates as if typed) or `RAW`.
    pub value_input: Option<Spanned<String>>,
    /// Rows sent in one append request at most (default 100).
    pub batch_rows: Option<Spanned<u32>>,
    /// How long a row waits for others to go with it (default 1s).
    pub batch_wait: Option<Spanned<String>>,
    /// The Sheets API's base URL (default https://sheets.googleapis.com), for a test.
    pub endpoint: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

/// A service account's key: who it is and what signs its tokens. Never printed.
pub struct Account {
    email: String,
    key_id: String,
    token_uri: String,
    key: ring::signature::RsaKeyPair,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Account({})", self.email)
    }
}

impl PartialEq for Account {
    fn eq(&self, o: &Account) -> bool {
        (&self.email, &self.key_id, &self.token_uri) == (&o.email, &o.key_id, &o.token_uri)
    }
}

#[derive(Debug)]
pub struct Sheets {
    url: String,
    target: Target,
    account: Arc<Account>,
    columns: Vec<TemplateId>,
    batch_rows: usize,
    batch_wait: Duration,
}

/// One rendered row, and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The append URL (no secret in it).
    pub url: String,
    pub account: Arc<Account>,
    pub values: Vec<String>,
    pub batch_rows: usize,
    pub batch_wait: Duration,
    /// The request as shown: the token masked, the body with this row alone.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a row's batch got back. Every row of a batch gets the same.
#[derive(Debug, Clone)]
pub enum Appended {
    /// The append request's answer.
    Answer(HttpAnswer),
    /// No access token: the token endpoint refused the key (`why`), for good or for now.
    Token { why: String, retryable: bool },
    /// No answer: timeout, refused connection, TLS, egress policy.
    Failed {
        class: &'static str,
        why: String,
        retryable: bool,
    },
}

impl Action for Sheets {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> &Target {
        &self.target
    }
    fn concurrency(&self) -> Option<usize> {
        Some(self.batch_rows)
    }
    fn templates(&self) -> Vec<&TemplateId> {
        self.columns.iter().collect()
    }
    fn render(&self, s: &Scope) -> Result<Message, RenderError> {
        let mut values = Vec::with_capacity(self.columns.len());
        for (i, c) in self.columns.iter().enumerate() {
            values.push(s.optional(&format!("columns[{i}]"), c)?);
        }
        let body = serde_json::json!({ "values": [values] })
            .to_string()
            .into_bytes();
        Ok(Message::Rows(Box::new(Row {
            url: self.url.clone(),
            account: self.account.clone(),
            values,
            batch_rows: self.batch_rows,
            batch_wait: self.batch_wait,
            headers: vec![
                ("authorization".into(), "Bearer ***".into()),
                ("content-type".into(), "application/json".into()),
            ],
            body,
        })))
    }
    fn judge(&self, answer: Answer) -> Outcome {
        match answer {
            Answer::Rows(a) => judge(a),
            _ => Outcome::Other("not an answer to a Sheets append".into()),
        }
    }
}

/// 200 is delivered; Google's error object says why not. 429, 401 (the token is fetched
/// again) and 5xx are tried again; 400, 403 and 404 are final.
pub fn judge(a: Appended) -> Outcome {
    let a = match a {
        Appended::Answer(a) => a,
        Appended::Token { why, retryable } => {
            return Outcome::Rejected {
                status: None,
                body: String::new(),
                why,
                class: "error",
                retryable,
                retry_after: None,
            }
        }
        Appended::Failed {
            class,
            why,
            retryable,
        } => {
            return Outcome::Rejected {
                status: None,
                body: String::new(),
                why,
                class,
                retryable,
                retry_after: None,
            }
        }
    };
    if a.status == 200 {
        return Outcome::Delivered {
            status: 200,
            body: a.body,
        };
    }
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
    let e = &v["error"];
    let why = format!(
        "sheets error {} {}: {}",
        e["code"].as_u64().unwrap_or(a.status as u64),
        e["status"].as_str().unwrap_or(""),
        e["message"].as_str().unwrap_or("no message")
    );
    Outcome::Rejected {
        status: Some(a.status),
        why,
        body: a.body.clone(),
        class: super::outcome::status_class(a.status),
        retryable: a.status == 401 || super::outcome::status_retryable(a.status),
        retry_after: a.retry_after,
    }
}

/// How the appender sends a request: deliver's client, behind the egress policy.
pub type Send = Arc<
    dyn Fn(
            Request,
            Duration,
        )
            -> Pin<Box<dyn Future<Output = Result<HttpAnswer, SendError>> + std::marker::Send>>
        + std::marker::Send
        + Sync,
>;

/// One row waiting, and where its answer goes.
type Pending = (Vec<String>, oneshot::Sender<Appended>);

/// Rows waiting for their batch, by append URL.
#[derive(Default)]
struct Waiting {
    /// Each batch's number, so a timer that wakes after its batch left does nothing.
    next: u64,
    batches: HashMap<String, (u64, Vec<Pending>)>,
}

/// Batches rows per range and appends them; caches access tokens per service account.
#[derive(Clone, Default)]
pub struct Appender {
    waiting: Arc<Mutex<Waiting>>,
    tokens: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

impl Appender {
    /// Appends one row with whatever else is bound for its range, and returns the
    /// batch's answer.
    pub async fn append(&self, row: &Row, send: Send, timeout: Duration) -> Appended {
        let (tx, rx) = oneshot::channel();
        let full = {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            w.next += 1;
            let id = w.next;
            let batch = w.batches.entry(row.url.clone()).or_insert((id, Vec::new()));
            batch.1.push((row.values.clone(), tx));
            if batch.1.len() == 1 {
                let (me, row, send, gen) = (self.clone(), row.clone(), send.clone(), batch.0);
                tokio::spawn(async move {
                    tokio::time::sleep(row.batch_wait).await;
                    if let Some(rows) = me.take(&row.url, Some(gen)) {
                        me.flush(&row, rows, send, timeout).await;
                    }
                });
            }
            batch.1.len() >= row.batch_rows
        };
        if full {
            if let Some(rows) = self.take(&row.url, None) {
                let (me, row) = (self.clone(), row.clone());
                tokio::spawn(async move { me.flush(&row, rows, send, timeout).await });
            }
        }
        rx.await.unwrap_or(Appended::Failed {
            class: "error",
            why: "the batch was dropped before it was sent".into(),
            retryable: true,
        })
    }

    /// Takes the rows waiting for `url` (only batch `gen`, when given).
    #[allow(clippy::type_complexity)]
    fn take(
        &self,
        url: &str,
        gen: Option<u64>,
    ) -> Option<Vec<(Vec<String>, oneshot::Sender<Appended>)>> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match w.batches.get(url) {
            Some((g, _)) if gen.is_none_or(|x| x == *g) => w.batches.remove(url).map(|b| b.1),
            _ => None,
        }
    }

    async fn flush(&self, row: &Row, rows: Vec<Pending>, send: Send, timeout: Duration) {
        let (values, senders): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
        let answer = self.send_batch(row, values, &send, timeout).await;
        for s in senders {
            let _ = s.send(answer.clone());
        }
    }

    async fn send_batch(
        &self,
        row: &Row,
        values: Vec<Vec<String>>,
        send: &Send,
        timeout: Duration,
    ) -> Appended {
        let token = match self.token(&row.account, send, timeout).await {
            Ok(t) => t,
            Err(a) => return a,
        };
        let body = serde_json::json!({ "values": values })
            .to_string()
            .into_bytes();
        let req = Request {
            method: super::Method::Post,
            url: row.url.clone(),
            headers: vec![
                ("authorization".into(), format!("Bearer {token}")),
                ("content-type".into(), "application/json".into()),
            ],
            body: Some(body),
        };
        match send(req, timeout).await {
            Ok(a) => {
                if a.status == 401 {
                    self.forget(&row.account);
                }
                Appended::Answer(a)
            }
            Err(e) => failed(e),
        }
    }

    fn forget(&self, account: &Account) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        t.remove(&cache_key(account));
    }

    /// An access token for the account: cached, or exchanged for a fresh signed JWT.
    async fn token(
        &self,
        account: &Account,
        send: &Send,
        timeout: Duration,
    ) -> Result<String, Appended> {
        let key = cache_key(account);
        if let Some((t, until)) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let jwt = sign_jwt(account, crate::now_ms() / 1000).map_err(|why| Appended::Token {
            why,
            retryable: false,
        })?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
            .append_pair("assertion", &jwt)
            .finish();
        let req = Request {
            method: super::Method::Post,
            url: account.token_uri.clone(),
            headers: vec![(
                "content-type".into(),
                "application/x-www-form-urlencoded".into(),
            )],
            body: Some(form.into_bytes()),
        };
        let a = send(req, timeout).await.map_err(failed)?;
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
        match (a.status, v["access_token"].as_str()) {
            (200, Some(t)) => {
                let life = v["expires_in"].as_u64().unwrap_or(3600);
                // A minute before Google's expiry, so a token never dies in flight.
                let until = Instant::now() + Duration::from_secs(life.saturating_sub(60));
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, (t.to_string(), until));
                Ok(t.to_string())
            }
            (status, _) => Err(Appended::Token {
                why: format!(
                    "the token endpoint refused the service account's key (http {status}): {} {}",
                    v["error"].as_str().unwrap_or(""),
                    v["error_description"].as_str().unwrap_or("")
                )
                .trim_end()
                .to_string(),
                retryable: super::outcome::status_retryable(status),
            }),
        }
    }
}

fn cache_key(a: &Account) -> String {
    format!("{}|{}|{}", a.email, a.key_id, a.token_uri)
}

fn failed(e: SendError) -> Appended {
    let o = unanswered(e);
    Appended::Failed {
        class: o.class(),
        why: o.parts().2.unwrap_or_default(),
        retryable: o.retryable(),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The signed assertion Google's token endpoint takes: an RS256 JWT of the account, the
/// Sheets scope, the token endpoint as audience, for one hour from `now`.
pub fn sign_jwt(a: &Account, now: i64) -> Result<String, String> {
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": a.key_id });
    let claims = serde_json::json!({
        "iss": a.email, "scope": SCOPE, "aud": a.token_uri, "iat": now, "exp": now + 3600,
    });
    let msg = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut sig = vec![0; a.key.public().modulus_len()];
    a.key
        .sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            msg.as_bytes(),
            &mut sig,
        )
        .map_err(|_| "the service account's key cannot sign".to_string())?;
    Ok(format!("{msg}.{}", b64(&sig)))
}

/// Reads a service account's key file (the JSON Google gives).
fn account(text: &str) -> Result<Account, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the key file is not JSON: {e}"))?;
    let field = |k: &str| v[k].as_str().map(str::to_string);
    if field("type").as_deref() != Some("service_account") {
        return Err(
            "the key file is not a service account's (`type` is not `service_account`)".into(),
        );
    }
    let email = field("client_email").ok_or("the key file has no `client_email`")?;
    let pem = field("private_key").ok_or("the key file has no `private_key`")?;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("the key file's `private_key` is not a PKCS#8 PEM key: {e}"))?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| format!("the key file's `private_key` is not an RSA key: {e}"))?;
    Ok(Account {
        email,
        key_id: field("private_key_id").unwrap_or_default(),
        token_uri: field("token_uri").unwrap_or_else(|| TOKEN_URI.to_string()),
        key,
    })
}

/// Compiles `sheets:`.
pub fn compile(b: &mut dyn Build, r: &Raw) -> Option<Sheets> {
    let account = match b.secret("sheets.service_account", &r.service_account) {
        Some((text, _)) => match account(&text) {
            Ok(a) => Some(Arc::new(a)),
            Err(m) => {
                b.error(&r.service_account, format!("sheets.service_account: {m}"), Some("point it at the JSON key Google gives for the service account: \"${file:/run/secrets/google-sa.json}\""));
                None
            }
        },
        None => None,
    };
    let endpoint = b.endpoint(r.endpoint.as_ref(), ENDPOINT);
    let (id, _) = b.value(&r.spreadsheet_id);
    if id.is_empty()
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c))
    {
        b.error(
            &r.spreadsheet_id,
            "sheets.spreadsheet_id is not a spreadsheet id",
            Some("the id is the part of the sheet's URL between /d/ and /edit"),
        );
    }
    let (range, _) = b.value(&r.range);
    if range.is_empty() || range.contains('{') {
        b.error(
            &r.range,
            "sheets.range must be written out, like Conversions!A:F",
            None,
        );
    }
    let value_input = match r.value_input.as_ref().map(|v| v.value.as_str()) {
        None | Some("USER_ENTERED") => "USER_ENTERED",
        Some("RAW") => "RAW",
        Some(other) => {
            b.error(
                r.value_input.as_ref()?,
                format!("sheets.value_input: unknown option `{other}`"),
                Some("use USER_ENTERED or RAW"),
            );
            "USER_ENTERED"
        }
    };
    if r.columns.is_empty() {
        b.error(
            &r.range,
            "sheets: give at least one column",
            Some("columns: [\"{date}\", \"{transaction_id}\", \"{payout}\"]"),
        );
    }
    let columns: Vec<TemplateId> = r.columns.iter().filter_map(|c| b.template(c)).collect();
    let batch_rows = r
        .batch_rows
        .as_ref()
        .map(|n| n.value as usize)
        .unwrap_or(100);
    if batch_rows == 0 || batch_rows > 1000 {
        if let Some(at) = &r.batch_rows {
            b.error(at, "sheets.batch_rows must be between 1 and 1000", None);
        }
    }
    let batch_wait = r
        .batch_wait
        .as_ref()
        .and_then(|w| b.duration(w))
        .unwrap_or(Duration::from_secs(1));
    let timeout = r.timeout.as_ref().and_then(|t| b.duration(t));
    let path_range: String = percent_encoding::utf8_percent_encode(&range, RANGE).to_string();
    let url = format!(
        "{endpoint}/v4/spreadsheets/{id}/values/{path_range}:append?valueInputOption={value_input}&insertDataOption=INSERT_ROWS"
    );
    if columns.len() != r.columns.len() {
        return None;
    }
    Some(Sheets {
        url,
        target: Target {
            destination: super::destination_of(&endpoint),
            timeout,
        },
        account: account?,
        columns,
        batch_rows: batch_rows.clamp(1, 1000),
        batch_wait,
    })
}

/// What a range keeps as it is in a URL path (`Sheet1!A:F`); the rest is encoded.
const RANGE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b':')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

super::raw_action!(Raw, compile);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheets_answers() {
        let a = |status, body: &str| {
            Appended::Answer(HttpAnswer {
                status,
                retry_after: None,
                body: body.into(),
            })
        };
        assert!(judge(a(200, r#"{"updates":{"updatedRows":2}}"#)).is_success());
        let o = judge(a(
            429,
            r#"{"error":{"code":429,"message":"Quota exceeded for quota metric 'Write requests'","status":"RESOURCE_EXHAUSTED"}}"#,
        ));
        assert!(o.retryable());
        assert_eq!(
            o.parts().2.unwrap(),
            "sheets error 429 RESOURCE_EXHAUSTED: Quota exceeded for quota metric 'Write requests'"
        );
        let o = judge(a(
            403,
            r#"{"error":{"code":403,"message":"The caller does not have permission","status":"PERMISSION_DENIED"}}"#,
        ));
        assert!(!o.retryable());
        assert!(!judge(Appended::Token {
            why: "invalid_grant".into(),
            retryable: false
        })
        .retryable());
    }
}
