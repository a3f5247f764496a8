//! "did you mean …?": the closest known name to a misspelt one, for the hints of config
//! errors. A leaf: the config compiler, the template engine and the action kinds use it.

/// "did you mean `sub4`?" for a name close to a known one.
pub fn suggest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<String> {
    let lname = name.to_ascii_lowercase();
    // Short names are too easily "close" to anything; longer ones tolerate more typos.
    let limit = match lname.chars().count() {
        0..=2 => 0,
        3..=4 => 1,
        n => n / 2,
    };
    known
        .map(|k| (strsim::levenshtein(&lname, &k.to_ascii_lowercase()), k))
        .filter(|(d, _)| *d > 0 && *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!("did you mean `{k}`?"))
}
