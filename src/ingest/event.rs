//! The canonical event: what every incoming webhook becomes, whatever tracker sent it.
//!
//! Trackers name the same thing many ways (`clickid`, `click_id`, `subid`, `cid`); this module
//! maps the common aliases onto one set of canonical field names, normalises statuses
//! (including Affise's numeric codes) and keeps every raw parameter for templates.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What happened: the trigger a postback listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Click,
    Impression,
    Conversion,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Click, Kind::Impression, Kind::Conversion];

    pub fn parse(s: &str) -> Option<Kind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "click" | "clicks" => Some(Kind::Click),
            "impression" | "impressions" | "view" => Some(Kind::Impression),
            "conversion" | "conversions" | "lead" | "sale" => Some(Kind::Conversion),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Click => "click",
            Kind::Impression => "impression",
            Kind::Conversion => "conversion",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A conversion's status, after normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Rejected,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Pending, Status::Approved, Status::Rejected];

    /// Parses the status words and codes trackers send. Affise: 1 approved, 2 pending,
    /// 3 declined, 5 hold.
    pub fn parse(s: &str) -> Option<Status> {
        match s.trim().to_ascii_lowercase().as_str() {
            "approved" | "approve" | "confirmed" | "done" | "sale" | "success" | "paid"
            | "accepted" | "1" => Some(Status::Approved),
            "pending" | "hold" | "on_hold" | "onhold" | "lead" | "new" | "processing" | "2"
            | "5" => Some(Status::Pending),
            "rejected" | "reject" | "declined" | "decline" | "trash" | "cancelled" | "canceled"
            | "fraud" | "refund" | "refunded" | "chargeback" | "3" => Some(Status::Rejected),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Canonical field names, as templates and conditions see them.
pub const CANONICAL: &[&str] = &[
    "clickid",
    "transaction_id",
    "offer_id",
    "offer_name",
    "goal",
    "affiliate_id",
    "status",
    "payout",
    "revenue",
    "currency",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "sub6",
    "sub7",
    "sub8",
    "sub9",
    "sub10",
    "country",
    "city",
    "region",
    "os",
    "browser",
    "device_type",
    "referrer",
    "ip",
    "user_agent",
    "email",
    "phone",
    "fbclid",
    "gclid",
    "ttclid",
    "fbc",
    "fbp",
    "type",
    "rejection_reason",
    "timestamp",
];

/// Incoming parameter names understood out of the box, and the canonical field each fills.
/// The first alias present wins, so the canonical name itself is always listed first.
const ALIASES: &[(&str, &[&str])] = &[
    (
        "clickid",
        &[
            "clickid",
            "click_id",
            "subid",
            "sub_id",
            "cid",
            "cnv_id",
            "aff_click_id",
        ],
    ),
    (
        "transaction_id",
        &["transaction_id", "txid", "tid", "conversion_id", "order_id"],
    ),
    ("offer_id", &["offer_id", "offer", "oid", "campaign_id"]),
    ("offer_name", &["offer_name"]),
    ("goal", &["goal", "goal_id", "event_type", "et"]),
    (
        "affiliate_id",
        &[
            "affiliate_id",
            "affiliate",
            "aff_id",
            "pid",
            "partner_id",
            "publisher_id",
        ],
    ),
    (
        "status",
        &["status", "cnv_status", "conv_status", "conversion_status"],
    ),
    ("payout", &["payout", "sum", "amount"]),
    ("revenue", &["revenue"]),
    ("currency", &["currency", "cnv_currency", "cur"]),
    ("sub1", &["sub1", "sub_id_1", "aff_sub", "aff_sub1", "adv1"]),
    ("sub2", &["sub2", "sub_id_2", "aff_sub2", "adv2"]),
    ("sub3", &["sub3", "sub_id_3", "aff_sub3", "adv3"]),
    ("sub4", &["sub4", "sub_id_4", "aff_sub4", "adv4"]),
    ("sub5", &["sub5", "sub_id_5", "aff_sub5", "adv5"]),
    ("sub6", &["sub6", "sub_id_6"]),
    ("sub7", &["sub7", "sub_id_7"]),
    ("sub8", &["sub8", "sub_id_8"]),
    ("sub9", &["sub9", "sub_id_9"]),
    ("sub10", &["sub10", "sub_id_10"]),
    ("country", &["country", "geo", "country_code"]),
    ("city", &["city"]),
    ("region", &["region", "state"]),
    ("os", &["os"]),
    ("browser", &["browser"]),
    ("device_type", &["device_type", "device"]),
    ("referrer", &["referrer", "referer", "ref"]),
    ("ip", &["ip", "user_ip", "ip_address"]),
    ("user_agent", &["user_agent", "ua", "useragent"]),
    ("email", &["email"]),
    ("phone", &["phone"]),
    ("fbclid", &["fbclid"]),
    ("gclid", &["gclid"]),
    ("ttclid", &["ttclid"]),
    ("fbc", &["fbc"]),
    ("fbp", &["fbp"]),
    ("type", &["type", "conversion_type", "cnv_type"]),
    (
        "rejection_reason",
        &["rejection_reason", "reason", "reject_reason"],
    ),
    ("timestamp", &["timestamp", "ts", "event_time", "time"]),
];

/// Parameter names that select the event kind rather than fill a field.
pub const KIND_PARAMS: &[&str] = &["kind", "event"];

/// Returns the canonical name a template or condition field refers to, resolving the
/// template-side aliases (`txid`, `sum`, `ua`, `click_id`...).
pub fn canonical_name(name: &str) -> Option<&'static str> {
    if let Some(c) = CANONICAL.iter().find(|c| **c == name) {
        return Some(c);
    }
    ALIASES
        .iter()
        .find(|(_, names)| names.contains(&name))
        .map(|(c, _)| *c)
}

/// An event as accepted: canonical fields plus every raw parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Our id for this event (a UUIDv7, so ids sort by arrival).
    pub id: String,
    pub kind: Kind,
    /// The configured source that sent it (`default` when none is named).
    pub source: String,
    /// Arrival time, unix milliseconds.
    pub received_at: i64,
    /// Canonical fields, values as strings; `status` holds the normalised status word.
    pub fields: BTreeMap<String, String>,
    /// Every parameter as the sender named it.
    pub params: BTreeMap<String, String>,
}

