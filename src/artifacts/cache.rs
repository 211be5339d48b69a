//! vexec's cache directory: boot artifacts stored by content key, each
//! entry sealed when written and checked when used.
//!
//! An entry is a directory `KIND/KEY/` holding `data` (a file, or a
//! directory of files) and `seal`: every file's size and content hash, and
//! its identity on disk (inode, change time) when it was written. The entry
//! is assembled in a temporary directory beside it and renamed into place,
//! so concurrent runs and interrupted writes never leave a half-written
//! entry. On use, a file whose identity is unchanged is trusted (a stat);
//! one that changed is hashed, and an entry that no longer matches its seal
//! is removed and rebuilt, with a one-line notice: vexec never boots a
//! truncated kernel or initramfs.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The cache root (`$XDG_CACHE_HOME/vexec`, else `~/.cache/vexec`).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// A cache operation failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cache {path}: {source}; check its permissions and free space, or set XDG_CACHE_HOME to a writable directory"
)]
pub struct CacheError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// One entry, as `vexec cache list` shows it.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub kind: String,
    pub key: String,
    pub bytes: u64,
    /// When it was last used (its directory's modification time).
    pub used: SystemTime,
    pub path: PathBuf,
}

/// What a seal records of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileSeal {
    /// Path below `data` ("" when `data` is the file itself).
    name: String,
    len: u64,
    blake3: String,
    ino: u64,
    ctime_ns: i64,
}

/// Temporary directories older than this are leftovers of a killed run.
const STALE: Duration = Duration::from_secs(3600);
const DATA: &str = "data";
const SEAL: &str = "seal";
const TMP_PREFIX: &str = ".tmp-";

impl Cache {
    /// Opens (creating) the cache at `root`.
    pub fn open(root: PathBuf) -> Result<Self, CacheError> {
        let err = |source| CacheError {
            path: root.clone(),
            source,
        };
        // The shared temp dir's fallback: another user could have made it
        // first and planted an initramfs or a snapshot there.
        let fallback = shared_fallback();
        if root == fallback.join("vexec") {
            for d in [&fallback, &root] {
                private_dir(d, uid()).map_err(err)?;
            }
        }
        std::fs::create_dir_all(&root).map_err(err)?;
        Ok(Cache { root })
    }

