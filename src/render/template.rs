//! The macro engine: minijinja, plus the industry's `{clickid}` shorthand.
//!
//! Every template of a plan is compiled once into one [`Engine`]. Values are URL-encoded in
//! URL templates and JSON-escaped in JSON bodies unless marked `raw`. Unknown variables are
//! errors (strict undefined), so a misspelled macro is never sent literally.

use super::simple::{Filter, Simple};
use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Digest;

/// RFC 3986 unreserved characters stay; everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// How a template's output is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// Values are percent-encoded (URL templates).
    Url,
    /// Values are serialised as JSON (raw JSON bodies).
    Json,
    /// Values are written as they are (headers, form values, JSON leaves).
    Plain,
    /// Values are HTML-escaped (`&`, `<`, `>`, `"`, `'`): an e-mail's HTML body.
    Html,
}

impl Escape {
    fn suffix(self) -> &'static str {
        match self {
            Escape::Url => ".url",
            Escape::Json => ".json",
            Escape::Plain => ".txt",
            Escape::Html => ".html",
        }
    }
}

/// A compiled template's handle inside an [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateId(u32);

enum Compiled {
    /// Text and plain macros, rendered by [`Simple`]; the source is kept so minijinja can
    /// say what is wrong when the simple path cannot render it.
    Simple {
        simple: Simple,
        escape: Escape,
        source: Box<str>,
    },
    /// Compiled by minijinja, under this name in the environment; `repeats` if it has a
    /// tag that can run its body more than once (a loop, a macro).
    Jinja { name: String, repeats: bool },
}

/// Whether a template has a block tag that can repeat work: `for`, `macro`, `call`, or
/// one that pulls in another template. Without one, every statement runs at most once, so
/// a render costs what the template's length and the printed values cost.
fn repeats(source: &str) -> bool {
    source.split("{%").skip(1).any(|block| {
        let word = block
            .trim_start_matches(['-', '+'])
            .trim_start()
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .next()
            .unwrap_or_default();
        matches!(
            word,
            "for" | "macro" | "call" | "include" | "import" | "from" | "extends" | "block"
        )
    })
}

/// All templates of one plan.
pub struct Engine {
    env: Environment<'static>,
    templates: Vec<Compiled>,
    /// Off in tests that compare both paths.
    simple: bool,
    /// Filter names already found to exist, so each is tried once per plan.
    known_filters: std::collections::HashSet<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({} templates)", self.templates.len())
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine {
    pub fn new() -> Engine {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Every render stops after this many steps, so a template that loops over a long
        // value cannot hold a thread: the attempt fails as a render error instead.
        env.set_fuel(Some(RENDER_FUEL));
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".url") {
                AutoEscape::Custom("url")
            } else if name.ends_with(".json") {
                AutoEscape::Json
            } else if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.set_formatter(|out, state, value| {
            let escape = match state.auto_escape() {
                AutoEscape::Custom("url") => Escape::Url,
                AutoEscape::Json => Escape::Json,
                AutoEscape::Html => Escape::Html,
                _ => Escape::Plain,
            };
            let mut s = String::new();
            if apply_escape(&mut s, value, escape).is_none() {
                return minijinja::escape_formatter(out, state, value);
            }
            out.write_str(&s).map_err(Error::from)
        });
        // A missing value is empty to every filter, never the word `none`.
        for f in Filter::ALL {
            env.add_filter(f.name(), move |v: Value| f.apply(&v));
        }
        env.add_filter("urlencode", |v: Value| {
            utf8_percent_encode(&text_of(&v), COMPONENT).to_string()
        });
        env.add_filter("value_map", value_map);
        env.add_filter("date", date_filter);
        env.add_function("uuid", || uuid::Uuid::new_v4().to_string());
        Engine {
            env,
            templates: Vec::new(),
            simple: true,
            known_filters: Default::default(),
        }
    }

    /// An engine that compiles every template with minijinja, to compare both paths.
    #[cfg(test)]
    pub fn jinja_only() -> Engine {
        Engine {
            simple: false,
            ..Engine::new()
        }
    }

