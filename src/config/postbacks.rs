//! Compiling postbacks: triggers, scopes, conditions, vars, and the HTTP action with its
//! templates (every secret placed as a variable, see [`super::secret`]).

use super::*;

impl Compiler {
    /// Checks a template's variables against what an event provides.
    fn check_vars(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        vars: &[String],
        declared: &BTreeMap<String, Spanned<String>>,
    ) {
        for v in vars {
            let (head, tail) = match v.split_once('.') {
                Some((h, t)) => (h, Some(t)),
                None => (v.as_str(), None),
            };
            if head == "params" || head.starts_with(secret::PREFIX) {
                continue;
            }
            if head == "vars" {
                if let Some(name) = tail {
                    let name = name.split('.').next().unwrap_or(name);
                    if !declared.contains_key(name) {
                        let hint =
                            suggest(name, declared.keys().map(String::as_str)).or_else(|| {
                                Some(format!(
                                    "declare it under `vars:` (declared: {})",
                                    list(declared.keys())
                                ))
                            });
                        self.err(cx, at, format!("unknown variable `vars.{name}`"), hint);
                    }
                }
                continue;
            }
            if canonical_name(head).is_some() || EXTRA_NAMES.contains(&head) {
                continue;
            }
            let hint = suggest(head, CANONICAL.iter().chain(EXTRA_NAMES).copied())
                .or_else(|| Some(format!("use a canonical field, or `params.{head}` for a raw parameter the tracker sends")));
            self.err(
                cx,
                at,
                format!("unknown macro `{head}`: it would never render"),
                hint,
            );
        }
    }

    fn template(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        text: &str,
        escape: Escape,
        shorthand: bool,
        declared: &BTreeMap<String, Spanned<String>>,
    ) -> Option<crate::render::template::TemplateId> {
        let src = if shorthand {
            expand_shorthand(text)
        } else {
            text.to_string()
        };
        match self.engine.add(&src, escape) {
            Ok((id, vars)) => {
                self.check_vars(cx, at, &vars, declared);
                Some(id)
            }
            Err(m) => {
                self.err(
                    cx,
                    at,
                    format!("template error: {m}"),
                    Some(
                        "macros are {name} or {{ name }}; filters like {{ email | sha256 }}".into(),
                    ),
                );
                None
            }
        }
    }

    fn conditions(
        &mut self,
        cx: &Ctx,
        when: &BTreeMap<String, Spanned<OneOrMany>>,
        unless: &BTreeMap<String, Spanned<OneOrMany>>,
    ) -> Conditions {
        let mut goal = None;
        let mut w = Vec::new();
        let mut u = Vec::new();
        for (which, map) in [(0, when), (1, unless)] {
            for (field, values) in map {
                let Some(canonical) =
                    canonical_name(field).or(if field == "kind" { Some("kind") } else { None })
                else {
                    let hint = suggest(field, CANONICAL.iter().copied());
                    self.err(
                        cx,
                        values,
                        format!("unknown field `{field}` in conditions"),
                        hint,
                    );
                    continue;
                };
                let vals: Vec<String> = values.value.0.iter().map(|i| i.0.clone()).collect();
                if canonical == "status" {
                    for v in &vals {
                        if Status::parse(v).is_none() {
                            self.err(
                                cx,
                                values,
                                format!("`{v}` is not a status"),
                                Some("use approved, pending or rejected".into()),
                            );
                        }
                    }
                }
                let vals: Vec<String> = if canonical == "status" {
                    vals.iter()
                        .filter_map(|v| Status::parse(v))
                        .map(|s| s.as_str().to_string())
                        .collect()
                } else {
                    vals
                };
                if which == 0 && canonical == "goal" {
                    goal = Some(vals);
                } else if which == 0 {
                    w.push((canonical.to_string(), vals));
                } else {
                    u.push((canonical.to_string(), vals));
                }
            }
        }
        Conditions {
            goal,
            when: w,
            unless: u,
            expr: None,
        }
    }

