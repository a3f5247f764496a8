//! Where deliveries may connect. By default never to loopback, private, link-local (cloud
//! metadata at 169.254.169.254), shared (CGNAT), unique-local, multicast, broadcast or
//! unspecified addresses, however the URL writes them: a name that resolves there, an IPv4
//! address written as a decimal number (the URL parser reads `http://2852039166/` as
//! 169.254.169.254), or inside IPv6 (`::ffff:169.254.169.254`, NAT64 `64:ff9b::/96`).
//!
//! The check is made on the addresses a name resolves to, inside the HTTP client's
//! resolver, and the client connects only to the addresses that passed: a DNS answer that
//! changes between a check and a connect cannot dodge it, as there is no second lookup.
//! Literal addresses never reach a resolver and are checked before the request is built.
//! `delivery.allow_networks` opens networks (CIDRs) and hosts (names) a deployment needs.

use crate::plan::Plan;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// A connection the policy refused, with the reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("blocked: {0}")]
pub struct Blocked(pub String);

/// What may be reached: `delivery.allow_networks` of the running plan.
#[derive(Clone)]
pub struct Egress {
    plan: Arc<ArcSwap<Plan>>,
}

/// Why an address is blocked by default, if it is.
pub fn blocked_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_range(v4).map(|_| "an IPv4 address written as IPv6 in a blocked range");
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 =
                    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return v4_range(v4).map(|_| "a NAT64 address of a blocked IPv4 range");
            }
            v6_range(v6)
        }
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local (cloud metadata lives at 169.254.169.254)"
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        "shared address space (CGNAT)"
    } else if ip.is_multicast() {
        "multicast"
    } else if ip.is_broadcast() {
        "broadcast"
    } else if o[0] == 0 {
        "unspecified (this network)"
    } else {
        return None;
    })
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_multicast() {
        "multicast"
    } else if first & 0xffc0 == 0xfe80 {
        "link-local"
    } else if first & 0xfe00 == 0xfc00 {
        "unique-local"
    } else {
        return None;
    })
}

/// One entry of `delivery.allow_networks`.
#[derive(Debug, Clone, PartialEq)]
pub enum Allowed {
    Network(IpNet),
    /// A host name, lower-case; `.example.internal` for every name under it.
    Host(String),
}

/// Reads an entry of `delivery.allow_networks` (or `--allow-network`): a CIDR, an address,
/// or a host name.
pub fn parse_allowed(v: &str) -> Result<Allowed, String> {
    let v = v.trim();
    if let Ok(n) = v.parse::<IpNet>() {
        return Ok(Allowed::Network(n.trunc()));
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Ok(Allowed::Network(IpNet::from(ip)));
    }
    let labels_ok = v
        .trim_start_matches('.')
        .split('.')
        .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !v.is_empty() && !v.contains('/') && labels_ok {
        return Ok(Allowed::Host(v.to_ascii_lowercase()));
    }
    Err(format!("`{v}` is not a network, an address or a host name"))
}

/// Adds an allowed entry to the delivery settings.
pub fn allow(d: &mut crate::plan::DeliverySettings, a: Allowed) {
    match a {
        Allowed::Network(n) => d.allow_networks.push(n),
        Allowed::Host(h) => d.allow_hosts.push(h),
    }
}

/// Whether `host` (a name, lower-case) is one of the allowed host names: `tracker.internal`
/// matches itself; `.svc.cluster.local` matches every name under it.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    allowed.iter().any(|a| match a.strip_prefix('.') {
        Some(suffix) => host.ends_with(&format!(".{suffix}")),
        None => *a == host,
    })
}

/// Whether `ip` may be connected to: outside every blocked range, or inside an allowed
/// network.
pub fn ip_allowed(networks: &[IpNet], ip: IpAddr) -> Result<(), String> {
    let plain = crate::ingest::guard::canonical(ip);
    if networks
        .iter()
        .any(|n| n.contains(&ip) || n.contains(&plain))
    {
        return Ok(());
    }
    match blocked_range(ip) {
        Some(why) => Err(format!(
            "{ip} is {why}; allow it with delivery.allow_networks if this deployment must reach it"
        )),
        None => Ok(()),
    }
}

