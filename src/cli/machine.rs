//! The machine options every mode shares (the plain run, the shell,
//! run-dir, matrix children, bisect steps): one definition, flattened into
//! each command line, so a flag means the same everywhere.

use std::path::PathBuf;
use std::time::Duration;

use super::{parse_duration, parse_memory};
use crate::modes::spec::Machine;
use crate::vm::accel::{AccelChoice, TcgThreads};

pub use crate::modes::spec::{DEFAULT_CPUS, DEFAULT_MEMORY};

/// How the VM is built and watched.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MachineOptions {
    /// Module tree to use instead of the one found beside the kernel.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,

    /// Guest memory (e.g. 512M, 2G) [default: 1G].
    #[arg(short, long, value_parser = parse_memory)]
    pub memory: Option<String>,

    /// Guest CPUs [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub cpus: Option<u32>,

    /// Accelerator: auto uses KVM only where it is proven to work [default:
    /// auto].
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,

    /// Stop the command and the VM after this long (e.g. 30s, 5m); exit 124,
    /// with a report of where the host and the guest stood.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, env = "VEXEC_TIMEOUT")]
    pub timeout: Option<Duration>,

    /// How long the guest may take to boot and report in before the run fails
    /// [default: 60s under TCG, 20s under KVM]. Time QEMU waits for a busy
    /// host's CPUs does not count (up to 2x).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub boot_timeout: Option<Duration>,

    /// Append ARG to the kernel command line (repeatable).
    #[arg(long = "kernel-arg", value_name = "ARG")]
    pub kernel_args: Vec<String>,

    /// QEMU binary to use (default: qemu-system-x86_64, or -aarch64 for an
    /// arm64 guest, on PATH).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,

    /// Start QEMU's gdb stub on PORT (default 1234) with the CPUs halted;
    /// vexec prints the gdb command to attach, and the run goes on once gdb
    /// continues. Adds nokaslr to the kernel command line.
    /// (`--debug=PORT` is run-dir's old name for it.)
    #[arg(
        long,
        alias = "debug",
        value_name = "PORT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1234"
    )]
    pub gdb: Option<u16>,

    /// Boot the kernel even when a saved booted guest of this machine
    /// could be restored instead. Warm start is the default: the first run
    /// of a machine saves it when its agent is ready, later runs restore
    /// it (over virtio-fs, the kernel needs CONFIG_HOTPLUG_PCI_ACPI).
    #[arg(long, env = "VEXEC_COLD", value_parser = clap::builder::FalseyValueParser::new())]
    pub cold: bool,

    /// How TCG runs the guest's vCPUs: `multi`, one host thread each, or
    /// `single`, all in one thread (slower for parallel work in the guest;
    /// try it when a guest under TCG reports soft lockups or RCU stalls
    /// on a loaded host) [default: multi]. Means nothing under KVM.
    #[arg(long, value_enum, value_name = "HOW", env = "VEXEC_TCG_THREADS")]
    pub tcg_threads: Option<TcgThreads>,

    /// Size cap of all saved booted guests together; the least recently
    /// used are removed beyond it (default 2G).
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::parse_bytes, env = "VEXEC_SNAPSHOT_CAP")]
    pub snapshot_cap: Option<u64>,

    /// Show the kernel console, the steps and their timings on stderr.
    #[arg(short, long)]
    pub verbose: bool,

    /// Do not print notices (such as falling back to TCG).
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

impl MachineOptions {
    /// The plain options a mode takes, defaults filled in.
    pub fn plain(&self) -> Machine {
        Machine {
            modules: self.modules.clone(),
            memory: (self.memory.clone()).unwrap_or_else(|| DEFAULT_MEMORY.into()),
            cpus: self.cpus.unwrap_or(DEFAULT_CPUS),
            accel: self.accel,
            timeout: self.timeout,
            boot_timeout: self.boot_timeout,
            kernel_args: self.kernel_args.clone(),
            qemu: self.qemu.clone(),
            gdb: self.gdb,
            cold: self.cold,
            tcg_threads: self.tcg_threads,
            snapshot_cap: self.snapshot_cap,
            verbose: self.verbose,
            quiet: self.quiet,
        }
    }
}
