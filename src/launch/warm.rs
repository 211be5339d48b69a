//! Warm start: a machine is booted once and saved the moment its agent is
//! ready (nothing host-backed mounted yet); later launches of the same
//! machine restore that state instead of booting. This module decides,
//! for each launch, what the session does (restore, boot and save, or
//! boot), keys saved states by everything that shapes the guest, and keeps
//! them: sealed cache entries, one writer per shape at a time, the least
//! recently used removed beyond a size cap.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::artifacts::cache::{self, Cache};
use crate::host::session::{Ready, Restore, Saver, Warm};
use crate::protocol::VERSION;
use crate::vm::qemu::{self, Backend, QemuConfig};
use crate::vm::qmp::Qmp;
use crate::vm::snapshot::{self, SaveError};

/// The cache kind of saved guests.
pub const KIND: &str = "snapshot";
/// The cache kind recording machines QEMU refused to save.
const REFUSED: &str = "snapshot-refused";
const STATE: &str = "state";
const READY: &str = "ready.json";
/// Changes whenever what a saved state holds changes meaning.
const FORMAT: &[u8] = b"vexec-snapshot-1";
/// The longest a save may take.
const SAVE_LIMIT: Duration = Duration::from_secs(60);
/// The default size cap of all saved guests together.
pub const DEFAULT_CAP: u64 = 2 << 30;

/// Warm start for the launches of one run.
#[derive(Debug, Clone)]
pub struct WarmStart {
    /// Why this run boots cold; None when warm start is on.
    cold: Option<String>,
    cache: Cache,
    /// The size cap of all saved guests, bytes.
    cap: u64,
    verbose: bool,
    quiet: bool,
}

impl WarmStart {
    /// Warm start as allowed (`cold`: why not), kept in `cache`.
    pub fn new(cold: Option<String>, cache: Cache, cap: u64, verbose: bool, quiet: bool) -> Self {
        WarmStart {
            cold,
            cache,
            cap,
            verbose,
            quiet,
        }
    }

    /// What the session does for a launch of `config`.
    pub fn mode(&self, config: &QemuConfig) -> Warm {
        if let Some(why) = self.cold.as_deref().or_else(|| unsaveable(config)) {
            self.note(&format!("cold boot ({why})"));
            return Warm::Cold;
        }
        let key = shape_key(config);
        if let Some(r) = self.restorable(&key) {
            self.note(&format!(
                "warm start (snapshot {}, {:.0} MB)",
                &key[..12],
                r.state.metadata().map_or(0, |m| m.len()) as f64 / 1e6
            ));
            return Warm::Restore(r);
        }
        if let Some(path) = self.cache.get(REFUSED, &key) {
            let why = std::fs::read_to_string(path).unwrap_or_default();
            self.note(&format!(
                "cold boot (QEMU refused to save this machine: {why})"
            ));
            return Warm::Cold;
        }
        let Some(lock) = lock(self.cache.root(), &key) else {
            self.note("cold boot (another vexec is saving this machine now)");
            return Warm::Cold;
        };
        self.note(
            "cold boot (no snapshot of this machine yet; saving one when the guest is ready)",
        );
        Warm::Save(Box::new(SaveJob {
            warm: self.clone(),
            key,
            _lock: lock,
        }))
    }

    /// A restore of `config`'s snapshot failed: it is removed, so the next
    /// launch boots and saves it again.
    pub fn discard(&self, config: &QemuConfig, why: &str) {
        let first = why.lines().next().unwrap_or(why);
        if !self.quiet {
            crate::say!(
                "vexec: warning: the saved guest could not be restored ({first}); booting instead, and saving it again"
            );
        }
        self.cache.remove(KIND, &shape_key(config));
    }

    /// The cache root (where KVM's verdict is kept too).
    pub fn cache_root(&self) -> &Path {
        self.cache.root()
    }

    fn note(&self, what: &str) {
        if self.verbose {
            crate::say!("vexec: {what}");
        }
    }

    /// The saved guest of shape `key`, when there is a sound one.
    fn restorable(&self, key: &str) -> Option<Restore> {
        let data = self.cache.get(KIND, key)?;
        let ready: Ready = serde_json::from_slice(&std::fs::read(data.join(READY)).ok()?).ok()?;
        let state = File::open(data.join(STATE)).ok()?;
        (ready.version == VERSION).then_some(Restore { state, ready })
    }
}

