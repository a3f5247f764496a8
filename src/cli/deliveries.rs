//! `postbackd deliveries`: the delivery log of a running daemon, from the command line
//! (the same queries as `/api/v1/deliveries`).

use clap::{Args, Subcommand};
use serde_json::Value;
use std::process::ExitCode;

#[derive(Args)]
pub struct Deliveries {
    /// The daemon's address.
    #[arg(long, env = "POSTBACKD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API token (admin, or an affiliate's for its own postbacks).
    #[arg(long, env = "POSTBACKD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Option<What>,
    #[command(flatten)]
    filters: Filters,
}

#[derive(Subcommand)]
enum What {
    /// One delivery with every attempt.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Queue a finished delivery again, or every one matching --postback/--state/--since.
    Retry {
        id: Option<i64>,
        #[arg(long)]
        postback: Option<String>,
        /// dead (default), cancelled or delivered.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
}

/// Filters for the list (all optional), as `/api/v1/deliveries` takes them.
#[derive(Args, Default)]
struct Filters {
    #[arg(long)]
    transaction_id: Option<String>,
    #[arg(long)]
    clickid: Option<String>,
    #[arg(long)]
    offer: Option<String>,
    #[arg(long)]
    affiliate: Option<String>,
    #[arg(long)]
    goal: Option<String>,
    #[arg(long)]
    postback: Option<String>,
    /// The conversion's status.
    #[arg(long)]
    status: Option<String>,
    /// pending, inflight, delivered, dead, cancelled.
    #[arg(long)]
    state: Option<String>,
    /// The last attempt's result class (5xx, timeout, …).
    #[arg(long)]
    outcome: Option<String>,
    /// RFC 3339 or unix seconds.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// The cursor printed after a full page.
    #[arg(long)]
    cursor: Option<String>,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

impl Filters {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = vec![("limit", self.limit.to_string())];
        for (k, v) in [
            ("transaction_id", &self.transaction_id),
            ("clickid", &self.clickid),
            ("offer", &self.offer),
            ("affiliate", &self.affiliate),
            ("goal", &self.goal),
            ("postback", &self.postback),
            ("status", &self.status),
            ("state", &self.state),
            ("outcome", &self.outcome),
            ("since", &self.since),
            ("until", &self.until),
            ("cursor", &self.cursor),
        ] {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        q
    }
}

pub fn main(d: Deliveries) -> ExitCode {
    let Some(rt) = super::runtime() else {
        return ExitCode::from(1);
    };
    match rt.block_on(run(d)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn call(d: &Deliveries, rb: reqwest::RequestBuilder) -> Result<Value, String> {
    let rb = match &d.token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let r = rb
        .send()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", d.url))?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!(
            "{}: {}",
            status.as_u16(),
            v["error"].as_str().unwrap_or("no reason given")
        ))
    }
}

async fn run(d: Deliveries) -> Result<String, String> {
    let client = reqwest::Client::new();
    let base = d.url.trim_end_matches('/').to_string();
    match &d.command {
        None => {
            let v = call(
                &d,
                client
                    .get(format!("{base}/api/v1/deliveries"))
                    .query(&d.filters.query()),
            )
            .await?;
            if d.filters.json {
                return Ok(format!("{v:#}\n"));
            }
            Ok(table(&v))
        }
        Some(What::Show { id, json }) => {
            let v = call(&d, client.get(format!("{base}/api/v1/deliveries/{id}"))).await?;
            if *json {
                return Ok(format!("{v:#}\n"));
            }
            Ok(show(&v))
        }
        Some(What::Retry {
            id,
            postback,
            state,
            since,
            until,
        }) => {
            let v = match id {
                Some(id) => {
                    call(
                        &d,
                        client.post(format!("{base}/api/v1/deliveries/{id}/retry")),
                    )
                    .await?
                }
                None => {
                    let body = serde_json::json!({"postback": postback, "state": state, "since": since, "until": until});
                    call(
                        &d,
                        client
                            .post(format!("{base}/api/v1/deliveries/retry"))
                            .json(&body),
                    )
                    .await?
                }
            };
            let n = v["queued"].as_array().map_or(0, Vec::len);
            Ok(format!(
                "queued again: {n} {}\n",
                if n == 1 { "delivery" } else { "deliveries" }
            ))
        }
    }
}

fn time(ms: &Value) -> String {
    ms.as_i64().map(crate::utc_text).unwrap_or_default()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(v: &Value) -> String {
    let rows = v["deliveries"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "{:<8} {:<20} {:<24} {:<10} {:>3} {:<14} {:<16} {}\n",
        "ID", "CREATED", "POSTBACK", "STATE", "TRY", "LAST", "TRANSACTION", "CLICK"
    );
    for r in &rows {
        let last = match (&r["last_status"], &r["last_outcome"]) {
            (Value::Null, o) => s(o),
            (st, o) => format!("{} {}", s(st), s(o)),
        };
        out.push_str(&format!(
            "{:<8} {:<20} {:<24} {:<10} {:>3} {:<14} {:<16} {}\n",
            s(&r["id"]),
            time(&r["created_at"]),
            s(&r["postback"]),
            s(&r["state"]),
            s(&r["attempts"]),
            last,
            s(&r["transaction_id"]),
            s(&r["clickid"]),
        ));
    }
    match v["next_cursor"].as_str() {
        Some(c) => out.push_str(&format!("(more: --cursor {c})\n")),
        None => out.push_str(&format!("({} shown)\n", rows.len())),
    }
    out
}

fn show(v: &Value) -> String {
    let mut out = format!(
        "delivery {}: postback {} (offer {}), {}\n",
        s(&v["id"]),
        s(&v["postback"]),
        s(&v["offer"]),
        s(&v["state"])
    );
    out.push_str(&format!(
        "  conversion: transaction {} click {} affiliate {} goal {} status {}\n  created {}  updated {}\n",
        s(&v["transaction_id"]),
        s(&v["clickid"]),
        s(&v["affiliate_id"]),
        s(&v["goal"]),
        s(&v["status"]),
        time(&v["created_at"]),
        time(&v["updated_at"]),
    ));
    if let Some(e) = v["last_error"].as_str() {
        let label = if v["orphaned_at"].is_null() {
            "last error"
        } else {
            "orphaned"
        };
        out.push_str(&format!("  {label}: {e}\n"));
    }
    for a in v["attempt_log"].as_array().cloned().unwrap_or_default() {
        out.push_str(&format!(
            "  #{} {} {} {} -> {} {} in {} ms (config {})\n",
            s(&a["attempt"]),
            time(&a["started_at"]),
            s(&a["method"]),
            s(&a["url"]),
            s(&a["response_status"]),
            s(&a["outcome"]),
            s(&a["duration_ms"]),
            s(&a["config_version"]),
        ));
        if let Some(b) = a["request_body"].as_str() {
            out.push_str(&format!("     sent: {b}\n"));
        }
        if let Some(b) = a["response_body"].as_str().filter(|b| !b.is_empty()) {
            out.push_str(&format!(
                "     answer: {}\n",
                b.lines().next().unwrap_or_default()
            ));
        }
        if let Some(e) = a["error"].as_str() {
            out.push_str(&format!("     error: {e}\n"));
        }
    }
    out
}
