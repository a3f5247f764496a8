//! Templates that are only text and `{{ name }}` macros, rendered without minijinja.
//!
//! Almost every postback template is a URL with a few macros in it. A compiled minijinja
//! template costs about 12 KiB of memory and its share of every reload, and a config with
//! 10,000 postbacks would spend most of its memory and reload time on them. A template
//! this module can read (literal text, and macros that are a variable path with at most
//! the filters `raw`, `sha256`, `sha256_raw`, `md5`, `lower`, `upper` and `digits`) is kept
//! as a list of parts instead; anything else goes to minijinja.
//!
//! Rendering one must give the bytes minijinja would give. Whatever this module is not
//! sure of (an undefined variable, a value that is a list or a map) it hands back to
//! minijinja by returning `None`, so errors read the same on both paths.

use super::template::{apply_escape, Escape};
use minijinja::Value;

/// A filter the simple path knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Raw,
    Sha256,
    Sha256Raw,
    Md5,
    Lower,
    Upper,
    Digits,
}

impl Filter {
    pub const ALL: [Filter; 7] = [
        Filter::Raw,
        Filter::Sha256,
        Filter::Sha256Raw,
        Filter::Md5,
        Filter::Lower,
        Filter::Upper,
        Filter::Digits,
    ];

    pub fn parse(name: &str) -> Option<Filter> {
        Filter::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Filter::Raw => "raw",
            Filter::Sha256 => "sha256",
            Filter::Sha256Raw => "sha256_raw",
            Filter::Md5 => "md5",
            Filter::Lower => "lower",
            Filter::Upper => "upper",
            Filter::Digits => "digits",
        }
    }

    /// What the filter of this name does, on both paths. A missing value is empty.
    pub fn apply(self, v: &Value) -> Value {
        let s = super::template::text_of(v);
        match self {
            Filter::Raw => Value::from_safe_string(s),
            Filter::Sha256 => Value::from(super::template::sha256_normalised(&s)),
            Filter::Sha256Raw => Value::from(super::template::sha256_hex(&s)),
            Filter::Md5 => Value::from(super::template::md5_hex(&s)),
            Filter::Lower => keep_safety(v, s.to_lowercase()),
            Filter::Upper => keep_safety(v, s.to_uppercase()),
            Filter::Digits => {
                Value::from(s.chars().filter(char::is_ascii_digit).collect::<String>())
            }
        }
    }
}

fn keep_safety(input: &Value, out: String) -> Value {
    if input.is_safe() {
        Value::from_safe_string(out)
    } else {
        Value::from(out)
    }
}

#[derive(Debug)]
enum Part {
    Text(Box<str>),
    Macro {
        path: Box<[Box<str>]>,
        filters: Box<[Filter]>,
    },
}

/// A template read by this module.
#[derive(Debug)]
pub struct Simple {
    parts: Box<[Part]>,
}

/// Words that are not variables in a jinja expression.
const KEYWORDS: &[&str] = &[
    "true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if", "else",
    "loop", "self", "super", "caller", "varargs", "kwargs",
];

impl Simple {
    /// Reads a (shorthand-expanded) template, or `None` when minijinja must compile it.
    /// Also returns the variables it reads, dotted, as minijinja's check would.
    pub fn parse(src: &str) -> Option<(Simple, Vec<String>)> {
        // minijinja drops one trailing newline by default.
        let src = src
            .strip_suffix("\r\n")
            .or_else(|| src.strip_suffix('\n'))
            .unwrap_or(src);
        let mut parts = Vec::new();
        let mut vars = Vec::new();
        let mut rest = src;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                parts.push(Part::Text(rest.into()));
                break;
            };
            match rest.as_bytes().get(open + 1) {
                Some(b'%') | Some(b'#') => return None,
                Some(b'{') => {}
                _ => {
                    // A lone brace is text; keep it with what follows.
                    let next = rest[open + 1..]
                        .find('{')
                        .map(|p| open + 1 + p)
                        .unwrap_or(rest.len());
                    push_text(&mut parts, &rest[..next]);
                    rest = &rest[next..];
                    continue;
                }
            }
            if open > 0 {
                push_text(&mut parts, &rest[..open]);
            }
            let body_start = open + 2;
            let close = rest[body_start..].find("}}")? + body_start;
            let (path, filters) = parse_macro(&rest[body_start..close])?;
            vars.push(path.join("."));
            parts.push(Part::Macro {
                path: path.into_iter().map(Box::from).collect(),
                filters: filters.into(),
            });
            rest = &rest[close + 2..];
        }
        vars.sort();
        vars.dedup();
        Some((
            Simple {
                parts: parts.into(),
            },
            vars,
        ))
    }

    /// Renders the template, or `None` to let minijinja render it (and say what is wrong).
    pub fn render(&self, ctx: &Value, escape: Escape) -> Option<String> {
        let mut out = String::new();
        for part in self.parts.iter() {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Macro { path, filters } => {
                    let mut v = ctx.clone();
                    for seg in path.iter() {
                        v = v.get_attr(seg).ok()?;
                        if v.is_undefined() {
                            return None;
                        }
                    }
                    if !matches!(
                        v.kind(),
                        minijinja::value::ValueKind::None
                            | minijinja::value::ValueKind::Bool
                            | minijinja::value::ValueKind::Number
                            | minijinja::value::ValueKind::String
                    ) {
                        return None;
                    }
                    for f in filters.iter() {
                        v = f.apply(&v);
                    }
                    apply_escape(&mut out, &v, escape)?;
                }
            }
        }
        Some(out)
    }
}

fn push_text(parts: &mut Vec<Part>, text: &str) {
    if let Some(Part::Text(prev)) = parts.last_mut() {
        let mut s = String::from(std::mem::take(prev));
        s.push_str(text);
        *prev = s.into();
    } else {
        parts.push(Part::Text(text.into()));
    }
}

/// `name.attr | filter | filter`, with nothing else: no whitespace control, calls,
/// literals, operators or filter arguments.
fn parse_macro(body: &str) -> Option<(Vec<&str>, Vec<Filter>)> {
    if body.starts_with('-') || body.ends_with('-') || body.starts_with('+') {
        return None;
    }
    let mut pieces = body.split('|');
    let path: Vec<&str> = pieces.next()?.trim().split('.').collect();
    if !path.iter().all(|s| is_name(s)) || KEYWORDS.contains(&path[0]) {
        return None;
    }
    let filters = pieces
        .map(|f| Filter::parse(f.trim()))
        .collect::<Option<Vec<_>>>()?;
    Some((path, filters))
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
