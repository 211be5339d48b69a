//! Warm start: the first run of a machine saves the booted guest, later
//! runs restore it, and each restored guest is a new machine. On Debian's
//! 6.1 kernel under TCG, over 9p (its RAM in the migration stream); the
//! virtio-fs path (RAM saved apart, share devices plugged in after the
//! restore) is what every other VM test that boots over virtio-fs uses,
//! and has a test of its own here. Each test uses a machine of its own (a
//! memory size no other test uses), so what it finds in the shared cache
//! is its own.

mod common;
use common::*;

use std::process::{Output, Stdio};

const K: &str = "6.1";

/// `vexec -v -m MEMORY -- sh -c SCRIPT`: (stdout, stderr, status).
fn warm_run(memory: &str, extra: &[&str], script: &str) -> (String, String, Option<i32>) {
    let mut c = vexec_saying(K);
    c.args(["-v", "--transport", "9p", "-m", memory])
        .args(extra)
        .args(["--", "sh", "-c", script]);
    let out: Output = c.output().expect("spawning vexec");
    (
        stdout(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

/// Makes sure the machine of `memory` has its snapshot (saved by this run
/// or an earlier one).
fn saved(memory: &str) {
    let (_, err, code) = warm_run(memory, &[], "true");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("saved the booted guest") || err.contains("warm start (snapshot"),
        "{err}"
    );
}

/// The snapshot a warm start names in its `-v` notice.
fn snapshot_named(err: &str) -> String {
    err.split("warm start (snapshot ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no snapshot named in: {err}"))
        .to_string()
}

#[test]
fn the_first_run_saves_and_later_runs_restore_with_the_same_results() {
    let (out, err, code) = warm_run("1100M", &[], "echo out; echo err >&2; exit 7");
    assert_eq!((out.as_str(), code), ("out\n", Some(7)), "{err}");
    for _ in 0..2 {
        let (out, err, code) = warm_run("1100M", &[], "echo out; echo err >&2; exit 7");
        assert!(err.contains("warm start (snapshot"), "{err}");
        assert!(err.contains("\nerr\n") || err.starts_with("err\n"), "{err}");
        assert_eq!((out.as_str(), code), ("out\n", Some(7)), "{err}");
    }
}

#[test]
fn restored_guests_differ_in_randomness_and_keep_the_host_clock() {
    saved("1101M");
    let script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/uuid; date +%s";
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (out, err, code) = warm_run("1101M", &[], script);
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("warm start (snapshot"), "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let guest: i64 = lines[2].parse().unwrap();
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        // Within 2 s, plus the time the run took after `date`.
        assert!(
            (host - guest).abs() <= 4,
            "guest clock {guest}, host {host}"
        );
        seen.push((lines[0].to_string(), lines[1].to_string()));
    }
    assert_ne!(seen[0].0, seen[1].0, "the same random bytes twice");
    assert_ne!(seen[0].1, seen[1].1, "the same uuid twice");
}

#[test]
fn stdin_cwd_writes_and_the_overlay_behave_as_cold() {
    saved("1102M");
    let dir = workdir("warmcwd");
    let mut c = vexec_saying(K);
    c.current_dir(dir.path())
        .args(["-v", "--transport", "9p", "-m", "1102M", "--", "sh", "-c"])
        .arg("cat > kept; echo gone > /etc/vexec-warm; cat kept")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\x00bytes\xff\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warm start (snapshot"), "{err}");
    assert_eq!(out.stdout, b"\x00bytes\xff\n");
    assert_eq!(
        std::fs::read(dir.path().join("kept")).unwrap(),
        b"\x00bytes\xff\n"
    );
    // The overlay of the saved guest is new for each run.
    let (out, err, _) = warm_run("1102M", &[], "cat /etc/vexec-warm 2>&1 || echo absent");
    assert!(out.ends_with("absent\n"), "{out}{err}");
}

#[test]
fn another_machine_shape_never_restores_a_snapshot_made_for_one() {
    saved("1103M");
    // Another memory size, and another kernel command line.
    let (_, err, code) = warm_run("1104M", &["--cold"], "true");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("cold boot (--cold)"), "{err}");
    let (_, err, _) = warm_run("1103M", &[], "true");
    let plain = snapshot_named(&err);
    // The kernel-arg machine has a snapshot of its own (made now, or by an
    // earlier try of this test), never the plain one.
    for _ in 0..2 {
        let (out, err, code) = warm_run(
            "1103M",
            &["--kernel-arg", "vexec.test=1"],
            "cat /proc/cmdline",
        );
        assert_eq!(code, Some(0), "{err}");
        assert!(!err.contains(&plain), "{err}");
        assert!(out.contains("vexec.test=1"), "{out}");
    }
}

