//! Who may send a webhook: the checks a source asks for, in the order they run. The
//! client's address against the source's `allow_ips` (the socket's address, or what a
//! trusted proxy says), the shared secret, the HMAC signature of the raw body (with a signed
//! timestamp, if the source sends one, within a tolerance), then the source's rate limit.
//! A source can ask for any of these at once; each one that is set must pass.
//!
//! Every comparison of a secret or a digest runs in constant time (`subtle`, and `hmac`'s
//! own `verify_slice`).

use crate::plan::{HmacAlgorithm, Signature, Source};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

/// The address the connection came from; the listener puts it on every request.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Why a webhook was refused: the answer's status, the reason's label in the metrics, the
/// message, and when to come back.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

/// Every refusal reason, for the metrics (each series exists from the start).
pub const REASONS: [&str; 11] = [
    "missing_secret",
    "bad_secret",
    "missing_signature",
    "bad_signature",
    "stale_signature",
    "ip_not_allowed",
    "rate_limited",
    "too_large",
    "invalid",
    "unknown_source",
    "unavailable",
];

impl Refusal {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// The client's address: the socket's, unless the socket is a trusted proxy; then the
/// nearest address in `X-Forwarded-For` (or `Forwarded`) that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&canonical(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        if let Ok(v) = v.to_str() {
            chain.extend(v.split(',').filter_map(|a| parse_addr(a.trim())));
        }
    }
    if chain.is_empty() {
        for v in headers.get_all("forwarded") {
            if let Ok(v) = v.to_str() {
                for element in v.split(',') {
                    for pair in element.split(';') {
                        if let Some((k, val)) = pair.trim().split_once('=') {
                            if k.trim().eq_ignore_ascii_case("for") {
                                chain.extend(parse_addr(val.trim().trim_matches('"')));
                            }
                        }
                    }
                }
            }
        }
    }
    // From the nearest hop back: the first address that is not one of our proxies.
    chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer)
}

/// An address as proxies write it: `203.0.113.7`, `203.0.113.7:4711`, `[2001:db8::1]:4711`,
/// `2001:db8::1`.
fn parse_addr(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.split(']').next())
        .and_then(|ip| ip.parse().ok())
}

/// An IPv4 address written as IPv6 (`::ffff:203.0.113.7`) is that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The source's `allow_ips`, if it has any.
pub fn check_ip(source: &Source, ip: IpAddr) -> Result<(), Refusal> {
    let ip = canonical(ip);
    if source.allow_ips.is_empty() || source.allow_ips.iter().any(|n| n.contains(&ip)) {
        return Ok(());
    }
    Err(Refusal::new(
        StatusCode::FORBIDDEN,
        "ip_not_allowed",
        format!("source `{}` does not accept webhooks from {ip}", source.id),
    ))
}

/// The HMAC signature in the source's header, over the raw body (and the signed timestamp).
pub fn check_signature(
    source: &Source,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: i64,
) -> Result<(), Refusal> {
    let Some(sig) = &source.signature else {
        return Ok(());
    };
    let bad = |reason: &'static str, msg: String| {
        Err(Refusal::new(StatusCode::UNAUTHORIZED, reason, msg))
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(given) = header(&sig.header) else {
        return bad(
            "missing_signature",
            format!(
                "source `{}` requires a signature in header `{}`",
                source.id, sig.header
            ),
        );
    };
    let mut timestamp = "";
    if let Some(th) = &sig.timestamp_header {
        let Some(t) = header(th) else {
            return bad(
                "missing_signature",
                format!(
                    "source `{}` requires the signed time in header `{th}`",
                    source.id
                ),
            );
        };
        let Ok(n) = t.trim().parse::<i64>() else {
            return bad(
                "bad_signature",
                format!("header `{th}` must be a unix time, got `{}`", t.trim()),
            );
        };
        // Seconds, or milliseconds when it is that large.
        let ms = if n.abs() > 100_000_000_000 {
            n
        } else {
            n.saturating_mul(1000)
        };
        let off = (now_ms - ms).abs();
        if off > sig.tolerance.as_millis() as i64 {
            return bad(
                "stale_signature",
                format!(
                    "the signed time in `{th}` is {} s from now; at most {} s is accepted",
                    off / 1000,
                    sig.tolerance.as_secs()
                ),
            );
        }
        timestamp = t.trim();
    }
    let digest = given.trim();
    let Some(digest) = digest.strip_prefix(sig.prefix.as_str()) else {
        return bad(
            "bad_signature",
            format!("header `{}` must start with `{}`", sig.header, sig.prefix),
        );
    };
    let decoded = if sig.base64 {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(digest)
            .ok()
    } else {
        decode_hex(digest)
    };
    let Some(decoded) = decoded else {
        let enc = if sig.base64 { "base64" } else { "hex" };
        return bad(
            "bad_signature",
            format!("header `{}` is not a {enc} digest", sig.header),
        );
    };
    if verify(sig, timestamp, body, &decoded) {
        Ok(())
    } else {
        bad(
            "bad_signature",
            format!("the signature in `{}` does not match the body", sig.header),
        )
    }
}

