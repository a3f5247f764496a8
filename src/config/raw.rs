//! The YAML schema, exactly as users write it. These, and each action kind's `Raw` in
//! [`crate::actions`], are the only serde types for config; the compiler turns them into a
//! checked [`crate::plan::Plan`].

use crate::actions;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;

/// An id written as a number or a string (`1001` and `"1001"` are the same offer).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an id (a string or a number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// One value or a list of them (`goal: deposit` or `goal: [lead, deposit]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OneOrMany(pub Vec<Id>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OneOrMany, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Id(v.to_string())]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Id(v.to_string())]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Id(v.to_string())]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Id(v.to_string())]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Id(v.to_string())]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<Id>()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `postbackd.yaml`: the daemon's own settings.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    pub listen: Option<Spanned<String>>,
    pub data_dir: Option<Spanned<String>>,
    /// `sqlite` (the default, in `data_dir`) or a `postgres://` connection string.
    pub store: Option<Spanned<String>>,
    /// How long a claimed delivery stays an instance's without renewal (PostgreSQL).
    pub store_lease: Option<Spanned<String>>,
    pub delivery: Option<RawDeliverySettings>,
    pub log: Option<RawLog>,
    /// How long finished deliveries, their attempts and received events are kept.
    pub retention: Option<Spanned<String>>,
    pub api: Option<RawApi>,
    pub server: Option<RawServer>,
}

/// Limits on incoming connections.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub header_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub request_timeout: Option<Spanned<String>>,
    /// A number, or `auto`.
    pub max_connections: Option<Spanned<String>>,
    /// CIDRs or addresses of reverse proxies allowed to say who the client is.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub tls: Option<RawTls>,
}

/// PEM files of the listener's certificate chain and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// Tokens that may use `/api/v1`; each must come from `${env:…}` or `${file:…}`.
    #[serde(default)]
    pub admin_tokens: Vec<Spanned<String>>,
    /// Affiliate id → token: that affiliate sees its own postbacks' deliveries only.
    #[serde(default)]
    pub affiliate_tokens: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub concurrency: Option<Spanned<u32>>,
    /// `10/s`, `600/m` or `3600/h`.
    pub rate: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDeliverySettings {
    pub timeout: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<u32>>,
    pub per_destination: Option<Spanned<u32>>,
    pub retry: Option<Vec<Spanned<String>>>,
    pub max_age: Option<Spanned<String>>,
    /// How long deliveries of a postback that left the config wait for it to come back.
    pub orphan_grace: Option<Spanned<String>>,
    pub user_agent: Option<String>,
    #[serde(default)]
    pub destinations: BTreeMap<String, RawDestination>,
    /// Consecutive failed attempts that pause a destination (0: never).
    pub pause_after: Option<Spanned<u32>>,
    /// How often a paused destination is probed.
    pub probe_every: Option<Spanned<String>>,
    /// CIDRs, addresses or host names deliveries may reach although internal.
    #[serde(default)]
    pub allow_networks: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<Spanned<String>>,
    pub level: Option<Spanned<String>>,
}

/// A rule file: any `*.yaml` / `*.yml` in the config directory other than `postbackd.yaml`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRuleFile {
    #[serde(default)]
    pub sources: Vec<RawSource>,
    #[serde(default)]
    pub offers: Vec<RawOffer>,
    #[serde(default)]
    pub postbacks: Vec<RawPostback>,
    /// Names of parameters trackers send that templates may use as `{name}`
    /// (`external_transaction_id`); for every rule file.
    #[serde(default)]
    pub macros: Vec<Spanned<String>>,
}

