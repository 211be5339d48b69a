//! The plain run (and the shell): from [`RunSpec`] to exit status. It
//! resolves the kernel, prepares the boot artifacts and the shares, asks
//! [`launch`] for the machine, and reports how the command ended.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::artifacts::cache::{Cache, CacheError};
use crate::artifacts::{self, BootArtifacts, PrepareError};
use crate::host::events::SignalRelay;
use crate::host::outcome::Outcome;
use crate::host::params::Job;
use crate::kernel::image::Arch;
use crate::kernel::{self, Kernel, ResolveError, resolve::Defaults};
use crate::launch::plan::{self, BootPlan, BootRequest, Found, ROOT_TAG};
use crate::launch::shares::{self, NotARoot, ResolvedShare, ShareError, ShareRequest};
use crate::launch::transport::{self, Chosen, TransportError};
use crate::launch::warm::WarmStart;
use crate::launch::{self, LaunchError, Launched, Watch};
use crate::modes::command::exec_for;
use crate::modes::persistent::reach::{self, Reach};
use crate::modes::rundir::RunDirError;
use crate::modes::spec::RunSpec;
use crate::protocol::{Exec, Exit, Setup, ShareMode, Transport};
use crate::report::oops::{self, Splat};
use crate::report::record::{self, OutputDir, RecordError, RunRecord};
use crate::report::results::{self, Collector};
use crate::report::{
    keep_hang_report, outcome_words, print_timings, report_aftermath, report_hang, report_splats,
    status_of,
};
use crate::sys::terminal;
use crate::vm::qemu;
use crate::vm::virtiofsd;
use crate::vm::{self as vmmod, VmError};

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
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    ForeignRoot(#[from] RunDirError),
    #[error("no command given; usage: vexec [OPTIONS] [--] COMMAND [ARGS...]")]
    NoCommand,
    #[error(
        "{image} is a kernel for {arch}: commands run with the host's x86_64 userspace need an x86_64 kernel; to boot it, use `vexec run-dir --arch {arch} -k KERNEL DIR` (initramfs only) or add `--root DIR` with a root filesystem of that architecture"
    )]
    ForeignKernel { image: String, arch: &'static str },
    #[error(transparent)]
    NotARoot(#[from] NotARoot),
    #[error("--net is not possible: {0}")]
    NoNet(String),
}

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
    // Checked first: a host without QEMU is told so before anything else.
    vmmod::find_qemu(spec.qemu.as_deref(), spec.path_var.clone())?;
    let output = spec.output.as_deref().map(OutputDir::create).transpose()?;
    let shares = shares_for(spec, output.as_ref())?;
    let cache = Cache::open(spec.cache_dir.clone())?;
    let kernel = resolve_kernel(spec, &cache)?;
    if kernel.info.arch != Arch::X86_64 {
        return foreign(spec, &kernel, relay);
    }
    let writable = writable_of(&shares);
    let Machine {
        kernel,
        chosen,
        art,
        mut plan,
        setup,
        start,
    } = machine(spec, &cache, kernel, shares)?;
    if spec.dry_run {
        print_dry_run(&plan);
        return Ok(0);
    }
    // `vexec exec run-PID` reaches the run while it runs.
    let reach = Reach::open(spec, &kernel.info.release, writable, relay);
    if reach.is_some() {
        plan.config.exec_port_fds = vec![-1; reach::RUN_PORTS];
    }
    let exec = exec_with_output(spec, output.as_ref());
    let collector = spec.results.map(Collector::new);
    if let Some(port) = spec.gdb {
        launch::announce_gdb(
            port,
            Arch::X86_64,
            kernel.symbol_file().as_deref(),
            &art.kernel,
        );
    }
    let console_log =
        (spec.console_log.clone()).or_else(|| output.as_ref().map(|o| o.console_log()));
    let watch = watch_for(spec, console_log);
    let prep = t0.elapsed();
    let warm = warm_start_for(spec, &cache);
    let launched = launch::launch(&start, plan, &watch, &warm, relay, || Job::Command {
        setup: Box::new(setup.clone()),
        exec: Box::new(exec.clone()),
        tap: collector.as_ref().map(Collector::tap),
        server: reach.as_ref().map(Reach::server),
    })?;
    drop(reach);
    if spec.verbose {
        print_timings(prep, &launched.timings, t0);
    }
    let ended = Ended::report(spec, &kernel, launched, collector.as_ref());
    if let Some(o) = &output {
        keep_record(o, spec, &kernel, &chosen, &ended, prep, t0);
    }
    Ok(ended.status)
}

