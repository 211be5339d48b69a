//! One run from [`RunSpec`] to exit status: resolve the kernel, prepare the
//! boot artifacts, choose the accelerator, run the session (rerunning under
//! TCG when KVM proves broken), and map the outcome to an exit status.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::artifacts::cache::{Cache, CacheError};
use crate::artifacts::{self, PrepareError};
use crate::host::session::{Job, Params, SignalRelay};
use crate::host::terminal;
use crate::kernel::{self, ResolveError, resolve::Defaults};
use crate::launch;
use crate::launch::shares::{self, ShareError, ShareRequest};
use crate::launch::transport::{self, TransportError};
use crate::modes::spec::{RunSpec, TtyMode};
use crate::protocol::{Exec, Setup, Share, ShareMode, Transport, Tty};
use crate::report::oops;
use crate::report::record::{self, OutputDir, RunRecord};
use crate::report::{
    keep_hang_report, outcome_words, print_timings, report_aftermath, report_hang, report_splats,
    status_of,
};
use crate::vm::qemu::{self, Backend, QemuConfig, ShareDevice};
use crate::vm::virtiofsd::{self, DaemonSpec};
use crate::vm::{self as vmmod, VmError};

/// Exit status for vexec's own failures.
pub const STATUS_FAILED: i32 = 125;
/// Exit status when --timeout expired.
pub const STATUS_TIMEOUT: i32 = 124;

/// Anything that stops a run before the command could finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("no command given; usage: vexec [OPTIONS] [--] COMMAND [ARGS...]")]
    NoCommand,
    #[error("cannot find vexec's own executable to use as the guest's init: {0}")]
    SelfExe(std::io::Error),
    #[error("{0}")]
    Failed(String),
}

const ROOT_TAG: &str = "vexec-root";
/// 9p's largest message size over virtio on every kernel we boot.
const MSIZE: u32 = 512_000;

