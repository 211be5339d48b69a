//! The directories a run shares beyond the read-only root: checked, made
//! absolute and canonical, de-duplicated, and ordered parents first so
//! nested shares mount on top of their parents. Also the check of a
//! `--root` directory, the guest's root instead of the host's.

use std::path::{Path, PathBuf};

use crate::protocol::ShareMode;

/// A `--root` that holds no system.
#[derive(Debug, thiserror::Error)]
#[error("--root {0}: not a root filesystem (no bin/ or usr/bin/ in it)")]
pub struct NotARoot(pub String);

/// `dir` as a guest root (canonical when it can be made so), if it looks
/// like one: a `bin` or a `usr/bin` in it.
pub fn root_dir(dir: &Path) -> Result<PathBuf, NotARoot> {
    if !(dir.join("bin").exists() || dir.join("usr/bin").is_dir()) {
        return Err(NotARoot(dir.display().to_string()));
    }
    Ok(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()))
}

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
    #[error(
        "cannot share {path}: it is the host's {what}; the guest has its own /proc, /sys and /dev, share a regular directory instead"
    )]
    Pseudo { path: PathBuf, what: &'static str },
    #[error(
        "cannot share the working directory {path}: {source}; vexec shares it so the command can write there. Run with --no-cwd to leave it unshared (over virtio-fs the command still starts in it, seen read-only through the root; 9p cannot walk into a directory it cannot read), or cd to a readable directory"
    )]
    UnreadableCwd {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a host pseudo filesystem is, by its statfs magic; None for a
/// regular filesystem. `/dev` and below is the host's device tree.
fn pseudo_filesystem(path: &Path) -> Option<&'static str> {
    if path.starts_with("/dev") && !path.starts_with("/dev/shm") {
        return Some("device tree (/dev)");
    }
    let c =
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).ok()?;
    // SAFETY: statfs fills a zeroed struct for a valid path string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let magic = st.f_type as u64;
    [
        (0x9fa0, "proc filesystem"),
        (0x6265_6572, "sysfs"),
        (0x6462_6720, "debugfs"),
        (0x7472_6163, "tracefs"),
        (0x7363_6673, "securityfs"),
        (0x6367_7270, "cgroup2 filesystem"),
        (0x0027_e0eb, "cgroup filesystem"),
        (0xcafe_4a11, "bpf filesystem"),
        (0x1cd1, "devpts filesystem"),
        (0x6265_6570, "configfs"),
        (0x6165_676c, "pstore filesystem"),
        (0xde5e_81e4, "efivarfs"),
        (0x4249_4e4d, "binfmt_misc filesystem"),
        (0x6e73_6673, "nsfs"),
    ]
    .iter()
    .find(|(m, _)| *m == magic)
    .map(|(_, what)| *what)
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
        if let Some(what) = pseudo_filesystem(&path) {
            return Err(ShareError::Pseudo { path, what });
        }
        // QEMU's or virtiofsd's own error for this would be cryptic.
        std::fs::read_dir(&path).map_err(|source| ShareError::Unusable {
            path: abs.clone(),
            source,
        })?;
        match out.iter().find(|s| s.path == path) {
            Some(s) if s.mode == r.mode => {}
            Some(_) => return Err(ShareError::Conflict(path)),
            None => out.push(ResolvedShare { path, mode: r.mode }),
        }
    }
    if share_cwd && cwd != Path::new("/") && !out.iter().any(|s| s.path == cwd) {
        std::fs::read_dir(cwd).map_err(|source| ShareError::UnreadableCwd {
            path: cwd.to_path_buf(),
            source,
        })?;
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

    #[test]
    fn pseudo_filesystems_are_refused() {
        for p in ["/proc", "/proc/self", "/sys", "/dev", "/dev/pts"] {
            let e = resolve(
                &[req(Path::new(p), ShareMode::ReadWrite)],
                Path::new("/"),
                false,
            )
            .unwrap_err();
            assert!(matches!(e, ShareError::Pseudo { .. }), "{p}: {e}");
            assert!(e.to_string().contains("share a regular directory"), "{e}");
        }
    }
}
