//! `vexec run-dir`: boot a kernel with nothing but an initramfs, run every
//! executable of a directory in it, report each one, keep the run's
//! record, and collect the kernel's GCOV coverage. x86_64 guests run
//! vexec's own agent as init; guests of other architectures (aarch64 under
//! `qemu-system-aarch64 -M virt`) run a busybox script speaking the same
//! protocol's batch subset.

pub mod coverage;
pub mod options;
mod outdir;
pub(crate) mod payload;
pub mod report;
mod root;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::artifacts::cache::{Cache, CacheError};
use crate::artifacts::{self, PrepareError};
use crate::host::events::SignalRelay;
use crate::host::outcome::Outcome;
use crate::host::params::Job;
use crate::kernel::image::Arch;
use crate::kernel::{self, Kernel, ResolveError, resolve::Defaults};
use crate::launch::plan::{self, BootRequest, Found, ROOT_TAG};
use crate::launch::warm::WarmStart;
use crate::launch::{self, LaunchError, Launched, Watch};
use crate::protocol::Transport;
use crate::report::record::{self, RecordError, RunRecord};
use crate::report::{outcome_words, status_of};
use crate::status::STATUS_FAILED;
use crate::vm::VmError;
use crate::vm::accel::{AccelChoice, TcgThreads};
use options::RunDirOptions;
use payload::{Payload, PayloadError};
pub use root::run_in_root;