fn bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// Runs the spec; returns vexec's exit status.
pub fn run(spec: &RunSpec, relay: &SignalRelay) -> Result<i32, RunError> {
    let t0 = Instant::now();
    if spec.argv.is_empty() {
        return Err(RunError::NoCommand);
    }
    let qemu_bin = vmmod::find_qemu(spec.qemu.as_deref(), spec.path_var.clone())?;
    let output = spec
        .output
        .as_deref()
        .map(OutputDir::create)
        .transpose()
        .map_err(RunError::Failed)?;
    let mut requests = spec.shares.clone();
    if let Some(o) = &output {
        requests.push(ShareRequest {
            path: o.command_dir(),
            mode: ShareMode::ReadWrite,
        });
    }
    let shares = shares::resolve(&requests, &spec.cwd, spec.share_cwd)?;
    let cache = Cache::open(spec.cache_dir.clone())?;
    let defaults = Defaults {
        running: spec.running_release.clone(),
        boot_dir: PathBuf::from("/boot"),
        store: Some(cache.root().join("kernels")),
    };
    let kernel = kernel::resolve(spec.kernel.as_deref(), spec.modules.as_deref(), &defaults)?;
    if kernel.info.arch != kernel::image::Arch::X86_64 {
        if let Some(root) = &spec.root {
            return crate::modes::rundir::run_in_root(spec, &kernel, root, relay)
                .map_err(RunError::Failed);
        }
        return Err(RunError::Failed(format!(
            "{} is a kernel for {}: commands run with the host's x86_64 userspace need an x86_64 kernel; to boot it, use `vexec run-dir --arch {} -k KERNEL DIR` (initramfs only) or add `--root DIR` with a root filesystem of that architecture",
            kernel.image.display(),
            kernel.info.arch.name(),
            kernel.info.arch.name()
        )));
    }
    let root = match &spec.root {
        Some(r) if r.join("bin").exists() || r.join("usr/bin").is_dir() => {
            std::fs::canonicalize(r).unwrap_or_else(|_| r.clone())
        }
        Some(r) => {
            return Err(RunError::Failed(format!(
                "--root {}: not a root filesystem (no bin/ or usr/bin/ in it)",
                r.display()
            )));
        }
        None => PathBuf::from("/"),
    };
    let custom_root = spec.root.as_ref().map(|_| root.clone());
    let inspected = artifacts::inspect(&cache, &kernel)?;
    let chosen = transport::choose(spec.transport, &inspected.support, || {
        let dirs: Vec<PathBuf> = virtiofsd::DESCRIPTOR_DIRS
            .iter()
            .map(PathBuf::from)
            .collect();
        virtiofsd::find(
            spec.virtiofsd.as_deref(),
            spec.path_var.as_deref(),
            &dirs,
            spec.uid == 0,
        )
    })?;
    if let (true, Some(why)) = (spec.net, &inspected.support.net) {
        return Err(RunError::Failed(format!("--net is not possible: {why}")));
    }
    let agent = crate::artifacts::initramfs::agent_executable().map_err(RunError::SelfExe)?;
    let interactive = !spec.quiet && terminal::is_tty(2);
    let art = artifacts::prepare(
        &cache,
        &kernel,
        &inspected,
        chosen.transport,
        spec.net,
        &agent,
        interactive,
    )?;
    if spec.verbose {
        crate::say!(
            "vexec: kernel {} ({}), booted as {}, modules {}",
            kernel.info.banner,
            kernel.image.display(),
            if art.pvh {
                "vmlinux via PVH"
            } else {
                "bzImage"
            },
            kernel
                .modules
                .as_ref()
                .map_or("none".into(), |m| m.display().to_string())
        );
        for n in &art.notes {
            crate::say!("vexec: {n}");
        }
        crate::say!(
            "vexec: transport {}{}; shares: / read-only with overlay{}{}",
            chosen.transport.name(),
            chosen
                .virtiofsd
                .as_ref()
                .map(|v| format!(" ({}, {:?})", v.path.display(), v.flavour))
                .unwrap_or_default(),
            if shares.is_empty() { "" } else { ", " },
            shares::describe(&shares)
        );
        if let Some(n) = &chosen.note {
            crate::say!("vexec: {n}");
        }
    }

    // Every share, the root first, as devices (and daemons for virtio-fs).
    let mut devices = Vec::new();
    let mut daemons = Vec::new();
    let mut add = |tag: String, path: PathBuf, mode: ShareMode, cache: &'static str| {
        let readonly = mode != ShareMode::ReadWrite;
        let backend = match (&chosen.virtiofsd, chosen.transport) {
            (Some(v), Transport::Virtiofs) => {
                daemons.push((
                    devices.len(),
                    DaemonSpec {
                        virtiofsd: v.clone(),
                        source: path.clone(),
                        readonly,
                        cache,
                        submounts: mode != ShareMode::Overlay,
                    },
                ));
                // The real descriptor is known once the daemon runs.
                Backend::Virtiofs { fd: -1 }
            }
            _ => Backend::NineP,
        };
        devices.push(ShareDevice {
            tag,
            path,
            readonly,
            backend,
        });
    };
    // The root is read-only and rarely changes under a run: cache it all.
    add(ROOT_TAG.into(), root, ShareMode::Overlay, "always");
    let mut guest_shares = Vec::new();
    for (i, s) in shares.iter().enumerate() {
        let tag = format!("vexec-s{i}");
        add(tag.clone(), s.path.clone(), s.mode, "auto");
        guest_shares.push(Share {
            tag,
            path: bytes(&s.path),
            mode: s.mode,
        });
    }
    let setup = Setup {
        transport: chosen.transport,
        root_tag: ROOT_TAG.into(),
        shares: guest_shares,
        // The module tree is shown from the host's root; another root
        // does not hold it (modules the guest needs to boot are loaded).
        modules: art
            .modules
            .as_deref()
            .map(bytes)
            .filter(|_| custom_root.is_none()),
        module_index: art
            .module_index
            .as_deref()
            .map(bytes)
            .filter(|_| custom_root.is_none()),
        hostname: spec.hostname.clone(),
        msize: MSIZE,
        verbose: spec.verbose,
        net: spec.net,
    };
    let mut exec = exec_for(spec);
    exec.kernel_log = spec.fail_on_oops || output.is_some();
    if let Some(o) = &output {
        exec.env.retain(|(k, _)| k != b"VEXEC_OUTPUT");
        exec.env
            .push((b"VEXEC_OUTPUT".to_vec(), bytes(&o.command_dir())));
    }

    let start = launch::Start {
        accel: spec.accel,
        gdb: spec.gdb,
        boot_timeout: spec.boot_timeout,
        slow_boot: false,
        quiet: spec.quiet,
    };
    let accel = launch::first_accel(&start, cache.root());
    let mut kernel_args = spec.kernel_args.clone();
    let mut qemu_args = spec.qemu_args.clone();
    if let Some(port) = spec.gdb {
        launch::add_gdb(port, &mut kernel_args, &mut qemu_args);
    }
    let arch = kernel::image::Arch::X86_64;
    let config = QemuConfig {
        firmware: qemu::default_firmware(arch, &qemu_bin),
        binary: qemu_bin,
        arch,
        accel,
        cpus: spec.cpus,
        memory: spec.memory.clone(),
        kernel: art.kernel.clone(),
        initrd: art.initramfs.clone(),
        cmdline: qemu::cmdline(spec.verbose, spec.dump_on_panic.is_some(), &kernel_args),
        shares: devices,
        net: spec.net.then(|| spec.forwards.clone()),
        console_fd: 3,
        control_fd: 4,
        qmp_fd: None,
        extra: qemu_args,
    };
    if spec.dry_run {
        // Each daemon's socket is passed as an inherited descriptor, shown
        // here as -1 (its number is known only at run time).
        for (_, d) in &daemons {
            println!("{}", qemu::shell_line(&d.virtiofsd.path, &d.args(-1)));
        }
        println!("{}", qemu::shell_line(&config.binary, &qemu::argv(&config)));
        return Ok(0);
    }
    if let Some(port) = spec.gdb {
        let symbols = symbol_file(&kernel, &art.kernel);
        crate::say!(
            "vexec: the guest waits for gdb; attach with:\n  gdb -ex 'target remote localhost:{port}' {}{}",
            symbols.display(),
            if symbols == art.kernel {
                "\nvexec: (no vmlinux with debug symbols found beside the kernel or in /usr/lib/debug; use hbreak *ADDR with addresses from /proc/kallsyms)"
            } else {
                ""
            }
        );
    }
    let prep = t0.elapsed();
    let console_log = spec
        .console_log
        .clone()
        .or_else(|| output.as_ref().map(|o| o.console_log()));
    let launched = launch::launch(&start, config, cache.root(), relay, |config, boot| {
        let log = match &console_log {
            Some(p) => Some(std::fs::File::create(p).map_err(|e| {
                RunError::Failed(format!("cannot write the console log {}: {e}", p.display()))
            })?),
            None => None,
        };
        Ok::<_, RunError>(Params {
            qemu: config.clone(),
            daemons: daemons.clone(),
            job: Job::Command {
                setup: Box::new(setup.clone()),
                exec: Box::new(exec.clone()),
            },
            timeout: spec.timeout,
            boot_timeout: boot.timeout,
            kvm_probe: boot.kvm_probe,
            verbose: spec.verbose,
            console_log: log,
            print_qemu: spec.verbose,
            dump_on_panic: spec.dump_on_panic.clone(),
        })
    })?;
    let launch::Launched {
        outcome,
        timings,
        config,
    } = launched;
    if spec.verbose {
        print_timings(prep, &timings, t0);
    }
    let kernel_log = timings.kernel_log.as_deref();
    let splats = kernel_log
        .map(|l| oops::find(&String::from_utf8_lossy(l)))
        .unwrap_or_default();
    report_aftermath(&timings.aftermath, &outcome, spec);
    let words = outcome_words(&outcome);
    let mut status = status_of(outcome);
    if let Some(h) = &timings.hang {
        report_hang(h);
        if let Some(dir) = &spec.hang_reports {
            keep_hang_report(dir, h, spec, &kernel.image);
        }
    }
    if !splats.is_empty() {
        report_splats(&splats, spec.fail_on_oops && status == 0);
        if spec.fail_on_oops && status == 0 {
            status = 1;
        }
    }
    if let Some(o) = &output {
        let ms = |d: Duration| d.as_millis() as u64;
        let record = RunRecord::new(
            &kernel,
            &config,
            status,
            words,
            record::Timings {
                host_prep: ms(prep),
                boot_to_agent: Some(timings.guest_ready_ms),
                boot_to_init: None,
                command: Some(
                    timings
                        .guest_exited_ms
                        .zip(timings.guest_started_ms)
                        .map_or(0, |(e, s)| e.saturating_sub(s)),
                ),
                total: ms(t0.elapsed()),
            },
            record::ModeRecord::Command {
                transport: chosen.transport.name(),
                command: spec
                    .argv
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
                splats: &splats,
            },
        );
        if let Err(e) = o.finish(kernel_log, &record) {
            crate::say!("vexec: warning: {e}");
        }
    }
    Ok(status)
}

