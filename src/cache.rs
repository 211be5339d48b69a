//! vexec's cache directory: boot artifacts stored by content hash, written
//! atomically so concurrent runs and interrupted writes never leave a
//! half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The cache root (`$XDG_CACHE_HOME/vexec`, else `~/.cache/vexec`).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// A cache operation failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cache {path}: {source}; check its permissions or set XDG_CACHE_HOME to a writable directory"
)]
pub struct CacheError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl Cache {
    /// Opens (creating) the cache at `root`.
    pub fn open(root: PathBuf) -> Result<Self, CacheError> {
        std::fs::create_dir_all(&root).map_err(|source| CacheError {
            path: root.clone(),
            source,
        })?;
        Ok(Cache { root })
    }

    /// The default location for the current user.
    pub fn default_root(xdg_cache_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
        xdg_cache_home
            .filter(|p| p.is_absolute())
            .or_else(|| home.map(|h| h.join(".cache")))
            .unwrap_or_else(|| std::env::temp_dir().join(format!("vexec-{}", uid())))
            .join("vexec")
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of an entry (`kind/key`), whether or not it exists.
    pub fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// Writes `data` to `path` atomically (temp file + rename).
    pub fn write(&self, path: &Path, data: &[u8]) -> Result<(), CacheError> {
        let err = |source| CacheError {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        tmp.write_all(data).map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// A hex content hash of several parts (lengths included, so parts cannot
/// run into each other).
pub fn hash_parts(parts: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex()[..32].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().join("c")).unwrap();
        let p = c.entry("k", "abc");
        c.write(&p, b"x").unwrap();
        c.write(&p, b"y").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"y");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn hash_separates_parts() {
        assert_ne!(hash_parts(&[b"ab", b"c"]), hash_parts(&[b"a", b"bc"]));
    }

    #[test]
    fn default_root_prefers_xdg() {
        assert_eq!(
            Cache::default_root(Some("/x".into()), Some("/h".into())),
            PathBuf::from("/x/vexec")
        );
        assert_eq!(
            Cache::default_root(Some("rel".into()), Some("/h".into())),
            PathBuf::from("/h/.cache/vexec")
        );
    }
}