/// Why a batch could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
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
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A `--tag` or `--output` directory (the message says which).
    #[error("{0}")]
    Output(String),
    /// Keeping the coverage (the message says what to do).
    #[error("{0}")]
    Coverage(String),
    #[error(
        "an {0} guest needs a kernel of its own: pass -k KERNEL (Debian's: `vexec kernel fetch --arch {0} linux-image-arm64`, then -k the release it names)"
    )]
    NoKernelFor(&'static str),
    /// Fetching a foreign guest's busybox.
    #[error("fetching a busybox for the guest (or pass --busybox PATH): {0}")]
    Busybox(#[from] crate::store::StoreError),
    #[error("--arch {wanted} but {image} is a kernel for {arch}")]
    WrongArch {
        wanted: &'static str,
        image: String,
        arch: &'static str,
    },
    #[error(
        "--firmware {0}: no such file; give the path of a QEMU firmware image (e.g. QEMU_EFI.fd)"
    )]
    NoFirmwareFile(String),
    #[error(
        "--uefi: no {arch} UEFI firmware found (looked at {looked}); install it (Debian/Ubuntu: apt-get install {package}) or pass --firmware PATH"
    )]
    NoUefi {
        arch: &'static str,
        looked: String,
        package: &'static str,
    },
    #[error("--accel kvm: an {0} guest on this x86_64 host can only be emulated (TCG)")]
    KvmForeign(&'static str),
    /// Options that cannot go together.
    #[error("{0}")]
    Conflict(&'static str),
    #[error(transparent)]
    NotARoot(#[from] crate::launch::shares::NotARoot),
    #[error(
        "--root with a foreign-architecture kernel runs a command, not an interactive shell; give the command after --"
    )]
    ShellInRoot,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl RunDirError {
    /// Wraps an I/O error with what was being done.
    fn io(what: String) -> impl FnOnce(std::io::Error) -> RunDirError {
        move |source| RunDirError::Io { what, source }
    }
}

/// Firmware files tried by `--uefi`, per architecture (Debian/Ubuntu paths).
const AARCH64_FIRMWARE: &[&str] = &[
    "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
    "/usr/share/edk2/aarch64/QEMU_EFI.fd",
];
const X86_64_FIRMWARE: &[&str] = &["/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"];

/// Entry point: `vexec run-dir ARGS`; returns the exit status.
pub fn main(o: &RunDirOptions) -> i32 {
    let relay = match SignalRelay::install() {
        Ok(r) => r,
        Err(e) => {
            crate::say!("vexec: error: installing signal handlers: {e}");
            return STATUS_FAILED;
        }
    };
    match run(o, &relay, None) {
        Ok(code) => code,
        Err(e) => {
            crate::say!("vexec: error: {e}");
            STATUS_FAILED
        }
    }
}

fn arch_named(name: &str) -> Arch {
    match name {
        "aarch64" | "arm64" => Arch::Aarch64,
        _ => Arch::X86_64,
    }
}

/// The firmware `--firmware` or `--uefi` asks for.
fn firmware(o: &RunDirOptions, arch: Arch) -> Result<Option<PathBuf>, RunDirError> {
    if let Some(f) = &o.firmware {
        if !f.is_file() {
            return Err(RunDirError::NoFirmwareFile(f.display().to_string()));
        }
        return Ok(Some(f.clone()));
    }
    if !o.uefi {
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
        .ok_or_else(|| RunDirError::NoUefi {
            arch: arch.name(),
            looked: candidates.join(", "),
            package,
        })
}

/// Runs the batch `o` describes; `resolved` is its kernel when the caller
/// has already resolved it.
fn run(
    o: &RunDirOptions,
    relay: &SignalRelay,
    resolved: Option<Kernel>,
) -> Result<i32, RunDirError> {
    let t0 = Instant::now();
    if let Some(why) = crate::vm::accel::threads_conflict(o.machine.accel, o.machine.tcg_threads) {
        return Err(RunDirError::Conflict(why));
    }
    for t in &o.tag {
        outdir::check_tag(t).map_err(RunDirError::Output)?;
    }
    let path_var = std::env::var_os("PATH");
    let cache = Cache::open(Cache::default_root(
        std::env::var_os("XDG_CACHE_HOME").map(Into::into),
        std::env::var_os("HOME").map(Into::into),
    ))?;
    let kernel = match resolved {
        Some(k) => k,
        None => resolve_kernel(o, &cache)?,
    };
    let arch = kernel.info.arch;
    let inspected = artifacts::inspect(&cache, &kernel)?;
    let (payload, initrd) = initramfs(o, &cache, &kernel, &inspected, path_var.as_deref())?;
    let qemu = crate::vm::find_qemu_for(arch, o.machine.qemu.as_deref(), path_var.clone())?;
    let firmware = firmware(o, arch)?;
    if arch == Arch::Aarch64 && o.machine.accel == Some(AccelChoice::Kvm) {
        return Err(RunDirError::KvmForeign(arch.name()));
    }
    let start = start_of(o, arch, firmware.is_some());
    let found = Found {
        default_firmware: crate::vm::qemu::default_firmware(arch, &qemu),
        qemu,
        accel: launch::first_accel(&start, cache.root()),
        firmware: firmware.clone(),
        image: kernel.image.clone(),
        direct_kernel: inspected.boot_kernel.clone(),
        initrd: initrd.path().to_path_buf(),
        transport: Transport::NineP,
        virtiofsd: None,
        hotplug: inspected.support.hotplug,
    };
    let plan = plan::plan(&boot_request(o, arch), &found);
    if let Some(port) = o.machine.gdb {
        let symbols = kernel.symbol_file();
        launch::announce_gdb(port, arch, symbols.as_deref(), &kernel.image);
    }
    let out = (o.output.as_deref())
        .map(|dir| outdir::create(dir, &o.tag))
        .transpose()
        .map_err(RunDirError::Output)?;
    if !o.machine.quiet {
        announce(o, &payload, &kernel, firmware.is_some(), out.as_deref());
    }
    let watch = Watch {
        timeout: o.machine.timeout,
        verbose: o.machine.verbose,
        console_log: out.as_ref().map(|dir| dir.join("serial")),
        dump_on_panic: None,
    };
    let prep = t0.elapsed();
    let report = Arc::new(Mutex::new(report::Report::new(
        out.as_ref().map(|dir| dir.join("results")),
        o.machine.quiet,
    )));
    let launched = launch::launch(&start, plan, &watch, &cold(o, &cache), relay, || {
        Job::Batch(Box::new(report::Sink(Arc::clone(&report))))
    })?;
    drop(initrd);
    let batch = Batch::collect(&report, &payload, launched);
    if o.command_mode {
        return Ok(batch.command_status());
    }
    let status = batch.status();
    if !o.machine.quiet || status != 0 {
        crate::say!(
            "vexec: run-dir on {} ({}):\n{}",
            kernel.release(),
            arch.name(),
            report::summary(&batch.results)
        );
    }
    let coverage = keep_coverage(o, &kernel, &batch.coverage, out.as_deref(), &path_var)?;
    if let Some(dir) = &out {
        let kept = Kept {
            status,
            firmware: firmware.as_deref(),
            busybox: payload.busybox.as_deref(),
            coverage: coverage.as_ref(),
            prep,
            t0,
        };
        keep_record(dir, o, &kernel, &batch, &kept)?;
    }
    Ok(status)
}

/// The kernel `-k` names, checked against `--arch`.
fn resolve_kernel(o: &RunDirOptions, cache: &Cache) -> Result<Kernel, RunDirError> {
    let wanted = o.arch.as_deref().map(arch_named);
    if let Some(w) = wanted.filter(|w| *w != Arch::X86_64)
        && o.kernel.is_none()
    {
        return Err(RunDirError::NoKernelFor(w.name()));
    }
    let defaults = Defaults {
        running: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        boot_dir: PathBuf::from("/boot"),
        store: Some(cache.root().join("kernels")),
    };
    let modules = o.machine.modules.as_deref();
    let kernel = kernel::resolve(o.kernel.as_deref(), modules, &defaults)?;
    match wanted {
        Some(w) if w != kernel.info.arch => Err(RunDirError::WrongArch {
            wanted: w.name(),
            image: kernel.image.display().to_string(),
            arch: kernel.info.arch.name(),
        }),
        _ => Ok(kernel),
    }
}

/// The batch's initramfs: the init, the programs, `--add`'s files,
/// busybox and the modules the guest needs.
fn initramfs(
    o: &RunDirOptions,
    cache: &Cache,
    kernel: &Kernel,
    inspected: &artifacts::Inspected,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<(Payload, tempfile::NamedTempFile), RunDirError> {
    let modules = artifacts::batch_modules(cache, kernel, inspected, o.root.is_some())?;
    let agent = crate::artifacts::initramfs::agent_executable()?;
    let fetched = match (&o.busybox, kernel.info.arch == payload::host_arch()) {
        (None, false) => Some(foreign_busybox(cache, kernel.info.arch)?),
        _ => None,
    };
    let payload = payload::build(&payload::Inputs {
        arch: kernel.info.arch,
        dir: &o.dir,
        adds: &o.add,
        busybox: o.busybox.as_deref().or(fetched.as_deref()),
        path_var,
        agent: &agent,
        modules: &modules,
        root_tag: o.root.as_ref().map(|_| ROOT_TAG),
    })?;
    let initrd = write_initrd(cache, &payload)?;
    Ok((payload, initrd))
}

/// A static busybox for a guest of another architecture: Debian's
/// busybox-static for it, fetched once into the cache (kind `busybox`).
fn foreign_busybox(cache: &Cache, arch: Arch) -> Result<PathBuf, RunDirError> {
    let deb = crate::store::debian_arch(arch.name());
    if let Some(p) = cache.get("busybox", deb) {
        return Ok(p);
    }
    crate::say!("vexec: no --busybox given: fetching Debian's busybox-static for {deb} (once)");
    let work = tempfile::Builder::new()
        .prefix(".busybox-")
        .tempdir_in(cache.root())
        .map_err(RunDirError::io(format!(
            "creating a directory in {}",
            cache.root().display()
        )))?;
    let apt = crate::store::own_apt(cache.root(), deb)?;
    let package = apt.download("busybox-static", work.path())?;
    let root = work.path().join("root");
    crate::store::unpack_deb(&package, &root)?;
    let bin = root.join("bin/busybox");
    let bytes =
        std::fs::read(&bin).map_err(RunDirError::io(format!("reading {}", bin.display())))?;
    Ok(cache.put("busybox", deb, &bytes)?)
}

/// The run's initramfs, in the cache's scratch directory (removed when
/// dropped).
fn write_initrd(cache: &Cache, payload: &Payload) -> Result<tempfile::NamedTempFile, RunDirError> {
    let scratch = cache.root().join("tmp");
    let io = RunDirError::io;
    std::fs::create_dir_all(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
    let initrd = tempfile::Builder::new()
        .prefix("run-dir-")
        .suffix(".cpio")
        .tempfile_in(&scratch)
        .map_err(io(format!(
            "creating the initramfs in {}",
            scratch.display()
        )))?;
    std::fs::write(initrd.path(), &payload.bytes)
        .map_err(io(format!("writing {}", initrd.path().display())))?;
    Ok(initrd)
}

/// How the machine starts: a foreign guest can only be emulated, and it
/// and firmware take longer to reach init.
fn start_of(o: &RunDirOptions, arch: Arch, firmware: bool) -> launch::Start {
    launch::Start {
        accel: match arch {
            Arch::X86_64 => o.machine.accel.unwrap_or(AccelChoice::Auto),
            Arch::Aarch64 => AccelChoice::Tcg,
        },
        gdb: o.machine.gdb,
        boot_timeout: o.machine.boot_timeout,
        slow_boot: arch != Arch::X86_64 || firmware,
        quiet: o.machine.quiet,
    }
}

/// The machine: no shares but a foreign root, the initramfs is the system.
fn boot_request(o: &RunDirOptions, arch: Arch) -> BootRequest {
    let mut kernel_args = Vec::new();
    if o.output.is_some() {
        // The record's serial log is the whole console, boot messages too.
        kernel_args.push("loglevel=7".to_string());
    }
    kernel_args.extend(o.machine.kernel_args.iter().cloned());
    BootRequest {
        arch,
        cpus: o.machine.cpus,
        memory: o.machine.memory.clone(),
        kernel_args,
        qemu_args: o.qemu_args.clone(),
        gdb: o.machine.gdb,
        tcg_single: o.machine.tcg_threads == Some(TcgThreads::Single),
        verbose: o.machine.verbose,
        hold_on_panic: false,
        net: None,
        root: o.root.clone(),
        shares: Vec::new(),
    }
}

/// One line on what is about to run.
fn announce(o: &RunDirOptions, payload: &Payload, kernel: &Kernel, uefi: bool, out: Option<&Path>) {
    crate::say!(
        "vexec: run-dir: {} program(s) of {} on {} ({}, {}){}",
        payload.programs.len(),
        o.dir.display(),
        kernel.release(),
        kernel.info.arch.name(),
        if uefi { "UEFI" } else { "direct boot" },
        out.map(|o| format!("; record in {}", o.display()))
            .unwrap_or_default()
    );
}

/// What the batch reported, once the machine is gone.
struct Batch {
    results: Vec<crate::report::programs::ProgramResult>,
    coverage: Vec<u8>,
    launched: Launched,
}

impl Batch {
    fn collect(report: &Mutex<report::Report>, payload: &Payload, launched: Launched) -> Batch {
        let (mut results, coverage) = {
            let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut r.results),
                std::mem::take(&mut r.coverage),
            )
        };
        report::complete(&mut results, &payload.programs);
        Batch {
            results,
            coverage,
            launched,
        }
    }

    /// The batch's status: the machine's, else 1 when a program failed.
    fn status(&self) -> i32 {
        let status = status_of(&self.launched.outcome);
        let finished = matches!(self.launched.outcome, Outcome::Finished);
        if finished && self.results.iter().any(|r| r.result != "pass") {
            return 1;
        }
        status
    }

    /// The one command's own status, as `vexec` reports it (`--root` with
    /// a foreign kernel).
    fn command_status(&self) -> i32 {
        if !matches!(self.launched.outcome, Outcome::Finished) {
            return status_of(&self.launched.outcome);
        }
        let r = self.results.first();
        if let Some(e) = r.and_then(|r| r.error.as_ref()) {
            crate::say!("{e}");
        }
        match (r.and_then(|r| r.exit_code), r.and_then(|r| r.signal)) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => STATUS_FAILED,
        }
    }
}

/// What the record holds beyond the batch.
struct Kept<'a> {
    status: i32,
    firmware: Option<&'a Path>,
    busybox: Option<&'a Path>,
    coverage: Option<&'a crate::report::programs::Saved>,
    prep: std::time::Duration,
    t0: Instant,
}