/// The command as the guest runs it: as the caller, or with `--sudo` as
/// root with the caller's environment plus what sudo adds.
fn exec_for(spec: &RunSpec) -> Exec {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let (uid, gid, groups) = if spec.sudo {
        let user = env
            .iter()
            .find(|(k, _)| k == b"USER")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| spec.uid.to_string().into_bytes());
        let set: [(&[u8], Vec<u8>); 5] = [
            (b"SUDO_USER", user),
            (b"SUDO_UID", spec.uid.to_string().into_bytes()),
            (b"SUDO_GID", spec.gid.to_string().into_bytes()),
            (b"USER", b"root".to_vec()),
            (b"LOGNAME", b"root".to_vec()),
        ];
        env.retain(|(k, _)| !set.iter().any(|(s, _)| k == s));
        env.extend(set.into_iter().map(|(k, v)| (k.to_vec(), v)));
        (0, 0, vec![0])
    } else {
        (spec.uid, spec.gid, spec.groups.clone())
    };
    Exec {
        argv: spec.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd: bytes(&spec.cwd),
        uid,
        gid,
        groups,
        setup: spec.setup.iter().map(|c| c.as_bytes().to_vec()).collect(),
        teardown: spec
            .teardown
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        tty: tty_for(spec),
        kernel_log: false,
        output_grace_ms: spec.output_grace.as_millis() as u64,
    }
}

