//! `vexec run-dir`'s command line.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::modes::rundir::options::RunDirOptions;

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

    /// Kernel build tree for the LCOV capture of GCOV data [default: the
    /// tree given with -k].
    #[arg(long, value_name = "DIR")]
    pub build_tree: Option<PathBuf>,

    /// Keep GCOV data as an archive only; skip the LCOV capture.
    #[arg(long)]
    pub no_lcov: bool,

    /// Machine options, as for a plain run.
    #[command(flatten)]
    pub machine: super::MachineOptions,
}

impl RunDirCli {
    /// The plain options `vexec run-dir` runs with.
    pub fn options(&self) -> RunDirOptions {
        RunDirOptions {
            dir: self.dir.clone(),
            qemu_args: self.qemu_args.clone(),
            kernel: self.kernel.clone(),
            arch: self.arch.clone(),
            add: self.add.clone(),
            busybox: self.busybox.clone(),
            output: self.output.clone(),
            tag: self.tag.clone(),
            firmware: self.firmware.clone(),
            uefi: self.uefi,
            build_tree: self.build_tree.clone(),
            no_lcov: self.no_lcov,
            root: None,
            command_mode: false,
            machine: self.machine.plain(),
        }
    }
}
