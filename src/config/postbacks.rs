//! Compiling postbacks: triggers, scopes, conditions, vars; each action compiles itself
//! ([`crate::actions`]) through [`Builder`], which places every secret as a variable (see
//! [`super::secret`]) and checks every template's macros.

use super::*;
use crate::actions::Build;

/// The compiler as an action's `compile` sees it: errors land at the postback being
/// compiled, templates are checked against its vars and the declared macros.
struct Builder<'c, 'a> {
    c: &'c mut Compiler,
    cx: &'c Ctx<'a>,
    declared: &'c BTreeMap<String, Spanned<String>>,
}

impl Build for Builder<'_, '_> {
    fn error_at(&mut self, line: u64, column: u64, message: String, hint: Option<String>) {
        let cx = self.cx;
        self.c
            .err_at(cx.file, line, column, cx.postback, message, hint);
    }
    fn value(&mut self, at: &Spanned<String>) -> (String, Option<String>) {
        self.c.expand_pair(self.cx, at)
    }
    fn text(&mut self, at: &Spanned<String>) -> (String, String) {
        self.c.template_text(self.cx, at)
    }
    fn compile(
        &mut self,
        at: &Spanned<String>,
        source: &str,
        escape: Escape,
        shorthand: bool,
    ) -> Option<crate::render::template::TemplateId> {
        self.c
            .template(self.cx, at, source, escape, shorthand, self.declared)
    }
    fn duration(&mut self, at: &Spanned<String>) -> Option<Duration> {
        self.c.duration(self.cx, at)
    }
}

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
            if canonical_name(head).is_some()
                || EXTRA_NAMES.contains(&head)
                || self.macros.contains(head)
            {
                continue;
            }
            let declare = format!("declare it (`macros: [{head}]` in a rule file or its source) to read the parameter trackers send under that name");
            // A name one or two letters off is a typo; one further off may be a field of
            // the tracker's own, which a declaration makes readable.
            let typo = CANONICAL
                .iter()
                .chain(EXTRA_NAMES)
                .any(|k| strsim::levenshtein(head, k) <= 2);
            let hint = Some(
                match suggest(head, CANONICAL.iter().chain(EXTRA_NAMES).copied()) {
                    Some(s) if typo => s,
                    Some(s) => format!("{s} Or, if it is the tracker's own field, {declare}"),
                    None => format!("use a canonical field, `params.{head}`, or {declare}"),
                },
            );
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

        let action = match p.actions().as_slice() {
            [(_, raw)] => raw.compile(&mut Builder {
                c: self,
                cx: &cx,
                declared: &declared,
            }),
            [] => {
                self.err(
                    &cx,
                    &p.id,
                    "postback has no action",
                    Some(format!(
                        "add one of: {} (an `http:` block needs at least a `url:`)",
                        crate::actions::KINDS.join(", ")
                    )),
                );
                None
            }
            several => {
                let kinds: Vec<&str> = several.iter().map(|(k, _)| *k).collect();
                self.err(
                    &cx,
                    &p.id,
                    format!(
                        "postback has {} actions ({}); give exactly one",
                        kinds.len(),
                        kinds.join(", ")
                    ),
                    Some("split it into one postback per action, each with its own id".into()),
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
        let Some(action) = action else { return };
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
            action,
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
}