    /// Compiles a template. Returns its handle and the variables it reads (top-level names,
    /// with `params.x` and `vars.x` kept dotted) for the config check.
    pub fn add(
        &mut self,
        source: &str,
        escape: Escape,
    ) -> Result<(TemplateId, Vec<String>), String> {
        let exact = exact_amounts(source);
        let source = exact.as_str();
        let id = TemplateId(self.templates.len() as u32);
        if self.simple {
            if let Some((simple, vars)) = Simple::parse(source) {
                self.templates.push(Compiled::Simple {
                    simple,
                    escape,
                    source: source.into(),
                });
                return Ok((id, amounts_by_name(vars)));
            }
        }
        if let Some(bad) = self.unknown_filter(source) {
            let known = Filter::ALL.iter().map(|f| f.name()).chain([
                "value_map",
                "date",
                "urlencode",
                "default",
                "float",
                "int",
                "round",
                "trim",
                "replace",
                "join",
                "length",
                "tojson",
            ]);
            let hint = crate::suggest::suggest(&bad, known)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(format!("unknown filter `{bad}`{hint}"));
        }
        let name = format!("t{}{}", id.0, escape.suffix());
        self.env
            .add_template_owned(name.clone(), source.to_string())
            .map_err(describe)?;
        let tmpl = self.env.get_template(&name).map_err(describe)?;
        let vars: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
        let repeats = repeats(source);
        self.templates.push(Compiled::Jinja { name, repeats });
        Ok((id, amounts_by_name(vars)))
    }

    /// The first filter a template names that the engine does not have. minijinja finds an
    /// unknown filter only when it renders, so every name after a `|` inside a block is
    /// tried here once, at compile time.
    fn unknown_filter(&mut self, source: &str) -> Option<String> {
        let mut rest = source;
        while let Some(open) = rest.find(['{']) {
            let after = &rest[open + 1..];
            let close = match after.chars().next() {
                Some('{') => "}}",
                Some('%') => "%}",
                _ => {
                    rest = after;
                    continue;
                }
            };
            // The close is looked for after the opening's second character: `{%}` is
            // an opening with no close, not an empty block.
            let end = after[1..].find(close).map_or(after.len(), |e| e + 1);
            // String literals may hold a `|` of their own: leave them out.
            let mut block = String::new();
            let mut quote = None;
            for c in after[1..end].chars() {
                match quote {
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None if c == '"' || c == '\'' => quote = Some(c),
                    None => block.push(c),
                }
            }
            for piece in block.split('|').skip(1) {
                let name: String = piece
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.is_empty() || self.known_filters.contains(&name) {
                    continue;
                }
                let probe = format!("{{{{ none | {name} }}}}");
                if let Err(e) = self.env.render_str(&probe, ()) {
                    if e.kind() == ErrorKind::UnknownFilter {
                        return Some(name);
                    }
                }
                self.known_filters.insert(name);
            }
            rest = &after[end.min(after.len())..];
        }
        None
    }

    /// Compiles a boolean expression (`payout > 0 and country != "US"`).
    pub fn add_condition(&mut self, expr: &str) -> Result<(TemplateId, Vec<String>), String> {
        // Compile once as an expression for a clear syntax error, then as a template that
        // prints 1 when it holds, so the plan owns it without borrowing the environment.
        // A delimiter outside a string would end the `{% if %}` it is wrapped in (and
        // minijinja 2.24's lexer panics on some, such as `}}0`).
        if let Some(d) = delimiter_outside_strings(expr) {
            return Err(format!(
                "a condition cannot hold the template delimiter `{d}`; write the expression alone"
            ));
        }
        self.env.compile_expression(expr).map_err(describe)?;
        self.add(&format!("{{% if {expr} %}}1{{% endif %}}"), Escape::Plain)
    }

    pub fn render(&self, id: &TemplateId, ctx: &Value) -> Result<String, String> {
        self.render_raw(id, ctx).map_err(describe)
    }

    /// Like [`Engine::render`], but a template that reads an undefined value (a parameter
    /// the event lacks) renders empty: for optional fields, which are then left out.
    pub fn render_or_empty(&self, id: &TemplateId, ctx: &Value) -> Result<String, String> {
        match self.render_raw(id, ctx) {
            Err(e) if e.kind() == ErrorKind::UndefinedError => Ok(String::new()),
            other => other.map_err(describe),
        }
    }