/// A machine planned for the host's root with an x86_64 kernel: what a
/// plain run and a persistent VM (`vexec up`) both launch.
pub struct Machine {
    pub kernel: Kernel,
    pub chosen: Chosen,
    pub art: BootArtifacts,
    pub plan: BootPlan,
    /// How the guest builds its root.
    pub setup: Setup,
    pub start: launch::Start,
}

/// Plans the machine `spec` asks for, with `kernel` and `shares`.
pub fn machine(
    spec: &RunSpec,
    cache: &Cache,
    kernel: Kernel,
    shares: Vec<ResolvedShare>,
) -> Result<Machine, RunError> {
    let qemu_bin = vmmod::find_qemu(spec.qemu.as_deref(), spec.path_var.clone())?;
    let root = root_of(spec)?;
    let (chosen, art) = prepare(spec, cache, &kernel)?;
    if spec.verbose {
        describe(&kernel, &art, &chosen, &shares);
    }
    let start = launch::Start {
        accel: spec.accel,
        gdb: spec.gdb,
        boot_timeout: spec.boot_timeout,
        slow_boot: false,
        quiet: spec.quiet,
    };
    let found = Found {
        default_firmware: qemu::default_firmware(Arch::X86_64, &qemu_bin),
        qemu: qemu_bin,
        accel: launch::first_accel(&start, cache.root()),
        firmware: None,
        image: kernel.image.clone(),
        direct_kernel: art.kernel.clone(),
        initrd: art.initramfs.clone(),
        transport: chosen.transport,
        virtiofsd: chosen.virtiofsd.clone(),
        hotplug: art.hotplug,
    };
    let plan = plan::plan(&boot_request(spec, root, shares), &found);
    let setup = setup_for(spec, &chosen, &plan, &art);
    Ok(Machine {
        kernel,
        chosen,
        art,
        plan,
        setup,
        start,
    })
}

/// The host directories `shares` writes through to.
pub fn writable_of(shares: &[ResolvedShare]) -> Vec<PathBuf> {
    (shares.iter())
        .filter(|s| s.mode == ShareMode::ReadWrite)
        .map(|s| s.path.clone())
        .collect()
}

/// How a run of `spec` is watched: its deadline, verbosity, console log
/// and panic dump.
pub fn watch_for(spec: &RunSpec, console_log: Option<PathBuf>) -> Watch {
    Watch {
        timeout: spec.timeout,
        verbose: spec.verbose,
        console_log,
        dump_on_panic: spec.dump_on_panic.clone(),
    }
}

/// Warm start as `spec` asks for it: off with a reason, or its cap and
/// verbosity.
pub fn warm_start_for(spec: &RunSpec, cache: &Cache) -> WarmStart {
    WarmStart::new(
        cold_reason(spec),
        cache.clone(),
        spec.snapshot_cap,
        spec.verbose,
        spec.quiet,
    )
}

/// Why this run boots rather than restoring a saved guest, if it must.
fn cold_reason(spec: &RunSpec) -> Option<String> {
    if spec.cold {
        Some("--cold".into())
    } else if spec.gdb.is_some() {
        Some("--gdb debugs the kernel from its first instruction".into())
    } else {
        None
    }
}

/// The shares the user asked for, and `--output`'s directory.
pub fn shares_for(
    spec: &RunSpec,
    output: Option<&OutputDir>,
) -> Result<Vec<ResolvedShare>, RunError> {
    let mut requests = spec.shares.clone();
    if let Some(o) = output {
        requests.push(ShareRequest {
            path: o.command_dir(),
            mode: ShareMode::ReadWrite,
        });
    }
    Ok(shares::resolve(&requests, &spec.cwd, spec.share_cwd)?)
}

