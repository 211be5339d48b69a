//! Launching a machine, the same way for every mode (plain runs, the
//! shell, run-dir, foreign roots, and through them matrix children and
//! bisect steps): a [`plan::BootRequest`] is planned into a
//! [`plan::BootPlan`] by a pure function, then launched here, where the
//! accelerator choice, the boot-time policy and the KVM→TCG retry are
//! written once.

pub mod plan;
pub mod shares;
pub mod transport;
pub mod warm;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::session;

use crate::host::params::{Job, Params};

use crate::host::outcome::{Outcome, Timings};

use crate::host::events::SignalRelay;
use crate::kernel::image::Arch;
use crate::vm::VmError;
use crate::vm::accel::{self, Accel, AccelChoice};
use crate::vm::qemu::QemuConfig;
use plan::BootPlan;
use warm::WarmStart;

/// Why a planned machine could not be run.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot write the console log {}: {source}; check that its directory exists and is writable", path.display())]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
}

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

/// How a launch ended, with the configuration it last ran (under TCG if
/// KVM was given up on).
pub struct Launched {
    pub outcome: Outcome,
    pub timings: Timings,
    pub config: QemuConfig,
}

/// How a session is watched, the same for every launch of it.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// Show the kernel's console and QEMU's command line.
    pub verbose: bool,
    /// Where the console is logged (written anew by each launch).
    pub console_log: Option<PathBuf>,
    /// Where guest memory is dumped when the kernel panics.
    pub dump_on_panic: Option<PathBuf>,
}

/// Launches `plan` and runs the session to its end, with the job `job`
/// makes for each launch. When KVM, on trial, fails to boot the kernel,
/// KVM is marked broken for this host boot and the machine is launched
/// once more under TCG; when it crashes QEMU after the command started, it
/// is marked broken but not relaunched.
pub fn launch(
    start: &Start,
    plan: BootPlan,
    watch: &Watch,
    warm: &WarmStart,
    relay: &SignalRelay,
    mut job: impl FnMut() -> Job,
) -> Result<Launched, LaunchError> {
    let BootPlan {
        mut config,
        daemons,
        hotplug,
        ..
    } = plan;
    let cache_root = warm.cache_root();
    let (mut stalled_before, mut restore_failed_before) = (false, false);
    let mut plug_failed_before = false;
    loop {
        let (mode, machine) = warm.mode(&config, hotplug);
        let console_log = match &watch.console_log {
            Some(path) => Some(
                File::create(path).map_err(|source| LaunchError::ConsoleLog {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let params = Params {
            qemu: machine.clone(),
            daemons: daemons.clone(),
            job: job(),
            timeout: watch.timeout,
            boot_timeout: boot_timeout(start, config.accel),
            kvm_probe: kvm_probe(start, config.accel),
            verbose: watch.verbose,
            console_log,
            print_qemu: watch.verbose,
            dump_on_panic: watch.dump_on_panic.clone(),
            warm: mode,
        };
        let (outcome, timings) = session::run(params, relay)?;
        match &outcome {
            Outcome::KvmBroken(why) if config.accel == Accel::Kvm => {
                accel::fall_back_to_tcg(cache_root, why, start.quiet);
                config.accel = Accel::Tcg;
                continue;
            }
            Outcome::KvmCrashed(_) => accel::mark_broken(cache_root),
            Outcome::PlugFailed(why) if !plug_failed_before => {
                plug_failed_before = true;
                warm.refuse(&machine, why);
                continue;
            }
            Outcome::RestoreFailed(why) if !restore_failed_before => {
                restore_failed_before = true;
                warm.discard(&machine, why);
                continue;
            }
            Outcome::BootStalled(why) if !stalled_before => {
                stalled_before = true;
                again_after_stall(&mut config, why);
                continue;
            }
            _ => {}
        }
        return Ok(Launched {
            outcome,
            timings,
            config,
        });
    }
}

/// Prepares a second boot after the kernel stalled in the first: nothing
/// had run, so it is safe. Under TCG the second boot runs every vCPU in
/// one thread: QEMU 7.2's one-thread-per-vCPU TCG can leave a halted vCPU
/// unwoken on a loaded host, and a CPU waiting for it stalls (soft
/// lockups, RCU stalls); one thread cannot.
/// Said even with `-q`: a slower second boot needs its reason shown.
fn again_after_stall(config: &mut QemuConfig, why: &str) {
    let first = why.lines().next().unwrap_or(why);
    config.tcg_single = config.accel == Accel::Tcg;
    config.stall_retry = true;
    crate::say!(
        "vexec: warning: {first}; booting again{}",
        if config.tcg_single {
            " with single-threaded TCG"
        } else {
            ""
        }
    );
}

/// Tells the user how to attach gdb to a guest halted for it: with the
/// kernel's debug symbols when they were found.
pub fn announce_gdb(port: u16, arch: Arch, symbols: Option<&Path>, booted: &Path) {
    let gdb = match arch {
        Arch::X86_64 => "gdb",
        Arch::Aarch64 => "gdb-multiarch",
    };
    crate::say!(
        "vexec: the guest waits for gdb; attach with:\n  {gdb} -ex 'target remote localhost:{port}' {}{}",
        symbols.unwrap_or(booted).display(),
        if symbols.is_none() {
            "\nvexec: (no vmlinux with debug symbols found beside the kernel or in /usr/lib/debug; use hbreak *ADDR with addresses from /proc/kallsyms)"
        } else {
            ""
        }
    );
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
}
