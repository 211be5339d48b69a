//! Choosing the accelerator. /dev/kvm existing — even opening and running a
//! toy guest — does not prove KVM can run Linux (some nested setups crawl
//! and die with "KVM internal error"), so `auto` tries KVM, and a boot that
//! does not reach init in time marks KVM broken for this host boot.

use std::path::{Path, PathBuf};

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The name QEMU and the run record use.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when it works here, else TCG (with a notice).
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How QEMU's TCG runs a guest's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TcgThreads {
    /// One host thread per vCPU (QEMU's default): a guest's CPUs run at
    /// once on as many host cores.
    #[default]
    Multi,
    /// Every vCPU in one host thread, in turn: no parallelism in the
    /// guest, and no vCPU left waiting for another that was not woken.
    Single,
}

/// Why the accelerator and TCG's threading asked for cannot go together
/// (a TCG setting under KVM would be accepted and ignored), or None.
pub fn threads_conflict(
    accel: Option<AccelChoice>,
    threads: Option<TcgThreads>,
) -> Option<&'static str> {
    (accel == Some(AccelChoice::Kvm) && threads.is_some()).then_some(
        "--tcg-threads (or tcg-threads in .vexec.toml) means nothing with --accel kvm: drop one of them",
    )
}

/// Why KVM cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvmUnavailable {
    #[error("/dev/kvm: {0}")]
    Device(String),
    #[error("it failed to boot Linux on this host earlier; remembered until the host reboots")]
    KnownBroken,
}

/// Checks that /dev/kvm can be opened and speaks the stable API.
pub fn kvm_device_usable() -> Result<(), KvmUnavailable> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| KvmUnavailable::Device(e.to_string()))?;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: a query ioctl without arguments on an open fd.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v != 12 {
        return Err(KvmUnavailable::Device(format!(
            "unexpected KVM API version {v}"
        )));
    }
    Ok(())
}

/// The file that records "KVM broken" for one host boot.
pub fn broken_marker(cache_root: &Path) -> PathBuf {
    cache_root.join("kvm-broken")
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// True when an earlier run marked KVM broken since the host last booted.
pub fn known_broken(cache_root: &Path) -> bool {
    let id = boot_id();
    !id.is_empty()
        && std::fs::read_to_string(broken_marker(cache_root)).is_ok_and(|s| s.trim() == id)
}

/// Records that KVM does not work until the host reboots.
pub fn mark_broken(cache_root: &Path) {
    let _ = std::fs::write(broken_marker(cache_root), boot_id() + "\n");
}

/// After a KVM boot failed (`why`): remembers it for this host boot and
/// says, unless `quiet`, that the run goes on under TCG.
pub fn fall_back_to_tcg(cache_root: &Path, why: &str, quiet: bool) {
    mark_broken(cache_root);
    if !quiet {
        crate::say!(
            "vexec: KVM cannot boot Linux on this host ({why}); rerunning under TCG, and using TCG until the host reboots"
        );
    }
}

/// Resolves the choice to an accelerator, with the reason when `auto`
/// settled for TCG.
pub fn choose(choice: AccelChoice, cache_root: &Path) -> (Accel, Option<KvmUnavailable>) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, None),
        AccelChoice::Tcg => (Accel::Tcg, None),
        AccelChoice::Auto => match kvm_device_usable() {
            Err(e) => (Accel::Tcg, Some(e)),
            Ok(()) if known_broken(cache_root) => (Accel::Tcg, Some(KvmUnavailable::KnownBroken)),
            Ok(()) => (Accel::Kvm, None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_marker_is_per_boot() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!known_broken(dir.path()));
        mark_broken(dir.path());
        assert!(known_broken(dir.path()));
        std::fs::write(broken_marker(dir.path()), "another-boot\n").unwrap();
        assert!(!known_broken(dir.path()));
        assert_eq!(choose(AccelChoice::Tcg, dir.path()).0, Accel::Tcg);
    }
}