impl Egress {
    pub fn new(plan: Arc<ArcSwap<Plan>>) -> Egress {
        Egress { plan }
    }

    /// Checks a URL's host when it is a literal address (names are checked when resolved).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Blocked> {
        let plan = self.plan.load();
        let d = &plan.settings.delivery;
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        ip_allowed(&d.allow_networks, ip).map_err(Blocked)
    }
}

impl reqwest::dns::Resolve for Egress {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let plan = self.plan.load_full();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let d = &plan.settings.delivery;
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if host_allowed(&d.allow_hosts, &host) {
                return Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refused = None;
            let passed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match ip_allowed(&d.allow_networks, a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if passed.is_empty() {
                let why = refused.unwrap_or_else(|| "it has no address".into());
                let e: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(Blocked(format!("`{host}` resolves to {why}")));
                return Err(e);
            }
            Ok(Box::new(passed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A warning for each postback whose URL names, as a literal address, a blocked range the
/// config does not allow: its deliveries would all be refused.
pub fn warnings(plan: &Plan) -> Vec<String> {
    let d = &plan.settings.delivery;
    plan.postbacks
        .iter()
        // Mail goes to its relay, which the config names: not through this policy.
        .filter(|p| p.action.kind() != crate::actions::email::KIND)
        .filter_map(|p| {
            let url = reqwest::Url::parse(&format!("http://{}/", p.action.destination())).ok()?;
            let ip = match url.host()? {
                url::Host::Ipv4(v4) => IpAddr::V4(v4),
                url::Host::Ipv6(v6) => IpAddr::V6(v6),
                url::Host::Domain(_) => return None,
            };
            let why = ip_allowed(&d.allow_networks, ip).err()?;
            Some(format!(
                "{}:{}: postback `{}` sends to {why}",
                p.origin.file.display(),
                p.origin.line,
                p.id
            ))
        })
        .collect()
}

/// The [`Blocked`] somewhere in an error's chain, if the policy is why it failed.
pub fn blocked_in(e: &(dyn std::error::Error + 'static)) -> Option<Blocked> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(b) = c.downcast_ref::<Blocked>() {
            return Some(b.clone());
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_internal_range_is_blocked_however_written() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(blocked_range(ip(a)).is_some(), "{a} should be blocked");
        }
        for a in [
            "8.8.8.8",
            "203.0.114.1",
            "2606:4700::1111",
            "100.128.0.1",
            "64:ff9b::808:808",
        ] {
            assert!(blocked_range(ip(a)).is_none(), "{a} should pass");
        }
        let url = reqwest::Url::parse("http://2852039166/latest/meta-data").unwrap();
        assert_eq!(url.host_str(), Some("169.254.169.254"));
    }

    #[test]
    fn allowed_networks_and_hosts_open_what_they_name() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(ip_allowed(&nets, ip("127.0.0.1")).is_ok());
        assert!(ip_allowed(&nets, ip("::ffff:127.0.0.1")).is_ok());
        assert!(ip_allowed(&nets, ip("fd12::1")).is_ok());
        let e = ip_allowed(&nets, ip("169.254.169.254")).unwrap_err();
        assert!(
            e.contains("link-local") && e.contains("delivery.allow_networks"),
            "{e}"
        );
        let hosts = vec![
            "tracker.internal".to_string(),
            ".svc.cluster.local".to_string(),
        ];
        assert!(host_allowed(&hosts, "Tracker.Internal"));
        assert!(host_allowed(&hosts, "crm.prod.svc.cluster.local"));
        assert!(!host_allowed(&hosts, "svc.cluster.local.evil.example"));
        assert!(!host_allowed(&hosts, "other.internal"));
    }
}