    /// The default location for the current user.
    pub fn default_root(xdg_cache_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
        xdg_cache_home
            .filter(|p| p.is_absolute())
            .or_else(|| home.map(|h| h.join(".cache")))
            .unwrap_or_else(shared_fallback)
            .join("vexec")
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The data of entry `kind/key` when it is present and matches its
    /// seal. A damaged entry is removed (with a notice) and None returned,
    /// so the caller builds it again.
    pub fn get(&self, kind: &str, key: &str) -> Option<PathBuf> {
        let dir = self.root.join(kind).join(key);
        if !dir.exists() {
            return None;
        }
        match check(&dir) {
            Ok(()) => {
                self.touch(kind, key);
                Some(dir.join(DATA))
            }
            Err(why) => {
                crate::say!("vexec: cache entry {kind}/{key} is damaged ({why}); rebuilding it");
                remove_entry(&dir);
                None
            }
        }
    }

    /// Removes entry `kind/key`, if present.
    pub fn remove(&self, kind: &str, key: &str) {
        remove_entry(&self.root.join(kind).join(key));
    }

    /// Removes what vexec keeps beside its entries: lock files nobody
    /// holds (`*-locks/`) and empty scratch directories (`tmp/`).
    pub fn remove_leftovers(&self) {
        let Ok(kinds) = std::fs::read_dir(&self.root) else {
            return;
        };
        for kind in kinds.flatten() {
            let name = kind.file_name().to_string_lossy().into_owned();
            if name.ends_with("-locks") {
                for f in std::fs::read_dir(kind.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let Ok(file) = std::fs::File::open(f.path()) else {
                        continue;
                    };
                    if file.try_lock().is_ok() {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
                let _ = std::fs::remove_dir(kind.path());
            } else if name == "tmp" {
                let _ = std::fs::remove_dir(kind.path());
            }
        }
    }

    /// Records that entry `kind/key` was used now (for [`Cache::entries`]'s
    /// last use, which eviction goes by).
    pub fn touch(&self, kind: &str, key: &str) {
        if let Ok(dir) = std::fs::File::open(self.root.join(kind).join(key)) {
            let _ = dir.set_modified(SystemTime::now());
        }
    }

    /// Every sealed entry of every kind (the kernel store is not one).
    pub fn entries(&self) -> Vec<EntryInfo> {
        let mut out = Vec::new();
        let Ok(kinds) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for kind in kinds.flatten() {
            let Ok(keys) = std::fs::read_dir(kind.path()) else {
                continue;
            };
            for e in keys.flatten() {
                let path = e.path();
                if !path.join(SEAL).is_file() {
                    continue;
                }
                out.push(EntryInfo {
                    kind: kind.file_name().to_string_lossy().into_owned(),
                    key: e.file_name().to_string_lossy().into_owned(),
                    bytes: size_of(&path.join(DATA)),
                    used: e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                    path,
                });
            }
        }
        out.sort_by(|a, b| (&a.kind, &a.key).cmp(&(&b.kind, &b.key)));
        out
    }

    /// Stores `bytes` as entry `kind/key`; returns the path of its data.
    pub fn put(&self, kind: &str, key: &str, bytes: &[u8]) -> Result<PathBuf, CacheError> {
        self.put_with(kind, key, |data| {
            std::fs::File::create(data)?.write_all(bytes)
        })
    }

    /// Stores entry `kind/key` whose data `fill` writes at the path it is
    /// given (a file, or a directory it creates); returns the data's path.
    /// When another run stored the same entry first, theirs is kept.
    pub fn put_with(
        &self,
        kind: &str,
        key: &str,
        fill: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<PathBuf, CacheError> {
        let parent = self.root.join(kind);
        let final_dir = parent.join(key);
        let err = |source| CacheError {
            path: final_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&parent).map_err(err)?;
        sweep_stale(&parent);
        // The writer's pid in the name: a sweep knows a dead writer's
        // leftovers at once.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(err)?;
        let data = tmp.path().join(DATA);
        fill(&data).map_err(err)?;
        let seal = serde_json::to_vec(&seal_of(&data).map_err(err)?)
            .map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(tmp.path().join(SEAL), seal).map_err(err)?;
        // On disk before the rename publishes it: after a crash an entry
        // is whole or absent, never sealed over data that was not written.
        sync_tree(tmp.path()).map_err(err)?;
        match std::fs::rename(tmp.path(), &final_dir) {
            Ok(()) => {
                // Renamed away: nothing left for the TempDir to remove.
                let _ = tmp.keep();
                let _ = std::fs::File::open(&parent).and_then(|d| d.sync_all());
            }
            // Another run stored it first (ENOTEMPTY/EEXIST): keep theirs.
            Err(_) if final_dir.join(SEAL).exists() => {}
            Err(e) => return Err(err(e)),
        }
        Ok(final_dir.join(DATA))
    }
}

/// fsyncs every file and directory under `dir`, `dir` included.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else if e.file_type()?.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Whether the entry in `dir` still matches its seal; why not otherwise.
fn check(dir: &Path) -> Result<(), String> {
    let seal = std::fs::read(dir.join(SEAL)).map_err(|e| format!("its seal: {e}"))?;
    let files: Vec<FileSeal> =
        serde_json::from_slice(&seal).map_err(|e| format!("its seal is unreadable: {e}"))?;
    let data = dir.join(DATA);
    for f in &files {
        let path = if f.name.is_empty() {
            data.clone()
        } else {
            data.join(&f.name)
        };
        let shown = if f.name.is_empty() { DATA } else { &f.name };
        let m = std::fs::metadata(&path).map_err(|e| format!("{shown}: {e}"))?;
        if m.len() != f.len {
            return Err(format!(
                "{shown} has {} bytes, {} were written",
                m.len(),
                f.len
            ));
        }
        if (m.ino(), ctime_ns(&m)) == (f.ino, f.ctime_ns) {
            continue;
        }
        // Touched since it was written (or copied): compare contents.
        if hash_file(&path).map_err(|e| format!("{shown}: {e}"))? != f.blake3 {
            return Err(format!("{shown} changed since it was written"));
        }
    }
    if files.is_empty() {
        return Err("its seal lists no files".into());
    }
    Ok(())
}

/// The seal of `data`: one entry for a file, one per file for a directory.
fn seal_of(data: &Path) -> std::io::Result<Vec<FileSeal>> {
    let mut files = Vec::new();
    let mut stack = vec![(data.to_path_buf(), String::new())];
    while let Some((path, name)) = stack.pop() {
        let m = std::fs::symlink_metadata(&path)?;
        if m.is_dir() {
            for e in std::fs::read_dir(&path)? {
                let e = e?;
                let child = e.file_name().to_string_lossy().into_owned();
                let rel = if name.is_empty() {
                    child
                } else {
                    format!("{name}/{child}")
                };
                stack.push((e.path(), rel));
            }
        } else if m.is_file() {
            files.push(FileSeal {
                name,
                len: m.len(),
                blake3: hash_file(&path)?,
                ino: m.ino(),
                ctime_ns: ctime_ns(&m),
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    // An empty file still counts: "no PVH entry" is recorded that way.
    Ok(files)
}

/// The bytes a file or directory tree takes (its files' lengths).
fn size_of(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|es| es.flatten().map(|e| size_of(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn ctime_ns(m: &std::fs::Metadata) -> i64 {
    m.ctime() * 1_000_000_000 + m.ctime_nsec()
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Removes a damaged entry: renamed aside first, so no run sees it half
/// deleted.
fn remove_entry(dir: &Path) {
    let Some(parent) = dir.parent() else { return };
    let aside = parent.join(format!(
        "{TMP_PREFIX}damaged-{}-{}",
        std::process::id(),
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    if std::fs::rename(dir, &aside).is_ok() {
        let _ = std::fs::remove_dir_all(&aside);
    }
}

/// Removes temporary directories that a killed run left behind: its
/// writer is gone, or it is older than any write takes.
pub(crate) fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE);
        let writer_gone = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .is_some_and(|pid| !alive(pid));
        if old || writer_gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether process `pid` exists (possibly another user's).
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The user's private directory in the shared temp dir, for a user with
/// neither `XDG_CACHE_HOME` nor `HOME` (the cache) or `XDG_RUNTIME_DIR`
/// (the VM registry).
pub fn shared_fallback() -> PathBuf {
    std::env::temp_dir().join(format!("vexec-{}", uid()))
}

/// Makes `d` (mode 0700), or checks that it is `uid`'s own directory and
/// makes it private; an error says why it cannot be used.
pub fn private_dir(d: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(d)?;
    if !m.is_dir() || m.uid() != uid {
        return Err(std::io::Error::other(format!(
            "it is not a directory owned by uid {uid} (another user made it?); remove it, or set XDG_CACHE_HOME and XDG_RUNTIME_DIR"
        )));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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
    fn a_private_dir_of_another_user_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let d = base.path().join("vexec-x");
        private_dir(&d, uid()).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        // Made by "another user": its owner is not the uid asked for.
        let e = private_dir(&d, uid() + 1).unwrap_err();
        assert!(
            e.to_string().contains("not a directory owned by uid"),
            "{e}"
        );
    }
    use std::fs::OpenOptions;

    fn cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().join("c")).unwrap();
        (dir, c)
    }

    #[test]
    fn stores_and_finds_an_entry() {
        let (_d, c) = cache();
        assert_eq!(c.get("k", "abc"), None);
        let p = c.put("k", "abc", b"hello").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert_eq!(c.get("k", "abc"), Some(p));
        // Only the entry: no temporary directory left behind.
        assert_eq!(std::fs::read_dir(c.root().join("k")).unwrap().count(), 1);
    }

    #[test]
    fn a_truncated_entry_is_dropped() {
        let (_d, c) = cache();
        let p = c.put("k", "abc", &[7u8; 4096]).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100)
            .unwrap();
        assert_eq!(c.get("k", "abc"), None);
        assert!(!c.root().join("k/abc").exists());
    }

    #[test]
    fn same_size_garbage_is_found_by_its_hash() {
        let (_d, c) = cache();
        let p = c.put("k", "abc", b"good bytes").unwrap();
        std::fs::write(&p, b"evil bytes").unwrap();
        assert_eq!(c.get("k", "abc"), None);
    }

    #[test]
    fn a_copied_entry_is_rehashed_and_kept() {
        let (_d, c) = cache();
        let p = c.put("k", "abc", b"content").unwrap();
        // A new inode with the same bytes (a backup restored, say).
        let copy = p.with_extension("copy");
        std::fs::copy(&p, &copy).unwrap();
        std::fs::rename(&copy, &p).unwrap();
        assert_eq!(c.get("k", "abc"), Some(p));
    }

    #[test]
    fn directories_are_sealed_file_by_file() {
        let (_d, c) = cache();
        let p = c
            .put_with("idx", "k", |d| {
                std::fs::create_dir(d)?;
                std::fs::write(d.join("a.bin"), b"aaaa")?;
                std::fs::write(d.join("b.bin"), b"")
            })
            .unwrap();
        assert_eq!(c.get("idx", "k"), Some(p.clone()));
        std::fs::remove_file(p.join("a.bin")).unwrap();
        assert_eq!(c.get("idx", "k"), None);
    }

    #[test]
    fn an_entry_without_a_seal_is_damaged() {
        let (_d, c) = cache();
        std::fs::create_dir_all(c.root().join("k/abc")).unwrap();
        std::fs::write(c.root().join("k/abc/data"), b"x").unwrap();
        assert_eq!(c.get("k", "abc"), None);
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let (_d, c) = cache();
        let e = c
            .put_with("k", "abc", |d| {
                std::fs::write(d, b"partial")?;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert!(e.to_string().contains("free space"), "{e}");
        assert_eq!(std::fs::read_dir(c.root().join("k")).unwrap().count(), 0);
    }

    #[test]
    fn the_first_writer_wins_a_race() {
        let (_d, c) = cache();
        let a = c.put("k", "abc", b"same").unwrap();
        let b = c.put("k", "abc", b"same").unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read_dir(c.root().join("k")).unwrap().count(), 1);
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
