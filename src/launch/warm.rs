//! Warm start: a machine is booted once and saved the moment its agent is
//! ready (nothing host-backed mounted yet); later launches of the same
//! machine restore that state instead of booting. This module decides,
//! for each launch, what the session does (restore, boot and save, or
//! boot), keys saved states by everything that shapes the guest, and keeps
//! them: sealed cache entries, one writer per shape at a time, the least
//! recently used removed beyond a size cap.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::artifacts::cache::{self, Cache};
use crate::host::params::{Ready, Restore, Saver, Warm};
use crate::protocol::VERSION;
use crate::vm::qemu::{self, Backend, QemuConfig};
use crate::vm::qmp::Qmp;
use crate::vm::snapshot::{self, SaveError};

/// The cache kind of saved guests.
pub const KIND: &str = "snapshot";
/// The cache kind recording machines that cannot be saved (QEMU refused,
/// or the guest never saw its plugged devices).
const REFUSED: &str = "snapshot-refused";
const STATE: &str = "state";
/// A saved guest's RAM, when kept apart from its state (virtio-fs).
const RAM: &str = "ram";
const READY: &str = "ready.json";
/// Changes whenever what a saved state holds changes meaning.
const FORMAT: &[u8] = b"vexec-snapshot-2";
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

    /// What the session does for a launch of `config`, and the machine it
    /// launches: a machine saved or restored with virtio-fs has its share
    /// devices plugged in once it runs (`hotplug`: its kernel takes them).
    pub fn mode(&self, config: &QemuConfig, hotplug: bool) -> (Warm, QemuConfig) {
        if let Some(why) = self.cold.as_deref().or_else(|| unsaveable(config, hotplug)) {
            self.note(&format!("cold boot ({why})"));
            return (Warm::Cold, config.clone());
        }
        let warm = saveable(config);
        match self.mode_of(&warm) {
            Warm::Cold => (Warm::Cold, config.clone()),
            mode => (mode, warm),
        }
    }

    /// What the session does for a launch of the saveable machine `config`.
    fn mode_of(&self, config: &QemuConfig) -> Warm {
        let key = shape_key(config);
        if let Some(r) = self.restorable(&key) {
            let bytes = |f: Option<&File>| f.and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
            self.note(&format!(
                "warm start (snapshot {}, {:.0} MB)",
                &key[..12],
                (bytes(Some(&r.state)) + bytes(r.ram.as_ref())) as f64 / 1e6
            ));
            return Warm::Restore(r);
        }
        if let Some(path) = self.cache.get(REFUSED, &key) {
            match Refusal::read(&path) {
                Some(r) if r.stands() => {
                    self.note(&format!(
                        "cold boot (this machine cannot be saved: {})",
                        r.why
                    ));
                    return Warm::Cold;
                }
                // Load or a slow host, not the machine: try saving again.
                _ => self.cache.remove(REFUSED, &key),
            }
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

    /// A restore of `config`'s snapshot failed (`config` as [`Self::mode`]
    /// gave it): it is removed, so the next launch boots and saves it again.
    /// After [`FAILED_LOADS_LIMIT`] failed restores of one machine within
    /// [`FAILED_LOADS_WINDOW`], the machine boots cold from then on (until
    /// it changes, or `vexec cache clean`), said once.
    pub fn discard(&self, config: &QemuConfig, why: &str) {
        let first = why.lines().next().unwrap_or(why);
        let key = shape_key(config);
        self.cache.remove(KIND, &key);
        let failures = self.failed_load(&key);
        if failures >= FAILED_LOADS_LIMIT {
            self.cache.remove(FAILED_LOADS, &key);
            let why = format!(
                "its saved guest could not be restored {failures} times within a day; the last time: {first}"
            );
            Refusal::keep(&self.cache, &key, &why, true);
            if !self.quiet {
                crate::say!(
                    "vexec: warning: {why}; booting instead, and warm start is off for this machine (`vexec cache clean` turns it back on)"
                );
            }
        } else if !self.quiet {
            crate::say!(
                "vexec: warning: the saved guest could not be restored ({first}); booting instead, and saving it again"
            );
        }
    }

    /// Records a failed restore of machine `key`; how many there were
    /// within [`FAILED_LOADS_WINDOW`], this one included.
    fn failed_load(&self, key: &str) -> usize {
        let now = now_secs();
        let mut times: Vec<u64> = (self.cache.get(FAILED_LOADS, key))
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        times.retain(|t| now.saturating_sub(*t) < FAILED_LOADS_WINDOW.as_secs());
        times.push(now);
        self.cache.remove(FAILED_LOADS, key);
        if let Ok(bytes) = serde_json::to_vec(&times) {
            let _ = self.cache.put(FAILED_LOADS, key, &bytes);
        }
        times.len()
    }

    /// Plugging in `config`'s share devices failed (`config` as
    /// [`Self::mode`] gave it): its snapshot is removed and the machine
    /// marked as one that boots with its devices, said once.
    pub fn refuse(&self, config: &QemuConfig, why: &str) {
        let first = why.lines().next().unwrap_or(why);
        let key = shape_key(config);
        self.cache.remove(KIND, &key);
        Refusal::keep(&self.cache, &key, first, false);
        if !self.quiet {
            crate::say!(
                "vexec: warning: {first}; booting with the devices instead (warm start is off for this machine for {} minutes)",
                REFUSAL_TTL.as_secs() / 60
            );
        }
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
        // Kept apart only for machines with virtio-fs.
        let ram = match data.join(RAM).exists() {
            true => Some(File::open(data.join(RAM)).ok()?),
            false => None,
        };
        (ready.version == VERSION).then_some(Restore { state, ram, ready })
    }
}

/// Why a machine cannot be saved, known without asking QEMU.
fn unsaveable(config: &QemuConfig, hotplug: bool) -> Option<&'static str> {
    // The second boot after a stall is a one-off machine: saved, it would
    // only add a snapshot no ordinary run restores.
    if config.stall_retry {
        return Some("booting again with single-threaded TCG after a stall");
    }
    // `acpi=off` leaves the guest blind to plugged devices.
    let acpi = !config.cmdline.split(' ').any(|a| a == "acpi=off");
    (config.has_virtiofs() && !(hotplug && acpi)).then_some(
        "virtio-fs: QEMU 7.2 cannot save a machine with its device, and this guest cannot take it plugged in later (that needs CONFIG_HOTPLUG_PCI_ACPI=y and no acpi=off); --transport 9p starts warm",
    )
}