/// Why a machine cannot be saved, known without asking QEMU.
fn unsaveable(config: &QemuConfig) -> Option<&'static str> {
    // QEMU 7.2 cannot migrate vhost-user-fs; adding the device after a
    // restore works, but its shared memory must then be fd-backed, and
    // loading a saved state into that touches every page (measured: the
    // whole guest RAM resident, a restore slower than with 9p). `auto`
    // still prefers virtio-fs: 9p has a rare hang under heavy load that is
    // not understood yet (docs/warm-start.md).
    config
        .shares
        .iter()
        .any(|s| matches!(s.backend, Backend::Virtiofs { .. }))
        .then_some(
            "virtio-fs: QEMU 7.2 cannot save a machine with its device; --transport 9p starts warm",
        )
}

/// Saves one booted guest as the snapshot of its shape.
struct SaveJob {
    warm: WarmStart,
    key: String,
    /// Held while saving: one writer per shape.
    _lock: File,
}

impl Saver for SaveJob {
    fn save(&mut self, q: &mut Qmp, ready: &Ready) {
        let t = Instant::now();
        let mut refused = None;
        let saved = self.warm.cache.put_with(KIND, &self.key, |data| {
            std::fs::create_dir(data)?;
            snapshot::save(q, &data.join(STATE), SAVE_LIMIT).map_err(|e| {
                if let SaveError::Refused(why) = &e {
                    refused = Some(why.clone());
                }
                std::io::Error::other(e)
            })?;
            std::fs::write(data.join(READY), serde_json::to_vec(ready)?)
        });
        let w = &self.warm;
        match (saved, refused) {
            (Ok(data), _) => {
                let bytes = std::fs::metadata(data.join(STATE)).map_or(0, |m| m.len());
                w.note(&format!(
                    "saved the booted guest for warm starts ({:.0} MB in {:.2}s)",
                    bytes as f64 / 1e6,
                    t.elapsed().as_secs_f64()
                ));
                evict(&w.cache, w.cap, &self.key);
            }
            (Err(_), Some(why)) => {
                let _ = w.cache.put(REFUSED, &self.key, why.as_bytes());
                if !w.quiet {
                    crate::say!(
                        "vexec: warm start is not possible for this machine ({why}); it boots cold (said once)"
                    );
                }
            }
            (Err(e), None) if !w.quiet => crate::say!(
                "vexec: warning: could not save the booted guest for warm starts: {e}; the run goes on"
            ),
            (Err(_), None) => {}
        }
    }
}

/// The key of everything that shapes a saved guest: QEMU's command line
/// with what differs per run taken out (descriptor numbers, the host
/// directories behind shares, which the guest has not touched), the files
/// it names (by identity), and the protocol.
pub fn shape_key(config: &QemuConfig) -> String {
    let mut c = config.clone();
    (c.console_fd, c.control_fd, c.qmp_fd, c.incoming_fd) = (3, 4, None, None);
    c.exec_port_fds.fill(-1);
    c.qga_fd = c.qga_fd.map(|_| -1);
    for s in &mut c.shares {
        s.path = PathBuf::new();
        if let Backend::Virtiofs { fd } = &mut s.backend {
            *fd = -1;
        }
    }
    let mut parts: Vec<Vec<u8>> = vec![FORMAT.to_vec(), VERSION.to_le_bytes().to_vec()];
    parts.extend(qemu::argv(&c).iter().map(|a| a.as_bytes().to_vec()));
    for file in [
        Some(&c.binary),
        Some(&c.kernel),
        Some(&c.initrd),
        c.firmware.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        parts.push(identity(file));
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    cache::hash_parts(&refs)
}

/// A file's path and what changes when it is replaced or rewritten.
fn identity(path: &Path) -> Vec<u8> {
    let mut v = path.as_os_str().as_bytes().to_vec();
    if let Ok(m) = std::fs::metadata(path) {
        for n in [m.dev(), m.ino(), m.len()] {
            v.extend(n.to_le_bytes());
        }
        v.extend((m.mtime() * 1_000_000_000 + m.mtime_nsec()).to_le_bytes());
    }
    v
}

/// An exclusive hold on saving shape `key`, or None while another process
/// has it.
fn lock(root: &Path, key: &str) -> Option<File> {
    let dir = root.join("snapshot-locks");
    std::fs::create_dir_all(&dir).ok()?;
    let f = File::create(dir.join(key)).ok()?;
    // SAFETY: flock on a descriptor we own.
    let held = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    held.then_some(f)
}

/// Removes the least recently used saved guests until they fit in `cap`
/// bytes, never `keep` (the one just saved).
pub fn evict(cache: &Cache, cap: u64, keep: &str) {
    let mut entries: Vec<_> = cache
        .entries()
        .into_iter()
        .filter(|e| e.kind == KIND)
        .collect();
    entries.sort_by_key(|e| e.used);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    for e in entries {
        if total <= cap {
            break;
        }
        if e.key != keep {
            cache.remove(KIND, &e.key);
            total -= e.bytes;
        }
    }
}
