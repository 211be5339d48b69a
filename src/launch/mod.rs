//! Launching a planned VM, the same way for every mode (plain runs, the
//! shell, run-dir, matrix children, bisect steps): the accelerator choice,
//! the gdb stub, the boot-time policy, and the KVM→TCG retry, written once.
//! The front ends build the QEMU configuration and the job; this module
//! decides how the machine is started and started again.

pub mod shares;
pub mod transport;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::host::session::{self, Outcome, Params, SignalRelay, Timings};
use crate::vm::VmError;
use crate::vm::accel::{self, Accel, AccelChoice};
use crate::vm::qemu::QemuConfig;

/// How the machine is to be started, beyond its QEMU configuration.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// What the user asked for (`--accel`).
    pub accel: AccelChoice,
    /// `--gdb`: the CPUs wait for a debugger on this port.
    pub gdb: Option<u16>,
    /// `--boot-timeout`, if given.
    pub boot_timeout: Option<Duration>,
    /// Firmware, or an emulated foreign architecture: slow to reach init.
    pub slow_boot: bool,
    pub quiet: bool,
}

/// How long the guest may take to report in: as long as the user needs
/// under gdb, else what was asked, else a default for the machine.
pub fn boot_timeout(start: &Start, accel: Accel) -> Duration {
    match (start.gdb, start.boot_timeout) {
        (Some(_), _) => Duration::from_secs(7 * 24 * 3600),
        (None, Some(t)) => t,
        (None, None) => Duration::from_secs(match (start.slow_boot, accel) {
            (false, Accel::Kvm) => 20,
            (false, Accel::Tcg) => 60,
            (true, _) => 180,
        }),
    }
}

/// How long KVM has to prove it boots Linux, when it is on trial: chosen
/// by `auto` and not halted for a debugger.
pub fn kvm_probe(start: &Start, accel: Accel) -> Option<Duration> {
    (start.accel == AccelChoice::Auto && accel == Accel::Kvm && start.gdb.is_none())
        .then(|| Duration::from_secs(8))
}

/// The accelerator to start with, saying why when `auto` settled for TCG.
pub fn first_accel(start: &Start, cache_root: &Path) -> Accel {
    let (accel, why_not_kvm) = accel::choose(start.accel, cache_root);
    if let (Some(why), false) = (&why_not_kvm, start.quiet) {
        crate::say!("vexec: KVM not usable ({why}); using TCG emulation (slower)");
    }
    accel
}

/// Adds QEMU's gdb stub (CPUs halted until gdb continues) and `nokaslr`
/// (breakpoints by symbol need the kernel where it was linked).
pub fn add_gdb(port: u16, kernel_args: &mut Vec<String>, qemu_args: &mut Vec<OsString>) {
    kernel_args.push("nokaslr".into());
    qemu_args.splice(
        0..0,
        [
            OsString::from("-gdb"),
            format!("tcp:127.0.0.1:{port}").into(),
            "-S".into(),
        ],
    );
}

/// The boot deadlines of one launch, for the session's [`Params`].
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    pub timeout: Duration,
    pub kvm_probe: Option<Duration>,
}

/// How a launch ended, with the configuration it last ran (under TCG if
/// KVM was given up on).
pub struct Launched {
    pub outcome: Outcome,
    pub timings: Timings,
    pub config: QemuConfig,
}

/// Launches `config` and runs the session to its end. When KVM, on trial,
/// fails to boot the kernel, KVM is marked broken for this host boot and
/// the machine is launched once more under TCG; when it crashes QEMU after
/// the command started, it is marked broken but not relaunched.
/// `attempt` builds the session's parameters for each launch, from the
/// configuration and boot deadlines of that launch.
pub fn launch<E: From<VmError>>(
    start: &Start,
    mut config: QemuConfig,
    cache_root: &Path,
    relay: &SignalRelay,
    mut attempt: impl FnMut(&QemuConfig, Boot) -> Result<Params, E>,
) -> Result<Launched, E> {
    loop {
        let boot = Boot {
            timeout: boot_timeout(start, config.accel),
            kvm_probe: kvm_probe(start, config.accel),
        };
        let params = attempt(&config, boot)?;
        let (outcome, timings) = session::run(params, relay)?;
        match &outcome {
            Outcome::KvmBroken(why) if config.accel == Accel::Kvm => {
                accel::fall_back_to_tcg(cache_root, why, start.quiet);
                config.accel = Accel::Tcg;
                continue;
            }
            Outcome::KvmCrashed(_) => accel::mark_broken(cache_root),
            _ => {}
        }
        return Ok(Launched {
            outcome,
            timings,
            config,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(accel: AccelChoice, gdb: Option<u16>, boot: Option<u64>, slow: bool) -> Start {
        Start {
            accel,
            gdb,
            boot_timeout: boot.map(Duration::from_secs),
            slow_boot: slow,
            quiet: true,
        }
    }

    #[test]
    fn boot_time_policy() {
        let s = |gdb, boot, slow| start(AccelChoice::Auto, gdb, boot, slow);
        assert_eq!(
            boot_timeout(&s(None, None, false), Accel::Kvm).as_secs(),
            20
        );
        assert_eq!(
            boot_timeout(&s(None, None, false), Accel::Tcg).as_secs(),
            60
        );
        assert_eq!(
            boot_timeout(&s(None, None, true), Accel::Tcg).as_secs(),
            180
        );
        assert_eq!(
            boot_timeout(&s(None, Some(5), true), Accel::Tcg).as_secs(),
            5
        );
        assert!(boot_timeout(&s(Some(1234), Some(5), false), Accel::Tcg).as_secs() > 86400);
    }

    #[test]
    fn kvm_is_on_trial_only_when_auto_chose_it_without_gdb() {
        let probe = |choice, gdb, accel| kvm_probe(&start(choice, gdb, None, false), accel);
        assert!(probe(AccelChoice::Auto, None, Accel::Kvm).is_some());
        assert!(probe(AccelChoice::Auto, Some(1), Accel::Kvm).is_none());
        assert!(probe(AccelChoice::Kvm, None, Accel::Kvm).is_none());
        assert!(probe(AccelChoice::Auto, None, Accel::Tcg).is_none());
    }

    #[test]
    fn gdb_halts_the_cpus_and_pins_the_kernel() {
        let (mut k, mut q) = (vec!["quiet".to_string()], vec![OsString::from("-d")]);
        add_gdb(4321, &mut k, &mut q);
        assert_eq!(k, ["quiet", "nokaslr"]);
        assert_eq!(q, ["-gdb", "tcp:127.0.0.1:4321", "-S", "-d"]);
    }
}
