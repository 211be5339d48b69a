//! Faults a run must survive and report exactly: readers that go away,
//! daemons and QEMU killed, vexec itself killed, damaged, full, read-only
//! and raced caches, a deleted working directory, an out-of-memory guest,
//! a full overlay, output after the command exits.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const K: &str = "6.1";

/// Starts `vexec ... -- sh -c SCRIPT` with stdout and stderr piped and
/// waits until the script printed its first line.
fn started(mut c: Command, script: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    c.args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "the command never started");
    (child, out)
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// The direct children of `pid` named `comm`.
fn children(pid: u32, comm: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = &stat[stat.find('(').unwrap() + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        if ppid == pid && name.starts_with(comm) {
            found.push(p);
        }
    }
    found
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

fn kill9(pid: u32) {
    // SAFETY: sending a signal to a pid we just found.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn a_reader_that_goes_away_stops_the_writer_with_sigpipe() {
    for (script, stream) in [
        ("yes", "stdout"),
        ("seq 20000000", "stdout"),
        ("yes >&2", "stderr"),
    ] {
        let mut c = vexec(K);
        c.args(["--", "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // Read a little of the stream, then go away as `head -1` would.
        let mut first = [0u8; 2];
        let got = match stream {
            "stdout" => child.stdout.take().unwrap().read_exact(&mut first),
            _ => child.stderr.take().unwrap().read_exact(&mut first),
        };
        got.unwrap();
        // The command dies of SIGPIPE; the shell running it says so too.
        assert_eq!(
            wait_for(&mut child, Duration::from_secs(120)),
            Some(141),
            "`{script}` with its {stream} reader gone"
        );
    }
}

#[test]
fn a_command_that_closes_its_input_makes_the_writer_see_epipe() {
    use std::os::unix::process::ExitStatusExt;
    // `yes | vexec -- sh -c 'head -c 2; exec <&-; sleep 8'`: locally yes
    // dies of SIGPIPE as soon as nothing can read its pipe any more, while
    // the command still runs; it must not be left writing into vexec.
    let mut producer = Command::new("yes").stdout(Stdio::piped()).spawn().unwrap();
    let mut c = vexec(K);
    c.args(["--", "sh", "-c", "head -c 2; exec <&-; sleep 8; echo done"])
        .stdin(producer.stdout.take().unwrap())
        .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // The test's own copy of the pipe's read end goes with the Command.
    drop(c);
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 2];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"y\n");
    let deadline = Instant::now() + Duration::from_secs(6);
    let producer_status = loop {
        match producer.try_wait().unwrap() {
            Some(s) => break s.signal(),
            None if Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let vexec_running = child.try_wait().unwrap().is_none();
    let _ = producer.kill();
    stdout.read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(out, "done\n");
    assert_eq!(producer_status, Some(libc::SIGPIPE));
    assert!(vexec_running, "the producer only died when vexec exited");
}

/// Kills the daemon serving `source` while the guest reads from it.
fn kill_daemon_mid_run(transport: &str, source: &Path, script: &str) {
    let Some(args) = transport_args(transport) else {
        return;
    };
    let dir = workdir("daemon-kill");
    let mut c = vexec(K);
    c.args(&args).current_dir(dir.path());
    let (mut child, _out) = started(c, script);
    let needle = source.to_string_lossy().into_owned();
    let daemon = children(child.id(), "virtiofsd")
        .into_iter()
        .find(|p| {
            let cmd = cmdline(*p);
            cmd.contains(&format!("={needle} ")) || cmd.ends_with(&format!("={needle}"))
        })
        .unwrap_or_else(|| panic!("no virtiofsd serving {needle}"));
    kill9(daemon);
    let t = Instant::now();
    let code = wait_for(&mut child, Duration::from_secs(30));
    let took = t.elapsed();
    let err = stderr_of(&mut child);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("virtiofsd serving"), "{err}");
    assert!(err.contains(&needle), "{err}");
    // Within 2 s on an idle machine; a loose bound here (shared machine).
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn a_dead_root_daemon_ends_the_run_with_125() {
    for t in ["virtiofs-rust", "virtiofs-c"] {
        kill_daemon_mid_run(
            t,
            Path::new("/"),
            "echo started; while :; do cat /usr/share/common-licenses/* >/dev/null; done",
        );
    }
}

#[test]
fn a_dead_cwd_daemon_ends_the_run_with_125() {
    let dir = workdir("daemon-kill");
    let cwd = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::write(cwd.join("f"), "x").unwrap();
    for t in ["virtiofs-rust", "virtiofs-c"] {
        let Some(args) = transport_args(t) else {
            continue;
        };
        let mut c = vexec(K);
        c.args(&args).current_dir(&cwd);
        let (mut child, _out) = started(c, "echo started; while :; do cat f >/dev/null; done");
        let daemon = children(child.id(), "virtiofsd")
            .into_iter()
            .find(|p| cmdline(*p).contains(&*cwd.to_string_lossy()))
            .expect("the cwd share's virtiofsd");
        kill9(daemon);
        let code = wait_for(&mut child, Duration::from_secs(30));
        let err = stderr_of(&mut child);
        assert_eq!(code, Some(125), "{t}: {err}");
        assert!(err.contains(&*cwd.to_string_lossy()), "{t}: {err}");
    }
}

#[test]
fn killing_qemu_is_125_at_once() {
    let (mut child, _out) = started(vexec(K), "echo started; sleep 100");
    let qemu = children(child.id(), "qemu-system")[0];
    kill9(qemu);
    let code = wait_for(&mut child, Duration::from_secs(30));
    let err = stderr_of(&mut child);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("QEMU exited"), "{err}");
    // What the daemons say once QEMU is gone is only noise.
    assert!(!err.contains("Unexpected poll revents"), "{err}");
}

#[test]
fn killing_vexec_takes_its_children_with_it() {
    let mut c = vexec(K);
    c.args(["--transport", "virtiofs", "--virtiofsd"])
        .arg(rust_virtiofsd());
    let (mut child, _out) = started(c, "echo started; sleep 100");
    let mut ours = children(child.id(), "qemu-system");
    ours.extend(children(child.id(), "virtiofsd"));
    assert!(ours.len() >= 2, "qemu and a virtiofsd: {ours:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(Instant::now() < deadline, "left running: {ours:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data file of each entry of `kind` in a cache.
fn entries(cache: &Path, kind: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache.join("vexec").join(kind))
        .map(|d| d.flatten().map(|e| e.path().join("data")).collect())
        .unwrap_or_default()
}

#[test]
fn damaged_cache_entries_are_rebuilt_not_booted() {
    let cache = workdir("damaged-cache");
    let go = || {
        let mut c = vexec(K);
        c.env("XDG_CACHE_HOME", cache.path())
            .args(["--", "echo", "ok"]);
        run(c)
    };
    assert_ok(&go());
    for kind in ["initramfs", "vmlinux"] {
        for data in entries(cache.path(), kind) {
            let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
            f.set_len(1000).unwrap();
        }
    }
    let out = go();
    assert_ok(&out);
    assert_eq!(stdout(&out), "ok\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cache entry initramfs/") && err.contains("damaged"),
        "{err}"
    );
    assert!(err.contains("cache entry vmlinux/"), "{err}");
    // Repaired: a third run says nothing.
    let out = go();
    assert_ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn eight_first_runs_racing_on_an_empty_cache_all_pass() {
    let cache = workdir("raced-cache");
    let children: Vec<Child> = (0..8)
        .map(|i| {
            let mut c = vexec(K);
            // Eight guests booting at once on a small CI machine (two
            // cores here) can take two minutes: this test is about the
            // cache, not boot speed.
            c.env("XDG_CACHE_HOME", cache.path())
                .args(["--boot-timeout", "150s", "--", "echo", &format!("run {i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_ok(&out);
        assert_eq!(stdout(&out), format!("run {i}\n"));
    }
    // One sealed entry per artifact, nothing half-written or left aside;
    // one saved guest at most (one run saves it, the others boot cold).
    for kind in ["initramfs", "vmlinux", "support"] {
        assert_eq!(entries(cache.path(), kind).len(), 1, "{kind}");
    }
    assert!(entries(cache.path(), "snapshot").len() <= 1);
    let out = run({
        let mut c = vexec(K);
        c.env("XDG_CACHE_HOME", cache.path()).args(["--", "true"]);
        c
    });
    assert_ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "entries intact");
}

/// Runs vexec with its cache on a fresh tmpfs (in a private mount
/// namespace), prepared by `prepare` (shell, with $D the mount point).
fn with_cache_on_tmpfs(size: &str, prepare: &str) -> Option<std::process::Output> {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs for the cache needs root");
        return None;
    }
    let d = workdir("cache-fs");
    let script = format!(
        "mount -t tmpfs -o size={size} vexec-test \"$D\" && {prepare} && XDG_CACHE_HOME=\"$D\" \"$@\"; rc=$?; echo left: $(ls -A \"$D\"/vexec/*/ 2>/dev/null) >&2; exit $rc"
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_vexec"))
        .args(["--accel", "tcg", "-q", "-k"])
        .arg(kernel(K))
        .args(["--", "true"])
        .env("D", d.path())
        .env_remove("VEXEC_KERNEL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn a_full_cache_is_a_clear_error_and_leaves_no_half_entry() {
    let Some(out) = with_cache_on_tmpfs("2m", "true") else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("free space"), "{err}");
    // The last line lists what is left in the cache: the entries that
    // fit, none half-written, no temporary directory.
    let left = err.lines().last().unwrap_or_default();
    assert!(
        left.starts_with("left:") && !left.contains(".tmp-"),
        "{err}"
    );
}

#[test]
fn a_read_only_cache_is_a_clear_error() {
    let Some(out) = with_cache_on_tmpfs("64m", "mount -o remount,ro \"$D\"") else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(err.contains("XDG_CACHE_HOME"), "{err}");
}

#[test]
fn a_deleted_working_directory_is_refused() {
    let base = workdir("deleted-cwd");
    let out = Command::new("sh")
        .args([
            "-c",
            "mkdir d && cd d && rmdir ../d && exec \"$@\" -- sh -c 'pwd; ls'",
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_vexec"))
        .args(["--accel", "tcg", "-q", "-k"])
        .arg(kernel(K))
        .current_dir(base.path())
        .env("XDG_CACHE_HOME", cache_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(stdout(&out), "", "nothing ran");
    assert!(
        err.contains("working directory") && err.contains("deleted"),
        "{err}"
    );
}

#[test]
fn the_oom_killer_is_named_and_the_agent_survives() {
    let mut c = vexec(K);
    c.args([
        "-m",
        "256M",
        "--",
        "python3",
        "-c",
        "a = []\nwhile True: a.append(bytearray(1 << 24))",
    ]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    // SIGKILL reported as the command's own end (the agent lived to say).
    assert_eq!(out.status.code(), Some(137), "{err}");
    assert!(err.contains("OOM killer killed"), "{err}");
    assert!(err.contains("python3"), "{err}");
    assert!(err.contains("--memory"), "{err}");
}

#[test]
fn a_full_overlay_is_enospc_to_the_command() {
    let mut c = vexec(K);
    c.args([
        "-m",
        "512M",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/var/tmp/vexec-fill bs=1M count=1024 2>/dev/null; echo dd=$?; exit 7",
    ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "dd=1\n");
}

#[test]
fn output_after_the_command_exits_is_kept_for_the_grace_period() {
    let script = "(sleep 4; echo late) & echo early";
    let mut c = vexec(K);
    c.args(["--", "sh", "-c", script]);
    let out = run(c);
    assert_ok(&out);
    assert_eq!(stdout(&out), "early\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--output-grace"), "{err}");

    let mut c = vexec(K);
    c.args(["--output-grace", "30s", "--", "sh", "-c", script]);
    let out = run(c);
    assert_ok(&out);
    assert_eq!(stdout(&out), "early\nlate\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn readdir_and_stat_agree_on_inode_numbers() {
    // Directories of the host's root seen through the overlay.
    let script = "import os\n\
        bad = [e.path for d in ('/usr', '/usr/lib', '/etc') for e in os.scandir(d)\n\
               if e.inode() != os.stat(e.path, follow_symlinks=False).st_ino]\n\
        print(len(bad), bad[:5])";
    for t in ["9p", "virtiofs-rust"] {
        let Some(args) = transport_args(t) else {
            continue;
        };
        let mut c = vexec(K);
        c.args(&args).args(["--", "python3", "-c", script]);
        let out = run(c);
        assert_ok(&out);
        assert_eq!(stdout(&out), "0 []\n", "{t}");
    }
}