    fn render_raw(&self, id: &TemplateId, ctx: &Value) -> Result<String, Error> {
        match self.templates.get(id.0 as usize) {
            Some(Compiled::Simple {
                simple,
                escape,
                source,
            }) => match simple.render(ctx, *escape) {
                Some(out) => Ok(out),
                None => self
                    .env
                    .template_from_named_str(escape.suffix(), source)
                    .and_then(|t| t.render(ctx)),
            },
            Some(Compiled::Jinja { name, .. }) => {
                self.env.get_template(name).and_then(|t| t.render(ctx))
            }
            None => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("no template {}", id.0),
            )),
        }
    }

    /// Whether a template takes the simple path (text and plain macros: linear in the
    /// values it prints, never minijinja).
    #[cfg(test)]
    fn is_simple(&self, id: &TemplateId) -> bool {
        matches!(self.templates[id.0 as usize], Compiled::Simple { .. })
    }

    /// Whether rendering costs no more than the template's length and the values it prints:
    /// the simple path, or minijinja without a loop or a macro.
    pub fn is_bounded(&self, id: &TemplateId) -> bool {
        match self.templates.get(id.0 as usize) {
            Some(Compiled::Simple { .. }) => true,
            Some(Compiled::Jinja { repeats, .. }) => !repeats,
            None => true,
        }
    }

    /// Evaluates a condition compiled with [`Engine::add_condition`].
    pub fn holds(&self, id: &TemplateId, ctx: &Value) -> Result<bool, String> {
        Ok(self.render(id, ctx)? == "1")
    }
}

/// Writes one printed value as a template of that escape prints it: a safe (`raw`) string
/// as it is, nothing for none, otherwise percent-encoded, JSON or plain text. `None` when
/// the value cannot be written (it does not serialise to JSON).
pub(crate) fn apply_escape(out: &mut String, value: &Value, escape: Escape) -> Option<()> {
    use std::fmt::Write;
    if value.is_safe() {
        if let Some(s) = value.as_str() {
            out.push_str(s);
            return Some(());
        }
    }
    if value.is_none() {
        return Some(());
    }
    match escape {
        Escape::Url => {
            let _ = write!(
                out,
                "{}",
                utf8_percent_encode(&value.to_string(), COMPONENT)
            );
        }
        Escape::Json => out.push_str(&serde_json::to_string(value).ok()?),
        Escape::Plain => {
            let _ = write!(out, "{value}");
        }
        Escape::Html => {
            for c in value.to_string().chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#x27;"),
                    c => out.push(c),
                }
            }
        }
    }
    Some(())
}

/// The first template delimiter (`{{`, `}}`, `{%`, `%}`, `{#`, `#}`) in an expression that
/// is not inside a quoted string.
fn delimiter_outside_strings(expr: &str) -> Option<&'static str> {
    const DELIMITERS: [&str; 6] = ["{{", "}}", "{%", "%}", "{#", "#}"];
    let b = expr.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < b.len() {
        match quote {
            Some(_) if b[i] == b'\\' => i += 1,
            Some(q) if b[i] == q => quote = None,
            Some(_) => {}
            None if b[i] == b'"' || b[i] == b'\'' => quote = Some(b[i]),
            None => {
                if let Some(d) = DELIMITERS.iter().find(|d| b[i..].starts_with(d.as_bytes())) {
                    return Some(d);
                }
            }
        }
        i += 1;
    }
    None
}

/// A value as text for a filter: a missing value is empty.
pub(crate) fn text_of(v: &Value) -> String {
    if v.is_none() || v.is_undefined() {
        String::new()
    } else {
        v.to_string()
    }
}

/// One line saying what went wrong in a template, without minijinja's internal names.
/// How many steps (minijinja instructions) one render or condition may take. A template
/// that prints a few dozen macros takes a few hundred; a loop over a list of 1,000 items
/// takes a few thousand.
pub const RENDER_FUEL: u64 = 100_000;

fn describe(e: Error) -> String {
    let mut msg = match e.kind() {
        ErrorKind::UndefinedError => "undefined value".to_string(),
        ErrorKind::OutOfFuel => {
            return format!(
                "the template stopped after {RENDER_FUEL} steps (a loop over a long value?); simplify it"
            )
        }
        _ => e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string()),
    };
    if e.kind() == ErrorKind::UndefinedError {
        if let Some(d) = e.detail() {
            msg = format!("{msg}: {d}");
        }
    }
    msg
}

