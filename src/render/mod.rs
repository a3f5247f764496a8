//! Templates and what they see: the engine ([`template`]), and the context of one event
//! (every canonical field, the aliases, dates, vars and placed secrets).
//!
//! Rendering happens when a delivery is attempted, not when the event arrives, so a retry of
//! a postback whose rule was fixed goes out with the fixed rule. What a postback's
//! templates make of the context is its action's business ([`crate::actions`]).

#[cfg(test)]
mod props;
mod simple;
pub mod template;

use crate::ingest::event::{Event, CANONICAL};
use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// Names of secret variables start with this (`__secret_0`, …): the config places each
/// secret a template uses as one, and a template cannot misspell one.
pub const SECRET_PREFIX: &str = "__secret_";

/// Names templates may use besides the canonical fields (see [`event_context`]).
pub const EXTRA_NAMES: &[&str] = &[
    "txid",
    "tid",
    "sum",
    "amount",
    "ua",
    "click_id",
    "subid",
    "aff_id",
    "affiliate",
    "offer",
    "event_id",
    "kind",
    "source",
    "date",
    "time",
    "rand",
    "params",
    "vars",
    "postback_id",
    "received_at",
    "uuid",
];

/// The variables a template sees for one event. Every canonical field is present (none
/// when the event lacks it, which renders empty), numbers are numbers.
///
/// Values are made when a template asks for them: a postback URL reads a handful of the
/// fifty names, and building them all (dates, a random id, the params map) cost more than
/// rendering.
///
/// `secrets` are the values templates place (`__secret_N`); without them every secret
/// reads `***`, which is how a request is rendered for showing. `macros` are the parameter
/// names rule files and sources declared.
pub fn event_context(
    event: &Event,
    vars: Option<&BTreeMap<String, String>>,
    postback_id: &str,
    secrets: Option<Arc<[String]>>,
    macros: Arc<[String]>,
) -> Value {
    Value::from_object(Context {
        macros,
        event: event.clone(),
        vars: vars.cloned().unwrap_or_default(),
        postback_id: postback_id.to_string(),
        rand: OnceLock::new(),
        secrets,
    })
}

/// The context behind [`event_context`].
#[derive(Debug)]
struct Context {
    event: Event,
    vars: BTreeMap<String, String>,
    postback_id: String,
    /// One random id per render, however often the template uses it.
    rand: OnceLock<Value>,
    /// The secrets' values, or none to show each as `***`.
    secrets: Option<Arc<[String]>>,
    /// Parameter names declared under `macros:`, readable as `{name}`.
    macros: Arc<[String]>,
}

impl Context {
    fn lookup(&self, name: &str) -> Option<Value> {
        let alias = match name {
            "txid" | "tid" => Some("transaction_id"),
            "sum" | "amount" => Some("payout"),
            "ua" => Some("user_agent"),
            "click_id" | "subid" => Some("clickid"),
            "aff_id" | "affiliate" => Some("affiliate_id"),
            "offer" => Some("offer_id"),
            _ => None,
        };
        if let Some(canonical) = alias {
            return self.lookup(canonical);
        }
        if let Some(n) = name.strip_prefix(SECRET_PREFIX) {
            let n: usize = n.parse().ok()?;
            return Some(Value::from_safe_string(match &self.secrets {
                Some(values) => values.get(n)?.clone(),
                None => "***".to_string(),
            }));
        }
        if let Some(field) = name.strip_prefix(template::EXACT_PREFIX) {
            return Some(match self.event.field(field) {
                Some(s) => exact_amount(s),
                None => Value::from(()),
            });
        }
        let e = &self.event;
        Some(match name {
            "timestamp" => Value::from(self.instant().as_second()),
            "date" => Value::from(self.utc().strftime("%Y-%m-%d").to_string()),
            "time" => Value::from(self.utc().strftime("%H:%M:%S").to_string()),
            "event_id" => Value::from(e.id.as_str()),
            "kind" => Value::from(e.kind.as_str()),
            "source" => Value::from(e.source.as_str()),
            "received_at" => Value::from(e.received_at),
            "rand" => self
                .rand
                .get_or_init(|| Value::from(uuid::Uuid::new_v4().to_string()))
                .clone(),
            "postback_id" => Value::from(self.postback_id.as_str()),
            "params" => Value::from_serialize(&e.params),
            "vars" => Value::from_serialize(&self.vars),
            _ if CANONICAL.contains(&name) => match e.field(name) {
                Some(s) if name == "payout" || name == "revenue" => number(s),
                Some(s) => Value::from(s),
                None => Value::from(()),
            },
            // A name a rule file or a source declared under `macros:`: the parameter of
            // that name, empty when absent.
            _ if self.macros.iter().any(|m| m == name) => match e.params.get(name) {
                Some(v) => Value::from(v.as_str()),
                None => Value::from(()),
            },
            _ => return None,
        })
    }

    /// The event's own timestamp when it has a readable one, else its arrival.
    fn instant(&self) -> jiff::Timestamp {
        self.event
            .field("timestamp")
            .and_then(template::parse_instant)
            .or_else(|| jiff::Timestamp::from_millisecond(self.event.received_at).ok())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    fn utc(&self) -> jiff::Zoned {
        self.instant().to_zoned(jiff::tz::TimeZone::UTC)
    }
}

impl Object for Context {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.lookup(key.as_str()?)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut names: Vec<&str> = CANONICAL
            .iter()
            .chain(EXTRA_NAMES)
            .copied()
            .filter(|n| *n != "uuid")
            .chain(["timestamp"])
            .collect();
        names.sort_unstable();
        names.dedup();
        Enumerator::Values(names.into_iter().map(Value::from).collect())
    }
}

/// A money amount as a number, for expressions: whole amounts as integers, exactly (up to
/// 39 digits), others as floats. Printing an amount does not go through this: see
/// [`exact_amount`].
fn number(s: &str) -> Value {
    if let Ok(i) = s.trim().parse::<i128>() {
        return Value::from(i);
    }
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() => Value::from(f),
        _ => Value::from(s),
    }
}

/// A money amount as printed: the text as received when it is a plain decimal (`12.50`
/// stays `12.50`, `12345678901234567890` stays whole), written unquoted in JSON like a
/// number; any other text is an ordinary string.
fn exact_amount(s: &str) -> Value {
    if is_decimal(s) {
        Value::from_safe_string(s.to_string())
    } else {
        Value::from(s)
    }
}

/// `-?digits[.digits][e[-]digits]`: a JSON number that needs no escaping in a URL.
fn is_decimal(s: &str) -> bool {
    let b = s.strip_prefix('-').unwrap_or(s).as_bytes();
    let digits = |b: &[u8], i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    let mut i = 0;
    if !digits(b, &mut i) || (b[0] == b'0' && i > 1) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(b, &mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e') | Some(b'E')) {
        i += 1;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        if !digits(b, &mut i) {
            return false;
        }
    }
    i == b.len()
}

/// Text with control characters written as escapes (`\r`, `\n`, `\u{1b}`), for logs: a
/// value from a webhook cannot start a line of its own.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
