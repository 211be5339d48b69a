//! `vexec run-dir`: initramfs-only runs of a directory of programs, on
//! x86_64 (vexec's agent as init) and arm64 (busybox script as init, under
//! qemu-system-aarch64 -M virt, direct and UEFI boot), the output
//! directory's layout, --gdb and QEMU argument pass-through.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const PASS_C: &str = r#"#include <stdio.h>
#include <sys/utsname.h>
int main(void) { struct utsname u; uname(&u); printf("static C on %s %s\n", u.release, u.machine); return 0; }
"#;
const FAIL_C: &str = r#"#include <stdio.h>
int main(void) { fprintf(stderr, "failing on purpose\n"); return 3; }
"#;
const SCRIPT: &str = "#!/bin/sh\necho \"script sees $(cat /extra/data.txt) on $(uname -m)\"\n";

/// The arm64 test kernel and its static busybox (scripts/fetch-test-kernels.sh).
fn arm64_busybox() -> PathBuf {
    let b = kernels_dir().join("arm64-busybox/bin/busybox");
    assert!(
        b.is_file(),
        "{} missing; run scripts/fetch-test-kernels.sh",
        b.display()
    );
    b
}

fn executable(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Compiles `src` statically with `cc` into `out`.
fn static_c(cc: &str, src: &str, out: &Path) {
    let c = out.with_extension("c");
    std::fs::write(&c, src).unwrap();
    let status = Command::new(cc)
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&c)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "{cc}: {e}; install gcc (and gcc-aarch64-linux-gnu libc6-dev-arm64-cross for arm64)"
            )
        });
    assert!(status.success());
    std::fs::remove_file(c).unwrap();
}

/// A directory with a passing and a failing static C program (built with
/// `cc`), a busybox script, a data file (not executable: not run) and the
/// extra file the script reads (--add).
fn fixture(work: &Path, cc: &str) -> (PathBuf, PathBuf) {
    let progs = work.join("progs");
    std::fs::create_dir(&progs).unwrap();
    static_c(cc, PASS_C, &progs.join("01-pass"));
    static_c(cc, FAIL_C, &progs.join("02-fail"));
    executable(&progs.join("03-script.sh"), SCRIPT);
    std::fs::write(progs.join("README"), "not a program\n").unwrap();
    let extra = work.join("extra");
    std::fs::create_dir(&extra).unwrap();
    std::fs::write(extra.join("data.txt"), "added-file").unwrap();
    (progs, extra)
}

fn run_dir() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .env_remove("VEXEC_KERNEL")
        .arg("run-dir")
        .stdin(Stdio::null());
    c
}

/// The only run directory under `out`.
fn the_run(out: &Path) -> PathBuf {
    let runs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.into_iter().next().unwrap()
}

/// Checks what every run of the fixture must show.
fn check_fixture_run(out: &std::process::Output, record: &Path, machine: &str, release: &str) {
    assert_eq!(out.status.code(), Some(1), "one program fails");
    let text = stdout(out);
    assert_eq!(
        text,
        format!("static C on {release} {machine}\nscript sees added-file on {machine}\n")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failing on purpose"), "{err}");
    assert!(err.contains("FAIL    02-fail"), "{err}");
    assert!(err.contains("2 passed, 1 failed or not run, of 3"), "{err}");
    // The record: serial, results/NAME/{stdout,stderr,status}, run.json.
    let name = record.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with("-ci-smoke"), "{name}");
    assert!(name.len() == "20261123T235959Z-ci-smoke".len(), "{name}");
    let serial = std::fs::read_to_string(record.join("serial")).unwrap();
    assert!(
        serial.contains(&format!("Linux version {release}")),
        "{serial}"
    );
    let res = record.join("results");
    assert_eq!(
        std::fs::read_to_string(res.join("02-fail/stderr")).unwrap(),
        "failing on purpose\n"
    );
    assert_eq!(
        std::fs::read_to_string(res.join("02-fail/status")).unwrap(),
        "fail exit 3\n"
    );
    assert_eq!(
        std::fs::read_to_string(res.join("01-pass/status")).unwrap(),
        "pass exit 0\n"
    );
    assert!(!res.join("README").exists());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record.join("run.json")).unwrap()).unwrap();
    assert_eq!(json["exit_status"], 1);
    assert_eq!(json["release"], release);
    let results: Vec<(String, String)> = json["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("01-pass".to_string(), "pass".to_string()),
            ("02-fail".into(), "fail".into()),
            ("03-script.sh".into(), "pass".into())
        ]
    );
}

#[test]
fn x86_64_runs_each_program_from_the_initramfs_alone() {
    let work = workdir("rundir-x86");
    let (progs, extra) = fixture(work.path(), "gcc");
    let out_dir = work.path().join("runs");
    let image = kernel("6.1");
    let mut c = run_dir();
    c.args(["--accel", "tcg", "-k"])
        .arg(&image)
        .arg("--add")
        .arg(format!("{}:/extra", extra.display()))
        .arg("--output")
        .arg(&out_dir)
        .args(["--tag", "ci", "--tag", "smoke"])
        .arg(&progs);
    let out = run(c);
    check_fixture_run(&out, &the_run(&out_dir), "x86_64", &release_of(&image));
}