pub fn resolve_kernel(spec: &RunSpec, cache: &Cache) -> Result<Kernel, RunError> {
    let defaults = Defaults {
        running: spec.running_release.clone(),
        boot_dir: PathBuf::from("/boot"),
        store: Some(cache.root().join("kernels")),
    };
    Ok(kernel::resolve(
        spec.kernel.as_deref(),
        spec.modules.as_deref(),
        &defaults,
    )?)
}

/// A kernel of another architecture: only with a root of its own.
fn foreign(spec: &RunSpec, kernel: &Kernel, relay: &SignalRelay) -> Result<i32, RunError> {
    match &spec.root {
        Some(root) => Ok(crate::modes::rundir::run_in_root(
            spec, kernel, root, relay,
        )?),
        None => Err(RunError::ForeignKernel {
            image: kernel.image.display().to_string(),
            arch: kernel.info.arch.name(),
        }),
    }
}

/// The directory the guest's root is made of: the host's, or `--root`.
fn root_of(spec: &RunSpec) -> Result<PathBuf, RunError> {
    match &spec.root {
        Some(r) => Ok(shares::root_dir(r)?),
        None => Ok(PathBuf::from("/")),
    }
}

/// The transport, and the kernel and initramfs to boot with it.
fn prepare(
    spec: &RunSpec,
    cache: &Cache,
    kernel: &Kernel,
) -> Result<(Chosen, BootArtifacts), RunError> {
    let inspected = artifacts::inspect(cache, kernel)?;
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
        return Err(RunError::NoNet(why.clone()));
    }
    let agent = crate::artifacts::initramfs::agent_executable()?;
    let interactive = !spec.quiet && terminal::is_tty(2);
    let art = artifacts::prepare(
        cache,
        kernel,
        &inspected,
        chosen.transport,
        spec.net,
        &agent,
        interactive,
    )?;
    Ok((chosen, art))
}

/// What `-v` says about the kernel, its artifacts and the shares.
fn describe(kernel: &Kernel, art: &BootArtifacts, chosen: &Chosen, shares: &[ResolvedShare]) {
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
        shares::describe(shares)
    );
    if let Some(n) = &chosen.note {
        crate::say!("vexec: {n}");
    }
}

/// The machine the spec asks for.
fn boot_request(spec: &RunSpec, root: PathBuf, shares: Vec<ResolvedShare>) -> BootRequest {
    BootRequest {
        arch: Arch::X86_64,
        cpus: spec.cpus,
        memory: spec.memory.clone(),
        kernel_args: spec.kernel_args.clone(),
        qemu_args: spec.qemu_args.clone(),
        gdb: spec.gdb,
        tcg_single: spec.tcg_threads == crate::vm::accel::TcgThreads::Single,
        verbose: spec.verbose,
        hold_on_panic: spec.dump_on_panic.is_some(),
        net: spec.net.then(|| spec.forwards.clone()),
        root: Some(root),
        shares,
    }
}

/// `--dry-run`: the daemons' and QEMU's command lines. Each daemon's
/// socket is an inherited descriptor, shown as -1 (its number is known
/// only at run time).
fn print_dry_run(plan: &BootPlan) {
    for (_, d) in &plan.daemons {
        println!("{}", qemu::shell_line(&d.virtiofsd.path, &d.args(-1)));
    }
    let config = &plan.config;
    println!("{}", qemu::shell_line(&config.binary, &qemu::argv(config)));
}

/// How the guest builds its root.
fn setup_for(spec: &RunSpec, chosen: &Chosen, plan: &BootPlan, art: &BootArtifacts) -> Setup {
    // The module tree is shown from the host's root; another root does
    // not hold it (the modules the guest needs to boot are loaded).
    let host_root = spec.root.is_none();
    Setup {
        transport: chosen.transport,
        root_tag: ROOT_TAG.into(),
        shares: plan.guest_shares.clone(),
        modules: art.modules.as_deref().map(bytes).filter(|_| host_root),
        module_index: art.module_index.as_deref().map(bytes).filter(|_| host_root),
        hostname: spec.hostname.clone(),
        msize: MSIZE,
        verbose: spec.verbose,
        net: spec.net,
        // Filled in as it is sent.
        fresh: Default::default(),
        virtiofs_fd_budget: (chosen.transport == Transport::Virtiofs)
            .then(virtiofsd::guest_fd_budget),
        // Filled in as it is sent, from the machine's ports and devices.
        served: Default::default(),
        plugged: 0,
        limits: spec.limits.clone(),
        device_nodes: if host_root {
            let dirs = [art.module_index.as_deref(), art.modules.as_deref()];
            kernel::devnames::nodes(&dirs.into_iter().flatten().collect::<Vec<_>>())
        } else {
            Vec::new()
        },
    }
}

