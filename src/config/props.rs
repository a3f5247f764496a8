//! Property tests of config loading: the shipped `config/` and `examples/` directories
//! (the corpus) with one file cut, spliced or corrupted. Loading gives a plan or errors
//! that each name a file and say something, never a panic.

use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// Every YAML file of the shipped configs: (directory, file), the rule tests left out.
fn corpus() -> Vec<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("config")];
    for e in std::fs::read_dir(root.join("examples"))
        .into_iter()
        .flatten()
        .flatten()
    {
        dirs.push(e.path());
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(&d, &d, &mut out);
    }
    out.sort();
    out
}

fn walk(dir: &Path, at: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
    for e in std::fs::read_dir(at).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "tests") {
                walk(dir, &p, out);
            }
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push((dir.to_path_buf(), p));
        }
    }
}

fn copy(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            if e.file_name() != "tests" && e.file_name() != "data" {
                std::fs::create_dir_all(&dest).unwrap();
                copy(&p, &dest);
            }
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    DropLine(usize),
    DuplicateLine(usize),
    Replace(usize, &'static str),
    Insert(usize, &'static str),
}

const BITS: [&str; 14] = [
    ":",
    "-",
    " ",
    "\t",
    "{",
    "}",
    "[",
    "\"",
    "'",
    "\n",
    "\0",
    "${env:NOPE}",
    "{{ x | }}",
    "&a *a",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let bit = proptest::sample::select(&BITS[..]);
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::DropLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), bit.clone()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        (any::<usize>(), bit).prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let at = |i: usize| {
        let mut i = i % (text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let lines: Vec<&str> = text.lines().collect();
    let line = |i: usize| i % lines.len().max(1);
    match m {
        Mutation::Truncate(i) => text[..at(*i)].to_string(),
        Mutation::DropLine(i) => {
            let k = line(*i);
            lines
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != k)
                .map(|(_, l)| format!("{l}\n"))
                .collect()
        }
        Mutation::DuplicateLine(i) => {
            let k = line(*i);
            lines
                .iter()
                .enumerate()
                .flat_map(|(j, l)| if j == k { vec![*l, *l] } else { vec![*l] })
                .map(|l| format!("{l}\n"))
                .collect()
        }
        Mutation::Replace(i, b) => {
            let s = at(*i);
            let e = text[s..].chars().next().map_or(s, |c| s + c.len_utf8());
            format!("{}{b}{}", &text[..s], &text[e..])
        }
        Mutation::Insert(i, b) => {
            let s = at(*i);
            format!("{}{b}{}", &text[..s], &text[s..])
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_config_loads_or_says_where(pick in any::<proptest::sample::Index>(), m in mutation()) {
        let all = corpus();
        prop_assume!(!all.is_empty());
        let (dir, file) = &all[pick.index(all.len())];
        let tmp = tempfile::tempdir().unwrap();
        copy(dir, tmp.path());
        let rel = file.strip_prefix(dir).unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        std::fs::write(tmp.path().join(rel), apply(&text, &m)).unwrap();
        if let Err(errs) = super::load_dir(tmp.path()) {
            prop_assert!(!errs.0.is_empty());
            for e in &errs.0 {
                prop_assert!(!e.message.is_empty(), "{:?}", e);
                prop_assert!(!e.file.as_os_str().is_empty(), "{:?}", e);
            }
        }
    }
}
