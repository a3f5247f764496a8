//! What git knows about a config directory: the commit it is at, and who last changed each
//! line. Optional: without git, or outside a checkout, there is simply no git information.

use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// The commit a config directory is checked out at.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GitInfo {
    pub commit: String,
    pub author: String,
    pub date: String,
    pub subject: String,
    /// Files under the directory differ from the commit.
    pub dirty: bool,
}

/// Who last changed one line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LineChange {
    pub commit: String,
    pub author: String,
    pub date: String,
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The commit `dir` is at, if it is inside a git checkout.
pub fn head(dir: &Path) -> Option<GitInfo> {
    let log = git(
        dir,
        &[
            "log",
            "-1",
            "--format=%H%x00%an <%ae>%x00%cI%x00%s",
            "--",
            ".",
        ],
    )?;
    let mut parts = log.trim_end().split('\0');
    let commit = parts.next()?.to_string();
    if commit.is_empty() {
        return None;
    }
    let dirty =
        git(dir, &["status", "--porcelain", "--", "."]).is_some_and(|s| !s.trim().is_empty());
    Some(GitInfo {
        commit,
        author: parts.next().unwrap_or_default().to_string(),
        date: parts.next().unwrap_or_default().to_string(),
        subject: parts.next().unwrap_or_default().to_string(),
        dirty,
    })
}

/// Who last changed each line of `file` (1-based line → change). Empty when the file is
/// not tracked; lines not yet committed are left out.
pub fn blame(file: &Path) -> HashMap<u64, LineChange> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return HashMap::new();
    };
    let Some(out) = git(
        dir,
        &["blame", "--line-porcelain", "--", &name.to_string_lossy()],
    ) else {
        return HashMap::new();
    };
    let mut lines = HashMap::new();
    let mut commits: HashMap<String, LineChange> = HashMap::new();
    let (mut commit, mut line, mut author, mut mail, mut time) =
        (String::new(), 0u64, String::new(), String::new(), 0i64);
    for l in out.lines() {
        if l.starts_with('\t') {
            if !commit.starts_with("0000000") {
                let change = commits.entry(commit.clone()).or_insert_with(|| LineChange {
                    commit: commit.clone(),
                    author: format!("{author} {mail}"),
                    date: jiff::Timestamp::from_second(time)
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                });
                lines.insert(line, change.clone());
            }
        } else if let Some(v) = l.strip_prefix("author ") {
            author = v.to_string();
        } else if let Some(v) = l.strip_prefix("author-mail ") {
            mail = v.to_string();
        } else if let Some(v) = l.strip_prefix("author-time ") {
            time = v.parse().unwrap_or(0);
        } else {
            let mut f = l.split(' ');
            if let (Some(sha), Some(_), Some(final_line)) = (f.next(), f.next(), f.next()) {
                if sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    commit = sha.to_string();
                    line = final_line.parse().unwrap_or(0);
                }
            }
        }
    }
    lines
}