/// Which of the command's descriptors are a terminal in the guest.
fn tty_for(spec: &RunSpec) -> Option<Tty> {
    let (stdin, stdout, stderr) = match spec.tty {
        TtyMode::Never => return None,
        TtyMode::Always => (true, true, true),
        TtyMode::Auto => (
            terminal::is_tty(0),
            terminal::is_tty(1),
            terminal::is_tty(2),
        ),
    };
    if !(stdin || stdout || stderr) {
        return None;
    }
    let (rows, cols) = terminal::window_size(&[0, 1, 2]).unwrap_or((24, 80));
    Some(Tty {
        stdin,
        stdout,
        stderr,
        rows,
        cols,
        job_control: spec.shell,
        host_raw: stdin && terminal::is_tty(0),
    })
}

/// The kernel image with debug symbols for gdb: `vmlinux` in a build
/// tree, Debian's and Ubuntu's debug packages, else the image vexec boots.
pub(crate) fn symbol_file(kernel: &kernel::Kernel, booted: &Path) -> PathBuf {
    let rel = kernel.release();
    let mut candidates = Vec::new();
    // .../arch/x86/boot/bzImage (or arch/arm64/boot/Image) -> .../vmlinux
    if let Some(tree) = kernel.image.ancestors().nth(4)
        && (kernel.image.ends_with("arch/x86/boot/bzImage")
            || kernel.image.ends_with("arch/arm64/boot/Image"))
    {
        candidates.push(tree.join("vmlinux"));
    }
    if let Some(dir) = kernel.image.parent() {
        candidates.push(dir.join("vmlinux"));
        candidates.push(dir.join(format!("vmlinux-{rel}")));
    }
    candidates.push(PathBuf::from(format!("/usr/lib/debug/boot/vmlinux-{rel}")));
    candidates.push(PathBuf::from(format!(
        "/usr/lib/debug/lib/modules/{rel}/vmlinux"
    )));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| booted.to_path_buf())
}
