//! Secrets that never need to be written into git: `${env:NAME}`, `${env:NAME:-fallback}`
//! and `${file:PATH}`.

/// Expands every `${env:NAME}` and `${file:PATH}` in `s`. Returns the text and the secret
/// values found (for masking in logs).
pub fn expand(s: &str) -> Result<(String, Vec<String>), String> {
    let mut out = String::with_capacity(s.len());
    let mut found = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
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
        out.push_str(&value);
        found.push(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file() {
        std::env::set_var("POSTBACKD_TEST_SECRET", "s3cret");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, "filetok\n").unwrap();
        let (text, found) = expand(&format!(
            "a=${{env:POSTBACKD_TEST_SECRET}}&b=${{file:{}}}",
            f.display()
        ))
        .unwrap();
        assert_eq!(text, "a=s3cret&b=filetok");
        assert_eq!(found, vec!["s3cret".to_string(), "filetok".to_string()]);
        assert!(expand("${env:POSTBACKD_SURELY_UNSET_VAR}")
            .unwrap_err()
            .contains("not set"));
        assert!(expand("${vault:x}").is_err());
        assert_eq!(
            expand("${env:POSTBACKD_SURELY_UNSET_VAR:-dev}").unwrap().0,
            "dev"
        );
        assert_eq!(expand("plain {clickid}").unwrap().0, "plain {clickid}");
    }
}
