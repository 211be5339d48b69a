//! The project file `.vexec.toml`, `--sudo`, `--env`, and the generated
//! completions and man page.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn bare_vexec() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .env_remove("VEXEC_KERNEL")
        .stdin(Stdio::null());
    c
}

#[test]
fn config_file_from_the_vcs_root_with_setup_and_teardown() {
    let repo = workdir("cfg-repo");
    std::fs::create_dir_all(repo.path().join(".git")).unwrap();
    let sub = repo.path().join("a/b");
    std::fs::create_dir_all(&sub).unwrap();
    // Paths in the file are relative to it; the kernel sits beside it.
    let image = kernel("6.1");
    std::fs::create_dir_all(repo.path().join("k")).unwrap();
    std::os::unix::fs::symlink(&image, repo.path().join("k/vmlinuz")).unwrap();
    std::fs::write(
        repo.path().join(".vexec.toml"),
        format!(
            r#"
kernel = "k/vmlinuz"
modules = "{modules}"
accel = "tcg"
memory = "768M"
kernel-args = ["vexec_test=1"]
setup = ["echo ran > /run/marker", "echo setup-output"]
teardown = ["echo teardown-output"]
[env]
set = {{ FROM_FILE = "yes", OVERRIDDEN = "file" }}
unset = ["DROP_ME"]
"#,
            modules = kernels_dir()
                .join("6.1/lib/modules")
                .join(release_of(&image))
                .display()
        ),
    )
    .unwrap();
    let mut c = bare_vexec();
    c.current_dir(&sub)
        .env("DROP_ME", "x")
        .args(["-q", "-e", "OVERRIDDEN=flag", "--"])
        .args([
            "sh",
            "-c",
            "cat /run/marker; echo $FROM_FILE $OVERRIDDEN ${DROP_ME:-dropped}; grep -o vexec_test=1 /proc/cmdline; id -u",
        ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        stdout(&out),
        format!("ran\nyes flag dropped\nvexec_test=1\n{uid}\n")
    );
    // Hook output goes to stderr: stdout is the command's.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("setup-output") && err.contains("teardown-output"),
        "{err}"
    );

    // --no-config ignores it (no kernel then: the default must be named).
    let mut c = bare_vexec();
    c.current_dir(&sub)
        .args(["--no-config", "-q", "--accel", "tcg", "-k"])
        .arg(&image)
        .args(["--", "sh", "-c", "echo ${FROM_FILE:-none}"]);
    let out = run(c);
    assert_eq!(stdout(&out), "none\n");
}

#[test]
fn failing_setup_stops_the_run_with_125() {
    let dir = workdir("cfg-setup-fails");
    let file = dir.path().join("vexec.toml");
    std::fs::write(&file, "setup = [\"exit 3\"]\n").unwrap();
    let mut c = vexec("6.1");
    c.arg("--config")
        .arg(&file)
        .args(["--", "echo", "should not run"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(stdout(&out), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("setup command `exit 3` failed"), "{err}");
}

#[test]
fn a_slow_setup_is_the_users_work_and_runs_once() {
    // The setup outlasts the boot timeout: only vexec's own mounting is
    // under that deadline, so nothing is booted again or run twice.
    let dir = workdir("cfg-slow-setup");
    let file = dir.path().join("vexec.toml");
    std::fs::write(&file, "setup = [\"echo ran >> count; sleep 12\"]\n").unwrap();
    let mut c = vexec_saying("6.1");
    c.current_dir(dir.path()).arg("--config").arg(&file).args([
        "--boot-timeout",
        "8s",
        "--",
        "echo",
        "done",
    ]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out), "done\n");
    assert!(!err.contains("booting again"), "{err}");
    let count = std::fs::read_to_string(dir.path().join("count")).unwrap();
    assert_eq!(count, "ran\n");
}

#[test]
fn bad_config_names_file_line_and_key() {
    let dir = workdir("cfg-bad");
    let file = dir.path().join(".vexec.toml");
    for (text, want) in [
        (
            "memory = \"1G\"\nmemroy = \"2G\"\n",
            "line 2, column 1: unknown field `memroy`",
        ),
        ("cpus = \"four\"\n", "line 1, column 8"),
        ("accel = \"warp\"\n", "key `accel`"),
    ] {
        std::fs::write(&file, text).unwrap();
        let mut c = bare_vexec();
        c.current_dir(dir.path()).arg("true");
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(125));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn sudo_runs_as_guest_root_with_the_callers_environment() {
    let mut c = vexec("6.1");
    c.env("KEEP_ME", "kept")
        .args(["--sudo", "-e", "EXTRA=1", "--"])
        .args([
            "sh",
            "-c",
            "id -u; echo $KEEP_ME $EXTRA $SUDO_UID $USER; touch /root/x && echo root-can-write",
        ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        stdout(&out),
        format!("0\nkept 1 {uid} root\nroot-can-write\n")
    );
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = bare_vexec().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("transport"),
            "{shell}"
        );
    }
    let out = bare_vexec().arg("manpage").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.contains(".TH vexec") && man.contains("sudo"), "{man}");
    let out = bare_vexec().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
}
