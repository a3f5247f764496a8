//! Compiling `postbackd.yaml`: listen address, store, delivery limits, retention, API
//! tokens, logging and connection limits.

use super::*;

impl Compiler {
    pub(super) fn settings(&mut self, file: &Path, raw: RawSettings, dir: &Path) -> Settings {
        let cx = Ctx {
            file,
            postback: None,
        };
        let listen = match &raw.listen {
            Some(l) => match l.value.parse() {
                Ok(a) => a,
                Err(_) => {
                    self.err(
                        &cx,
                        l,
                        format!("listen: `{}` is not an address", l.value),
                        Some("write it as 127.0.0.1:8080 or 0.0.0.0:8080".into()),
                    );
                    default_listen()
                }
            },
            None => default_listen(),
        };
        let data_dir = match &raw.data_dir {
            Some(d) => {
                let p = PathBuf::from(&d.value);
                if p.is_absolute() {
                    p
                } else {
                    dir.join(p)
                }
            }
            None => dir.join("data"),
        };
        let postgres = match &raw.store {
            Some(st) => {
                let (real, shown) = self.expand_pair(&cx, st);
                match real.trim() {
                    "" | "sqlite" => None,
                    url => match crate::store::PgUrl::parse(url, shown) {
                        Ok(pg) => Some(pg),
                        Err(e) => {
                            self.err(
                                &cx,
                                st,
                                format!("store: {e}"),
                                Some("write sqlite (the default: a file in data_dir) or postgres://postbackd:${env:PGPASSWORD}@db:5432/postbackd".into()),
                            );
                            None
                        }
                    },
                }
            }
            None => None,
        };
        let mut store_lease = crate::store::postgres::LEASE;
        if let Some(l) = &raw.store_lease {
            if let Some(d) = self.duration(&cx, l) {
                if d < Duration::from_secs(1) {
                    self.err(&cx, l, "store_lease must be at least 1s", None);
                } else {
                    store_lease = d;
                }
            }
        }
        let mut delivery = DeliverySettings::default();
        if let Some(d) = &raw.delivery {
            if let Some(t) = &d.timeout {
                delivery.timeout = self.duration(&cx, t).unwrap_or(delivery.timeout);
            }
            if let Some(n) = &d.concurrency {
                if n.value == 0 {
                    self.err(&cx, n, "delivery.concurrency must be at least 1", None);
                }
                delivery.concurrency = n.value.max(1) as usize;
            }
            if let Some(n) = &d.per_destination {
                if n.value == 0 {
                    self.err(&cx, n, "delivery.per_destination must be at least 1", None);
                }
                delivery.per_destination = n.value.max(1) as usize;
            }
            if let Some(r) = &d.retry {
                delivery.retry = r.iter().filter_map(|s| self.duration(&cx, s)).collect();
            }
            if let Some(m) = &d.max_age {
                delivery.max_age = self.duration(&cx, m).unwrap_or(delivery.max_age);
            }
            if let Some(g) = &d.orphan_grace {
                delivery.orphan_grace = self.duration(&cx, g).unwrap_or(delivery.orphan_grace);
            }
            if let Some(ua) = &d.user_agent {
                delivery.user_agent = ua.clone();
            }
            if let Some(n) = &d.pause_after {
                delivery.pause_after = n.value;
            }
            if let Some(p) = &d.probe_every {
                match self.duration(&cx, p) {
                    Some(v) if v.is_zero() => {
                        self.err(&cx, p, "delivery.probe_every must be longer than 0", None)
                    }
                    Some(v) => delivery.probe_every = v,
                    None => {}
                }
            }
            for n in &d.allow_networks {
                match crate::deliver::egress::parse_allowed(&n.value) {
                    Ok(a) => crate::deliver::egress::allow(&mut delivery, a),
                    Err(m) => self.err(
                        &cx,
                        n,
                        format!("delivery.allow_networks: {m}"),
                        Some(
                            "write 10.0.0.0/8, 127.0.0.1, tracker.internal or .svc.cluster.local"
                                .into(),
                        ),
                    ),
                }
            }
            for (host, raw) in &d.destinations {
                let mut dest = DestinationSettings::default();
                if let Some(n) = &raw.concurrency {
                    if n.value == 0 {
                        self.err(
                            &cx,
                            n,
                            format!("delivery.destinations.{host}.concurrency must be at least 1"),
                            None,
                        );
                    }
                    dest.concurrency = Some(n.value.max(1) as usize);
                }
                if let Some(r) = &raw.rate {
                    match parse_rate(&r.value) {
                        Ok(v) => dest.rate = Some(v),
                        Err(m) => self.err(
                            &cx,
                            r,
                            m,
                            Some("write a rate like 10/s, 600/m or 3600/h".into()),
                        ),
                    }
                }
                let at = raw
                    .concurrency
                    .as_ref()
                    .map(|n| (n.referenced.line(), n.referenced.column()))
                    .or(raw
                        .rate
                        .as_ref()
                        .map(|r| (r.referenced.line(), r.referenced.column())));
                if let Some((l, c)) = at {
                    self.destination_keys
                        .push((host.to_ascii_lowercase(), l, c));
                }
                delivery
                    .destinations
                    .insert(host.to_ascii_lowercase(), dest);
            }
        }
        let retention = match &raw.retention {
            Some(r) => {
                self.retention_at = Some((
                    file.to_path_buf(),
                    r.referenced.line(),
                    r.referenced.column(),
                ));
                self.duration(&cx, r).unwrap_or(DEFAULT_RETENTION)
            }
            None => DEFAULT_RETENTION,
        };
        let mut admin_tokens = Vec::new();
        let mut affiliate_tokens = Vec::new();
        for (affiliate, t) in raw.api.iter().flat_map(|a| &a.affiliate_tokens) {
            if !t.value.trim_start().starts_with("${") {
                self.err(
                    &cx,
                    t,
                    format!("api.affiliate_tokens.{affiliate}: a token must not be written in the config"),
                    Some("read it from the environment or a file: ${env:AFFILIATE_42_TOKEN}".into()),
                );
                continue;
            }
            let token = self.expand(&cx, t);
            if token.len() < 16 && !token.is_empty() {
                self.err(
                    &cx,
                    t,
                    format!(
                        "api.affiliate_tokens.{affiliate}: a token needs at least 16 characters"
                    ),
                    None,
                );
            } else if !token.is_empty() {
                affiliate_tokens.push((token, affiliate.clone()));
            }
        }
        for t in raw.api.iter().flat_map(|a| &a.admin_tokens) {
            if !t.value.trim_start().starts_with("${") {
                self.err(
                    &cx,
                    t,
                    "api.admin_tokens: a token must not be written in the config",
                    Some("read it from the environment or a file: ${env:POSTBACKD_ADMIN_TOKEN} or ${file:/run/secrets/postbackd}".into()),
                );
                continue;
            }
            let token = self.expand(&cx, t);
            if token.len() < 16 && !token.is_empty() {
                self.err(
                    &cx,
                    t,
                    "api.admin_tokens: a token needs at least 16 characters",
                    Some("generate one with: openssl rand -hex 24".into()),
                );
            } else if !token.is_empty() {
                admin_tokens.push(token);
            }
        }
        let mut log_json = false;
        let mut log_level = "info".to_string();
        if let Some(l) = &raw.log {
            if let Some(f) = &l.format {
                match f.value.as_str() {
                    "json" => log_json = true,
                    "text" => {}
                    other => self.err(
                        &cx,
                        f,
                        format!("log.format: unknown format `{other}`"),
                        Some("use text or json".into()),
                    ),
                }
            }
            if let Some(lv) = &l.level {
                if let Some(bad) = bad_log_level(&lv.value) {
                    self.err(
                        &cx,
                        lv,
                        format!("log.level: `{bad}` is not a level"),
                        Some("use error, warn, info, debug or trace, or target=level pairs like info,postbackd::deliver=debug".into()),
                    );
                }
                log_level = lv.value.clone();
            }
        }
        let server = self.server_settings(&cx, raw.server.as_ref(), dir);
        Settings {
            server,
            listen,
            data_dir,
            postgres,
            store_lease,
            delivery,
            log_json,
            log_level,
            retention,
            admin_tokens,
            affiliate_tokens,
        }
    }