#[test]
fn arm64_runs_the_same_directory_under_busybox_init() {
    let work = workdir("rundir-arm64");
    let (progs, extra) = fixture(work.path(), "aarch64-linux-gnu-gcc");
    let out_dir = work.path().join("runs");
    let image = kernel("arm64-6.1");
    let mut c = run_dir();
    c.args(["--arch", "aarch64", "-k"])
        .arg(&image)
        .arg("--busybox")
        .arg(arm64_busybox())
        .arg("--add")
        .arg(format!("{}:/extra", extra.display()))
        .arg("--output")
        .arg(&out_dir)
        .args(["--tag", "ci", "--tag", "smoke"])
        .arg(&progs);
    let out = run(c);
    check_fixture_run(&out, &the_run(&out_dir), "aarch64", &release_of(&image));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(the_run(&out_dir).join("run.json")).unwrap())
            .unwrap();
    assert_eq!(json["arch"], "aarch64");
    assert_eq!(json["accel"], "tcg");
}

#[test]
fn arm64_boots_through_uefi_firmware() {
    let firmware = Path::new("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd");
    assert!(
        firmware.is_file(),
        "apt-get install qemu-efi-aarch64 (UEFI firmware for arm64 guests)"
    );
    let work = workdir("rundir-uefi");
    let progs = work.path().join("progs");
    std::fs::create_dir(&progs).unwrap();
    executable(
        &progs.join("efi"),
        "#!/bin/sh\ntest -d /sys/firmware/efi && echo booted-by-uefi\n",
    );
    let out_dir = work.path().join("runs");
    let mut c = run_dir();
    c.arg("-k")
        .arg(kernel("arm64-6.1"))
        .arg("--busybox")
        .arg(arm64_busybox())
        .arg("--firmware")
        .arg(firmware)
        .arg("--output")
        .arg(&out_dir)
        .arg(&progs);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "booted-by-uefi\n");
    let serial = std::fs::read_to_string(the_run(&out_dir).join("serial")).unwrap();
    assert!(serial.contains("EFI stub"), "{serial}");
}

#[test]
fn qemu_arguments_pass_through_and_debug_waits_for_gdb() {
    let work = workdir("rundir-qemu");
    let progs = work.path().join("progs");
    std::fs::create_dir(&progs).unwrap();
    executable(
        &progs.join("serial"),
        "#!/bin/sh\ncat /sys/class/dmi/id/product_serial\n",
    );
    let port = free_port();
    let mut c = run_dir();
    c.args(["-q", "--accel", "tcg", "-k"])
        .arg(kernel("6.1"))
        .arg(format!("--gdb={port}"))
        .arg(&progs)
        .args(["--", "-smbios", "type=1,serial=passed-through"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let said = read_gdb_notice(&mut err);
    assert!(
        said.contains(&format!("target remote localhost:{port}")),
        "{said}"
    );
    // The CPUs are stopped at the reset vector until gdb lets them go.
    let gdb = Command::new("gdb")
        .args(["-nx", "-batch", "-ex"])
        .arg(format!("target remote localhost:{port}"))
        .args(["-ex", "info registers rip", "-ex", "detach"])
        .stdin(Stdio::null())
        .output()
        .expect("gdb (apt-get install gdb)");
    let gdb_out = String::from_utf8_lossy(&gdb.stdout);
    assert!(gdb_out.contains("0xfff0"), "{gdb_out}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "passed-through\n");
}

#[test]
fn bad_input_is_refused_before_booting() {
    let work = workdir("rundir-bad");
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let host_prog = work.path().join("host");
    std::fs::create_dir(&host_prog).unwrap();
    std::fs::copy("/bin/true", host_prog.join("true")).unwrap();
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "-k".into(),
                kernel("6.1").into(),
                work.path().join("missing").into(),
            ],
            "is not a directory",
        ),
        (
            vec!["-k".into(), kernel("6.1").into(), empty.clone().into()],
            "holds no executable files",
        ),
        (
            vec![
                "--accel".into(),
                "kvm".into(),
                "--tcg-threads".into(),
                "single".into(),
                "-k".into(),
                kernel("6.1").into(),
                host_prog.clone().into(),
            ],
            "means nothing with --accel kvm",
        ),
        (
            vec![
                "-k".into(),
                kernel("arm64-6.1").into(),
                "--busybox".into(),
                arm64_busybox().into(),
                host_prog.clone().into(),
            ],
            "is a program for x86_64, but the guest is aarch64",
        ),
        (
            vec![
                "--arch".into(),
                "aarch64".into(),
                "-k".into(),
                kernel("6.1").into(),
                host_prog.clone().into(),
            ],
            "is a kernel for x86_64",
        ),
        (
            vec![
                "-k".into(),
                kernel("6.1").into(),
                "--add".into(),
                "/nonexistent/file".into(),
                host_prog.clone().into(),
            ],
            "--add /nonexistent/file",
        ),
    ];
    for (args, want) in cases {
        let mut c = run_dir();
        c.args(&args);
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // An arm64 kernel cannot run the host's userspace: a clear error.
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .arg("-k")
        .arg(kernel("arm64-6.1"))
        .args(["--", "true"]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("vexec run-dir --arch aarch64"), "{err}");
    // Nor can KVM run it.
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .args(["--accel", "kvm", "--root"])
        .arg(&host_prog)
        .arg("-k")
        .arg(kernel("arm64-6.1"))
        .args(["--", "true"]);
    std::fs::create_dir(host_prog.join("bin")).unwrap();
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("can only be emulated"), "{err}");
}

