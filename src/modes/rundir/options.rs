//! What `vexec run-dir` runs with: its command line's options as plain
//! values, or those a `--root` run of a foreign kernel makes.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::modes::spec::Machine;

/// A batch run's options (see `vexec run-dir --help` for each).
#[derive(Debug, Clone)]
pub struct RunDirOptions {
    /// Directory whose executable files are run, in name order.
    pub dir: PathBuf,
    /// Extra QEMU arguments, passed through as they are.
    pub qemu_args: Vec<OsString>,
    pub kernel: Option<String>,
    /// Guest architecture; None: the kernel's.
    pub arch: Option<String>,
    /// `SRC[:DST]` put in the initramfs.
    pub add: Vec<String>,
    pub busybox: Option<PathBuf>,
    /// Keep the run's record under this directory.
    pub output: Option<PathBuf>,
    pub tag: Vec<String>,
    pub firmware: Option<PathBuf>,
    pub uefi: bool,
    /// Kernel build tree for the LCOV capture.
    pub build_tree: Option<PathBuf>,
    pub no_lcov: bool,
    /// `vexec --root DIR` with a foreign kernel: the root filesystem shared
    /// (over 9p, read-only, overlaid) and chrooted into by the program.
    pub root: Option<PathBuf>,
    /// One program that stands for the user's command: its exit status is
    /// vexec's, and no summary is printed.
    pub command_mode: bool,
    pub machine: Machine,
}