/// A named sender of webhooks (a tracker), reached at `/postback/<id>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub id: Spanned<String>,
    /// The shared secret it must send; `${env:NAME}` or `${file:PATH}`.
    pub secret: Option<Spanned<String>>,
    /// Query/form/JSON parameter carrying the secret (default `token`).
    pub secret_param: Option<String>,
    /// Header carrying the secret instead (e.g. `X-Postback-Token`).
    pub secret_header: Option<String>,
    /// An HMAC signature of the body the sender must send.
    pub signature: Option<RawSignature>,
    /// Networks (CIDRs or addresses) the source may send from.
    pub allow_ips: Option<Vec<Spanned<String>>>,
    /// `100/s`, `6000/m`: at most this many webhooks; more get 429.
    pub rate: Option<Spanned<String>>,
    /// canonical field → this tracker's parameter name.
    #[serde(default)]
    pub fields: BTreeMap<String, Spanned<String>>,
    /// this tracker's status word → approved / pending / rejected.
    #[serde(default)]
    pub status_map: BTreeMap<String, Spanned<String>>,
    /// Event kind when the request does not say (default conversion).
    pub kind: Option<Spanned<String>>,
    /// Parameters this tracker sends that templates may use as `{name}`.
    #[serde(default)]
    pub macros: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignature {
    pub header: Spanned<String>,
    /// `${env:…}` or `${file:…}`.
    pub secret: Spanned<String>,
    /// `sha256` (default) or `sha1`.
    pub algorithm: Option<Spanned<String>>,
    /// `hex` (default) or `base64`.
    pub encoding: Option<Spanned<String>>,
    pub prefix: Option<String>,
    pub timestamp_header: Option<String>,
    pub tolerance: Option<Spanned<String>>,
    /// What is signed: `{timestamp}.{body}` by default with a timestamp.
    pub payload: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOffer {
    pub id: Spanned<Id>,
    pub name: Option<String>,
    #[serde(default)]
    pub goals: Vec<Spanned<Id>>,
    pub goals_enabled: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostback {
    pub id: Spanned<String>,
    pub name: Option<String>,
    /// The affiliate this postback belongs to: it fires only for that affiliate's
    /// conversions, and that affiliate's API token can see it and its deliveries.
    pub affiliate: Option<Spanned<Id>>,
    pub enabled: Option<bool>,
    /// click | impression | conversion
    pub trigger: Spanned<String>,
    /// For conversions: which statuses fire it (default: all).
    pub statuses: Option<Spanned<OneOrMany>>,
    /// `all`, one offer id, or a list of offer ids.
    pub offers: Option<Spanned<OneOrMany>>,
    /// Field → accepted values; all must match.
    #[serde(default)]
    pub when: BTreeMap<String, Spanned<OneOrMany>>,
    /// Field → rejected values; none may match.
    #[serde(default)]
    pub unless: BTreeMap<String, Spanned<OneOrMany>>,
    /// A boolean expression over any field, e.g. `payout > 0 and country != "US"`.
    #[serde(rename = "if")]
    pub expr: Option<Spanned<String>>,
    pub delay: Option<Spanned<String>>,
    /// Constants for templates (`{{ vars.token }}`); may use `${env:...}`.
    #[serde(default)]
    pub vars: BTreeMap<String, Spanned<String>>,
    /// Per-offer overrides of a shared postback.
    #[serde(default)]
    pub per_offer: BTreeMap<String, RawOverride>,
    pub retry: Option<Vec<Spanned<String>>>,
    // The action: exactly one of these (see `crate::actions`).
    pub http: Option<actions::http::Raw>,
    pub email: Option<actions::email::Raw>,
    pub slack: Option<actions::slack::Raw>,
    pub telegram: Option<actions::telegram::Raw>,
    pub twilio: Option<actions::twilio::Raw>,
    pub meta: Option<actions::meta::Raw>,
    pub ga4: Option<actions::ga4::Raw>,
    pub tiktok: Option<actions::tiktok::Raw>,
    pub sheets: Option<actions::sheets::Raw>,
}

impl RawPostback {
    /// The action blocks it has, by kind: exactly one is right.
    pub fn actions(&self) -> Vec<(&'static str, &dyn actions::RawAction)> {
        fn one<'a, T: actions::RawAction>(
            kind: &'static str,
            raw: &'a Option<T>,
        ) -> Option<(&'static str, &'a dyn actions::RawAction)> {
            raw.as_ref().map(|r| (kind, r as &dyn actions::RawAction))
        }
        [
            one(actions::http::KIND, &self.http),
            one(actions::email::KIND, &self.email),
            one(actions::slack::KIND, &self.slack),
            one(actions::telegram::KIND, &self.telegram),
            one(actions::twilio::KIND, &self.twilio),
            one(actions::meta::KIND, &self.meta),
            one(actions::ga4::KIND, &self.ga4),
            one(actions::tiktok::KIND, &self.tiktok),
            one(actions::sheets::KIND, &self.sheets),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub enabled: Option<bool>,
    pub delay: Option<Spanned<String>>,
    #[serde(default)]
    pub vars: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub when: BTreeMap<String, Spanned<OneOrMany>>,
}
