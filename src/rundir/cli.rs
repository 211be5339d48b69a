//! `vexec run-dir` options.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::cli::{parse_duration, parse_memory};
use crate::vm::accel::AccelChoice;

/// Boot a kernel with nothing but an initramfs, run every executable in DIR
/// (in name order) inside it, report each one's result, power off.
///
/// No host filesystem is shared: the initramfs holds vexec's init, the
/// executables, the files given with --add, busybox when a script needs it
/// (or --busybox), and the modules the guest needs to talk to vexec.
/// Statically linked programs and `#!/bin/sh` scripts (run by busybox) work
/// on every architecture; on x86_64, dynamically linked programs bring
/// their libraries along.
///
/// Exit status: 0 when every program exited 0; 1 when any failed; 124 when
/// --timeout expired; 125 when vexec or the VM failed.
#[derive(Debug, Parser)]
#[command(
    name = "vexec run-dir",
    after_help = "Examples:\n  vexec run-dir -k /boot/vmlinuz-6.1.0-56-amd64 tests/\n  vexec run-dir --arch aarch64 -k ./arm64/boot/vmlinuz-6.1.0-56-arm64 \\\n      --busybox ./busybox-arm64 --output runs --tag smoke tests/\n  vexec run-dir -k ~/src/linux --add ~/mods/lib/modules:/lib/modules tests/ -- -d guest_errors"
)]
pub struct RunDirCli {
    /// Directory whose executable files are run, in name order.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Extra QEMU arguments, passed through as they are.
    #[arg(last = true, value_name = "QEMU-ARGS")]
    pub qemu_args: Vec<OsString>,

    /// Kernel to boot (image file, build tree, unpacked package, release).
    /// Default: as for `vexec` (x86_64 only).
    #[arg(short, long, value_name = "KERNEL", env = "VEXEC_KERNEL")]
    pub kernel: Option<String>,

    /// Guest architecture [default: the kernel's]. aarch64 runs under
    /// qemu-system-aarch64 -M virt with TCG; its init is a busybox script.
    #[arg(long, value_parser = ["x86_64", "aarch64", "arm64"])]
    pub arch: Option<String>,

    /// Put SRC (a file or a directory, recursively) in the initramfs at
    /// DST [default: /NAME of SRC]. Repeatable; e.g. modules installed
    /// with `make modules_install INSTALL_MOD_PATH=M`: --add M/lib/modules:/lib/modules
    #[arg(long, value_name = "SRC[:DST]")]
    pub add: Vec<String>,

    /// The busybox to include (must be static for a foreign architecture)
    /// [default: `busybox` on PATH, for the host's architecture, when a
    /// script needs it].
    #[arg(long, value_name = "PATH")]
    pub busybox: Option<PathBuf>,

    /// Keep the run in DIR/<timestamp>[-TAG...]/: serial, results/, run.json,
    /// coverage/.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// A word to name the run's output directory with (repeatable).
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,

    /// Boot through this firmware (`-bios`), e.g. Debian's
    /// /usr/share/qemu-efi-aarch64/QEMU_EFI.fd or OVMF.fd.
    #[arg(long, value_name = "PATH", conflicts_with = "uefi")]
    pub firmware: Option<PathBuf>,

    /// Boot through UEFI firmware found on the host (qemu-efi-aarch64's
    /// QEMU_EFI.fd, or OVMF for x86_64).
    #[arg(long)]
    pub uefi: bool,

    /// Start QEMU's gdb stub on 127.0.0.1:PORT (default 1234) with the CPUs
    /// halted, as the plain run's --gdb does (`--debug=PORT` is its old name).
    #[arg(
        long,
        alias = "debug",
        value_name = "PORT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1234"
    )]
    pub gdb: Option<u16>,

    /// Kernel build tree for the LCOV capture of GCOV data [default: the
    /// tree given with -k].
    #[arg(long, value_name = "DIR")]
    pub build_tree: Option<PathBuf>,

    /// Keep GCOV data as an archive only; skip the LCOV capture.
    #[arg(long)]
    pub no_lcov: bool,

    /// Kernel module tree to take the guest's modules from.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,

    /// Guest memory (e.g. 512M, 2G).
    #[arg(short, long, value_parser = parse_memory, default_value = "1024M")]
    pub memory: String,

    /// Guest CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub cpus: u32,

    /// Accelerator (aarch64 guests always use TCG on this host).
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,

    /// Stop the whole run after this long (exit status 124).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// Give up when the guest's init has not reported in after this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub boot_timeout: Option<Duration>,

    /// An extra kernel command-line argument (repeatable).
    #[arg(long = "kernel-arg", value_name = "ARG")]
    pub kernel_args: Vec<String>,

    /// The QEMU binary [default: qemu-system-ARCH on PATH].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,

    /// Show the console and each step.
    #[arg(short, long)]
    pub verbose: bool,

    /// Only the programs' output and errors.
    #[arg(short, long)]
    pub quiet: bool,

    /// `vexec --root DIR` with a foreign kernel: the root filesystem shared
    /// (over 9p, read-only, overlaid) and chrooted into by the program.
    #[arg(skip)]
    pub root: Option<PathBuf>,

    /// One program that stands for the user's command: its exit status is
    /// vexec's, and no summary is printed.
    #[arg(skip)]
    pub command_mode: bool,
}