/// `config` as a machine QEMU 7.2 can save: with virtio-fs, the share
/// devices are plugged in once it runs (QEMU cannot migrate vhost-user-fs),
/// and its RAM is shared memory the session owns, saved apart (loading a
/// whole migration stream into shared memory would make every page of it
/// resident; left out of the stream, only what the guest touched is).
fn saveable(config: &QemuConfig) -> QemuConfig {
    let mut c = config.clone();
    if config.has_virtiofs() {
        c.plug_shares = true;
        c.ram_fd = Some(-1);
    }
    c
}

/// Saves one booted guest as the snapshot of its shape.
struct SaveJob {
    warm: WarmStart,
    key: String,
    /// Held while saving: one writer per shape.
    _lock: File,
}

impl Saver for SaveJob {
    fn save(&mut self, q: &mut Qmp, ready: &Ready, ram: Option<&File>) {
        let t = Instant::now();
        let mut refused = None;
        let saved = self.warm.cache.put_with(KIND, &self.key, |data| {
            std::fs::create_dir(data)?;
            let (state, image) = (data.join(STATE), data.join(RAM));
            let to = snapshot::SaveTo {
                state: &state,
                ram: ram.map(|r| (r, image.as_path())),
            };
            snapshot::save(q, to, SAVE_LIMIT).map_err(|e| {
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
                let size = |f| std::fs::metadata(data.join(f)).map_or(0, |m| m.len());
                let bytes = size(STATE) + size(RAM);
                w.note(&format!(
                    "saved the booted guest for warm starts ({:.0} MB in {:.2}s)",
                    bytes as f64 / 1e6,
                    t.elapsed().as_secs_f64()
                ));
                evict(&w.cache, w.cap, &self.key);
            }
            (Err(_), Some(why)) => {
                Refusal::keep(&w.cache, &self.key, &why, true);
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
    c.ram_fd = c.ram_fd.map(|_| -1);
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
        parts.push(crate::sys::files::identity(file));
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    cache::hash_parts(&refs)
}

/// An exclusive hold on saving shape `key`, or None while another process
/// has it.
fn lock(root: &Path, key: &str) -> Option<File> {
    let dir = root.join("snapshot-locks");
    std::fs::create_dir_all(&dir).ok()?;
    let f = File::create(dir.join(key)).ok()?;
    crate::sys::files::try_lock(&f).then_some(f)
}

/// The cache kind counting a machine's failed restores.
const FAILED_LOADS: &str = "snapshot-failed-loads";
/// How many failed restores of one machine, within
/// [`FAILED_LOADS_WINDOW`], turn its warm start off.
const FAILED_LOADS_LIMIT: usize = 3;
const FAILED_LOADS_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// How long a machine that could not be saved for a passing cause (its
/// guest did not see its plugged devices in time, as on a loaded host)
/// boots cold before vexec tries saving it again.
const REFUSAL_TTL: Duration = Duration::from_secs(30 * 60);

/// Why a machine is not saved: `structural` when QEMU itself refuses to
/// migrate it (that holds until the machine changes), else a passing
/// cause that expires after [`REFUSAL_TTL`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Refusal {
    why: String,
    structural: bool,
    /// Seconds since the Unix epoch.
    at: u64,
}

impl Refusal {
    fn keep(cache: &Cache, key: &str, why: &str, structural: bool) {
        let r = Refusal {
            why: why.to_string(),
            structural,
            at: now_secs(),
        };
        if let Ok(bytes) = serde_json::to_vec(&r) {
            let _ = cache.put(REFUSED, key, &bytes);
        }
    }

    /// The record at `path`; None when unreadable (an older vexec's plain
    /// text: tried again).
    fn read(path: &Path) -> Option<Refusal> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Whether it still keeps the machine cold.
    fn stands(&self) -> bool {
        self.structural || now_secs().saturating_sub(self.at) < REFUSAL_TTL.as_secs()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_refusals_expire_and_structural_ones_stand() {
        let at = now_secs();
        let r = |structural, at| Refusal {
            why: "x".into(),
            structural,
            at,
        };
        assert!(r(false, at).stands());
        assert!(!r(false, at - REFUSAL_TTL.as_secs() - 1).stands());
        assert!(r(true, 0).stands());
    }

    #[test]
    fn a_machine_whose_snapshots_will_not_load_ends_up_booting_cold() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("vexec")).unwrap();
        let warm = WarmStart::new(None, cache, DEFAULT_CAP, false, true);
        let m = machine(Backend::NineP);
        for _ in 1..FAILED_LOADS_LIMIT {
            warm.discard(&m, "QEMU: load failed");
            assert!(!matches!(warm.mode(&m, true).0, Warm::Cold));
        }
        warm.discard(&m, "QEMU: load failed");
        assert!(matches!(warm.mode(&m, true).0, Warm::Cold));
    }

    /// A machine with one share (the root), served by `backend`, and two
    /// exec ports.
    fn machine(backend: Backend) -> QemuConfig {
        let mut c = qemu::example_config();
        c.shares.truncate(1);
        c.shares[0].backend = backend;
        (c.console_fd, c.control_fd, c.exec_port_fds) = (5, 6, vec![7, 8]);
        c.extra.clear();
        c
    }

    #[test]
    fn virtio_fs_machines_are_saved_with_plugged_shares_and_ram_apart() {
        let vfs = machine(Backend::Virtiofs { fd: 9 });
        assert!(unsaveable(&vfs, false).is_some());
        assert!(unsaveable(&vfs, true).is_none());
        let no_acpi = QemuConfig {
            cmdline: "console=ttyS0 acpi=off".into(),
            ..vfs.clone()
        };
        assert!(unsaveable(&no_acpi, true).is_some());
        let retried = QemuConfig {
            tcg_single: true,
            stall_retry: true,
            ..machine(Backend::NineP)
        };
        assert!(unsaveable(&retried, true).is_some());
        // Single-threaded TCG asked for is an ordinary machine, saved.
        let single = QemuConfig {
            tcg_single: true,
            ..machine(Backend::NineP)
        };
        assert!(unsaveable(&single, false).is_none());
        let saved = saveable(&vfs);
        assert!(saved.plug_shares && saved.ram_fd.is_some());
        // A 9p machine is saved as it boots.
        let ninep = saveable(&machine(Backend::NineP));
        assert!(!ninep.plug_shares && ninep.ram_fd.is_none());
        assert!(unsaveable(&machine(Backend::NineP), false).is_none());
    }

    #[test]
    fn the_shape_ignores_descriptors_but_not_the_machine() {
        let mut a = saveable(&machine(Backend::Virtiofs { fd: 9 }));
        let key = shape_key(&a);
        (a.console_fd, a.ram_fd, a.incoming_fd) = (40, Some(41), Some(42));
        a.shares[0].backend = Backend::Virtiofs { fd: 43 };
        a.exec_port_fds = vec![44, 45];
        assert_eq!(shape_key(&a), key);
        // A machine booted with its devices is another shape.
        assert_ne!(shape_key(&machine(Backend::Virtiofs { fd: 9 })), key);
        a.memory = "2G".into();
        assert_ne!(shape_key(&a), key);
    }
}
