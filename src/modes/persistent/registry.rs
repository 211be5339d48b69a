//! Where persistent VMs are found: one private directory per VM under the
//! user's runtime directory, holding the lock its `up` process keeps for
//! as long as it lives, its control socket, what it is (`info.json`) and
//! its log. A directory whose lock nobody holds is a dead VM's.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::artifacts::cache;
use crate::modes::spec::RunSpec;

use super::VmsError;

/// What a persistent VM is, written by its `up` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    /// The `up` process, which owns QEMU.
    pub pid: u32,
    pub qemu_pid: Option<u32>,
    pub kernel: String,
    pub memory: String,
    pub cpus: u32,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The guest serves commands.
    pub ready: bool,
    /// Host directories the guest writes through to, by host path.
    pub writable: Vec<PathBuf>,
    /// The QEMU guest agent socket, when served.
    pub qga: Option<PathBuf>,
    /// How many commands may run at once.
    pub ports: usize,
    /// A one-shot run's command (a VM of `vexec up` has none).
    #[serde(default)]
    pub command: Option<String>,
    /// What every `vexec exec` in it starts from.
    #[serde(default)]
    pub defaults: ExecDefaults,
}

/// What `up` was told for the VM's commands (`-e`, `--unset-env`,
/// `--sudo`, `--timeout` and the config file's `[env]` and `sudo`): the
/// defaults of each `vexec exec` in it, which its own options override.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// Environment changes in order: a value sets the key, none removes it.
    pub env: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub sudo: bool,
    pub timeout_ms: Option<u64>,
}

impl ExecDefaults {
    /// The defaults `spec` (an `up`'s) sets.
    pub fn of(spec: &RunSpec) -> ExecDefaults {
        use std::os::unix::ffi::OsStrExt;
        let bytes = |s: &std::ffi::OsStr| s.as_bytes().to_vec();
        ExecDefaults {
            env: (spec.env_changes.0.iter())
                .map(|(k, v)| (bytes(k), v.as_deref().map(bytes)))
                .collect(),
            sudo: spec.sudo,
            timeout_ms: spec.timeout.map(|d| d.as_millis() as u64),
        }
    }

    /// The environment changes, to apply before the exec's own.
    pub fn env_changes(&self) -> crate::modes::spec::EnvChanges {
        use std::os::unix::ffi::OsStrExt;
        let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_os_string();
        crate::modes::spec::EnvChanges(
            (self.env.iter())
                .map(|(k, v)| (os(k), v.as_deref().map(os)))
                .collect(),
        )
    }
}

impl Info {
    /// A VM this process is starting now with `spec`'s memory and CPUs;
    /// `command` is a one-shot run's.
    pub fn starting(name: String, kernel: String, spec: &RunSpec, writable: Vec<PathBuf>) -> Info {
        Info {
            name,
            pid: std::process::id(),
            qemu_pid: None,
            kernel,
            memory: spec.memory.clone(),
            cpus: spec.cpus,
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ready: false,
            writable,
            qga: None,
            ports: 0,
            command: None,
            defaults: ExecDefaults::default(),
        }
    }
}

/// The directory of every VM of this user: `$XDG_RUNTIME_DIR/vexec/vms`,
/// else a private directory in the temp dir; made 0700 and checked to be
/// the user's own, so no other user can reach a VM's socket.
pub fn root() -> Result<PathBuf, VmsError> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("vexec").join("vms"),
        None => cache::shared_fallback().join("vms"),
    };
    for d in [dir.parent().unwrap_or(&dir), &dir] {
        private_dir(d, uid)?;
    }
    Ok(dir)
}

/// Makes `d` private to `uid` (see [`cache::private_dir`]).
fn private_dir(d: &Path, uid: u32) -> Result<(), VmsError> {
    cache::private_dir(d, uid).map_err(|e| VmsError::RuntimeDir {
        path: d.to_path_buf(),
        why: e.to_string(),
    })
}

/// Checks a VM name: it becomes a directory name.
pub fn check_name(name: &str) -> Result<(), VmsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(VmsError::BadName(name.to_string()))
    }
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
}

impl Entry {
    pub fn new(root: &Path, name: &str) -> Entry {
        Entry {
            dir: root.join(name),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCK)
    }

    /// Whether a live `up` process holds this VM's lock.
    pub fn alive(&self) -> bool {
        let Ok(f) = File::open(self.lock_path()) else {
            return false;
        };
        !crate::sys::files::try_lock(&f)
    }