/// A macro that only prints an amount (`{{ payout }}`, `{payout}`, with at most the
/// simple filters) reads it under this prefix (`__exact_payout`): the amount's text as
/// received, so `12.50` is sent as `12.50`. Expressions that compute or compare
/// (`{{ payout * 0.8 }}`, `if: payout > 10`) see the amount as a number.
pub const EXACT_PREFIX: &str = "__exact_";

/// The field each name of a money amount stands for.
fn amount_field(name: &str) -> Option<&'static str> {
    match name {
        "payout" | "sum" | "amount" => Some("payout"),
        "revenue" => Some("revenue"),
        _ => None,
    }
}

/// Rewrites every `{{ payout [| filter …] }}` that only prints the amount to read its
/// exact text (see [`EXACT_PREFIX`]).
fn exact_amounts(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(open) = rest.find("{{") {
        let Some(len) = rest[open + 2..].find("}}") else {
            break;
        };
        let inner = &rest[open + 2..open + 2 + len];
        out.push_str(&rest[..open]);
        let mut pieces = inner.split('|');
        let head = pieces.next().unwrap_or_default().trim();
        let filters: Vec<&str> = pieces.map(str::trim).collect();
        match amount_field(head) {
            Some(field)
                if !inner.starts_with('-')
                    && !inner.ends_with('-')
                    && filters.iter().all(|f| Filter::parse(f).is_some()) =>
            {
                out.push_str("{{ ");
                out.push_str(EXACT_PREFIX);
                out.push_str(field);
                for f in filters {
                    out.push_str(" | ");
                    out.push_str(f);
                }
                out.push_str(" }}");
            }
            _ => out.push_str(&rest[open..open + 4 + len]),
        }
        rest = &rest[open + 4 + len..];
    }
    out.push_str(rest);
    out
}

/// The variables a template reads, with the exact amounts under their own names.
fn amounts_by_name(vars: Vec<String>) -> Vec<String> {
    let mut vars: Vec<String> = vars
        .into_iter()
        .map(|v| match v.strip_prefix(EXACT_PREFIX) {
            Some(field) => field.to_string(),
            None => v,
        })
        .collect();
    vars.sort();
    vars.dedup();
    vars
}

/// Percent-encodes everything but RFC 3986's unreserved characters, as URL templates do.
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of the value normalised as Meta's and TikTok's APIs require: trimmed and
/// lower-cased; empty stays empty. Phone numbers should go through `digits` first.
pub(crate) fn sha256_normalised(s: &str) -> String {
    let norm = s.trim().to_lowercase();
    if norm.is_empty() {
        return String::new();
    }
    sha256_hex(&norm)
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex(&sha2::Sha256::digest(s.as_bytes()))
}

pub(crate) fn md5_hex(s: &str) -> String {
    hex(&md5::Md5::digest(s.as_bytes()))
}

/// `{{ status | value_map(approved=1, pending=2) }}` or with a dict; unmapped values pass
/// through unless `default=` is given.
fn value_map(v: Value, map: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let key = v.to_string();
    if let Some(m) = map {
        if let Ok(found) = m.get_item(&Value::from(key.as_str())) {
            if !found.is_undefined() {
                return Ok(found);
            }
        }
    }
    for arg in kwargs.args() {
        if arg == key {
            let found: Value = kwargs.get(arg)?;
            return Ok(found);
        }
    }
    let default: Option<Value> = kwargs.get("default")?;
    kwargs.assert_all_used().ok();
    Ok(default.unwrap_or(v))
}