/// The command, told where `--output`'s directory is.
fn exec_with_output(spec: &RunSpec, output: Option<&OutputDir>) -> Exec {
    let mut exec = exec_for(spec);
    exec.kernel_log = spec.fail_on_oops || output.is_some() || spec.results.is_some();
    if let Some(o) = output {
        exec.env.retain(|(k, _)| k != b"VEXEC_OUTPUT");
        exec.env
            .push((b"VEXEC_OUTPUT".to_vec(), bytes(&o.command_dir())));
    }
    exec
}

/// How the run ended, told to the user.
struct Ended {
    launched: Launched,
    status: i32,
    words: String,
    splats: Vec<Splat>,
}

impl Ended {
    /// Reports the end (aftermath, hang, splats) and settles the status.
    fn report(
        spec: &RunSpec,
        kernel: &Kernel,
        launched: Launched,
        collector: Option<&Collector>,
    ) -> Ended {
        let timings = &launched.timings;
        let splats = (timings.kernel_log.as_deref())
            .map(|l| oops::find(&String::from_utf8_lossy(l)))
            .unwrap_or_default();
        report_aftermath(
            &timings.aftermath,
            &launched.outcome,
            spec.verbose,
            &spec.memory,
            spec.output_grace,
        );
        let words = outcome_words(&launched.outcome);
        let mut status = status_of(&launched.outcome);
        if let Some(h) = &timings.hang {
            report_hang(h);
            if let Some(dir) = &spec.hang_reports {
                keep_hang_report(dir, h, &spec.argv, &kernel.image);
            }
        } else if let (Some(s), Some(dir)) = (&timings.stall, &spec.hang_reports) {
            // Said when it happened; kept even though the run ended.
            keep_hang_report(dir, s, &spec.argv, &kernel.image);
        }
        if !splats.is_empty() {
            report_splats(&splats, spec.fail_on_oops && status == 0);
            if spec.fail_on_oops && status == 0 {
                status = 1;
            }
        }
        if let Some(c) = collector {
            let early = (!matches!(launched.outcome, Outcome::Exited(Exit::Code(_))))
                .then(|| format!("the run ended early ({words})"));
            let results = c.finish(timings.kernel_log.as_deref(), early.as_deref());
            status = results::settle(&results, status);
            if let Some(path) = &spec.cases_out {
                let written = serde_json::to_vec(&results)
                    .map_err(std::io::Error::other)
                    .and_then(|j| std::fs::write(path, j));
                if let Err(e) = written {
                    crate::say!(
                        "vexec: warning: writing the test cases to {}: {e}",
                        path.display()
                    );
                }
            }
        }
        Ended {
            launched,
            status,
            words,
            splats,
        }
    }
}

/// Writes `--output`'s record; a failure is a warning (the command ran).
fn keep_record(
    o: &OutputDir,
    spec: &RunSpec,
    kernel: &Kernel,
    chosen: &Chosen,
    ended: &Ended,
    prep: Duration,
    t0: Instant,
) {
    let ms = |d: Duration| d.as_millis() as u64;
    let timings = &ended.launched.timings;
    let record = RunRecord::new(
        kernel,
        &ended.launched.config,
        ended.status,
        ended.words.clone(),
        record::Timings {
            start: if timings.restored { "warm" } else { "cold" },
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
            splats: &ended.splats,
        },
    );
    if let Err(e) = o.finish(timings.kernel_log.as_deref(), &record) {
        crate::say!("vexec: warning: {e}");
    }
}