    pub fn info(&self) -> Option<Info> {
        let text = std::fs::read(self.dir.join("info.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Says the VM serves (QEMU's pid for `ps`'s memory column).
    pub fn mark_ready(&self, info: &mut Info, qemu_pid: u32) {
        info.ready = true;
        info.qemu_pid = Some(qemu_pid);
        let _ = self.write_info(info);
    }

    /// Writes `info` atomically (readers never see half of it).
    pub fn write_info(&self, info: &Info) -> std::io::Result<()> {
        let tmp = self.dir.join("info.json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, self.dir.join("info.json"))
    }

    /// Takes the directory for a new VM: a dead VM's is cleared first; a
    /// live one's is refused. The lock is held while the file stays open.
    /// The directory is made and locked under a private name, then renamed
    /// into place: a VM directory is never seen unlocked while it starts,
    /// so a racing `up` or `down` cannot take it for a dead one's.
    pub fn claim(&self) -> Result<File, VmsError> {
        let name = self.name();
        let dir_err = |e: std::io::Error| VmsError::RuntimeDir {
            path: self.dir.clone(),
            why: e.to_string(),
        };
        if self.dir.exists() && !self.alive() {
            self.remove();
        }
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        sweep_stale_claims(parent);
        // 0700, a unique name, removed if anything below fails.
        let making = tempfile::Builder::new()
            .prefix(&format!("{CLAIMING}{name}-"))
            .tempdir_in(parent)
            .map_err(dir_err)?;
        let lock = File::create(making.path().join(LOCK)).map_err(dir_err)?;
        lock.try_lock()
            .map_err(|e| dir_err(std::io::Error::other(e)))?;
        match std::fs::rename(making.path(), &self.dir) {
            Ok(()) => {
                // Renamed away: nothing left for the TempDir to remove.
                let _ = making.keep();
                Ok(lock)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
                Err(VmsError::NameInUse(name))
            }
            Err(e) => Err(dir_err(e)),
        }
    }

    /// Removes the directory (sockets, info, log).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    pub fn name(&self) -> String {
        (self.dir.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The lock file in a VM's directory.
const LOCK: &str = "lock";
/// The prefix of a directory being claimed (not a VM yet; VM names never
/// start with a dot).
const CLAIMING: &str = ".claim-";

/// Removes directories that a process killed while claiming one left
/// (old enough that no claim can still be under way in them).
fn sweep_stale_claims(root: &Path) {
    let stale = |e: &std::fs::DirEntry| {
        e.file_name().to_string_lossy().starts_with(CLAIMING)
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 60))
    };
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if stale(&e) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes what one-shot runs that were killed left (their directories
/// say nothing worth keeping).
pub fn sweep_dead_runs(root: &Path) {
    for e in all(root) {
        if e.info().is_some_and(|i| i.command.is_some()) && !e.alive() {
            e.remove();
        }
    }
}

/// Every VM directory, by name.
pub fn all(root: &Path) -> Vec<Entry> {
    let mut v: Vec<Entry> = std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                // Not a VM (yet): a directory being claimed.
                .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| Entry { dir: e.path() })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|e| e.name());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_claims_of_one_name_give_it_to_one_and_leave_no_half_made_directory() {
        let root = tempfile::tempdir().unwrap();
        let won: Vec<bool> = std::thread::scope(|s| {
            let tries: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Entry::new(root.path(), "vm").claim()))
                .collect();
            let results: Vec<_> = tries.into_iter().map(|t| t.join().unwrap()).collect();
            // Every winner still holds its lock here.
            assert!(Entry::new(root.path(), "vm").alive());
            results.iter().map(Result::is_ok).collect()
        });
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["vm"]);
    }

    #[test]
    fn names_are_plain_directory_names() {
        for ok in ["dev", "a.b_c-1", "X"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "-x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_claimed_name_is_in_use_until_its_lock_goes() {
        let root = tempfile::tempdir().unwrap();
        let e = Entry::new(root.path(), "dev");
        let lock = e.claim().unwrap();
        assert!(e.alive());
        assert!(matches!(e.claim(), Err(VmsError::NameInUse(_))));
        drop(lock);
        assert!(!e.alive());
        // A dead VM's directory never blocks a new one.
        std::fs::write(e.socket(), b"stale").unwrap();
        let _again = e.claim().unwrap();
        assert!(!e.socket().exists());
    }
}