/// Writes the run's record, `run.json`, into its directory.
fn keep_record(
    out: &Path,
    o: &RunDirOptions,
    kernel: &Kernel,
    batch: &Batch,
    kept: &Kept<'_>,
) -> Result<(), RunDirError> {
    let launched = &batch.launched;
    let timings = record::Timings {
        start: "cold",
        host_prep: kept.prep.as_millis() as u64,
        boot_to_agent: None,
        boot_to_init: (launched.timings.ready)
            .zip(launched.timings.spawned)
            .map(|(r, s)| (r - s).as_millis() as u64),
        command: None,
        total: kept.t0.elapsed().as_millis() as u64,
    };
    let mode = record::ModeRecord::Batch {
        arch: kernel.info.arch.name(),
        firmware: kept.firmware,
        dir: std::path::absolute(&o.dir).unwrap_or_else(|_| o.dir.clone()),
        busybox: kept.busybox,
        tags: &o.tag,
        programs: &batch.results,
        coverage: kept.coverage,
    };
    let words = outcome_words(&launched.outcome);
    let record = RunRecord::new(kernel, &launched.config, kept.status, words, timings, mode);
    Ok(record::write_json(&out.join("run.json"), &record)?)
}

/// Saves the kernel's GCOV data under `out` (and says where), or says how
/// to keep it.
fn keep_coverage(
    o: &RunDirOptions,
    kernel: &Kernel,
    data: &[u8],
    out: Option<&Path>,
    path_var: &Option<std::ffi::OsString>,
) -> Result<Option<crate::report::programs::Saved>, RunDirError> {
    if data.is_empty() {
        return Ok(None);
    }
    let Some(out) = out else {
        if !o.machine.quiet {
            crate::say!(
                "vexec: the kernel has GCOV data ({} KiB); pass --output DIR to keep it",
                data.len() / 1024
            );
        }
        return Ok(None);
    };
    let build_tree = o.build_tree.clone().or_else(|| {
        (kernel.config.as_deref())
            .and_then(Path::parent)
            .filter(|d| d.join("Makefile").is_file())
            .map(Path::to_path_buf)
    });
    let capture = coverage::Capture {
        out,
        build_tree: build_tree.as_deref(),
        lcov: !o.no_lcov,
        path_var: path_var.as_deref(),
    };
    let saved = coverage::save(data, &capture).map_err(RunDirError::Coverage)?;
    if !o.machine.quiet {
        crate::say!(
            "vexec: kernel coverage: {}{}",
            (saved.lcov.as_ref().or(saved.archive.as_ref()))
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            (saved.note.as_ref())
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    Ok(Some(saved))
}

/// Batch guests boot cold: their agent runs the programs as soon as it
/// boots, so there is no moment to save the guest at.
fn cold(o: &RunDirOptions, cache: &Cache) -> WarmStart {
    WarmStart::new(
        Some("run-dir guests run their programs as soon as they boot".into()),
        cache.clone(),
        0,
        o.machine.verbose,
        o.machine.quiet,
    )
}