    pub(super) fn postback(&mut self, file: &Path, p: &RawPostback, defaults: &DeliverySettings) {
        let id = p.id.value.clone();
        let cx = Ctx {
            file,
            postback: Some(&id),
        };
        if id.trim().is_empty() || id.contains(char::is_whitespace) {
            self.err(
                &cx,
                &p.id,
                "postback id must be a non-empty word",
                Some("use ids like keitaro-approved".into()),
            );
        }
        if let Some((f, l)) = self.postback_origin.get(&id) {
            let msg = format!("postback id is used twice (first at {}:{l})", f.display());
            self.err(&cx, &p.id, msg, Some("ids are how deliveries and logs refer to a postback: keep them unique and stable".into()));
            return;
        }
        self.postback_origin
            .insert(id.clone(), (file.to_path_buf(), p.id.referenced.line()));
        let errors_before = self.errors.len();
        self.postback_has_secret = false;

        let trigger = match Kind::parse(&p.trigger.value) {
            Some(k)
                if ["click", "impression", "conversion"].contains(&p.trigger.value.as_str()) =>
            {
                k
            }
            _ => {
                self.err(
                    &cx,
                    &p.trigger,
                    format!("unknown trigger `{}`", p.trigger.value),
                    Some("use click, impression or conversion".into()),
                );
                Kind::Conversion
            }
        };
        let statuses = p.statuses.as_ref().map(|s| {
            if trigger != Kind::Conversion {
                self.err(
                    &cx,
                    s,
                    "statuses only apply to conversions",
                    Some("remove `statuses` or set `trigger: conversion`".into()),
                );
            }
            s.value
                .0
                .iter()
                .filter_map(|v| {
                    let st = Status::parse(&v.0).filter(|st| st.as_str() == v.0);
                    if st.is_none() {
                        self.err(
                            &cx,
                            s,
                            format!("`{}` is not a status", v.0),
                            Some("use approved, pending or rejected".into()),
                        );
                    }
                    st
                })
                .collect::<Vec<_>>()
        });

        // Scope: which offers the postback applies to.
        let scope: Vec<String> = match &p.offers {
            None => vec![ALL_OFFERS.to_string()],
            Some(s)
                if s.value.0.len() == 1
                    && (s.value.0[0].0 == "all" || s.value.0[0].0 == ALL_OFFERS) =>
            {
                vec![ALL_OFFERS.to_string()]
            }
            Some(s) => {
                let mut v = Vec::new();
                for o in &s.value.0 {
                    if !self.offers.contains_key(&o.0) {
                        let hint = suggest(&o.0, self.offers.keys().map(String::as_str))
                            .or_else(|| Some("define the offer under `offers:` in any rule file, or use `offers: all`".into()));
                        self.err(&cx, s, format!("unknown offer `{}`", o.0), hint);
                    } else {
                        v.push(o.0.clone());
                    }
                }
                v
            }
        };
        for key in p.per_offer.keys() {
            if !scope.contains(key) {
                let msg = format!("per_offer: `{key}` is not one of this postback's offers");
                self.err(
                    &cx,
                    &p.id,
                    msg,
                    Some(format!("add it to `offers:` ({})", scope.join(", "))),
                );
            }
        }

        // Conditions, checked against each scoped offer's goals.
        let Conditions {
            goal, when, unless, ..
        } = self.conditions(&cx, &p.when, &p.unless);
        if let Some(goals) = &goal {
            for o in &scope {
                if let Some(offer_goals) = self.offers.get(o).map(|(offer, _)| offer.goals.clone())
                {
                    if offer_goals.is_empty() {
                        continue;
                    }
                    for g in goals {
                        if !offer_goals.contains(g) {
                            let msg = format!("goal `{g}` is not a goal of offer `{o}`");
                            let hint =
                                Some(format!("offer `{o}` has goals: {}", offer_goals.join(", ")));
                            let at = p
                                .when
                                .get("goal")
                                .map(|s| (s.referenced.line(), s.referenced.column()))
                                .unwrap_or((0, 0));
                            self.err_at(file, at.0, at.1, Some(&id), msg, hint);
                        }
                    }
                }
            }
        }
        let expr = p
            .expr
            .as_ref()
            .and_then(|e| match self.engine.add_condition(&e.value) {
                Ok((t, vars)) => {
                    self.check_vars(&cx, e, &vars, &BTreeMap::new());
                    Some(t)
                }
                Err(m) => {
                    self.err(
                        &cx,
                        e,
                        format!("if: {m}"),
                        Some(r#"write it like: payout > 0 and country != "US""#.into()),
                    );
                    None
                }
            });
        let delay = p
            .delay
            .as_ref()
            .and_then(|d| self.duration(&cx, d))
            .unwrap_or_default();
        self.longest_delay = self.longest_delay.max(delay);
        let retry = match &p.retry {
            Some(r) => r.iter().filter_map(|s| self.duration(&cx, s)).collect(),
            None => defaults.retry.clone(),
        };
        let mut declared = p.vars.clone();
        for o in p.per_offer.values() {
            for (k, v) in &o.vars {
                declared.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        for (k, v) in &declared {
            if CANONICAL.contains(&k.as_str()) {
                self.err(
                    &cx,
                    v,
                    format!("vars: `{k}` is an event field name"),
                    Some("pick another name; templates read vars as {{ vars.NAME }}".into()),
                );
            }
        }

        let http = match &p.http {
            Some(h) => self.http(&cx, h, &declared),
            None => {
                self.err(
                    &cx,
                    &p.id,
                    "postback has no action",
                    Some("add an `http:` block with at least a `url:`".into()),
                );
                None
            }
        };
        // Each var as sent and as shown (`***` for its secrets).
        let vars: BTreeMap<String, (String, String)> = p
            .vars
            .iter()
            .map(|(k, v)| {
                let (real, shown) = self.expand_pair(&cx, v);
                let shown = shown.unwrap_or_else(|| real.clone());
                (k.clone(), (real, shown))
            })
            .collect();
        if self.errors.len() > errors_before {
            return;
        }
        let Some(http) = http else { return };
        let pb_index = self.postbacks.len();
        self.postbacks.push(Postback {
            id: id.clone(),
            name: p.name.clone(),
            owner: p.affiliate.as_ref().map(|a| a.value.0.clone()),
            origin: Origin {
                file: file.to_path_buf(),
                line: p.id.referenced.line(),
            },
            trigger,
            statuses,
            http,
            retry,
            fingerprint: fingerprint(p),
            has_secret: self.postback_has_secret,
        });
        let base_enabled = p.enabled.unwrap_or(true);
        for offer in scope {
            let ov = p.per_offer.get(&offer);
            let mut entry_vars = vars.clone();
            let mut entry_delay = delay;
            let mut entry_enabled = base_enabled;
            let mut conds = Conditions {
                goal: goal.clone(),
                when: when.clone(),
                unless: unless.clone(),
                expr,
            };
            if let Some(ov) = ov {
                for (k, v) in &ov.vars {
                    let (real, shown) = self.expand_pair(&cx, v);
                    let shown = shown.unwrap_or_else(|| real.clone());
                    entry_vars.insert(k.clone(), (real, shown));
                }
                if let Some(d) = &ov.delay {
                    entry_delay = self.duration(&cx, d).unwrap_or(entry_delay);
                    self.longest_delay = self.longest_delay.max(entry_delay);
                }
                if let Some(e) = ov.enabled {
                    entry_enabled = e;
                }
                let Conditions {
                    goal: g, when: w, ..
                } = self.conditions(&cx, &ov.when, &BTreeMap::new());
                if g.is_some() {
                    conds.goal = g;
                }
                for (f, v) in w {
                    conds.when.retain(|(x, _)| *x != f);
                    conds.when.push((f, v));
                }
            }
            for (k, v) in &declared {
                if !entry_vars.contains_key(k) {
                    let msg = format!("vars: `{k}` has no value for offer `{offer}`");
                    self.err(
                        &cx,
                        v,
                        msg,
                        Some(
                            "give it a value under `vars:` or under this offer in `per_offer:`"
                                .into(),
                        ),
                    );
                }
            }
            let shown_vars = entry_vars
                .values()
                .any(|(real, shown)| real != shown)
                .then(|| {
                    Arc::new(
                        entry_vars
                            .iter()
                            .map(|(k, (_, s))| (k.clone(), s.clone()))
                            .collect(),
                    )
                });
            if shown_vars.is_some() {
                self.postbacks[pb_index].has_secret = true;
            }
            self.entries.push(Entry {
                postback: pb_index,
                offer,
                enabled: entry_enabled,
                delay: entry_delay,
                vars: Arc::new(entry_vars.into_iter().map(|(k, (r, _))| (k, r)).collect()),
                shown_vars,
                conditions: conds,
            });
        }
    }

    fn http(
        &mut self,
        cx: &Ctx,
        h: &RawHttp,
        declared: &BTreeMap<String, Spanned<String>>,
    ) -> Option<HttpAction> {
        let method = match h.method.as_ref().map(|m| m.value.to_ascii_uppercase()) {
            None => Method::Get,
            Some(m) => match m.as_str() {
                "GET" => Method::Get,
                "POST" => Method::Post,
                "PUT" => Method::Put,
                "PATCH" => Method::Patch,
                "DELETE" => Method::Delete,
                _ => {
                    if let Some(at) = &h.method {
                        self.err(
                            cx,
                            at,
                            format!("unknown method `{m}`"),
                            Some("use GET, POST, PUT, PATCH or DELETE".into()),
                        );
                    }
                    Method::Get
                }
            },
        };
        let (url_text, url_src) = self.template_text(cx, &h.url);
        // URL confinement: the scheme and host are written in the rule, never rendered from
        // event data, so a crafted click id cannot redirect a postback.
        let static_prefix = url_text.split("{").next().unwrap_or("");
        let after_scheme = static_prefix
            .strip_prefix("https://")
            .or_else(|| static_prefix.strip_prefix("http://"));
        match after_scheme {
            None => self.err(
                cx,
                &h.url,
                // The url as written: an expanded secret never goes into a message.
                format!(
                    "url must start with http:// or https://, got `{}`",
                    truncate(&h.url.value, 60)
                ),
                Some(
                    "write the full url, e.g. https://tracker.example/postback?cid={clickid}"
                        .into(),
                ),
            ),
            Some(rest) if !rest.contains(['/', '?']) && url_text.contains('{') => self.err(
                cx,
                &h.url,
                "url: the host must be written out, not templated",
                Some(
                    "keep macros in the path and query: https://tracker.example/pb?cid={clickid}"
                        .into(),
                ),
            ),
            Some("") => self.err(cx, &h.url, "url has no host", None),
            _ => {}
        }
        let url = self.template(cx, &h.url, &url_src, Escape::Url, true, declared);
        let mut params = Vec::new();
        for (k, v) in &h.params {
            let (_, text) = self.template_text(cx, v);
            if let Some(t) = self.template(cx, v, &text, Escape::Plain, true, declared) {
                params.push((k.clone(), t));
            }
        }
        let mut headers = Vec::new();
        for (k, v) in &h.headers {
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                self.err(cx, v, format!("`{k}` is not a valid header name"), None);
                continue;
            }
            let (_, text) = self.template_text(cx, v);
            if let Some(t) = self.template(cx, v, &text, Escape::Plain, true, declared) {
                headers.push((k.clone(), t));
            }
        }
        let bodies = [h.form.is_some(), h.json.is_some(), h.body.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if bodies > 1 {
            self.err(cx, &h.url, "give at most one of form, json and body", None);
        }
        if bodies > 0 && method == Method::Get {
            let at = h
                .method
                .as_ref()
                .map(|m| (m.referenced.line(), m.referenced.column()))
                .unwrap_or((h.url.referenced.line(), h.url.referenced.column()));
            self.err_at(
                cx.file,
                at.0,
                at.1,
                cx.postback,
                "a GET request cannot carry a body".into(),
                Some("set `method: POST`".into()),
            );
        }
        let body = if let Some(form) = &h.form {
            let mut fields = Vec::new();
            for (k, v) in form {
                let (_, text) = self.template_text(cx, v);
                if let Some(t) = self.template(cx, v, &text, Escape::Plain, true, declared) {
                    fields.push((k.clone(), t));
                }
            }
            Body::Form(fields)
        } else if let Some(j) = &h.json {
            let at = Spanned::new(String::new(), j.referenced, j.defined);
            Body::Json(self.json_template(cx, &at, &j.value, declared))
        } else if let Some(b) = &h.body {
            let (_, text) = self.template_text(cx, b);
            let ct = h
                .content_type
                .clone()
                .unwrap_or_else(|| "text/plain; charset=utf-8".into());
            let esc = if ct.contains("json") {
                Escape::Json
            } else {
                Escape::Plain
            };
            match self.template(cx, b, &text, esc, false, declared) {
                Some(t) => Body::Raw {
                    template: t,
                    content_type: ct,
                },
                None => Body::None,
            }
        } else {
            Body::None
        };
        let auth = h
            .auth
            .as_ref()
            .and_then(|a| match (&a.username, &a.password, &a.bearer) {
                (Some(u), Some(p), None) => {
                    let (username, u_shown) = self.expand_pair(cx, u);
                    let (password, p_shown) = self.expand_pair(cx, p);
                    Some(Auth::Basic {
                        username,
                        password,
                        masked: u_shown.is_some() || p_shown.is_some(),
                    })
                }
                (None, None, Some(b)) => {
                    let (token, shown) = self.expand_pair(cx, b);
                    Some(Auth::Bearer {
                        shown: shown.unwrap_or_else(|| token.clone()),
                        token,
                    })
                }
                _ => {
                    self.err(
                        cx,
                        &h.url,
                        "auth: give either username and password, or bearer",
                        Some("auth: { bearer: \"${env:CRM_TOKEN}\" }".into()),
                    );
                    None
                }
            });
        let timeout = h.timeout.as_ref().and_then(|t| self.duration(cx, t));
        let success = match &h.success {
            Some(s) => Success {
                status: s.status.clone().unwrap_or_default(),
                body_contains: s.body_contains.clone(),
                body_not_contains: s.body_not_contains.clone(),
                json: s.json.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            },
            None => Success::default(),
        };
        let sign = h
            .sign
            .as_ref()
            .and_then(|g| self.signing_keys(cx, g, &h.url));
        Some(HttpAction {
            sign,
            method,
            destination: destination_of(&url_text),
            url: url?,
            params,
            headers,
            body,
            auth,
            timeout,
            success,
        })
    }

    fn json_template(
        &mut self,
        cx: &Ctx,
        at: &Spanned<String>,
        v: &serde_json::Value,
        declared: &BTreeMap<String, Spanned<String>>,
    ) -> JsonTemplate {
        match v {
            serde_json::Value::String(s) => {
                let at_text = Spanned::new(s.clone(), at.referenced, at.defined);
                let (expanded, src) = self.template_text(cx, &at_text);
                let src = expand_shorthand(&src);
                if !src.contains("{{") && !src.contains("{%") {
                    return JsonTemplate::Static(serde_json::Value::String(expanded));
                }
                let trimmed = src.trim();
                let whole = trimmed.starts_with("{{")
                    && trimmed.ends_with("}}")
                    && trimmed.matches("{{").count() == 1;
                let (src, esc) = if whole {
                    (trimmed.to_string(), Escape::Json)
                } else {
                    (src, Escape::Plain)
                };
                match self.template(cx, &at_text, &src, esc, false, declared) {
                    Some(t) if whole => JsonTemplate::Whole(t),
                    Some(t) => JsonTemplate::Text(t),
                    None => JsonTemplate::Static(v.clone()),
                }
            }
            serde_json::Value::Array(a) => JsonTemplate::Array(
                a.iter()
                    .map(|x| self.json_template(cx, at, x, declared))
                    .collect(),
            ),
            serde_json::Value::Object(o) => JsonTemplate::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.json_template(cx, at, x, declared)))
                    .collect(),
            ),
            other => JsonTemplate::Static(other.clone()),
        }
    }