/// Why an incoming request could not become an event. The message goes back to the sender.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("unknown event kind `{0}`: use click, impression or conversion")]
    UnknownKind(String),
    #[error("unknown status `{0}`: use approved, pending or rejected (or map it with the source's status_map)")]
    UnknownStatus(String),
    #[error("field `{field}` must be a number, got `{value}`")]
    NotANumber { field: &'static str, value: String },
    #[error("a conversion needs a transaction_id or a clickid, so that status updates and repeats can be recognised")]
    NoConversionKey,
    #[error("value of `{0}` is too long (at most 4096 bytes)")]
    TooLong(String),
    #[error("too many parameters (at most 256)")]
    TooManyParams,
}

/// How one source's parameters map onto canonical fields: its own names first, then the
/// built-in aliases.
#[derive(Debug, Clone, Default)]
pub struct FieldMap {
    /// canonical field → the parameter name this source uses for it.
    pub fields: BTreeMap<String, String>,
    /// the source's status word → normalised status.
    pub statuses: BTreeMap<String, Status>,
}

impl Event {
    /// Builds an event from flat parameters (query string, form body or flat JSON object).
    pub fn from_params(
        params: BTreeMap<String, String>,
        default_kind: Kind,
        source: &str,
        map: &FieldMap,
        now_ms: i64,
    ) -> Result<Event, EventError> {
        if params.len() > 256 {
            return Err(EventError::TooManyParams);
        }
        if let Some((k, _)) = params.iter().find(|(_, v)| v.len() > 4096) {
            return Err(EventError::TooLong(k.clone()));
        }
        let kind = match KIND_PARAMS.iter().find_map(|k| params.get(*k)) {
            Some(k) => Kind::parse(k).ok_or_else(|| EventError::UnknownKind(k.clone()))?,
            None => default_kind,
        };
        let mut fields = BTreeMap::new();
        for (canonical, names) in ALIASES {
            let custom = map.fields.get(*canonical).and_then(|p| params.get(p));
            let value = custom.or_else(|| names.iter().find_map(|n| params.get(*n)));
            if let Some(v) = value {
                let v = v.trim();
                if !v.is_empty() {
                    fields.insert((*canonical).to_string(), v.to_string());
                }
            }
        }
        for field in ["payout", "revenue"] {
            if let Some(v) = fields.get(field) {
                if v.parse::<f64>().map(|f| !f.is_finite()).unwrap_or(true) {
                    return Err(EventError::NotANumber {
                        field,
                        value: v.clone(),
                    });
                }
            }
        }
        if kind == Kind::Conversion {
            let status = match fields.get("status") {
                Some(raw) => map
                    .statuses
                    .get(raw)
                    .or_else(|| map.statuses.get(&raw.to_ascii_lowercase()))
                    .copied()
                    .or_else(|| Status::parse(raw))
                    .ok_or_else(|| EventError::UnknownStatus(raw.clone()))?,
                // A conversion sent without a status is a new, approved one unless the
                // source maps an empty status elsewhere; this is what trackers assume.
                None => Status::Approved,
            };
            fields.insert("status".into(), status.as_str().into());
            if !fields.contains_key("transaction_id") && !fields.contains_key("clickid") {
                return Err(EventError::NoConversionKey);
            }
        }
        Ok(Event {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            source: source.to_string(),
            received_at: now_ms,
            fields,
            params,
        })
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    pub fn status(&self) -> Option<Status> {
        self.field("status").and_then(Status::parse)
    }

    /// The key that identifies a conversion across status updates: the transaction id when
    /// the sender gives one, else the click id and goal.
    pub fn conversion_key(&self) -> Option<String> {
        if self.kind != Kind::Conversion {
            return None;
        }
        if let Some(t) = self.field("transaction_id") {
            return Some(format!("{}|t|{t}", self.source));
        }
        self.field("clickid").map(|c| {
            format!(
                "{}|c|{c}|{}",
                self.source,
                self.field("goal").unwrap_or_default()
            )
        })
    }

    /// Folds a status update into the conversion it updates: fields the update carries win,
    /// fields it leaves out keep their earlier values.
    pub fn merged_onto(&self, earlier: &Event) -> Event {
        let mut fields = earlier.fields.clone();
        fields.extend(self.fields.clone());
        let mut params = earlier.params.clone();
        params.extend(self.params.clone());
        Event {
            id: self.id.clone(),
            kind: self.kind,
            source: self.source.clone(),
            received_at: self.received_at,
            fields,
            params,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn event(pairs: &[(&str, &str)]) -> Result<Event, EventError> {
        Event::from_params(
            params(pairs),
            Kind::Conversion,
            "default",
            &FieldMap::default(),
            0,
        )
    }

    #[test]
    fn aliases_fill_canonical_fields() {
        let e = event(&[("subid", "abc"), ("sum", "1.5"), ("tid", "T1"), ("ua", "x")]).unwrap();
        assert_eq!(e.field("clickid"), Some("abc"));
        assert_eq!(e.field("payout"), Some("1.5"));
        assert_eq!(e.field("transaction_id"), Some("T1"));
        assert_eq!(e.field("user_agent"), Some("x"));
        assert_eq!(e.params.get("subid").map(String::as_str), Some("abc"));
    }

    #[test]
    fn statuses_are_normalised_including_affise_codes() {
        for (raw, want) in [
            ("1", "approved"),
            ("2", "pending"),
            ("3", "rejected"),
            ("5", "pending"),
            ("sale", "approved"),
            ("Declined", "rejected"),
            ("hold", "pending"),
        ] {
            let e = event(&[("clickid", "c"), ("status", raw)]).unwrap();
            assert_eq!(e.field("status"), Some(want), "{raw}");
        }
        assert_eq!(
            event(&[("clickid", "c"), ("status", "maybe")]),
            Err(EventError::UnknownStatus("maybe".into()))
        );
    }

    #[test]
    fn source_maps_take_precedence() {
        let mut map = FieldMap::default();
        map.fields.insert("clickid".into(), "visitor".into());
        map.statuses.insert("ok".into(), Status::Approved);
        let e = Event::from_params(
            params(&[("visitor", "v1"), ("clickid", "other"), ("status", "ok")]),
            Kind::Conversion,
            "s",
            &map,
            0,
        )
        .unwrap();
        assert_eq!(e.field("clickid"), Some("v1"));
        assert_eq!(e.field("status"), Some("approved"));
    }

    #[test]
    fn bad_input_is_rejected_with_a_reason() {
        assert!(matches!(
            event(&[("clickid", "c"), ("payout", "ten")]),
            Err(EventError::NotANumber {
                field: "payout",
                ..
            })
        ));
        assert_eq!(event(&[("payout", "1")]), Err(EventError::NoConversionKey));
        assert!(matches!(
            event(&[("clickid", "c"), ("kind", "purchase-ish")]),
            Err(EventError::UnknownKind(_))
        ));
    }

    #[test]
    fn conversion_key_and_merge() {
        let first = event(&[("tid", "T"), ("payout", "5"), ("status", "pending")]).unwrap();
        let update = event(&[("tid", "T"), ("status", "approved")]).unwrap();
        assert_eq!(first.conversion_key(), update.conversion_key());
        let merged = update.merged_onto(&first);
        assert_eq!(merged.field("payout"), Some("5"));
        assert_eq!(merged.field("status"), Some("approved"));
    }
}
