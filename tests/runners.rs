//! vexec as the exec wrapper of real test runners: `go test -exec`, cargo's
//! target runner (`cargo test`, `.cargo/config.toml`, `cargo nextest`), and
//! `python3 -m pytest`, on the fixtures in tests/fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

const K: &str = "6.1";

/// The fixture copied into a fresh work directory (builds write there).
fn fixture(name: &str) -> tempfile::TempDir {
    let dir = workdir(&format!("fixture-{name}"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

/// The runner line: vexec with the test kernel, TCG and the test cache.
fn runner_words() -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_vexec").to_string(),
        "-q".into(),
        "--accel".into(),
        "tcg".into(),
        "-k".into(),
        kernel(K).display().to_string(),
    ]
}

/// A tool run with the outer cargo/nextest's variables removed, so the
/// inner build is an ordinary one.
fn tool(program: &str, dir: &Path) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("NEXTEST")
            || k.starts_with("RUST_TEST")
            || k == "RUSTFLAGS"
        {
            c.env_remove(&*k);
        }
    }
    c.current_dir(dir)
        .env("XDG_CACHE_HOME", cache_dir())
        .env("VEXEC_FIXTURE_RELEASE", release_of(&kernel(K)))
        .env_remove("VEXEC_KERNEL")
        .stdin(Stdio::null());
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn have(program: &str, version_arg: &str) -> bool {
    Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn go(dir: &Path) -> Option<Command> {
    if !have("go", "version") {
        eprintln!("skipped: no Go toolchain (Debian: apt-get install golang-go)");
        return None;
    }
    let mut c = tool("go", dir);
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    c.env("GOCACHE", scratch.join("go-cache"))
        .env("GOPATH", scratch.join("go-path"))
        .env("GOFLAGS", "")
        .env("GOTOOLCHAIN", "local");
    Some(c)
}

#[test]
fn go_test_exec_runs_the_package_tests_in_the_vm() {
    let dir = fixture("gomod");
    let Some(mut c) = go(dir.path()) else { return };
    c.args(["test", "-work", "-count=1", "-v", "-exec"])
        .arg(runner_words().join(" "))
        .arg("./...");
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let rel = release_of(&kernel(K));
    assert!(t.contains("--- PASS: TestKernelRelease"), "{t}");
    assert!(t.contains(&format!("kernel release {rel}")), "{t}");
    assert!(t.contains("--- PASS: TestRunsInPackageDir"), "{t}");
    assert!(t.contains("--- SKIP: TestFailsOnPurpose"), "{t}");
    // -work keeps the build directory, where the test binary ran from.
    let work = t
        .lines()
        .find_map(|l| l.strip_prefix("WORK="))
        .expect("go test -work prints WORK=");
    assert!(Path::new(work).is_dir(), "{work}");
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn go_test_exec_reports_failures_and_panics() {
    let dir = fixture("gomod");
    let Some(mut c) = go(dir.path()) else { return };
    c.env("VEXEC_FIXTURE_FAIL", "1")
        .env("VEXEC_FIXTURE_PANIC", "1")
        .args(["test", "-count=1", "-run", "Fails|Panics", "-exec"])
        .arg(runner_words().join(" "))
        .arg(".");
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("--- FAIL: TestFailsOnPurpose"), "{t}");
    assert!(t.contains("failing on purpose"), "{t}");
    assert!(t.contains("panic: panicking on purpose"), "{t}");
    assert!(t.contains("FAIL\texample.com/vexecfixture"), "{t}");
}

fn cargo(dir: &Path) -> Command {
    let mut c = tool(env!("CARGO"), dir);
    c.env(
        "CARGO_TARGET_DIR",
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixture-target"),
    );
    c
}

#[test]
fn cargo_test_with_vexec_as_target_runner() {
    let dir = fixture("crate");
    let mut c = cargo(dir.path());
    c.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER",
        runner_words().join(" "),
    )
    .args(["test", "--", "--nocapture", "--skip", "fails_on_purpose"]);
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let rel = release_of(&kernel(K));
    assert!(t.contains(&format!("unit: kernel release {rel}")), "{t}");
    assert!(
        t.contains(&format!("integration: kernel release {rel}")),
        "{t}"
    );
}

#[test]
fn cargo_config_toml_runner_and_a_failing_test() {
    let dir = fixture("crate");
    std::fs::create_dir_all(dir.path().join(".cargo")).unwrap();
    let words: Vec<String> = runner_words().iter().map(|w| format!("{w:?}")).collect();
    std::fs::write(
        dir.path().join(".cargo/config.toml"),
        format!(
            "[target.x86_64-unknown-linux-gnu]\nrunner = [{}]\n",
            words.join(", ")
        ),
    )
    .unwrap();
    let mut c = cargo(dir.path());
    c.env("VEXEC_FIXTURE_FAIL", "1")
        .args(["test", "--test", "integration"]);
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(101), "{t}");
    assert!(t.contains("failing on purpose"), "{t}");
    assert!(
        t.contains("test integration_test_sees_the_guest_kernel ... ok"),
        "{t}"
    );
}

#[test]
fn cargo_nextest_with_vexec_as_target_runner() {
    let dir = fixture("crate");
    let mut probe = cargo(dir.path());
    probe.args(["nextest", "--version"]);
    if !probe.output().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cargo-nextest is not installed");
        return;
    }
    let mut c = cargo(dir.path());
    c.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER",
        runner_words().join(" "),
    )
    .args([
        "nextest",
        "run",
        "--no-fail-fast",
        "-E",
        "not test(fails_on_purpose)",
    ]);
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("2 passed"), "{t}");
}

fn python_with_pytest() -> Option<&'static str> {
    let py = "/usr/bin/python3";
    let ok = Command::new(py)
        .args(["-c", "import pytest"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: no pytest for {py} (Debian: apt-get install python3-pytest)");
    }
    ok.then_some(py)
}

#[test]
fn pytest_passes_in_the_vm() {
    let Some(py) = python_with_pytest() else {
        return;
    };
    let dir = fixture("pyproj");
    let mut c = tool(env!("CARGO_BIN_EXE_vexec"), dir.path());
    c.args(&runner_words()[1..])
        .args(["--", py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]);
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("2 passed"), "{t}");
}

#[test]
fn pytest_failure_and_shell_script_exit_codes() {
    let Some(py) = python_with_pytest() else {
        return;
    };
    let dir = fixture("pyproj");
    let mut c = tool(env!("CARGO_BIN_EXE_vexec"), dir.path());
    c.env("VEXEC_FIXTURE_FAIL", "1")
        .args(&runner_words()[1..])
        .args([
            "--",
            "sh",
            "-c",
            "./script.sh 0; echo script=$?; \"$0\" -m pytest -q -p no:cacheprovider; echo pytest=$?; exec ./script.sh 7",
            py,
        ]);
    let out = c.output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(7), "{t}");
    let rel = release_of(&kernel(K));
    assert!(t.contains(&format!("script on {rel}\nscript=0")), "{t}");
    assert!(t.contains("failing on purpose"), "{t}");
    assert!(t.contains("1 failed, 1 passed"), "{t}");
    assert!(t.contains("pytest=1"), "{t}");
    // Not a terminal here, so no color.
    assert!(!t.contains("\u{1b}[32m"), "{t}");
}
