//! `vexec run-dir`: boot a kernel with nothing but an initramfs, run every
//! executable of a directory in it, report each one, keep the run's
//! record, and collect the kernel's GCOV coverage. x86_64 guests run
//! vexec's own agent as init; guests of other architectures (aarch64 under
//! `qemu-system-aarch64 -M virt`) run a busybox script speaking the same
//! protocol's batch subset.

pub mod cli;
pub mod coverage;
mod outdir;
pub(crate) mod payload;
pub mod report;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::artifacts;
use crate::artifacts::cache::Cache;
use crate::host::session::{Job, Outcome, Params, SignalRelay};
use crate::kernel::image::Arch;
use crate::kernel::{self, resolve::Defaults};
use crate::launch;
use crate::modes::run::{RunError, STATUS_FAILED};
use crate::report::{outcome_words, status_of};
use crate::vm::accel::AccelChoice;
use crate::vm::qemu::{self, Backend, QemuConfig, ShareDevice};

/// The 9p tag of a `--root` filesystem.
const ROOT_TAG: &str = "vexec-root";

/// Firmware files tried by `--uefi`, per architecture (Debian/Ubuntu paths).
const AARCH64_FIRMWARE: &[&str] = &[
    "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
    "/usr/share/edk2/aarch64/QEMU_EFI.fd",
];
const X86_64_FIRMWARE: &[&str] = &["/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"];

/// Entry point: `vexec run-dir ARGS`; returns the exit status.
pub fn main(cli: &cli::RunDirCli) -> i32 {
    let relay = match SignalRelay::install() {
        Ok(r) => r,
        Err(e) => {
            crate::say!("vexec: error: installing signal handlers: {e}");
            return STATUS_FAILED;
        }
    };
    match run(cli, &relay, None) {
        Ok(code) => code,
        Err(e) => {
            crate::say!("vexec: error: {e}");
            STATUS_FAILED
        }
    }
}

/// `name` in a directory of `path_var`, as a shell would find it.
fn find_on_path(name: &str, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn arch_named(name: &str) -> Arch {
    match name {
        "aarch64" | "arm64" => Arch::Aarch64,
        _ => Arch::X86_64,
    }
}

fn firmware(cli: &cli::RunDirCli, arch: Arch) -> Result<Option<PathBuf>, String> {
    if let Some(f) = &cli.firmware {
        if !f.is_file() {
            return Err(format!(
                "--firmware {}: no such file; give the path of a QEMU firmware image (e.g. QEMU_EFI.fd)",
                f.display()
            ));
        }
        return Ok(Some(f.clone()));
    }
    if !cli.uefi {
        return Ok(None);
    }
    let (candidates, package) = match arch {
        Arch::Aarch64 => (AARCH64_FIRMWARE, "qemu-efi-aarch64"),
        Arch::X86_64 => (X86_64_FIRMWARE, "ovmf"),
    };
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "--uefi: no {} UEFI firmware found (looked at {}); install it (Debian/Ubuntu: apt-get install {package}) or pass --firmware PATH",
                arch.name(),
                candidates.join(", ")
            )
        })
}

