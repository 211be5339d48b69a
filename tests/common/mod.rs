//! Helpers for tests that boot real kernels.
//!
//! Test kernels come from `scripts/fetch-test-kernels.sh`, in
//! `$VEXEC_TEST_KERNELS` (default `~/.cache/vexec-test-kernels`). A missing
//! kernel fails the test with the command that fetches it.
#![allow(dead_code)]

pub mod vms;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The directory holding the unpacked test kernels.
pub fn kernels_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VEXEC_TEST_KERNELS") {
        return d.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    cache.join("vexec-test-kernels")
}

/// The image of a test kernel by its short name (5.10, 6.1, 6.1-cloud, 6.12).
pub fn kernel(name: &str) -> PathBuf {
    let boot = kernels_dir().join(name).join("boot");
    std::fs::read_dir(&boot)
        .ok()
        .and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("vmlinuz-")
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "test kernel {name} missing in {}; run scripts/fetch-test-kernels.sh",
                boot.display()
            )
        })
}

/// The release of a test kernel image, from its `vmlinuz-REL` file name.
pub fn release_of(image: &Path) -> String {
    let name = image.file_name().unwrap().to_str().unwrap();
    name.trim_start_matches("vmlinuz-").to_string()
}

/// A shared cache for all tests, so boot artifacts are built once.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vexec-cache")
}

/// Where runs that hang leave their report (scripts/test.sh prints them at
/// the end, so a test that passed on retry still shows its hang).
pub fn hang_reports() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hang-reports")
}

/// A run stuck this long is stopped by vexec itself, with a report of
/// where it stood, well before the test harness kills the test.
const RUN_LIMIT: &str = "150s";

/// `vexec --accel tcg -q -k KERNEL` with the test cache; add the command.
pub fn vexec(kernel_name: &str) -> Command {
    let mut c = vexec_saying(kernel_name);
    c.arg("-q");
    c
}

/// [`vexec`] without `-q`: its notices (and `-v`, if added) are kept.
pub fn vexec_saying(kernel_name: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .env("VEXEC_TIMEOUT", RUN_LIMIT)
        .env("VEXEC_HANG_REPORTS", hang_reports())
        .env_remove("VEXEC_KERNEL")
        .arg("--accel")
        .arg("tcg")
        .arg("-k")
        .arg(kernel(kernel_name))
        .stdin(Stdio::null());
    c
}

/// Runs to completion and returns the output.
pub fn run(mut c: Command) -> Output {
    let out = c.output().expect("spawning vexec");
    if !out.status.success() {
        eprintln!(
            "vexec exited {:?}; stderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh directory under the target dir (not /tmp: the guest mounts its
/// own /tmp, and tests want a path that exists identically in both).
pub fn workdir(name: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("work");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .unwrap()
}

/// Processes whose command line contains `needle` (to find leaked QEMUs).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("cargo") {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}

/// True when every directory above `p` can be traversed by others.
pub fn world_reachable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.ancestors()
        .skip(1)
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// The Rust virtiofsd that scripts/test.sh installs (or `$VEXEC_TEST_VIRTIOFSD`).
pub fn rust_virtiofsd() -> PathBuf {
    let p = std::env::var_os("VEXEC_TEST_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| kernels_dir().join("tools/bin/virtiofsd"));
    assert!(
        p.is_file(),
        "the Rust virtiofsd is missing at {}; run scripts/test.sh (it installs it) or set VEXEC_TEST_VIRTIOFSD",
        p.display()
    );
    p
}

/// QEMU 7.2's C virtiofsd, where the QEMU package ships it.
pub fn c_virtiofsd() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/lib/qemu/virtiofsd");
    p.is_file().then_some(p)
}

/// The options that select each transport (and daemon) to test.
pub fn transport_args(which: &str) -> Option<Vec<std::ffi::OsString>> {
    let v = |d: PathBuf| {
        vec![
            "--transport".into(),
            "virtiofs".into(),
            "--virtiofsd".into(),
            d.into_os_string(),
        ]
    };
    match which {
        "9p" => Some(vec!["--transport".into(), "9p".into()]),
        "virtiofs-rust" => Some(v(rust_virtiofsd())),
        "virtiofs-c" => {
            if !is_root() {
                eprintln!("skipped: QEMU's C virtiofsd runs only as root");
                return None;
            }
            match c_virtiofsd() {
                Some(d) => Some(v(d)),
                None => {
                    eprintln!("skipped: this QEMU ships no C virtiofsd");
                    None
                }
            }
        }
        other => panic!("unknown transport {other}"),
    }
}

/// vexec with its cache in `cache` and no kernel from the environment.
pub fn vexec_in(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache)
        .env("VEXEC_TIMEOUT", RUN_LIMIT)
        .env("VEXEC_HANG_REPORTS", hang_reports())
        .env_remove("VEXEC_KERNEL")
        .stdin(Stdio::null());
    c
}

/// Asserts exit status 0, showing stderr otherwise.
pub fn assert_ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Boots the kernel stored under `cache` as `release` (over virtio-fs, which
/// every test kernel has) and checks `uname -r`.
pub fn assert_boots_by_release(cache: &Path, release: &str) {
    let out = vexec_in(cache)
        .args(["--accel", "tcg", "-q", "-k", release, "--virtiofsd"])
        .arg(rust_virtiofsd())
        .args(["--", "uname", "-r"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{release}\n"));
}

/// Unpacks Debian's linux-source-6.1 into `work`; returns the tree.
pub fn linux_source(work: &Path) -> PathBuf {
    let tarball = Path::new("/usr/src/linux-source-6.1.tar.xz");
    assert!(
        tarball.is_file(),
        "apt-get install linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev"
    );
    let ok = Command::new("tar")
        .arg("-C")
        .arg(work)
        .arg("-xf")
        .arg(tarball)
        .status()
        .unwrap()
        .success();
    assert!(ok, "unpacking {}", tarball.display());
    work.join("linux-source-6.1")
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads vexec's stderr (at most 30 s) until it has said how to attach
/// gdb; returns what it said by then. The caller keeps `err` open: vexec
/// must not meet a closed pipe when it writes again.
pub fn read_gdb_notice(err: &mut impl std::io::BufRead) -> String {
    let mut said = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !said.contains("target remote") && std::time::Instant::now() < deadline {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        said.push_str(&line);
    }
    said
}

/// `c`'s program and arguments under `prefix` (e.g. taskset, nice), with
/// its environment.
pub fn wrapped(c: &Command, prefix: &[&str]) -> Command {
    let mut w = Command::new(prefix[0]);
    w.args(&prefix[1..]).arg(c.get_program()).args(c.get_args());
    if let Some(d) = c.get_current_dir() {
        w.current_dir(d);
    }
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => w.env(k, v),
            None => w.env_remove(k),
        };
    }
    w
}

/// Waits for `child` at most `limit`; its exit code (None: a signal).
pub fn wait_for(child: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vexec did not end within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