#[test]
fn a_damaged_snapshot_is_replaced_and_the_run_boots() {
    saved("1105M");
    let (_, err, _) = warm_run("1105M", &[], "true");
    let key = snapshot_named(&err);
    let dir = std::fs::read_dir(cache_dir().join("vexec/snapshot"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&key))
        .unwrap()
        .path();
    let state = dir.join("data/state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (out, err, code) = warm_run("1105M", &[], "echo booted");
    assert_eq!((out.as_str(), code), ("booted\n", Some(0)), "{err}");
    assert!(err.contains("is damaged"), "{err}");
    assert!(err.contains("saved the booted guest"), "{err}");
    let (_, err, _) = warm_run("1105M", &[], "true");
    assert!(err.contains("warm start (snapshot"), "{err}");
}

#[test]
fn four_warm_runs_at_once_all_pass() {
    saved("1106M");
    let children: Vec<_> = (0..4)
        .map(|i| {
            let mut c = vexec_saying(K);
            c.args(["-v", "--transport", "9p", "-m", "1106M", "--", "sh", "-c"])
                .arg(format!("echo run{i}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.contains("warm start (snapshot"), "{err}");
        assert_eq!(stdout(&out), format!("run{i}\n"));
    }
}

/// `vexec -v` over virtio-fs with the Rust virtiofsd, in `dir`.
fn virtiofs_run(dir: &std::path::Path, memory: &str, script: &str) -> Output {
    let mut c = vexec_saying(K);
    c.current_dir(dir)
        .args(["-v", "--transport", "virtiofs", "--virtiofsd"])
        .arg(rust_virtiofsd())
        .args(["-m", memory, "--", "sh", "-c", script]);
    c.output().unwrap()
}

#[test]
fn virtio_fs_machines_are_saved_and_restored_with_their_devices_plugged_in() {
    let dir = workdir("warmvfs");
    std::fs::write(dir.path().join("host"), "from the host\n").unwrap();
    let script = "cat host; echo $$ > guest; mount | grep -c virtiofs";
    let first = virtiofs_run(dir.path(), "1107M", script);
    let err = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(0), "{err}");
    assert!(
        err.contains("saved the booted guest") || err.contains("warm start (snapshot"),
        "{err}"
    );
    for i in 0..2 {
        std::fs::write(dir.path().join("host"), format!("host edit {i}\n")).unwrap();
        let out = virtiofs_run(dir.path(), "1107M", script);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.contains("warm start (snapshot"), "{err}");
        // The host's files as they are now, writes through to the host,
        // and the working directory over virtio-fs.
        let out = stdout(&out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("host edit {i}"), "{out}");
        assert!(lines[1].parse::<u32>().unwrap() >= 1, "{out}");
        let written = std::fs::read_to_string(dir.path().join("guest")).unwrap();
        assert!(written.trim().parse::<u32>().is_ok(), "{written}");
    }
}

#[test]
fn cache_clean_then_a_run_works() {
    let cache = workdir("warmclean");
    let with_cache = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vexec"));
        c.env("XDG_CACHE_HOME", cache.path()).args(args);
        c.output().unwrap()
    };
    let kernel = kernel(K);
    let k = kernel.to_str().unwrap();
    let run = [
        "--accel",
        "tcg",
        "-v",
        "--transport",
        "9p",
        "-k",
        k,
        "--",
        "echo",
        "hi",
    ];
    let out = with_cache(&run);
    assert_eq!(
        stdout(&out),
        "hi\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = stdout(&with_cache(&["cache", "list"]));
    assert!(list.contains("snapshot"), "{list}");
    assert!(list.contains("initramfs"), "{list}");
    let clean = with_cache(&["cache", "clean", "--kind", "snapshot"]);
    assert!(String::from_utf8_lossy(&clean.stderr).contains("removed 1 cache entry"));
    assert!(!stdout(&with_cache(&["cache", "list"])).contains("snapshot"));
    let out = with_cache(&run);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout(&out), "hi\n", "{err}");
    assert!(err.contains("saved the booted guest"), "{err}");
    // A plain clean leaves nothing vexec made (locks and scratch too).
    let clean = with_cache(&["cache", "clean"]);
    assert_eq!(clean.status.code(), Some(0));
    let left: Vec<_> = std::fs::read_dir(cache.path().join("vexec"))
        .unwrap()
        .flatten()
        .filter(|kind| std::fs::read_dir(kind.path()).is_ok_and(|mut d| d.next().is_some()))
        .map(|kind| kind.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_guest_that_never_sees_its_plugged_devices_is_booted_with_them() {
    // ACPI PCI hotplug switched off in the guest: the devices plugged in
    // after the save never appear. The run boots again with its devices
    // (nothing had run), and the machine is not saved again.
    let dir = workdir("warmnoplug");
    let mut c = vexec_saying(K);
    c.current_dir(dir.path())
        .args(["-v", "--transport", "virtiofs", "--virtiofsd"])
        .arg(rust_virtiofsd())
        .args(["-m", "1108M", "--kernel-arg", "acpiphp.disable=1"])
        .args(["--", "sh", "-c", "echo ran >> runs"]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // A retry of this test finds the machine already marked.
    assert!(
        err.contains("booting with the devices instead")
            || err.contains("this machine cannot be saved: the plugged share devices"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("runs")).unwrap(),
        "ran\n"
    );
    let again = c.output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "cold boot (this machine cannot be saved: the plugged share devices did not appear"
        ),
        "{err}"
    );
}

#[test]
fn a_warm_run_reports_what_a_cold_run_reports() {
    // The rule (docs/warm-start.md): a run counts the whole kernel log its
    // guest holds. A restored guest holds the saved boot's log as a booted
    // one holds its own, so splats (--fail-on-oops) and KTAP cases read
    // from the kernel log come out the same either way.
    let script = "for l in 'KTAP version 1' '1..2' 'ok 1 first' 'not ok 2 second'; do echo \"$l\" > /dev/kmsg; done; echo 'WARNING: CPU: 0 PID: 1 at drivers/x.c:1 f+0x1/0x2' > /dev/kmsg; echo out";
    let said = |mode: &[&str]| {
        let mut c = vexec_saying(K);
        c.args(mode)
            .args(["--fail-on-oops", "--results", "ktap", "--sudo", "--"])
            .args(["sh", "-c", script]);
        let out = run(c);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<String> = err
            .lines()
            .filter(|l| l.contains("results:") || l.contains("the kernel logged"))
            .map(str::to_string)
            .collect();
        (out.status.code(), stdout(&out), lines)
    };
    let cold = said(&["--cold"]);
    assert_eq!(cold.0, Some(1), "{cold:?}");
    assert_eq!(cold.2.len(), 2, "{cold:?}");
    // Twice warm: the first may be the one that saves the machine.
    said(&[]);
    assert_eq!(said(&[]), cold);
}
