//! Secrets that never need to be written into git: `${env:NAME}`, `${env:NAME:-fallback}`
//! and `${file:PATH}`.
//!
//! A reference is read into [`Piece`]s, so the compiler can place each secret where it is
//! used and know every form it takes there: inside a template it becomes a variable that
//! renders the value for sending and `***` for showing (so every encoding a template or
//! filter applies is applied to `***`, not searched for afterwards); elsewhere the value
//! and its masked twin are kept side by side. Errors name the reference, never its value.

/// A string read for references: literal text and secret values, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// The value and the reference as written (`${env:NAME}`), for messages.
    Secret {
        value: String,
        reference: String,
    },
}

/// The string with its values in place: what is sent.
pub fn real(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.as_str(),
            Piece::Secret { value, .. } => value.as_str(),
        })
        .collect()
}

/// The string with every secret shown as `***`: what people see.
pub fn masked(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.as_str(),
            Piece::Secret { .. } => "***",
        })
        .collect()
}

/// Whether any piece is a secret.
pub fn has_secret(pieces: &[Piece]) -> bool {
    pieces.iter().any(|p| matches!(p, Piece::Secret { .. }))
}

/// Reads every `${env:NAME}` and `${file:PATH}` in `s`.
pub fn expand(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            out.push(Piece::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated `${`: write ${env:NAME} or ${file:PATH}".into());
        };
        let spec = &after[..end];
        let value = match spec.split_once(':') {
            Some(("env", name)) => {
                let (name, fallback) = match name.split_once(":-") {
                    Some((n, f)) => (n.trim(), Some(f)),
                    None => (name.trim(), None),
                };
                match (std::env::var(name), fallback) {
                    (Ok(v), _) => v,
                    (Err(_), Some(f)) => f.to_string(),
                    (Err(_), None) => {
                        return Err(format!("environment variable `{name}` is not set"))
                    }
                }
            }
            Some(("file", path)) => std::fs::read_to_string(path.trim())
                .map(|v| v.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read secret file `{}`: {e}", path.trim()))?,
            _ => {
                return Err(format!(
                    "unknown reference `${{{spec}}}`: write ${{env:NAME}} or ${{file:PATH}}"
                ))
            }
        };
        out.push(Piece::Secret {
            value,
            reference: format!("${{{spec}}}"),
        });
        rest = &after[end + 1..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(Piece::Text(rest.to_string()));
    }
    Ok(out)
}

/// The name a template reads secret number `n` by.
pub fn variable(n: usize) -> String {
    format!("{PREFIX}{n}")
}

/// Names of secret variables start with this; a template cannot misspell one.
pub use crate::render::SECRET_PREFIX as PREFIX;

/// Template source for `pieces`: each secret becomes a variable, numbered from `first`.
/// Outside a `{{ }}` or `{% %}` block a secret is printed as it is (`raw`), as the text it
/// replaces would be; inside one it must be a whole quoted string (`{{ "${env:K}" | upper }}`),
/// which becomes the variable. Returns the source and the values in order.
pub fn template_source(pieces: &[Piece], first: usize) -> Result<(String, Vec<String>), String> {
    let mut src = String::new();
    let mut values = Vec::new();
    // The quote that must close a secret just placed inside a block.
    let mut closing: Option<(char, &str)> = None;
    for p in pieces {
        match p {
            Piece::Text(t) => {
                let t = match closing.take() {
                    Some((q, reference)) => t.strip_prefix(q).ok_or_else(|| whole(reference))?,
                    None => t.as_str(),
                };
                src.push_str(t);
            }
            Piece::Secret { value, reference } => {
                if let Some((_, r)) = closing {
                    return Err(whole(r));
                }
                let name = variable(first + values.len());
                values.push(value.clone());
                if inside_block(&src) {
                    let q = src
                        .chars()
                        .last()
                        .filter(|c| *c == '"' || *c == '\'')
                        .ok_or_else(|| whole(reference))?;
                    src.pop();
                    src.push_str(&name);
                    closing = Some((q, reference));
                } else {
                    src.push_str("{{ ");
                    src.push_str(&name);
                    src.push_str(" | raw }}");
                }
            }
        }
    }
    match closing {
        Some((_, r)) => Err(whole(r)),
        None => Ok((src, values)),
    }
}

fn whole(reference: &str) -> String {
    format!("{reference} inside {{{{ }}}} must be a whole quoted string, like {{{{ \"{reference}\" | upper }}}}")
}

/// Whether the end of `src` is inside an unclosed `{{` or `{%`.
fn inside_block(src: &str) -> bool {
    let open = src.rfind("{{").max(src.rfind("{%"));
    let close = src.rfind("}}").max(src.rfind("%}"));
    match (open, close) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(v: &str, r: &str) -> Piece {
        Piece::Secret {
            value: v.into(),
            reference: r.into(),
        }
    }

    #[test]
    fn env_file_and_fallback() {
        // Only this test reads these names; nothing sets them while tests run.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, "filetok\n").unwrap();
        let pieces = expand(&format!("a=${{file:{}}}&b=1", f.display())).unwrap();
        assert_eq!(real(&pieces), "a=filetok&b=1");
        assert_eq!(masked(&pieces), "a=***&b=1");
        assert!(expand("${env:POSTBACKD_SURELY_UNSET_VAR}")
            .unwrap_err()
            .contains("not set"));
        assert!(expand("${vault:x}").is_err());
        let dev = expand("${env:POSTBACKD_SURELY_UNSET_VAR:-dev}").unwrap();
        assert_eq!(real(&dev), "dev");
        assert_eq!(masked(&dev), "***");
        assert_eq!(real(&expand("plain {clickid}").unwrap()), "plain {clickid}");
        assert!(!has_secret(&expand("").unwrap()));
    }

    #[test]
    fn secrets_become_variables_in_templates() {
        let p = vec![
            Piece::Text("https://t.example/?k=".into()),
            secret("v1", "${env:K}"),
            Piece::Text("&u={{ \"".into()),
            secret("v2", "${env:U}"),
            Piece::Text("\" | upper }}".into()),
        ];
        let (src, values) = template_source(&p, 3).unwrap();
        assert_eq!(
            src,
            "https://t.example/?k={{ __secret_3 | raw }}&u={{ __secret_4 | upper }}"
        );
        assert_eq!(values, vec!["v1".to_string(), "v2".to_string()]);
        let bad = vec![Piece::Text("{{ 1 + ".into()), secret("v", "${env:K}")];
        let err = template_source(&bad, 0).unwrap_err();
        assert!(err.contains("${env:K}") && !err.contains(" v "), "{err}");
    }
}
