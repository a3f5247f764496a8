//! The compiled, immutable rule set, and matching an event against it.
//!
//! A [`Plan`] is what [`crate::config`] produces: every template, expression, URL and
//! duration already parsed. Matching is indexed by (trigger, offer), so its cost depends on
//! the postbacks that could apply to an event, not on how many rules are loaded.

use crate::actions::{Action, RenderError, Rendered, Scope};
use crate::ingest::event::{Event, FieldMap, Kind, Status};
use crate::render::template::{Engine, TemplateId};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The offer scope key used for postbacks that apply to every offer.
pub const ALL_OFFERS: &str = "*";

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A shared PostgreSQL store instead of the embedded one in `data_dir`.
    pub postgres: Option<crate::store::PgUrl>,
    /// How long a claimed delivery stays an instance's without renewal (PostgreSQL).
    pub store_lease: Duration,
    pub delivery: DeliverySettings,
    pub log_json: bool,
    pub log_level: String,
    /// Finished deliveries, attempts and events older than this are pruned.
    pub retention: Duration,
    /// Bearer tokens accepted by `/api/v1` (none: the API answers 401).
    pub admin_tokens: Vec<String>,
    /// (token, affiliate id): read access to that affiliate's postbacks' deliveries.
    pub affiliate_tokens: Vec<(String, String)>,
    pub server: ServerSettings,
}

