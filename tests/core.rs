//! The command behaves as if it ran on the host: exit status, output bytes,
//! stdin, identity, filesystem semantics; failures are clear, fast and clean.
//! All on Debian's 6.1 kernel under TCG.

mod common;
use common::*;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

const K: &str = "6.1";

fn status_of(script: &str) -> Option<i32> {
    let mut c = vexec(K);
    c.args(["--", "sh", "-c", script]);
    c.output().unwrap().status.code()
}

#[test]
fn exit_codes_0_and_1_pass_through() {
    assert_eq!(status_of("exit 0"), Some(0));
    assert_eq!(status_of("exit 1"), Some(1));
}

#[test]
fn exit_codes_42_and_255_pass_through() {
    assert_eq!(status_of("exit 42"), Some(42));
    assert_eq!(status_of("exit 255"), Some(255));
}

#[test]
fn signal_death_is_128_plus_n() {
    assert_eq!(status_of("kill -TERM $$"), Some(128 + 15));
    assert_eq!(status_of("kill -KILL $$"), Some(128 + 9));
}

#[test]
fn not_found_and_not_executable() {
    let dir = workdir("noexec");
    std::fs::write(dir.path().join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let mut c = vexec(K);
    c.current_dir(dir.path()).args(["--", "./script.sh"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(126), "not executable");
    let mut c = vexec(K);
    c.args(["--", "no-such-command-vexec"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("command not found"));
}

#[test]
fn command_found_along_path_like_execvp_keeps_its_argv0() {
    let dir = workdir("pathlookup");
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    // Not executable: skipped, as execvp skips it.
    std::fs::write(first.join("vexec-tool"), "#!/bin/sh\necho first\n").unwrap();
    std::fs::write(second.join("vexec-tool"), "#!/bin/sh\necho second\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        second.join("vexec-tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}:{}",
        first.display(),
        second.display(),
        std::env::var("PATH").unwrap()
    );
    let mut c = vexec(K);
    c.env("PATH", &path).args(["--", "vexec-tool"]);
    assert_eq!(stdout(&run(c)), "second\n");
    // argv[0] is the name as typed, not the path it was found at.
    let mut c = vexec(K);
    c.args(["--", "sh", "-c", "echo $0"]);
    assert_eq!(stdout(&run(c)), "sh\n");
}

#[test]
fn binary_stdout_and_stderr_are_byte_exact() {
    let dir = workdir("bytes");
    // Several MB of every byte value, different on each stream.
    let a: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let b: Vec<u8> = (0..2_500_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    std::fs::write(dir.path().join("a.bin"), &a).unwrap();
    std::fs::write(dir.path().join("b.bin"), &b).unwrap();
    let mut c = vexec(K);
    c.current_dir(dir.path())
        .args(["--", "sh", "-c", "cat a.bin; cat b.bin >&2; printf tail"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let mut want = a.clone();
    want.extend_from_slice(b"tail");
    assert!(
        out.stdout == want,
        "stdout differs ({} vs {} bytes)",
        out.stdout.len(),
        want.len()
    );
    assert!(
        out.stderr == b,
        "stderr differs ({} vs {} bytes)",
        out.stderr.len(),
        b.len()
    );
}

#[test]
fn stdin_round_trip_with_eof() {
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let mut c = vexec(K);
    c.args(["--", "sh", "-c", "cat; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let d = data.clone();
    let w = std::thread::spawn(move || {
        stdin.write_all(&d).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    assert_ok(&out);
    let mut want = data;
    want.extend_from_slice(b"done\n");
    assert!(out.stdout == want, "stdin did not round-trip");
}

#[test]
fn identity_cwd_and_environment() {
    let dir = workdir("ident dir ü");
    let mut c = vexec(K);
    c.current_dir(dir.path())
        .env("VEXEC_TEST_VALUE", "a b\tc=d")
        .args([
            "--",
            "sh",
            "-c",
            "id -u; id -g; id -G; pwd; printf '%s\\n' \"$VEXEC_TEST_VALUE\"; command -v sh",
        ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    // SAFETY: credential queries.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(lines[0], uid.to_string());
    assert_eq!(lines[1], gid.to_string());
    let host_groups = String::from_utf8(
        std::process::Command::new("id")
            .arg("-G")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(lines[2], host_groups.trim());
    assert_eq!(lines[3], dir.path().to_str().unwrap());
    assert_eq!(lines[4], "a b\tc=d");
    assert!(lines[5].ends_with("/sh"));
}

#[test]
fn writes_outside_cwd_vanish_and_cwd_writes_persist() {
    let dir = workdir("writes");
    let marker = format!("/var/tmp/vexec-test-{}", std::process::id());
    let mut c = vexec(K);
    c.current_dir(dir.path()).args([
        "--",
        "sh",
        "-c",
        &format!("echo guest > out.txt && mkdir -p sub && echo x > sub/y; (echo no > {marker}) 2>/dev/null; ls {marker} >/dev/null 2>&1; echo $?"),
    ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sub/y")).unwrap(),
        "x\n"
    );
    // The guest could write it (to its overlay)...
    if is_root() {
        assert_eq!(stdout(&out).trim(), "0");
    }
    // ...but nothing reached the host.
    assert!(!std::path::Path::new(&marker).exists());
}

#[test]
fn guest_has_the_usual_filesystems() {
    let mut c = vexec(K);
    c.args(["--", "sh", "-c", "for d in /proc/self /sys/kernel /dev/null /dev/pts /dev/shm /tmp /run /sys/kernel/tracing /sys/fs/cgroup/cgroup.controllers; do test -e $d && echo ok $d || echo missing $d; done; awk '$2==\"/\"{print $3}' /proc/mounts"]);
    let out = run(c);
    let text = stdout(&out);
    assert!(!text.contains("missing"), "{text}");
    assert!(text.trim_end().ends_with("overlay"), "{text}");
}

#[test]
fn timeout_is_124_and_prompt() {
    let mut c = vexec(K);
    // Stopped on purpose: not a hang to report.
    c.env_remove("VEXEC_HANG_REPORTS")
        .args(["--timeout", "2s", "--", "sleep", "600"]);
    let start = Instant::now();
    let out = run(c);
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn kernel_panic_is_125_with_console() {
    if !is_root() {
        eprintln!("skipped: needs root in the guest to trigger a panic (run as root)");
        return;
    }
    let mut c = vexec(K);
    c.args([
        "--",
        "sh",
        "-c",
        "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 60",
    ]);
    let start = Instant::now();
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("panicked"), "{err}");
    assert!(err.contains("sysrq"), "console tail missing: {err}");
    assert!(start.elapsed() < Duration::from_secs(45));
}

#[test]
fn kernel_that_cannot_boot_fails_in_seconds() {
    let mut c = vexec(K);
    // No usable init: the kernel panics at once.
    c.args([
        "--kernel-arg",
        "rdinit=/nonexistent",
        "--kernel-arg",
        "init=/nonexistent",
        "--",
        "true",
    ]);
    let start = Instant::now();
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("panicked"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn sigint_stops_guest_and_leaves_nothing_behind() {
    let dir = workdir("sigint");
    let mut c = vexec(K);
    c.current_dir(dir.path())
        .args(["--", "sh", "-c", "echo started; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 8];
    use std::io::Read;
    out.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"started\n");
    let sent = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "took {:?}",
        sent.elapsed()
    );
    let left = processes_mentioning(dir.path().to_str().unwrap());
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn bad_input_is_125_with_a_clear_message() {
    let dir = workdir("bad");
    let not_kernel = dir.path().join("notes.txt");
    std::fs::write(&not_kernel, "not a kernel").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["-k".into(), "/nonexistent/vmlinuz".into(), "true".into()],
            "does not exist",
        ),
        (
            vec!["-k".into(), not_kernel.display().to_string(), "true".into()],
            "not a Linux kernel image",
        ),
        (
            vec![
                "-k".into(),
                kernel(K).display().to_string(),
                "--qemu".into(),
                "/nonexistent/qemu".into(),
                "true".into(),
            ],
            "QEMU",
        ),
        // Bad option values: clap's messages, vexec's status.
        (
            vec!["--memory".into(), "lots".into(), "true".into()],
            "is not a size",
        ),
        (
            vec!["--shard".into(), "3/2".into(), "true".into()],
            "is not I/N",
        ),
        (
            vec!["--forward".into(), "80".into(), "true".into()],
            "is not HOST:GUEST",
        ),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vexec"))
            .env("XDG_CACHE_HOME", cache_dir())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn unprivileged_user_path() {
    // As a user without root or /dev/kvm, with its own cache dir.
    let image = kernel(K);
    if !is_root() {
        let mut c = vexec(K);
        c.args(["--", "id", "-u"]);
        let out = run(c);
        assert_eq!(out.status.code(), Some(0));
        return;
    }
    if !world_reachable(&image) || !world_reachable(&kernels_dir().join(K).join("lib")) {
        eprintln!(
            "skipped: {} is not readable by other users; set VEXEC_TEST_KERNELS to a world-readable directory",
            image.display()
        );
        return;
    }
    let home = workdir("nobody-home");
    std::os::unix::fs::chown(home.path(), Some(65534), Some(65534)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vexec"))
        .args(["-k"])
        .arg(&image)
        .args(["--", "sh", "-c", "id -u; touch made-by-guest; echo ok"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .env_remove("VEXEC_KERNEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out), "65534\nok\n");
    let meta = std::fs::metadata(home.path().join("made-by-guest")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), 65534);
    // Without KVM access, auto falls back to TCG with one notice line.
    assert!(err.contains("using TCG"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn host_tmp_is_visible_and_guest_tmp_writes_stay_in_the_guest() {
    // As `go test -exec vexec` calls it: a program under the host's /tmp.
    let dir = tempfile::Builder::new()
        .prefix("vexec-go-build")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let prog = dir.path().join("pkg.test");
    std::fs::write(&prog, "#!/bin/sh\necho \"ran $0 $*\"; cat \"$(dirname \"$0\")/data\"; echo guest > \"$(dirname \"$0\")/from-guest\"; echo tmp > /tmp/vexec-guest-only-$$\n").unwrap();
    std::fs::write(dir.path().join("data"), "host data\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = vexec(K);
    c.arg(&prog).arg("-test.v");
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!("ran {} -test.v\nhost data\n", prog.display())
    );
    assert!(
        !dir.path().join("from-guest").exists(),
        "a guest write reached the host's /tmp"
    );
}

#[test]
fn the_agent_refuses_to_run_on_the_host() {
    // vexec-agent mounts and powers off as PID 1; anywhere else it must
    // touch nothing and say what to run instead.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vexec-agent"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runs only as PID 1"), "{err}");
    assert!(err.contains("run `vexec` instead"), "{err}");
}

/// Fields 1 (pid), 5 (pgrp), 6 (session) and 8 (tpgid) of a
/// `/proc/PID/stat` line.
fn session_fields(stat: &str) -> (i64, i64, i64, i64) {
    let (pid, rest) = stat.trim().split_once(' ').unwrap();
    let after = rest.rsplit_once(") ").unwrap().1;
    let f: Vec<i64> = after
        .split_whitespace()
        .skip(1)
        .take(5)
        .map(|w| w.parse().unwrap())
        .collect();
    (pid.parse().unwrap(), f[1], f[2], f[4])
}

#[test]
fn the_command_leads_its_own_session_and_process_group() {
    // Whatever session the host gave vexec (a container's init may leave
    // it in session 0), the command leads a session of its own, as a job
    // a shell starts does.
    let mut c = vexec(K);
    c.args(["-T", "--", "cat", "/proc/self/stat"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let (pid, pgrp, sid, tpgid) = session_fields(&stdout(&out));
    assert_eq!(sid, pid, "its own session");
    assert_eq!(pgrp, pid, "its own process group");
    // No terminal: a new session has no controlling terminal, so no
    // foreground group.
    assert_eq!(tpgid, -1, "no controlling terminal");
    // With a terminal, the command's group is its foreground group.
    let mut c = vexec(K);
    c.args(["-t", "--", "cat", "/proc/self/stat"]);
    let out = run(c);
    let (pid, pgrp, sid, tpgid) = session_fields(&stdout(&out));
    assert!(
        sid > 0 && pgrp == pid && tpgid == pgrp,
        "{pid} {pgrp} {sid} {tpgid}"
    );
}

/// Runs `cmd` with RLIMIT_NOFILE, RLIMIT_MEMLOCK and RLIMIT_CORE set to
/// values of their own (lowered only: anyone may lower a limit).
fn with_raised_limits(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for (r, soft, hard) in [
                (libc::RLIMIT_NOFILE, 4321, 5000),
                (libc::RLIMIT_MEMLOCK, 1234567, 2345678),
                (libc::RLIMIT_CORE, 0, libc::RLIM_INFINITY),
            ] {
                let mut now = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(r, &mut now);
                let hard = hard.min(now.rlim_max);
                let l = libc::rlimit {
                    rlim_cur: soft.min(hard),
                    rlim_max: hard,
                };
                if libc::setrlimit(r, &l) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[test]
fn the_command_has_the_callers_resource_limits() {
    let mut host = std::process::Command::new("cat");
    host.arg("/proc/self/limits").stdin(Stdio::null());
    with_raised_limits(&mut host);
    let host = String::from_utf8(host.output().unwrap().stdout).unwrap();
    assert!(host.contains("4321"), "{host}");
    let mut c = vexec(K);
    c.args(["--", "cat", "/proc/self/limits"]);
    with_raised_limits(&mut c);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), host);
}

#[test]
fn module_device_nodes_exist_as_on_a_host_and_load_their_module() {
    // The nodes a host makes from modules.devname; opening one loads its
    // module (tun and loop are modules in Debian's 6.1).
    let mut c = vexec(K);
    c.args([
        "--sudo",
        "--",
        "sh",
        "-c",
        "stat -c '%n %F %t:%T' /dev/net/tun /dev/loop-control /dev/fuse && ip tuntap add dev t0 mode tun && ip -o link show t0 | cut -d' ' -f2 && losetup -f",
    ]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        stdout(&out),
        "/dev/net/tun character special file a:c8\n/dev/loop-control character special file a:ed\n/dev/fuse character special file a:e5\nt0:\n/dev/loop0\n"
    );
    // The host's modes where the host has the node.
    for node in ["/dev/net/tun", "/dev/loop-control"] {
        let Ok(meta) = std::fs::metadata(node) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        let mut c = vexec(K);
        c.args(["--", "stat", "-c", "%a %u %g", node]);
        let out = run(c);
        assert_eq!(
            stdout(&out),
            format!("{:o} {} {}\n", meta.mode() & 0o7777, meta.uid(), meta.gid())
        );
    }
}
