//! The store's domain decisions, as pure functions: how an update folds into its
//! conversion, and which of the postbacks it matches become new deliveries, with their
//! order and dedupe keys. The store's ingest calls them inside its transaction; `simulate`
//! (behind `fire`, `test`, `diff` and `POST /api/v1/test`) calls the same ones, so what the
//! tools show is what the daemon does.

use crate::ingest::event::Event;
use crate::plan::{Match, Plan};
use std::borrow::Cow;

/// The conversion's state after `event`: the event folded onto the conversion's earlier
/// merged state, or the event itself when it starts one (or has no conversion key).
pub fn merge<'a>(prev: Option<&Event>, event: &'a Event) -> Cow<'a, Event> {
    match prev {
        Some(prev) => Cow::Owned(event.merged_onto(prev)),
        None => Cow::Borrowed(event),
    }
}

/// A delivery to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    pub matched: Match,
    /// Deliveries with the same order key go out one at a time, in the order created: the
    /// conversion (or, without one, the event), the postback and the offer.
    pub order_key: String,
}

/// What an event (already merged into its conversion) does: every postback it matches, and
/// of those the deliveries to create.
#[derive(Debug, Clone, Default)]
pub struct Decided {
    pub matches: Vec<Match>,
    pub deliveries: Vec<NewDelivery>,
    /// Matches left out because the conversion already had a delivery of that postback and
    /// offer for this status.
    pub repeated: Vec<Match>,
}

/// Which deliveries `merged` makes. `key` is the conversion key (`None` for clicks and
/// impressions, which fire every time), `event_id` the id of the event as received, and
/// `sent` the conversion's list of `postback|offer|status` already queued, updated here:
/// one delivery per (conversion, postback, offer, status), whatever the sender repeats.
pub fn deliveries(
    plan: &Plan,
    key: Option<&str>,
    event_id: &str,
    merged: &Event,
    sent: &mut Vec<String>,
) -> Decided {
    let matches = plan.matches(merged);
    let mut out = Decided {
        deliveries: Vec::with_capacity(matches.len()),
        ..Decided::default()
    };
    for m in &matches {
        if key.is_some() {
            let once = dedupe_key(m, merged);
            if sent.contains(&once) {
                out.repeated.push(m.clone());
                continue;
            }
            sent.push(once);
        }
        out.deliveries.push(NewDelivery {
            order_key: format!("{}|{}|{}", key.unwrap_or(event_id), m.postback_id, m.offer),
            matched: m.clone(),
        });
    }
    out.matches = matches;
    out
}

/// How a conversion remembers a delivery it queued: `postback|offer|status`.
fn dedupe_key(m: &Match, merged: &Event) -> String {
    format!(
        "{}|{}|{}",
        m.postback_id,
        m.offer,
        merged.field("status").unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::{FieldMap, Kind};

    fn plan() -> Plan {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("rules.yaml"),
            "postbacks:
  - id: sale
    trigger: conversion
    statuses: [approved]
    http: { url: \"http://127.0.0.1:9/s?c={clickid}\" }
  - id: every
    trigger: conversion
    http: { url: \"http://127.0.0.1:9/e?c={clickid}&s={status}\" }
  - id: clicks
    trigger: click
    http: { url: \"http://127.0.0.1:9/c?c={clickid}\" }
",
        )
        .unwrap();
        crate::config::load_dir(dir.path()).unwrap()
    }

    fn event(kind: Kind, pairs: &[(&str, &str)]) -> Event {
        let params = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Event::from_params(params, kind, "web", &FieldMap::default(), 1).unwrap()
    }

    fn ids(d: &Decided) -> Vec<&str> {
        d.deliveries
            .iter()
            .map(|n| n.matched.postback_id.as_str())
            .collect()
    }

    /// Each (postback, offer, status) goes out once per conversion; a new status is new.
    #[test]
    fn a_status_fires_once_per_conversion() {
        let plan = plan();
        let mut sent = Vec::new();
        let mut step = |status: &str| {
            let e = event(Kind::Conversion, &[("clickid", "c1"), ("status", status)]);
            let key = e.conversion_key();
            deliveries(&plan, key.as_deref(), &e.id, &e, &mut sent)
        };
        let first = step("approved");
        assert_eq!(ids(&first), ["sale", "every"]);
        assert!(first.deliveries[0].order_key.ends_with("|sale|*"));
        let again = step("approved");
        assert_eq!(ids(&again), Vec::<&str>::new());
        assert_eq!(again.repeated.len(), 2);
        assert_eq!(again.matches.len(), 2, "matching is not dedupe");
        assert_eq!(ids(&step("rejected")), ["every"]);
        assert_eq!(ids(&step("approved")), Vec::<&str>::new());
    }

    /// Clicks have no conversion: each fires, ordered by its own event.
    #[test]
    fn clicks_fire_every_time() {
        let plan = plan();
        let mut sent = Vec::new();
        for _ in 0..2 {
            let e = event(Kind::Click, &[("clickid", "c1")]);
            let d = deliveries(&plan, None, &e.id, &e, &mut sent);
            assert_eq!(ids(&d), ["clicks"]);
            assert_eq!(d.deliveries[0].order_key, format!("{}|clicks|*", e.id));
        }
        assert!(sent.is_empty());
    }

    /// An update keeps the fields it does not carry from the conversion so far.
    #[test]
    fn merge_keeps_earlier_fields() {
        let first = event(
            Kind::Conversion,
            &[("clickid", "c1"), ("payout", "5"), ("status", "pending")],
        );
        let update = event(
            Kind::Conversion,
            &[("clickid", "c1"), ("status", "approved")],
        );
        let m = merge(Some(&first), &update);
        assert_eq!(m.field("payout"), Some("5"));
        assert_eq!(m.field("status"), Some("approved"));
        assert!(matches!(merge(None, &update), Cow::Borrowed(_)));
    }
}
