//! Compiling `sources:`: who sends webhooks, how each proves it (a shared secret, an HMAC
//! signature, the networks it sends from), how fast it may send, and how its fields and
//! status words map onto the canonical event.

use super::*;

impl Compiler {
    pub(super) fn source(&mut self, file: &Path, s: &RawSource) {
        let cx = Ctx {
            file,
            postback: None,
        };
        if self.sources.contains_key(&s.id.value) {
            self.err(
                &cx,
                &s.id,
                format!("source `{}` is defined twice", s.id.value),
                Some("source ids must be unique across all files".into()),
            );
            return;
        }
        let secret = s.secret.as_ref().map(|v| self.expand(&cx, v));
        let signature = s.signature.as_ref().and_then(|g| self.signature(&cx, g));
        let allow_ips = s
            .allow_ips
            .iter()
            .flatten()
            .filter_map(|n| self.network(&cx, "allow_ips", n))
            .collect();
        let rate = s.rate.as_ref().and_then(|r| match parse_rate(&r.value) {
            Ok(v) => Some(v),
            Err(m) => {
                self.err(&cx, r, m, Some("write a rate like 100/s or 6000/m".into()));
                None
            }
        });
        let mut map = FieldMap::default();
        for (canonical, param) in &s.fields {
            if !CANONICAL.contains(&canonical.as_str()) {
                let hint = suggest(canonical, CANONICAL.iter().copied());
                self.err(
                    &cx,
                    param,
                    format!("fields: `{canonical}` is not a canonical field"),
                    hint,
                );
                continue;
            }
            map.fields.insert(canonical.clone(), param.value.clone());
        }
        for (word, status) in &s.status_map {
            match Status::parse(&status.value) {
                Some(st)
                    if ["approved", "pending", "rejected"].contains(&status.value.as_str()) =>
                {
                    map.statuses.insert(word.clone(), st);
                    map.statuses.insert(word.to_ascii_lowercase(), st);
                }
                _ => self.err(
                    &cx,
                    status,
                    format!("status_map: `{}` is not a status", status.value),
                    Some("map to approved, pending or rejected".into()),
                ),
            }
        }
        let kind = match &s.kind {
            Some(k) => Kind::parse(&k.value).unwrap_or_else(|| {
                self.err(
                    &cx,
                    k,
                    format!("kind: unknown kind `{}`", k.value),
                    Some("use click, impression or conversion".into()),
                );
                Kind::Conversion
            }),
            None => Kind::Conversion,
        };
        self.sources.insert(
            s.id.value.clone(),
            Source {
                id: s.id.value.clone(),
                secret,
                secret_param: s.secret_param.clone().unwrap_or_else(|| "token".into()),
                secret_header: s.secret_header.clone(),
                signature,
                allow_ips,
                rate,
                map,
                kind,
            },
        );
    }

    fn signature(&mut self, cx: &Ctx, g: &RawSignature) -> Option<Signature> {
        if !g.secret.value.trim_start().starts_with("${") {
            self.err(
                cx,
                &g.secret,
                "signature.secret: a secret must not be written in the config",
                Some("read it from the environment or a file: ${env:TRACKER_HMAC_SECRET}".into()),
            );
            return None;
        }
        let secret = self.expand(cx, &g.secret);
        let algorithm = match g.algorithm.as_ref().map(|a| a.value.to_ascii_lowercase()) {
            None => HmacAlgorithm::Sha256,
            Some(a) if a == "sha256" => HmacAlgorithm::Sha256,
            Some(a) if a == "sha1" => HmacAlgorithm::Sha1,
            Some(a) => {
                let at = g.algorithm.as_ref().unwrap_or(&g.secret);
                self.err(
                    cx,
                    at,
                    format!("signature.algorithm: `{a}` is not supported"),
                    Some("use sha256 or sha1".into()),
                );
                HmacAlgorithm::Sha256
            }
        };
        let base64 = match g.encoding.as_ref().map(|e| e.value.to_ascii_lowercase()) {
            None => false,
            Some(e) if e == "hex" => false,
            Some(e) if e == "base64" => true,
            Some(e) => {
                let at = g.encoding.as_ref().unwrap_or(&g.secret);
                self.err(
                    cx,
                    at,
                    format!("signature.encoding: `{e}` is not an encoding"),
                    Some("use hex or base64".into()),
                );
                false
            }
        };
        let tolerance = match &g.tolerance {
            Some(t) => self.duration(cx, t).unwrap_or(Duration::from_secs(300)),
            None => Duration::from_secs(300),
        };
        let default_payload = if g.timestamp_header.is_some() {
            "{timestamp}.{body}"
        } else {
            "{body}"
        };
        let payload = match &g.payload {
            Some(p) => {
                if !p.value.contains("{body}") {
                    self.err(
                        cx,
                        p,
                        "signature.payload must contain {body}",
                        Some("for example {timestamp}.{body} or v0:{timestamp}:{body}".into()),
                    );
                }
                if p.value.contains("{timestamp}") && g.timestamp_header.is_none() {
                    self.err(
                        cx,
                        p,
                        "signature.payload signs {timestamp}, but no timestamp_header says where it comes from",
                        None,
                    );
                }
                p.value.clone()
            }
            None => default_payload.to_string(),
        };
        Some(Signature {
            header: g.header.value.clone(),
            secret,
            algorithm,
            base64,
            prefix: g.prefix.clone().unwrap_or_default(),
            timestamp_header: g.timestamp_header.clone(),
            tolerance,
            payload,
        })
    }

    /// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
    pub(super) fn network(
        &mut self,
        cx: &Ctx,
        what: &str,
        n: &Spanned<String>,
    ) -> Option<ipnet::IpNet> {
        let v = n.value.trim();
        let parsed = v
            .parse::<ipnet::IpNet>()
            .ok()
            .or_else(|| v.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from));
        if parsed.is_none() {
            self.err(
                cx,
                n,
                format!("{what}: `{v}` is not an address or a network"),
                Some("write 203.0.113.7, 203.0.113.0/24 or 2001:db8::/32".into()),
            );
        }
        parsed.map(|n| n.trunc())
    }
}
