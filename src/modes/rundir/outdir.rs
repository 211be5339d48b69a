//! A batch run's output directory: `DIR/<timestamp>[-TAG...]/` holding
//! `serial`, `results/`, `run.json` and `coverage/`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The directory name for a run started at `when` with `tags`:
/// `20261123T235959Z-tag1-tag2` (UTC, sorts by time).
pub fn name(when: SystemTime, tags: &[String]) -> String {
    let stamp: String = humantime::format_rfc3339_seconds(when)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    std::iter::once(stamp)
        .chain(tags.iter().cloned())
        .collect::<Vec<_>>()
        .join("-")
}

/// Checks a `--tag` is usable in a directory name.
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.contains('/') || tag.starts_with('.') || tag.contains('\0') {
        return Err(format!(
            "--tag {tag:?}: a tag becomes part of a directory name; use a word without '/' that does not start with '.'"
        ));
    }
    Ok(())
}

/// Creates a fresh run directory under `root` (a suffix keeps two runs of
/// the same second apart) with `results/` in it.
pub fn create(root: &Path, tags: &[String]) -> Result<PathBuf, String> {
    let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    let err = |p: &Path, e: std::io::Error| {
        format!(
            "cannot create the output directory {}: {e}; pass a writable --output DIR",
            p.display()
        )
    };
    std::fs::create_dir_all(&root).map_err(|e| err(&root, e))?;
    let base = name(SystemTime::now(), tags);
    for n in 1.. {
        let dir = if n == 1 {
            root.join(&base)
        } else {
            root.join(format!("{base}.{n}"))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                std::fs::create_dir(dir.join("results")).map_err(|e| err(&dir, e))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(&dir, e)),
        }
    }
    unreachable!("an unbounded range ends only by returning")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_carry_tags() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_478_399);
        assert_eq!(name(t, &[]), "20261123T235959Z");
        assert_eq!(
            name(t, &["smoke".into(), "arm64".into()]),
            "20261123T235959Z-smoke-arm64"
        );
        assert!(check_tag("a/b").is_err() && check_tag("").is_err() && check_tag("ok").is_ok());
    }

    #[test]
    fn same_second_runs_get_their_own_directory() {
        let d = tempfile::tempdir().unwrap();
        let a = create(d.path(), &["x".into()]).unwrap();
        let b = create(d.path(), &["x".into()]).unwrap();
        assert_ne!(a, b);
        assert!(a.join("results").is_dir() && b.join("results").is_dir());
    }
}