/// Whether `digest` is the HMAC of the signed payload; constant time.
fn verify(sig: &Signature, timestamp: &str, body: &[u8], digest: &[u8]) -> bool {
    let mut payload = Vec::with_capacity(body.len() + 32);
    let mut parts = sig.payload.split("{body}");
    let head = parts.next().unwrap_or_default();
    payload.extend_from_slice(head.replace("{timestamp}", timestamp).as_bytes());
    for rest in parts {
        payload.extend_from_slice(body);
        payload.extend_from_slice(rest.replace("{timestamp}", timestamp).as_bytes());
    }
    match sig.algorithm {
        HmacAlgorithm::Sha256 => Hmac::<sha2::Sha256>::new_from_slice(sig.secret.as_bytes())
            .map(|mut m| {
                m.update(&payload);
                m.verify_slice(digest).is_ok()
            })
            .unwrap_or(false),
        HmacAlgorithm::Sha1 => Hmac::<sha1::Sha1>::new_from_slice(sig.secret.as_bytes())
            .map(|mut m| {
                m.update(&payload);
                m.verify_slice(digest).is_ok()
            })
            .unwrap_or(false),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

type Limiter = governor::DefaultDirectRateLimiter;

/// One token bucket per source with a `rate`, kept across reloads while the rate stays.
#[derive(Default)]
pub struct Limiters {
    by_source: Mutex<HashMap<String, (f64, Limiter)>>,
}

impl Limiters {
    /// Takes a token of the source's bucket, or says when to come back.
    pub fn check(&self, source: &Source) -> Result<(), Refusal> {
        let Some(rate) = source.rate else {
            return Ok(());
        };
        let mut all = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.get(&source.id).filter(|(r, _)| *r == rate).is_none();
        if entry {
            all.insert(source.id.clone(), (rate, limiter(rate)));
        }
        let Some((_, l)) = all.get(&source.id) else {
            return Ok(());
        };
        match l.check() {
            Ok(()) => Ok(()),
            Err(not_until) => {
                use governor::clock::Clock;
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(Refusal {
                    retry_after: Some(secs.max(1)),
                    ..Refusal::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        format!(
                            "source `{}` sends more than its rate of {rate}/s; send again in {} s",
                            source.id,
                            secs.max(1)
                        ),
                    )
                })
            }
        }
    }
}

/// A bucket of one second's tokens (at least one), refilled at `rate` a second.
fn limiter(rate: f64) -> Limiter {
    let period = Duration::from_secs_f64(1.0 / rate.max(1e-6));
    let burst =
        NonZeroU32::new(rate.ceil().clamp(1.0, u32::MAX as f64) as u32).unwrap_or(NonZeroU32::MIN);
    let quota = governor::Quota::with_period(period)
        .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    governor::RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_socket_unless_a_trusted_proxy_says_otherwise() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = headers(&[("x-forwarded-for", "198.51.100.9, 203.0.113.7, 10.0.0.2")]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &xff, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        let outsider: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            client_ip(outsider, &xff, &trusted),
            outsider,
            "spoofed header ignored"
        );
        let fwd = headers(&[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(
            client_ip(peer, &fwd, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(mapped, &xff, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn hex_decodes_or_refuses() {
        assert_eq!(decode_hex("0aFF"), Some(vec![10, 255]));
        assert_eq!(decode_hex("0aF"), None);
        assert_eq!(decode_hex("zz"), None);
    }

    #[test]
    fn a_bucket_holds_one_second() {
        let l = limiter(3.0);
        assert!((0..3).all(|_| l.check().is_ok()));
        assert!(l.check().is_err());
    }
}
