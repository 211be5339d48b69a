//! The directories a run shares beyond the read-only root: checked, made
//! absolute and canonical, de-duplicated, and ordered parents first so
//! nested shares mount on top of their parents.

use std::path::{Path, PathBuf};

use crate::protocol::ShareMode;

/// One share as the user asked for it (`--rw`, `--ro`, `--overlay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRequest {
    pub path: PathBuf,
    pub mode: ShareMode,
}

/// A share that can be mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedShare {
    /// Canonical host path; the guest mounts it at the same path.
    pub path: PathBuf,
    pub mode: ShareMode,
}

/// A share that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot share {path}: {source}; check that the directory exists and is readable")]
    Unusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot share {0}: it is not a directory; share the directory that holds it")]
    NotDirectory(PathBuf),
    #[error(
        "cannot share / itself: the guest always sees the host root read-only with a throwaway overlay; share directories below it"
    )]
    Root,
    #[error("{0} is given as more than one kind of share; keep one of --rw, --ro and --overlay")]
    Conflict(PathBuf),
}

fn flag(mode: ShareMode) -> &'static str {
    match mode {
        ShareMode::ReadWrite => "--rw",
        ShareMode::ReadOnly => "--ro",
        ShareMode::Overlay => "--overlay",
    }
}

/// Resolves the requests against `cwd`, adding the working directory as a
/// read-write share when `share_cwd` (unless it is / or already listed).
pub fn resolve(
    requests: &[ShareRequest],
    cwd: &Path,
    share_cwd: bool,
) -> Result<Vec<ResolvedShare>, ShareError> {
    let mut out: Vec<ResolvedShare> = Vec::new();
    for r in requests {
        let abs = cwd.join(&r.path);
        let path = std::fs::canonicalize(&abs).map_err(|source| ShareError::Unusable {
            path: abs.clone(),
            source,
        })?;
        let meta = std::fs::metadata(&path).map_err(|source| ShareError::Unusable {
            path: abs.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ShareError::NotDirectory(abs));
        }
        if path == Path::new("/") {
            return Err(ShareError::Root);
        }
        match out.iter().find(|s| s.path == path) {
            Some(s) if s.mode == r.mode => {}
            Some(_) => return Err(ShareError::Conflict(path)),
            None => out.push(ResolvedShare { path, mode: r.mode }),
        }
    }
    if share_cwd && cwd != Path::new("/") && !out.iter().any(|s| s.path == cwd) {
        out.push(ResolvedShare {
            path: cwd.to_path_buf(),
            mode: ShareMode::ReadWrite,
        });
    }
    // Parents first; equal depths keep the user's order.
    out.sort_by_key(|s| s.path.components().count());
    Ok(out)
}

/// Describes the shares for `-v`.
pub fn describe(shares: &[ResolvedShare]) -> String {
    shares
        .iter()
        .map(|s| format!("{} {}", flag(s.mode), s.path.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &Path, mode: ShareMode) -> ShareRequest {
        ShareRequest {
            path: path.to_path_buf(),
            mode,
        }
    }

    #[test]
    fn resolves_orders_and_adds_cwd() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        let nested = root.join("a b/ü");
        std::fs::create_dir_all(&nested).unwrap();
        let cwd = root.join("a b");
        let got = resolve(
            &[
                req(Path::new("ü"), ShareMode::ReadOnly),
                req(&root, ShareMode::Overlay),
            ],
            &cwd,
            true,
        )
        .unwrap();
        let paths: Vec<_> = got.iter().map(|s| (s.path.clone(), s.mode)).collect();
        assert_eq!(
            paths,
            [
                (root.clone(), ShareMode::Overlay),
                (cwd.clone(), ShareMode::ReadWrite),
                (nested.clone(), ShareMode::ReadOnly),
            ]
        );
        // An explicit share of the cwd replaces the default one.
        let got = resolve(&[req(&cwd, ShareMode::ReadOnly)], &cwd, true).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].mode, ShareMode::ReadOnly);
        assert!(resolve(&[], Path::new("/"), true).unwrap().is_empty());
    }

    #[test]
    fn bad_shares_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = resolve(
            &[req(&d.path().join("nope"), ShareMode::ReadWrite)],
            d.path(),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let f = d.path().join("file");
        std::fs::write(&f, "x").unwrap();
        let e = resolve(&[req(&f, ShareMode::ReadWrite)], d.path(), false).unwrap_err();
        assert!(matches!(e, ShareError::NotDirectory(_)), "{e}");
        let e = resolve(
            &[req(Path::new("/"), ShareMode::ReadWrite)],
            d.path(),
            false,
        )
        .unwrap_err();
        assert!(matches!(e, ShareError::Root), "{e}");
        let e = resolve(
            &[
                req(d.path(), ShareMode::ReadWrite),
                req(d.path(), ShareMode::ReadOnly),
            ],
            d.path(),
            false,
        )
        .unwrap_err();
        assert!(matches!(e, ShareError::Conflict(_)), "{e}");
    }
}