/// Runs the batch `cli` describes; `resolved` is its kernel when the caller
/// has already resolved it.
fn run(
    cli: &cli::RunDirCli,
    relay: &SignalRelay,
    resolved: Option<kernel::Kernel>,
) -> Result<i32, String> {
    let t0 = Instant::now();
    for t in &cli.tag {
        outdir::check_tag(t)?;
    }
    let path_var = std::env::var_os("PATH");
    let cache = Cache::open(Cache::default_root(
        std::env::var_os("XDG_CACHE_HOME").map(Into::into),
        std::env::var_os("HOME").map(Into::into),
    ))
    .map_err(|e| e.to_string())?;
    let wanted_arch = cli.arch.as_deref().map(arch_named);
    if wanted_arch.is_some_and(|a| a != Arch::X86_64) && cli.kernel.is_none() {
        return Err(format!(
            "an {} guest needs a kernel of its own: pass -k KERNEL (e.g. Debian's linux-image-arm64: after `dpkg --add-architecture arm64 && apt-get update`, `apt-get download linux-image-arm64:arm64` and `dpkg-deb -x` the package it depends on)",
            wanted_arch.unwrap_or_default().name()
        ));
    }
    let defaults = Defaults {
        running: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        boot_dir: PathBuf::from("/boot"),
        store: Some(cache.root().join("kernels")),
    };
    let kernel = match resolved {
        Some(k) => k,
        None => kernel::resolve(
            cli.kernel.as_deref(),
            cli.machine.modules.as_deref(),
            &defaults,
        )
        .map_err(|e| e.to_string())?,
    };
    let arch = kernel.info.arch;
    if let Some(w) = wanted_arch
        && w != arch
    {
        return Err(format!(
            "--arch {} but {} is a kernel for {}",
            w.name(),
            kernel.image.display(),
            arch.name()
        ));
    }
    let inspected = artifacts::inspect(&cache, &kernel).map_err(|e| e.to_string())?;
    let modules = artifacts::batch_modules(&cache, &kernel, &inspected, cli.root.is_some())
        .map_err(|e| e.to_string())?;
    let agent = crate::artifacts::initramfs::agent_executable()
        .map_err(|e| format!("cannot find vexec's own executable for the guest's init: {e}"))?;
    let payload = payload::build(&payload::Inputs {
        arch,
        dir: &cli.dir,
        adds: &cli.add,
        busybox: cli.busybox.as_deref(),
        path_var: path_var.as_deref(),
        agent: &agent,
        modules: &modules,
        root_tag: cli.root.as_ref().map(|_| ROOT_TAG),
    })
    .map_err(|e| e.to_string())?;
    let scratch = cache.root().join("tmp");
    std::fs::create_dir_all(&scratch)
        .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let initrd = tempfile::Builder::new()
        .prefix("run-dir-")
        .suffix(".cpio")
        .tempfile_in(&scratch)
        .map_err(|e| format!("creating the initramfs in {}: {e}", scratch.display()))?;
    std::fs::write(initrd.path(), &payload.bytes)
        .map_err(|e| format!("writing {}: {e}", initrd.path().display()))?;

    let qemu_bin = crate::vm::find_qemu_for(arch, cli.machine.qemu.as_deref(), path_var.clone())
        .map_err(|e| e.to_string())?;
    let firmware = firmware(cli, arch)?;
    if arch == Arch::Aarch64 && cli.machine.accel == Some(AccelChoice::Kvm) {
        return Err(
            "--accel kvm: an aarch64 guest on this x86_64 host can only be emulated (TCG)".into(),
        );
    }
    let start = launch::Start {
        // A foreign guest can only be emulated.
        accel: match arch {
            Arch::X86_64 => cli.machine.accel.unwrap_or(AccelChoice::Auto),
            Arch::Aarch64 => AccelChoice::Tcg,
        },
        gdb: cli.machine.gdb,
        boot_timeout: cli.machine.boot_timeout,
        // Emulated arm64, and firmware, take longer to reach init.
        slow_boot: arch != Arch::X86_64 || firmware.is_some(),
        quiet: cli.machine.quiet,
    };
    let accel = launch::first_accel(&start, cache.root());
    let mut kernel_args = Vec::new();
    if cli.output.is_some() {
        // The record's serial log is the whole console, boot messages too.
        kernel_args.push("loglevel=7".to_string());
    }
    kernel_args.extend(cli.machine.kernel_args.iter().cloned());
    let mut extra = cli.qemu_args.clone();
    if let Some(port) = cli.machine.gdb {
        launch::add_gdb(port, &mut kernel_args, &mut extra);
        let symbols = crate::modes::run::symbol_file(&kernel, &kernel.image);
        let gdb = match arch {
            Arch::X86_64 => "gdb",
            Arch::Aarch64 => "gdb-multiarch",
        };
        crate::say!(
            "vexec: the guest waits for gdb; attach with:\n  {gdb} -ex 'target remote localhost:{port}' {}",
            symbols.display()
        );
    }
    // Firmware boots the image it is handed through its own loader: a
    // bzImage or arm64 Image, never the PVH vmlinux.
    let boot_kernel = if firmware.is_some() || arch != Arch::X86_64 {
        kernel.image.clone()
    } else {
        inspected.boot_kernel.clone()
    };
    let config = QemuConfig {
        firmware: firmware
            .clone()
            .or_else(|| qemu::default_firmware(arch, &qemu_bin)),
        binary: qemu_bin,
        arch,
        accel,
        cpus: cli.machine.cpus.unwrap_or(crate::cli::DEFAULT_CPUS),
        memory: cli
            .machine
            .memory
            .clone()
            .unwrap_or_else(|| crate::cli::DEFAULT_MEMORY.into()),
        kernel: boot_kernel,
        initrd: initrd.path().to_path_buf(),
        cmdline: qemu::cmdline_for(arch, cli.machine.verbose, false, &kernel_args),
        shares: cli
            .root
            .iter()
            .map(|r| ShareDevice {
                tag: ROOT_TAG.into(),
                path: r.clone(),
                readonly: true,
                backend: Backend::NineP,
            })
            .collect(),
        net: None,
        console_fd: 3,
        control_fd: 4,
        qmp_fd: None,
        extra,
    };
    let out = cli
        .output
        .as_deref()
        .map(|o| outdir::create(o, &cli.tag))
        .transpose()?;
    if !cli.machine.quiet {
        crate::say!(
            "vexec: run-dir: {} program(s) of {} on {} ({}, {}){}",
            payload.programs.len(),
            cli.dir.display(),
            kernel.release(),
            arch.name(),
            if firmware.is_some() {
                "UEFI"
            } else {
                "direct boot"
            },
            out.as_ref()
                .map(|o| format!("; record in {}", o.display()))
                .unwrap_or_default()
        );
    }
    let prep = t0.elapsed();
    let report = Arc::new(Mutex::new(report::Report::new(
        out.as_ref().map(|o| o.join("results")),
        cli.machine.quiet,
    )));
    let launched = launch::launch(&start, config, cache.root(), relay, |config, boot| {
        let serial = match &out {
            Some(o) => Some(File::create(o.join("serial")).map_err(|e| {
                RunError::Failed(format!("creating {}: {e}", o.join("serial").display()))
            })?),
            None => None,
        };
        Ok::<_, RunError>(Params {
            qemu: config.clone(),
            daemons: Vec::new(),
            job: Job::Batch(Box::new(report::Sink(Arc::clone(&report)))),
            timeout: cli.machine.timeout,
            boot_timeout: boot.timeout,
            kvm_probe: boot.kvm_probe,
            verbose: cli.machine.verbose,
            console_log: serial,
            print_qemu: cli.machine.verbose,
            dump_on_panic: None,
        })
    })
    .map_err(|e| e.to_string())?;
    let launch::Launched {
        outcome,
        timings,
        config,
    } = launched;
    drop(initrd);

    let (mut results, coverage_data) = {
        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
        (
            std::mem::take(&mut r.results),
            std::mem::take(&mut r.coverage),
        )
    };
    report::complete(&mut results, &payload.programs);
    let finished = matches!(outcome, Outcome::Finished);
    let words = outcome_words(&outcome);
    let mut status = status_of(outcome);
    if finished && cli.command_mode {
        // The command's own status, as `vexec` reports it.
        let r = results.first();
        status = match (r.and_then(|r| r.exit_code), r.and_then(|r| r.signal)) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => STATUS_FAILED,
        };
        if let Some(e) = r.and_then(|r| r.error.as_ref()) {
            crate::say!("{e}");
        }
        return Ok(status);
    }
    if finished && results.iter().any(|r| r.result != "pass") {
        status = 1;
    }
    if !cli.command_mode && (!cli.machine.quiet || status != 0) {
        crate::say!(
            "vexec: run-dir on {} ({}):\n{}",
            kernel.release(),
            arch.name(),
            report::summary(&results)
        );
    }
    let build_tree = cli.build_tree.clone().or_else(|| {
        kernel
            .config
            .as_deref()
            .and_then(Path::parent)
            .filter(|d| d.join("Makefile").is_file())
            .map(Path::to_path_buf)
    });
    let mut coverage_saved = None;
    if !coverage_data.is_empty() {
        match &out {
            Some(o) => {
                let saved = coverage::save(
                    &coverage_data,
                    &coverage::Capture {
                        out: o,
                        build_tree: build_tree.as_deref(),
                        lcov: !cli.no_lcov,
                        path_var: path_var.as_deref(),
                    },
                )?;
                if !cli.machine.quiet {
                    crate::say!(
                        "vexec: kernel coverage: {}{}",
                        saved
                            .lcov
                            .as_ref()
                            .or(saved.archive.as_ref())
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        saved
                            .note
                            .as_ref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    );
                }
                coverage_saved = Some(saved);
            }
            None if !cli.machine.quiet => crate::say!(
                "vexec: the kernel has GCOV data ({} KiB); pass --output DIR to keep it",
                coverage_data.len() / 1024
            ),
            None => {}
        }
    }
    if let Some(o) = &out {
        let dir = std::path::absolute(&cli.dir).unwrap_or_else(|_| cli.dir.clone());
        let record = crate::report::record::RunRecord::new(
            &kernel,
            &config,
            status,
            words,
            crate::report::record::Timings {
                host_prep: prep.as_millis() as u64,
                boot_to_agent: None,
                boot_to_init: timings
                    .ready
                    .zip(timings.spawned)
                    .map(|(r, s)| (r - s).as_millis() as u64),
                command: None,
                total: t0.elapsed().as_millis() as u64,
            },
            crate::report::record::ModeRecord::Batch {
                arch: arch.name(),
                firmware: firmware.as_deref(),
                dir,
                busybox: payload.busybox.as_deref(),
                tags: &cli.tag,
                programs: &results,
                coverage: coverage_saved.as_ref(),
            },
        );
        let path = o.join("run.json");
        let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
        std::fs::write(&path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(status)
}

/// `vexec --root DIR -k KERNEL -- COMMAND` with a kernel of a foreign
/// architecture: the command runs chrooted into DIR (shared read-only over
/// 9p, overlaid with tmpfs) from the busybox init, as root, with a clean
/// environment. Its output comes back when it ends.
pub fn run_in_root(
    spec: &crate::modes::spec::RunSpec,
    kernel: &kernel::Kernel,
    root: &Path,
    relay: &SignalRelay,
) -> Result<i32, String> {
    if !(root.join("bin").exists() || root.join("usr/bin").is_dir()) {
        return Err(format!(
            "--root {}: not a root filesystem (no bin/ or usr/bin/ in it)",
            root.display()
        ));
    }
    if spec.argv.is_empty() || spec.shell {
        return Err(
            "--root with a foreign-architecture kernel runs a command, not an interactive shell; give the command after --"
                .into(),
        );
    }
    if spec.accel == AccelChoice::Kvm {
        return Err(format!(
            "--accel kvm: an {} guest on this host can only be emulated (TCG)",
            kernel.info.arch.name()
        ));
    }
    let root =
        std::fs::canonicalize(root).map_err(|e| format!("--root {}: {e}", root.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("vexec-root-cmd-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?;
    let program = dir.path().join("command");
    let quoted: Vec<String> = spec
        .argv
        .iter()
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect();
    let term = spec
        .env
        .iter()
        .find(|(k, _)| k == "TERM")
        .map(|(_, v)| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "linux".into());
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\nexec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM={} chroot /vexec/root {}\n",
            shell_quote(&term),
            quoted.join(" ")
        ),
    )
    .map_err(|e| format!("writing {}: {e}", program.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let cli = cli::RunDirCli {
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
        machine: crate::cli::MachineOptions {
            modules: spec.modules.clone(),
            memory: Some(spec.memory.clone()),
            cpus: Some(spec.cpus),
            // A foreign architecture is always emulated.
            accel: Some(AccelChoice::Tcg),
            timeout: spec.timeout,
            boot_timeout: spec.boot_timeout,
            kernel_args: spec.kernel_args.clone(),
            qemu: spec.qemu.clone(),
            gdb: spec.gdb,
            verbose: spec.verbose,
            quiet: true,
        },
        root: Some(root),
        command_mode: true,
    };
    run(&cli, relay, Some(kernel.clone()))
}

/// `s` quoted for `sh`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=/,.:+@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("uname"), "uname");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