/// `{{ timestamp | date("%Y-%m-%d %H:%M", "Europe/Berlin") }}`: formats unix seconds (or
/// milliseconds, or an RFC 3339 string) in a time zone (UTC by default).
fn date_filter(
    _state: &State,
    v: Value,
    format: Option<String>,
    tz: Option<String>,
) -> Result<String, Error> {
    let ts = parse_instant(&v.to_string()).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("date: `{v}` is not a unix time or an RFC 3339 date"),
        )
    })?;
    let tz_name = tz.unwrap_or_else(|| "UTC".into());
    let zone = jiff::tz::TimeZone::get(&tz_name).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("date: unknown time zone `{tz_name}`"),
        )
    })?;
    let zoned = ts.to_zoned(zone);
    let fmt = format.unwrap_or_else(|| "%Y-%m-%dT%H:%M:%S%:z".into());
    jiff::fmt::strtime::format(fmt.as_str(), &zoned).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("date: bad format `{fmt}`: {e}"),
        )
    })
}

/// Unix seconds, unix milliseconds, or RFC 3339.
pub fn parse_instant(s: &str) -> Option<jiff::Timestamp> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return if n.abs() > 100_000_000_000 {
            jiff::Timestamp::from_millisecond(n).ok()
        } else {
            jiff::Timestamp::from_second(n).ok()
        };
    }
    s.parse::<jiff::Timestamp>().ok()
}

/// Rewrites the `{name}` / `{name:modifier}` shorthand into minijinja syntax. Jinja
/// syntax (`{{ }}`, `{% %}`, `{# #}`) passes through untouched.
///
/// Modifiers: `raw` (not encoded), `hash`/`sha256`, `md5`, `lower`, `upper`,
/// `date:FORMAT[,TZ]` on `{date:...}`, and a value map `{status:approved=1 pending=2}`.
pub fn expand_shorthand(src: &str) -> String {
    let mut out = String::with_capacity(src.len() + 16);
    let bytes = src.as_bytes();
    let mut i = 0;
    while i < src.len() {
        let c = bytes[i];
        if c == b'{' {
            let next = bytes.get(i + 1).copied();
            if matches!(next, Some(b'{') | Some(b'%') | Some(b'#')) {
                // Copy the jinja block through to its closing delimiter.
                let close = match next {
                    Some(b'{') => "}}",
                    Some(b'%') => "%}",
                    _ => "#}",
                };
                let end = src[i + 2..]
                    .find(close)
                    .map(|p| i + 2 + p + 2)
                    .unwrap_or(src.len());
                out.push_str(&src[i..end]);
                i = end;
                continue;
            }
            if let Some(len) = src[i + 1..].find('}') {
                let inner = &src[i + 1..i + 1 + len];
                if let Some(expr) = shorthand_expr(inner) {
                    out.push_str("{{ ");
                    out.push_str(&expr);
                    out.push_str(" }}");
                    i += len + 2;
                    continue;
                }
            }
        }
        let ch = src[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && s.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn shorthand_expr(inner: &str) -> Option<String> {
    let (name, modifier) = match inner.split_once(':') {
        Some((n, m)) => (n.trim(), Some(m.trim())),
        None => (inner.trim(), None),
    };
    if !is_ident(name) {
        return None;
    }
    // `{_clickid}` is the unencoded form in some trackers.
    let (name, raw_prefix) = match name.strip_prefix('_') {
        Some(rest) if is_ident(rest) => (rest, true),
        _ => (name, false),
    };
    let base = match name {
        "rand" | "random" | "uuid" => "uuid()".to_string(),
        n => n.to_string(),
    };
    let expr = match modifier {
        None => base,
        Some("raw") => format!("{base} | raw"),
        Some("hash") | Some("sha256") => format!("{base} | sha256"),
        Some("md5") => format!("{base} | md5"),
        Some("lower") => format!("{base} | lower"),
        Some("upper") => format!("{base} | upper"),
        Some("urlencode") => base,
        Some(m) if m.contains('=') => {
            let pairs: Vec<String> = m
                .split_whitespace()
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
                .collect();
            format!("{base} | value_map({{{}}})", pairs.join(", "))
        }
        Some(m) if name == "date" || name == "time" || name == "timestamp" => {
            let (fmt, tz) = match m.rsplit_once(',') {
                Some((f, tz)) => (f, Some(tz.trim())),
                None => (m, None),
            };
            match tz {
                Some(tz) => format!("timestamp | date({}, {})", quote(fmt), quote(tz)),
                None => format!("timestamp | date({})", quote(fmt)),
            }
        }
        Some(_) => return None,
    };
    Some(if raw_prefix {
        format!("{expr} | raw")
    } else {
        expr
    })
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod tests;
