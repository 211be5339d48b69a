//! [`RunSpec`]: everything one run needs, independent of where it came from
//! (command line today, a config file later). Nothing below reads argv or
//! the process environment.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::launch::shares::ShareRequest;
use crate::launch::transport::TransportChoice;
use crate::vm::accel::{AccelChoice, TcgThreads};

/// When the command gets a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtyMode {
    /// Each standard descriptor that is a terminal on the host.
    Auto,
    /// All three (`-t`).
    Always,
    /// None (`-T`).
    Never,
}

/// Changes to the caller's environment, applied in order: `Some` sets
/// the key, `None` removes it (the config file's `[env]`, then `-e` and
/// `--unset-env`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvChanges(pub Vec<(OsString, Option<OsString>)>);

impl EnvChanges {
    /// `env` with the changes applied.
    pub fn apply(&self, mut env: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
        for (k, v) in &self.0 {
            env.retain(|(e, _)| e != k);
            if let Some(v) = v {
                env.push((k.clone(), v.clone()));
            }
        }
        env
    }
}

/// Guest memory when nothing says otherwise (QEMU's syntax).
pub const DEFAULT_MEMORY: &str = "1024M";
/// Guest CPUs when nothing says otherwise.
pub const DEFAULT_CPUS: u32 = 2;

/// How the VM is built and watched, as every mode takes it (the command
/// line's machine options, defaults filled in).
#[derive(Debug, Clone)]
pub struct Machine {
    /// Module tree to use instead of the one found beside the kernel.
    pub modules: Option<PathBuf>,
    /// Guest memory, as QEMU's `-m` takes it.
    pub memory: String,
    pub cpus: u32,
    /// None: auto (KVM only where it is proven to work).
    pub accel: Option<AccelChoice>,
    pub timeout: Option<Duration>,
    /// None: the accelerator's default.
    pub boot_timeout: Option<Duration>,
    pub kernel_args: Vec<String>,
    pub qemu: Option<PathBuf>,
    /// Start QEMU's gdb stub on this port, CPUs halted.
    pub gdb: Option<u16>,
    /// Boot even when a saved guest could be restored.
    pub cold: bool,
    /// None: the default (multi).
    pub tcg_threads: Option<TcgThreads>,
    pub snapshot_cap: Option<u64>,
    pub verbose: bool,
    pub quiet: bool,
}

/// One run, fully described.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub kernel: Option<String>,
    pub modules: Option<PathBuf>,
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// What the run changed of the caller's environment to make `env`.
    pub env_changes: EnvChanges,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The caller's resource limits, given to the command.
    pub limits: Vec<crate::protocol::Rlimit>,
    pub tty: TtyMode,
    /// No command was given: run the login shell.
    pub shell: bool,
    /// Run the command as the guest's root (`--sudo`).
    pub sudo: bool,
    /// Shell commands run as root in the guest before the command.
    pub setup: Vec<String>,
    /// Shell commands run as root in the guest after the command.
    pub teardown: Vec<String>,
    pub hostname: String,
    /// Share the working directory read-write.
    pub share_cwd: bool,
    /// Further shares, in the order given.
    pub shares: Vec<ShareRequest>,
    pub transport: TransportChoice,
    /// An explicit virtiofsd.
    pub virtiofsd: Option<PathBuf>,
    pub memory: String,
    pub cpus: u32,
    pub accel: AccelChoice,
    pub timeout: Option<Duration>,
    pub boot_timeout: Option<Duration>,
    /// How long output may still arrive after the command exited.
    pub output_grace: Duration,
    /// Where reports of stopped runs are also written.
    pub hang_reports: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<OsString>,
    pub console_log: Option<PathBuf>,
    /// User-mode networking (`--net`).
    pub net: bool,
    /// TCP forwards, host port to guest port.
    pub forwards: Vec<(u16, u16)>,
    /// Where to write a guest memory dump if the kernel panics.
    pub dump_on_panic: Option<PathBuf>,
    /// Boot even when a saved booted guest could be restored (`--cold`).
    pub cold: bool,
    /// How TCG runs the vCPUs (`--tcg-threads`).
    pub tcg_threads: TcgThreads,
    /// Size cap of all saved booted guests, bytes.
    pub snapshot_cap: u64,
    /// Port of QEMU's gdb stub (`--gdb`).
    pub gdb: Option<u16>,
    /// The guest's root filesystem, when not the host's.
    pub root: Option<PathBuf>,
    /// busybox for a foreign-architecture `root`.
    pub busybox: Option<PathBuf>,
    /// Fail when the kernel logs a splat (`--fail-on-oops`).
    pub fail_on_oops: bool,
    /// Parse test results from stdout and the kernel log (`--results`).
    pub results: Option<crate::report::tap::Format>,
    /// Write those results here as JSON (a matrix's child run).
    pub cases_out: Option<PathBuf>,
    /// Where to keep the run's record (`--output`).
    pub output: Option<PathBuf>,
    pub verbose: bool,
    pub quiet: bool,
    pub dry_run: bool,
    /// Where vexec keeps its cache.
    pub cache_dir: PathBuf,
    /// The running kernel's release, for the default kernel.
    pub running_release: Option<String>,
    /// `PATH` of the caller, for finding QEMU.
    pub path_var: Option<OsString>,
}
