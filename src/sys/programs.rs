//! Finding programs as a shell would, and quoting words for one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// True for a regular file someone may execute.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Every `name` along `path_var`, in search order, executable or not.
pub fn candidates_on_path(name: &str, path_var: Option<&OsStr>) -> Vec<PathBuf> {
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .collect()
}

/// The first executable `name` along `path_var`, as a shell finds it.
pub fn on_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    candidates_on_path(name, path_var)
        .into_iter()
        .find(|p| is_executable(p))
}

/// `s` quoted for `sh` (left bare when it needs no quotes).
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=/,.:+@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(quote("uname"), "uname");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn finds_the_first_executable_along_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(a.join("tool"), "not executable").unwrap();
        std::fs::write(b.join("tool"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(on_path("tool", Some(&path)), Some(b.join("tool")));
        assert_eq!(on_path("none", Some(&path)), None);
        assert_eq!(candidates_on_path("tool", Some(&path)).len(), 2);
    }
}