    fn server_settings(&mut self, cx: &Ctx, raw: Option<&RawServer>, dir: &Path) -> ServerSettings {
        let mut out = ServerSettings::default();
        let Some(raw) = raw else {
            return out;
        };
        for (field, into) in [
            (&raw.header_timeout, &mut out.header_timeout),
            (&raw.idle_timeout, &mut out.idle_timeout),
            (&raw.request_timeout, &mut out.request_timeout),
        ] {
            if let Some(d) = field.as_ref().and_then(|v| self.duration(cx, v)) {
                if d.is_zero() {
                    if let Some(v) = field {
                        self.err(cx, v, "server timeouts must be longer than 0", None);
                    }
                } else {
                    *into = d;
                }
            }
        }
        if let Some(t) = &raw.tls {
            let path = |p: &Spanned<String>| {
                let p = PathBuf::from(&p.value);
                if p.is_absolute() {
                    p
                } else {
                    dir.join(p)
                }
            };
            let (cert, key) = (path(&t.cert), path(&t.key));
            let provider = tokio_rustls::rustls::crypto::ring::default_provider();
            match crate::tls::load(&cert, &key, &provider) {
                Ok(_) => out.tls = Some((cert, key)),
                Err(e) => self.err(
                    cx,
                    &t.cert,
                    format!("server.tls: {e}"),
                    Some("cert is the PEM chain (leaf first), key its PEM private key".into()),
                ),
            }
        }
        out.trusted_proxies = raw
            .trusted_proxies
            .iter()
            .filter_map(|n| self.network(cx, "server.trusted_proxies", n))
            .collect();
        if let Some(m) = &raw.max_connections {
            match m.value.trim() {
                "auto" => {}
                n => match n.parse::<usize>() {
                    Ok(n) if n >= 1 => out.max_connections = Some(n),
                    _ => self.err(
                        cx,
                        m,
                        format!("server.max_connections: `{n}` is not a number of connections"),
                        Some("write a number like 1000, or auto (the open-file limit minus room for deliveries)".into()),
                    ),
                },
            }
        }
        out
    }
}