/// A minimal root filesystem: `busybox` and a few applet links, and a
/// marker file.
fn busybox_root(dir: &Path, busybox: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for a in ["sh", "uname", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    std::fs::write(dir.join("etc/marker"), "from the root dir\n").unwrap();
}

const IN_ROOT: &str =
    "uname -m; cat /etc/marker; echo new > /etc/new && cat /etc/new; test -d /proc/self; exit 7";

#[test]
fn a_command_runs_in_a_foreign_architecture_root() {
    let work = workdir("root-arm64");
    let root = work.path().join("root");
    busybox_root(&root, &arm64_busybox());
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .arg("--root")
        .arg(&root)
        .arg("-k")
        .arg(kernel("arm64-6.1"))
        .arg("--busybox")
        .arg(arm64_busybox())
        .args(["--", "/bin/sh", "-c", IN_ROOT])
        .stdin(Stdio::null());
    let out = run(c);
    assert_eq!(out.status.code(), Some(7), "the command's own status");
    assert_eq!(stdout(&out), "aarch64\nfrom the root dir\nnew\n");
    // Writes stay in the guest's overlay.
    assert!(!root.join("etc/new").exists());
}

#[test]
fn a_command_runs_in_another_x86_64_root() {
    let work = workdir("root-x86");
    let root = work.path().join("root");
    let host_busybox = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("busybox"))
        .find(|p| p.is_file())
        .expect("busybox (apt-get install busybox-static)");
    busybox_root(&root, &host_busybox);
    let mut c = vexec("6.1");
    c.arg("--root")
        .arg(&root)
        .args(["--", "/bin/sh", "-c", IN_ROOT]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "x86_64\nfrom the root dir\nnew\n");
    assert!(!root.join("etc/new").exists());
}

/// Opt-in (VEXEC_SLOW_TESTS=1, a kernel build of 15+ minutes on 2 cores, or
/// VEXEC_GCOV_TREE=DIR naming a tree already built with `vexec build
/// --gcov`): a run-dir on a GCOV kernel brings back its coverage data, and
/// lcov turns it into a tracefile.
#[test]
fn gcov_kernel_coverage_is_collected_and_captured() {
    let prebuilt = std::env::var_os("VEXEC_GCOV_TREE").map(PathBuf::from);
    if prebuilt.is_none() && std::env::var_os("VEXEC_SLOW_TESTS").is_none() {
        eprintln!("skipped: set VEXEC_SLOW_TESTS=1 (builds a GCOV kernel) or VEXEC_GCOV_TREE=DIR");
        return;
    }
    let work = workdir("gcov");
    let tree = match prebuilt {
        Some(t) => t,
        None => {
            let tree = linux_source(work.path());
            let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
                .args(["build", "--gcov"])
                .arg(&tree)
                .output()
                .unwrap();
            assert_ok(&out);
            tree
        }
    };
    let progs = work.path().join("progs");
    std::fs::create_dir(&progs).unwrap();
    static_c("gcc", PASS_C, &progs.join("uname"));
    let out_dir = work.path().join("runs");
    let mut c = run_dir();
    c.args(["--accel", "tcg", "-k"])
        .arg(&tree)
        .arg("--output")
        .arg(&out_dir)
        .arg(&progs);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let record = the_run(&out_dir);
    let tar = std::fs::read(record.join("coverage/gcda.tar")).unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entries = 0;
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        let p = e.path().unwrap().into_owned();
        if p.extension().is_some_and(|x| x == "gcda") {
            entries += 1;
        }
    }
    assert!(entries > 100, "{entries} .gcda files");
    let have_lcov =
        std::env::split_paths(&std::env::var_os("PATH").unwrap()).any(|d| d.join("lcov").is_file());
    if have_lcov {
        let info = std::fs::read_to_string(record.join("coverage/lcov.info")).unwrap();
        assert!(
            info.contains("SF:") && info.contains("kernel/fork.c"),
            "{}",
            &info[..info.len().min(2000)]
        );
    }
}
