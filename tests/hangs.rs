//! Runs that hang, stall or must be booted again: what vexec says while
//! they go on (a stuck CPU, SIGQUIT's report), what it keeps (hang
//! reports), and which boots it tries again (a silent kernel, a stuck
//! setup, a stall, KVM that aborts QEMU before anything of the user's ran).

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const K: &str = "6.1";

/// A vexec run made to hang or fail on purpose (not a hang for
/// scripts/test.sh to show): its exit status and stderr.
fn stopped_on_purpose(args: &[&str]) -> (Option<i32>, String) {
    let mut c = vexec(K);
    c.env_remove("VEXEC_HANG_REPORTS").args(args);
    let out = run(c);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_boot_that_prints_nothing_is_tried_again_single_threaded() {
    // -S: QEMU starts with its CPUs stopped, so the kernel never prints,
    // as a boot did once in the suite (QEMU 7.2, TCG, a loaded host).
    let (code, err) = stopped_on_purpose(&[
        "--cold",
        "--boot-timeout",
        "2s",
        "--qemu-arg",
        "-S",
        "--",
        "true",
    ]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("printed nothing on its console"), "{err}");
    assert!(
        err.contains("booting again with single-threaded TCG"),
        "{err}"
    );
}

/// The children of `parent` whose command line contains every one of
/// `words`.
fn children_with(parent: u32, words: &[&str]) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The parent pid is the second field after the ")" closing comm.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1));
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if ppid == Some(&parent.to_string()) && words.iter().all(|w| cmd.contains(w)) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_setup_that_never_finishes_is_booted_again() {
    // As once in CI: the agent's first request to the root share's
    // virtiofsd is never answered. Stopping the daemon once the guest has
    // set its device up (modules loaded) leaves QEMU running and the
    // mounts waiting; C daemon: one process, a child of vexec.
    let Some(args) = transport_args("virtiofs-c") else {
        return;
    };
    let mut c = vexec_saying(K);
    c.env_remove("VEXEC_HANG_REPORTS")
        .args(&args)
        .args(["-v", "--cold", "--boot-timeout", "8s", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Input waiting from the start: it must reach the attempt that runs
    // the command, not the one booted again.
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(b"ran\n").unwrap();
    }
    let vexec_pid = child.id();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let mut stopped = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if stopped.is_empty() && line.contains("modules loaded") {
            stopped = children_with(vexec_pid, &["virtiofsd", "source=/ "]);
            for &pid in &stopped {
                // SAFETY: stopping a daemon of the vexec this test started.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
            }
        }
        said.push_str(&line);
        said.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(stopped.len(), 1, "{said}");
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(stdout(&out), "ran\n");
    assert!(
        said.contains("setup (mounting the host's files) did not finish within 8s"),
        "{said}"
    );
    assert!(said.contains("booting again"), "{said}");
    // The stopped daemon went with its attempt.
    assert!(!Path::new(&format!("/proc/{}", stopped[0])).exists());
}

#[test]
fn a_hung_run_says_where_it_stood() {
    // Long enough for `sleep` to be exec'd and asleep on a loaded CI
    // machine: once, 5 s caught it still in exec.
    let (code, err) =
        stopped_on_purpose(&["--timeout", "12s", "--", "sh", "-c", "echo hi; sleep 100"]);
    assert_eq!(code, Some(124), "{err}");
    assert!(err.contains("where the run stood"), "{err}");
    assert!(err.contains("host: last message from the guest"), "{err}");
    assert!(err.contains("stdout: 3 bytes written"), "{err}");
    assert!(err.contains("guest: agent: running the command"), "{err}");
    // The kernel stack of the sleeping command.
    assert!(err.contains("(sleep) S"), "{err}");
    assert!(err.contains("nanosleep"), "{err}");
}

#[test]
fn a_boot_starved_of_cpu_gets_more_time_and_says_why_it_failed() {
    // One host CPU shared with a busy loop, vexec and QEMU at nice 19: the
    // guest gets about 1.5% of it and cannot boot, but that is the host's
    // doing, so the 2 s deadline moves by the time QEMU waited (up to 4x).
    let mut hog = Command::new("taskset")
        .args(["-c", "0", "sh", "-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    let mut c = vexec(K);
    // A failure made on purpose is not a hang for scripts/test.sh to show.
    c.env_remove("VEXEC_HANG_REPORTS")
        .args(["--boot-timeout", "2s", "--", "true"]);
    let t0 = Instant::now();
    let out = wrapped(&c, &["taskset", "-c", "0", "nice", "-n", "19"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    let _ = hog.kill();
    let _ = hog.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("waiting for a host CPU"), "{err}");
    assert!(took > Duration::from_secs(4), "{took:?}: {err}");
}

#[test]
fn a_kernel_that_stalls_while_booting_is_booted_again_once_single_threaded() {
    // At loglevel 8 the kernel echoes its command line: a lockup report in
    // it makes every boot of this machine look stalled.
    let (code, err) = stopped_on_purpose(&[
        "--kernel-arg",
        "loglevel=8",
        "--kernel-arg",
        "vexec.test=\"BUG: soft lockup\"",
        "--",
        "true",
    ]);
    assert_eq!(code, Some(125), "{err}");
    let again = "booting again with single-threaded TCG";
    assert_eq!(err.matches(again).count(), 1, "{err}");
    assert!(
        err.contains("the guest kernel stalled while booting"),
        "{err}"
    );
}

#[test]
fn a_stuck_cpu_while_the_command_runs_is_said_at_once_and_kept() {
    // The kernel's own lockup line, as it would print it (the guest's
    // root writes it to the kernel log, which reaches the console).
    let reports = workdir("stall-reports");
    let mut c = vexec_saying(K);
    c.env("VEXEC_HANG_REPORTS", reports.path()).args([
        "--sudo",
        "--",
        "sh",
        "-c",
        "echo '<0>watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [link.test:95]' > /dev/kmsg; sleep 1; echo done",
    ]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out), "done\n");
    assert!(
        err.contains("the guest kernel reports a stuck CPU while the command runs: ")
            && err.contains("soft lockup - CPU#0 stuck for 22s"),
        "{err}"
    );
    let kept: Vec<_> = std::fs::read_dir(reports.path())
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(kept.len(), 1, "{err}");
    let text = std::fs::read_to_string(kept[0].path()).unwrap();
    assert!(text.contains("stuck CPU"), "{text}");
}

#[test]
fn sigquit_says_where_a_run_stands_and_the_run_goes_on() {
    let mut c = vexec(K);
    c.env_remove("VEXEC_HANG_REPORTS")
        .args(["--", "sh", "-c", "echo started; sleep 6; echo finished"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    // SAFETY: signalling the vexec this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        wait_for(&mut child, Duration::from_secs(60)),
        Some(0),
        "{err}"
    );
    assert_eq!(rest, "finished\n");
    assert!(
        err.contains("where the run stands (SIGQUIT; the run goes on)"),
        "{err}"
    );
    assert!(err.contains("guest: agent: running the command"), "{err}");
    assert!(err.contains("(sh)"), "{err}");
}

#[test]
fn a_first_run_on_a_host_whose_kvm_aborts_qemu_runs_under_tcg() {
    // A fresh cache knows nothing of this host's KVM: `auto` tries it.
    // Where QEMU aborts under KVM before anything of the user's ran (as on
    // the machines this project is tested on; virtiofsd then complains
    // as QEMU dies under it), the run goes on under TCG and succeeds.
    // Where KVM works, it simply runs.
    let cache = workdir("fresh-kvm-cache");
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .env("XDG_CACHE_HOME", cache.path())
        .env_remove("VEXEC_KERNEL")
        .args(["--accel", "auto", "-k"])
        .arg(kernel(K))
        .args(["--", "uname", "-r"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out), format!("{}\n", release_of(&kernel(K))));
    assert!(!err.contains("run the command again"), "{err}");
}

#[test]
fn tcg_threads_single_runs_every_vcpu_in_one_thread_and_means_nothing_under_kvm() {
    // The workaround a stuck-CPU warning names: a flag, a file key, an env
    // variable, all reaching QEMU's accelerator.
    let mut c = vexec(K);
    c.args(["--tcg-threads", "single", "--dry-run", "--", "true"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("-accel tcg,thread=single "),
        "{}",
        stdout(&out)
    );
    let work = workdir("tcg");
    std::fs::write(
        work.path().join(".vexec.toml"),
        "tcg-threads = \"single\"\n",
    )
    .unwrap();
    let mut c = vexec(K);
    c.current_dir(work.path()).args(["--dry-run", "--", "true"]);
    assert!(stdout(&run(c)).contains("thread=single"));
    let mut c = vexec(K);
    c.env("VEXEC_TCG_THREADS", "multi")
        .current_dir(work.path())
        .args(["--dry-run", "--", "true"]);
    assert!(!stdout(&run(c)).contains("thread=single"));
    // A real guest with both its CPUs on one host thread.
    let mut c = vexec(K);
    c.args(["--tcg-threads", "single", "--", "nproc"]);
    let out = run(c);
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "2"));
    let mut c = vexec_in(&cache_dir());
    c.args(["--accel", "kvm", "--tcg-threads", "single", "-k"])
        .arg(kernel(K))
        .args(["--", "true"]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("means nothing with --accel kvm"), "{err}");
}