    /// `sign:`: each secret from `${env:…}`/`${file:…}`, `whsec_` and base64, as the
    /// Standard Webhooks specification writes them.
    fn signing_keys(
        &mut self,
        cx: &Ctx,
        g: &RawSign,
        url: &Spanned<String>,
    ) -> Option<SigningKeys> {
        let all: Vec<&Spanned<String>> =
            g.secret.iter().chain(g.secrets.iter().flatten()).collect();
        if all.is_empty() || all.len() > 2 {
            let at = all.first().copied().unwrap_or(url);
            self.err(
                cx,
                at,
                "sign: give one secret, or two (new and old) while a key rotates",
                Some("sign: { secret: \"${env:WEBHOOK_SECRET}\" }".into()),
            );
            return None;
        }
        let mut keys = Vec::new();
        for s in all {
            if !s.value.trim_start().starts_with("${") {
                self.err(
                    cx,
                    s,
                    "sign: a signing secret must not be written in the config",
                    Some("read it from the environment or a file: ${env:WEBHOOK_SECRET}".into()),
                );
                continue;
            }
            let value = self.expand(cx, s);
            let raw = value.strip_prefix("whsec_").unwrap_or(&value);
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(raw.trim()) {
                Ok(k) if !k.is_empty() => keys.push(k),
                _ => self.err(
                    cx,
                    s,
                    "sign: the secret is not a Standard Webhooks secret (whsec_ and base64)",
                    Some("generate one with: echo whsec_$(openssl rand -base64 32)".into()),
                ),
            }
        }
        (!keys.is_empty()).then_some(SigningKeys(keys))
    }
}
