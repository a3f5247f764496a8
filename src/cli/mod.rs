//! The command line: `run` the daemon; `check`, `test`, `fire` and `diff` for rule changes;
//! `sink` for trying rules out.

mod deliveries;
mod rules;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "postbackd",
    version,
    about = "Conversion webhooks in, durable templated postbacks out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon on a config directory. Flags win over environment variables, which
    /// win over postbackd.yaml.
    Run {
        /// Directory holding postbackd.yaml and the rule files.
        #[arg(env = "POSTBACKD_CONFIG")]
        dir: PathBuf,
        /// Listen address (overrides `listen` in postbackd.yaml).
        #[arg(long, env = "POSTBACKD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Data directory for the store (overrides `data_dir`).
        #[arg(long, env = "POSTBACKD_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The store: `sqlite` (a file in the data directory) or a PostgreSQL connection
        /// string, postgres://user:password@host:5432/db (overrides `store`).
        #[arg(long, env = "POSTBACKD_STORE", hide_env_values = true)]
        store: Option<String>,
        /// Log format, `text` or `json` (overrides `log.format`).
        #[arg(long, env = "POSTBACKD_LOG_FORMAT", value_parser = ["text", "json"])]
        log_format: Option<String>,
        /// Log level or filter, e.g. `info` or `postbackd=debug` (overrides `log.level`).
        #[arg(long, env = "POSTBACKD_LOG_LEVEL")]
        log_level: Option<String>,
        /// A file holding the admin token (replaces `api.admin_tokens`); the environment
        /// variable POSTBACKD_ADMIN_TOKEN holds the token itself.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Do not watch the config directory; reload only on SIGHUP or POST /-/reload.
        #[arg(long)]
        no_watch: bool,
        /// A network, address or host deliveries may reach although it is internal, on top
        /// of `delivery.allow_networks` (repeat for several).
        #[arg(long = "allow-network")]
        allow_networks: Vec<String>,
    },
    /// Check a config directory: print every error, or a one-line summary.
    Check { dir: PathBuf },
    /// Run rule tests: every YAML file under <dir>/tests, or the files named.
    Test { dir: PathBuf, tests: Vec<PathBuf> },
    /// Show which postbacks an event fires and exactly what they would send.
    Fire {
        dir: PathBuf,
        /// The event: JSON ('{"clickid":"abc"}'), a query string or URL, or @file.
        event: String,
        /// An earlier event of the same conversion (repeat for several, oldest first).
        #[arg(long)]
        before: Vec<String>,
        /// The source the event comes from (its field names and status words).
        #[arg(long)]
        source: Option<String>,
        /// Really send each postback once and show the answers.
        #[arg(long, conflicts_with = "dry_run")]
        send: bool,
        /// Only show what would be sent (the default).
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON object (what fired, exactly what it sends, and with --send the
        /// answers), for a rules repository's CI.
        #[arg(long)]
        json: bool,
        /// A network, address or host `--send` may reach although it is internal, on top
        /// of `delivery.allow_networks` (repeat for several).
        #[arg(long = "allow-network")]
        allow_networks: Vec<String>,
    },
    /// What a rule change does: postbacks added, removed and changed, and for sample
    /// events (the rule tests of both directories, or --events), what would be sent
    /// differently.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Sample events: JSON lines, a JSON array, a YAML list, or a rule-test file.
        #[arg(long)]
        events: Vec<PathBuf>,
    },
    /// The delivery log of a running daemon: list (with filters), show one, retry.
    Deliveries(Box<deliveries::Deliveries>),
    /// Ask a running daemon whether it is ready (`/-/ready`): exit 0, or 1 with the reason.
    /// For a container's HEALTHCHECK, where there is no curl.
    Healthcheck {
        /// The daemon's listen address (an unspecified one, 0.0.0.0, is asked on loopback).
        #[arg(long, env = "POSTBACKD_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Speak TLS (the listener has `server.tls`); the certificate is not checked, as
        /// the daemon is asked on its own address.
        #[arg(long)]
        tls: bool,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
    },
    /// A throwaway receiver for trying rules out: prints every request and answers 200.
    Sink {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { dir } => check(&dir),
        Command::Test { dir, tests } => rules::test(&dir, &tests),
        Command::Diff { old, new, events } => rules::diff(&old, &new, &events),
        Command::Deliveries(d) => deliveries::main(*d),
        Command::Fire {
            dir,
            event,
            before,
            source,
            send,
            dry_run: _,
            json,
            allow_networks,
        } => rules::fire(
            &dir,
            &event,
            &before,
            source.as_deref(),
            rules::FireOptions { send, json },
            &allow_networks,
        ),
        Command::Sink { listen } => sink(listen),
        Command::Healthcheck {
            listen,
            tls,
            timeout,
        } => healthcheck(listen, tls, timeout),
        Command::Run {
            dir,
            listen,
            data_dir,
            store,
            log_format,
            log_level,
            admin_token_file,
            no_watch,
            allow_networks,
        } => {
            let admin_token = match admin_token(admin_token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(url) = store.as_deref().map(str::trim) {
                if !matches!(url, "" | "sqlite") {
                    if let Err(e) = crate::store::PgUrl::parse(url, None) {
                        eprintln!("error: --store: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            let mut allowed = Vec::new();
            for a in &allow_networks {
                match crate::deliver::egress::parse_allowed(a) {
                    Ok(a) => allowed.push(a),
                    Err(e) => {
                        eprintln!("error: --allow-network: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            let opts = crate::Options {
                config_dir: dir,
                listen,
                data_dir,
                store,
                watch: !no_watch,
                allow_networks: allowed,
                log_json: log_format.map(|f| f == "json"),
                log_level,
                admin_token,
            };
            run(opts)
        }
    }
}

fn check(dir: &std::path::Path) -> ExitCode {
    match crate::config::load_dir(dir) {
        Ok(plan) => {
            let enabled = plan.entries.iter().filter(|e| e.enabled).count();
            println!(
                "ok: {} offers, {} postbacks ({} offer bindings, {} enabled), {} sources, config {}",
                plan.offers.len(),
                plan.postbacks.len(),
                plan.entries.len(),
                enabled,
                plan.sources.len(),
                plan.hash
            );
            for w in crate::deliver::egress::warnings(&plan) {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(errs) => {
            eprintln!("{errs}");
            eprintln!("{} error(s) in {}", errs.0.len(), dir.display());
            ExitCode::from(1)
        }
    }
}

fn run(opts: crate::Options) -> ExitCode {
    // The config is loaded once, first, because logging follows its settings.
    let plan = match crate::reload::load(&opts) {
        Ok(p) => p,
        Err(errs) => {
            eprintln!("{errs}");
            let n = errs.0.len();
            eprintln!(
                "error: invalid config in {}: {n} error(s)",
                opts.config_dir.display()
            );
            return ExitCode::from(1);
        }
    };
    init_logging(plan.settings.log_json, &plan.settings.log_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let daemon = async {
        let listener = crate::bind(&plan).await?;
        crate::start(listener, plan, opts, crate::shutdown_signal())
            .await?
            .wait()
            .await
    };
    match rt.block_on(daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The admin token from `--admin-token-file` or `POSTBACKD_ADMIN_TOKEN` (the file wins), if
/// either is given; it must be long enough to resist guessing.
fn admin_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let (token, from) = match file {
        Some(f) => (
            std::fs::read_to_string(f)
                .map_err(|e| format!("--admin-token-file {}: {e}", f.display()))?
                .trim()
                .to_string(),
            "--admin-token-file",
        ),
        None => match std::env::var("POSTBACKD_ADMIN_TOKEN") {
            Ok(t) if !t.trim().is_empty() => (t.trim().to_string(), "POSTBACKD_ADMIN_TOKEN"),
            _ => return Ok(None),
        },
    };
    if token.len() < 16 {
        return Err(format!(
            "{from}: the admin token needs at least 16 characters (generate one with: openssl rand -hex 24)"
        ));
    }
    Ok(Some(token))
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}

/// `postbackd healthcheck`: GET `/-/ready` on the daemon's own address.
fn healthcheck(listen: SocketAddr, tls: bool, timeout: std::time::Duration) -> ExitCode {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("{}://{addr}/-/ready", if tls { "https" } else { "http" });
    let Some(rt) = runtime() else {
        return ExitCode::from(1);
    };
    let answer = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .danger_accept_invalid_certs(tls)
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .get(&url)
            .send()
            .await
            .map_err(|e| crate::actions::outcome::error_chain(&e.without_url()))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Ok::<_, String>((status, body))
    });
    match answer {
        Ok((status, body)) if status.is_success() => {
            println!("{}", body.trim_end());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            println!("unhealthy: {url} answered {status}: {}", body.trim_end());
            ExitCode::from(1)
        }
        Err(e) => {
            println!("unhealthy: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

/// A single-threaded runtime for a command; says why if there is none.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .inspect_err(|e| eprintln!("error: cannot start runtime: {e}"))
        .ok()
}

fn init_logging(json: bool, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("POSTBACKD_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

fn sink(listen: SocketAddr) -> ExitCode {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, Uri};
    let Some(rt) = runtime() else {
        return ExitCode::from(1);
    };
    rt.block_on(async move {
        let app = axum::Router::new().fallback(
            |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                println!("{method} {uri} {ct} {}", String::from_utf8_lossy(&body));
                "ok\n"
            },
        );
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::from(1);
            }
        };
        eprintln!("sink listening on {listen}; every request is printed here");
        match axum::serve(listener, app)
            .with_graceful_shutdown(crate::shutdown_signal())
            .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}