/// Limits on incoming connections, so that slow or silent clients cannot use up the
/// process's file descriptors.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// A request's headers must arrive within this, from their first byte.
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// Reading a request's body and answering it must end within this.
    pub request_timeout: Duration,
    /// Open connections at most; `None`: the open-file limit minus room for deliveries and
    /// the store.
    pub max_connections: Option<usize>,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` headers say who the client is.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The listener speaks TLS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Settings {
    /// Where the store is: the PostgreSQL database when one is set, else `data_dir`.
    pub fn store(&self) -> crate::store::Location {
        match &self.postgres {
            Some(pg) => crate::store::Location::Postgres(crate::store::PgUrl {
                lease: self.store_lease,
                ..pg.clone()
            }),
            None => crate::store::Location::Sqlite(self.data_dir.clone()),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            request_timeout: Duration::from_secs(30),
            max_connections: None,
            trusted_proxies: Vec::new(),
            tls: None,
        }
    }
}

/// How long, by default, deliveries wait for their postback to come back to the config: a
/// day covers a bad push found the next morning.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(86400);

/// Default retention of the delivery log.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86400);

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub timeout: Duration,
    pub concurrency: usize,
    pub per_destination: usize,
    pub retry: Vec<Duration>,
    pub max_age: Duration,
    /// How long deliveries of a postback that is no longer in the config wait for a reload
    /// to bring it back before they are cancelled.
    pub orphan_grace: Duration,
    pub user_agent: String,
    /// Per-destination overrides, keyed by host (or `host:port`) as written in the URLs.
    pub destinations: HashMap<String, DestinationSettings>,
    /// A destination whose attempts fail this many times in a row is paused (0: never).
    pub pause_after: u32,
    /// How often a paused destination gets one probe attempt.
    pub probe_every: Duration,
    /// Networks deliveries may reach although they are internal (loopback, private…).
    pub allow_networks: Vec<ipnet::IpNet>,
    /// Host names deliveries may reach whatever they resolve to (`.suffix` for a domain).
    pub allow_hosts: Vec<String>,
}

/// Limits for one destination host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationSettings {
    /// Attempts in flight at once; overrides `per_destination`.
    pub concurrency: Option<usize>,
    /// Attempts started per second, at most (a token bucket with a burst of one second).
    pub rate: Option<f64>,
}

impl DeliverySettings {
    /// These settings for one of `instances` sharing a store: each destination's
    /// concurrency is divided evenly (at least 1 each) and its rate too, so the fleet
    /// together keeps the limits the config sets. The global `concurrency` is each
    /// instance's own.
    pub fn divided(&self, instances: usize) -> DeliverySettings {
        let n = instances.max(1);
        let mut out = self.clone();
        if n == 1 {
            return out;
        }
        out.per_destination = (self.per_destination / n).max(1);
        for d in out.destinations.values_mut() {
            if let Some(c) = d.concurrency.as_mut() {
                *c = (*c / n).max(1);
            }
            if let Some(r) = d.rate.as_mut() {
                *r /= n as f64;
            }
        }
        out
    }

    /// How many attempts may be in flight to `destination` at once.
    pub fn concurrency_for(&self, destination: &str) -> usize {
        self.destinations
            .get(destination)
            .and_then(|d| d.concurrency)
            .unwrap_or(self.per_destination)
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        let m = 60;
        DeliverySettings {
            timeout: Duration::from_secs(10),
            concurrency: 64,
            per_destination: 8,
            retry: [5, m, 5 * m, 30 * m, 120 * m, 360 * m, 720 * m, 1440 * m]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_age: Duration::from_secs(72 * 3600),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            user_agent: format!("postbackd/{}", env!("CARGO_PKG_VERSION")),
            destinations: HashMap::new(),
            allow_networks: Vec::new(),
            allow_hosts: Vec::new(),
            pause_after: 10,
            probe_every: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Source {
    pub id: String,
    pub secret: Option<String>,
    pub secret_param: String,
    pub secret_header: Option<String>,
    /// An HMAC of the raw body the sender must put in a header.
    pub signature: Option<Signature>,
    /// The networks it may send from (empty: any).
    pub allow_ips: Vec<ipnet::IpNet>,
    /// Webhooks per second at most (a token bucket holding one second's worth).
    pub rate: Option<f64>,
    pub map: FieldMap,
    pub kind: Kind,
}

/// How a source signs its webhooks: an HMAC of the raw body (or of the timestamp and the
/// body), in a header, as hex or base64, after an optional prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub header: String,
    pub secret: String,
    pub algorithm: HmacAlgorithm,
    pub base64: bool,
    /// Written before the digest, such as `sha256=`.
    pub prefix: String,
    /// The header holding the unix time the sender signed, if it signs one.
    pub timestamp_header: Option<String>,
    /// How far that time may be from now.
    pub tolerance: Duration,
    /// What is signed, with `{timestamp}` and `{body}` in it (`{timestamp}.{body}` when a
    /// timestamp is signed, `{body}` otherwise).
    pub payload: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha256,
    Sha1,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub id: String,
    pub name: Option<String>,
    pub goals: Vec<String>,
    pub goals_enabled: bool,
}

/// Where a postback was written, for errors, `check` output and the config API.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: PathBuf,
    pub line: u64,
}

#[derive(Debug)]
pub struct Postback {
    pub id: String,
    pub name: Option<String>,
    /// The affiliate that owns it (fires only for that affiliate; visible to its token).
    pub owner: Option<String>,
    pub origin: Origin,
    pub trigger: Kind,
    pub statuses: Option<Vec<Status>>,
    /// What it does: an HTTP request, an e-mail, a Slack message… (see [`crate::actions`]).
    pub action: Box<dyn Action>,
    pub retry: Vec<Duration>,
    /// A hash of the postback as written (secrets unexpanded, positions ignored): equal
    /// fingerprints mean an unchanged rule, for `postbackd diff`.
    pub fingerprint: String,
    /// Whether a secret is placed anywhere in its request (then what is shown is rendered
    /// apart from what is sent).
    pub has_secret: bool,
}

/// One postback as it applies to one offer (or to all offers), with that offer's overrides.
#[derive(Debug)]
pub struct Entry {
    pub postback: usize,
    /// The offer id, or [`ALL_OFFERS`].
    pub offer: String,
    pub enabled: bool,
    pub delay: Duration,
    pub vars: Arc<BTreeMap<String, String>>,
    /// The vars as shown, when a secret is in one of them.
    pub shown_vars: Option<Arc<BTreeMap<String, String>>>,
    pub conditions: Conditions,
}

#[derive(Debug, Default)]
pub struct Conditions {
    /// Goal condition, kept apart because an offer with goals switched off ignores it.
    pub goal: Option<Vec<String>>,
    /// (field, accepted values): all must hold.
    pub when: Vec<(String, Vec<String>)>,
    /// (field, rejected values): none may hold.
    pub unless: Vec<(String, Vec<String>)>,
    pub expr: Option<TemplateId>,
}

/// A postback an event matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub entry: usize,
    pub postback_id: String,
    pub offer: String,
    pub delay: Duration,
}

#[derive(Debug)]
pub struct Plan {
    /// Content hash of every config file: the config version.
    pub hash: String,
    /// The commit the config directory is at, when it is a git checkout.
    pub git: Option<crate::config::git::GitInfo>,
    pub settings: Settings,
    pub sources: HashMap<String, Source>,
    pub offers: HashMap<String, Offer>,
    pub postbacks: Vec<Postback>,
    pub by_id: HashMap<String, usize>,
    pub entries: Vec<Entry>,
    /// (trigger, offer id or ALL_OFFERS) → entries.
    pub index: HashMap<(Kind, String), Vec<usize>>,
    pub entry_by_key: HashMap<(String, String), usize>,
    pub engine: Engine,
    /// Every secret value, longest first: scrubbed from what destinations answer.
    pub secrets: Vec<String>,
    /// The secrets templates place, by number (`__secret_N`).
    pub template_secrets: Arc<[String]>,
    /// Parameter names rule files and sources declared under `macros:`.
    pub macros: Arc<[String]>,
}

impl Plan {
    /// The postbacks an event fires, in config order. A condition that fails to evaluate
    /// (say, comparing a missing number) does not match, and says why in the log.
    pub fn matches(&self, event: &Event) -> Vec<Match> {
        let offer = event.field("offer_id").unwrap_or_default();
        let mut out = Vec::new();
        let ctx = std::cell::OnceCell::new();
        let candidates = [
            self.index.get(&(event.kind, offer.to_string())),
            self.index.get(&(event.kind, ALL_OFFERS.to_string())),
        ];
        for idx in candidates.into_iter().flatten().flatten() {
            let entry = &self.entries[*idx];
            if !entry.enabled {
                continue;
            }
            if self.entry_holds(entry, event, &ctx) {
                out.push(Match {
                    entry: *idx,
                    postback_id: self.postbacks[entry.postback].id.clone(),
                    offer: entry.offer.clone(),
                    delay: entry.delay,
                });
            }
        }
        out.sort_by_key(|m| m.entry);
        out
    }

    /// Whether one entry's trigger and conditions hold for an event (used again when a
    /// delayed postback's hold ends). `ctx` is the event's template context, built on first
    /// use: only an `expr` condition needs it, and building it costs more than the rest.
    pub fn entry_holds(
        &self,
        entry: &Entry,
        event: &Event,
        ctx: &std::cell::OnceCell<minijinja::Value>,
    ) -> bool {
        let pb = &self.postbacks[entry.postback];
        if pb.trigger != event.kind {
            return false;
        }
        if let Some(owner) = &pb.owner {
            if event.field("affiliate_id") != Some(owner.as_str()) {
                return false;
            }
        }
        if let (Some(statuses), Some(status)) = (&pb.statuses, event.status()) {
            if !statuses.contains(&status) {
                return false;
            }
        }
        let c = &entry.conditions;
        if let Some(goals) = &c.goal {
            let goals_on = event
                .field("offer_id")
                .and_then(|o| self.offers.get(o))
                .map(|o| o.goals_enabled)
                .unwrap_or(true);
            if goals_on && !field_in(event, "goal", goals) {
                return false;
            }
        }
        if !c.when.iter().all(|(f, vals)| field_in(event, f, vals)) {
            return false;
        }
        if c.unless.iter().any(|(f, vals)| field_in(event, f, vals)) {
            return false;
        }
        if let Some(expr) = &c.expr {
            let ctx = ctx.get_or_init(|| {
                crate::render::event_context(event, None, "", None, self.macros.clone())
            });
            match self.engine.holds(expr, ctx) {
                Ok(b) => return b,
                Err(e) => {
                    tracing::warn!(postback = %pb.id, event = %event.id, error = %e, "condition could not be evaluated; not matched");
                    return false;
                }
            }
        }
        true
    }

    pub fn entry(&self, postback_id: &str, offer: &str) -> Option<&Entry> {
        self.entry_by_key
            .get(&(postback_id.to_string(), offer.to_string()))
            .map(|i| &self.entries[*i])
    }

    /// Every destination host the postbacks send to, once each.
    pub fn destinations(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .postbacks
            .iter()
            .map(|p| p.action.destination().to_string())
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// The ids of the postbacks an affiliate owns.
    pub fn owned_by(&self, affiliate: &str) -> Vec<String> {
        self.postbacks
            .iter()
            .filter(|p| p.owner.as_deref() == Some(affiliate))
            .map(|p| p.id.clone())
            .collect()
    }

    /// Renders one entry's postback for an event at `now_ms` (the attempt's time; an
    /// action may refuse an event too old for its API): what is sent, and what is shown
    /// (every secret as `***`).
    pub fn render(
        &self,
        entry: &Entry,
        event: &Event,
        now_ms: i64,
    ) -> Result<Rendered, RenderError> {
        let pb = &self.postbacks[entry.postback];
        let scope = |reveal: bool| -> Result<crate::actions::Message, RenderError> {
            let (vars, secrets) = if reveal {
                (&entry.vars, Some(self.template_secrets.clone()))
            } else {
                (entry.shown_vars.as_ref().unwrap_or(&entry.vars), None)
            };
            let ctx = crate::render::event_context(
                event,
                Some(vars),
                &pb.id,
                secrets,
                self.macros.clone(),
            );
            pb.action.render(&Scope {
                engine: &self.engine,
                ctx: &ctx,
                reveal,
                now_ms,
            })
        };
        let message = match scope(true) {
            Ok(m) => m,
            Err(RenderError::BadUrl(_)) if pb.has_secret => {
                let shown = scope(false).map(|m| m.target().to_string());
                return Err(RenderError::BadUrl(shown.unwrap_or_else(|_| "***".into())));
            }
            Err(e) => return Err(e),
        };
        let shown = if pb.has_secret {
            Some(scope(false)?)
        } else {
            None
        };
        Ok(Rendered { message, shown })
    }

    /// Whether every template of the entry's postback is bounded (the simple path, or
    /// minijinja without a loop or a macro): then rendering costs microseconds, in
    /// proportion to the template and the event, and needs no thread of its own.
    pub fn is_cheap(&self, entry: &Entry) -> bool {
        let pb = &self.postbacks[entry.postback];
        pb.action
            .templates()
            .into_iter()
            .all(|t| self.engine.is_bounded(t))
    }

    pub fn postback(&self, id: &str) -> Option<&Postback> {
        self.by_id.get(id).map(|i| &self.postbacks[*i])
    }

    /// Masks secret values in text that postbackd did not write itself: a destination's
    /// answer, an error from the network. Requests are masked where secrets are placed
    /// into them ([`crate::render`]); this is the net under what comes back, in every form
    /// a secret is commonly echoed in (as is, percent-encoded, form-encoded, JSON-escaped).
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            for form in encodings(s) {
                if out.contains(form.as_str()) {
                    out = out.replace(form.as_str(), "***");
                }
            }
        }
        out
    }
}

/// The forms a secret takes in text: as is, percent-encoded, form-encoded, JSON-escaped.
fn encodings(s: &str) -> Vec<String> {
    let mut forms = vec![
        s.to_string(),
        crate::render::template::percent_encode(s),
        form_urlencoded::byte_serialize(s.as_bytes()).collect(),
    ];
    if let Ok(j) = serde_json::to_string(s) {
        forms.push(j[1..j.len() - 1].to_string());
    }
    forms.sort();
    forms.dedup();
    forms.retain(|f| !f.is_empty());
    forms
}

fn field_in(event: &Event, field: &str, values: &[String]) -> bool {
    let v = if field == "kind" {
        Some(event.kind.as_str())
    } else {
        event.field(field)
    };
    match v {
        Some(v) => values.iter().any(|x| x.eq_ignore_ascii_case(v)),
        None => false,
    }
}
