//! `vexec --root DIR -k KERNEL -- COMMAND` with a kernel of a foreign
//! architecture: the command runs chrooted into DIR (shared read-only over
//! 9p, overlaid with tmpfs) from the busybox init, as root, with a clean
//! environment. Its output comes back when it ends.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::options::RunDirOptions;
use super::{RunDirError, run};
use crate::host::events::SignalRelay;
use crate::kernel::Kernel;
use crate::modes::spec::Machine;
use crate::modes::spec::RunSpec;
use crate::sys::programs::quote;
use crate::vm::accel::AccelChoice;

/// Runs the spec's command in `root` booted with `kernel`; returns its
/// exit status.
pub fn run_in_root(
    spec: &RunSpec,
    kernel: &Kernel,
    root: &Path,
    relay: &SignalRelay,
) -> Result<i32, RunDirError> {
    let root = crate::launch::shares::root_dir(root)?;
    if spec.argv.is_empty() || spec.shell {
        return Err(RunDirError::ShellInRoot);
    }
    if spec.accel == AccelChoice::Kvm {
        return Err(RunDirError::KvmForeign(kernel.info.arch.name()));
    }
    let io = RunDirError::io;
    let dir = tempfile::Builder::new()
        .prefix("vexec-root-cmd-")
        .tempdir()
        .map_err(io("creating a temporary directory".into()))?;
    let program = dir.path().join("command");
    std::fs::write(&program, script(spec))
        .and_then(|()| std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)))
        .map_err(io(format!("writing {}", program.display())))?;
    let o = RunDirOptions {
        dir: dir.path().to_path_buf(),
        qemu_args: spec.qemu_args.clone(),
        kernel: Some(kernel.image.to_string_lossy().into_owned()),
        arch: None,
        add: Vec::new(),
        busybox: spec.busybox.clone(),
        output: None,
        tag: Vec::new(),
        firmware: None,
        uefi: false,
        build_tree: None,
        no_lcov: true,
        machine: Machine {
            modules: spec.modules.clone(),
            memory: spec.memory.clone(),
            cpus: spec.cpus,
            // A foreign architecture is always emulated.
            accel: Some(AccelChoice::Tcg),
            timeout: spec.timeout,
            boot_timeout: spec.boot_timeout,
            kernel_args: spec.kernel_args.clone(),
            qemu: spec.qemu.clone(),
            gdb: spec.gdb,
            cold: true,
            tcg_threads: Some(spec.tcg_threads),
            snapshot_cap: Some(spec.snapshot_cap),
            verbose: spec.verbose,
            quiet: true,
        },
        root: Some(root),
        command_mode: true,
    };
    run(&o, relay, Some(kernel.clone()))
}

/// The batch's one program: the command, chrooted, with a clean
/// environment (the host's would name host paths).
fn script(spec: &RunSpec) -> String {
    let quoted: Vec<String> = spec
        .argv
        .iter()
        .map(|a| quote(&a.to_string_lossy()))
        .collect();
    let term = spec
        .env
        .iter()
        .find(|(k, _)| k == "TERM")
        .map(|(_, v)| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "linux".into());
    format!(
        "#!/bin/sh\nexec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM={} chroot /vexec/root {}\n",
        quote(&term),
        quoted.join(" ")
    )
}
