//! Persistent VMs: `vexec up`, `exec`, `shell`, `ps`, `down`, and reaching
//! a plain run while it runs, against real kernels. Each test has its own
//! runtime directory (common/vms.rs), so its VMs are its own.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vms::*;
use common::*;
#[test]
fn exec_gives_what_a_plain_run_gives() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    vms.up("dev", &[]);

    let o = vms.exec(
        "dev",
        &["sh", "-c", "printf 'a\\0b'; printf err >&2; exit 3"],
    );
    assert_eq!(
        (code(&o), &o.stdout[..], &o.stderr[..]),
        (Some(3), &b"a\0b"[..], &b"err"[..])
    );

    let mut c = vms.vexec();
    c.args(["exec", "-q", "dev", "--", "od", "-An", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"x\0y").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        stdout(&o).split_whitespace().collect::<Vec<_>>(),
        ["x", "\\0", "y"]
    );

    assert_eq!(code(&vms.exec("dev", &["no-such-command"])), Some(127));
    assert_eq!(
        code(&vms.exec("dev", &["sh", "-c", "kill -TERM $$"])),
        Some(143)
    );
    let o = vms
        .vexec()
        .args([
            "exec",
            "-q",
            "-e",
            "V=1 2",
            "dev",
            "--",
            "sh",
            "-c",
            "echo \"$V\"",
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "1 2\n");

    // The directory `up` started in is the host's, written through.
    let o = vms.exec("dev", &["sh", "-c", "pwd; echo kept > made-in-vm"]);
    assert_eq!(stdout(&o), format!("{}\n", work.path().display()));
    assert_eq!(
        std::fs::read_to_string(work.path().join("made-in-vm")).unwrap(),
        "kept\n"
    );

    // SIGPIPE when the reader goes away, as locally.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "'{}' exec -q dev -- yes | head -1; echo ${{PIPESTATUS[0]}}",
            env!("CARGO_BIN_EXE_vexec")
        ))
        .env("XDG_RUNTIME_DIR", vms.runtime.path())
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "y\n141\n");

    let t = Instant::now();
    let o = vms
        .vexec()
        .args(["exec", "dev", "--timeout", "1s", "--", "sleep", "60"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("keeps running"), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(20));
    // ... and the VM still serves, on every one of its 16 ports at once
    // (they sit on two virtio-serial buses, whose ports the guest finds
    // one by one).
    let kids: Vec<_> = (0..16)
        .map(|i| {
            let mut c = vms.vexec();
            // A port nobody serves would hang: --timeout fails it instead.
            c.args(["exec", "-q", "--timeout", "60s", "dev", "--"]);
            c.args(["sh", "-c", &format!("sleep 2; echo {i}")]);
            c.stdout(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        assert_eq!(stdout(&k.wait_with_output().unwrap()), format!("{i}\n"));
    }
}

#[test]
fn many_commands_at_once_and_a_vanished_client_frees_its_slot() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    vms.up("par", &["--max-execs", "2"]);
    // Six commands on two slots: the rest wait their turn.
    let kids: Vec<_> = (0..6)
        .map(|i| {
            vms.vexec()
                .args([
                    "exec",
                    "-q",
                    "par",
                    "--",
                    "sh",
                    "-c",
                    &format!("sleep 0.5; echo {i}"),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert_eq!((code(&o), stdout(&o)), (Some(0), format!("{i}\n")));
    }
    // A client killed mid-command: its command is killed, its slot freed.
    let mut hog = vms
        .vexec()
        .args(["exec", "-q", "par", "--", "sleep", "300"])
        .spawn()
        .unwrap();
    let mut hog2 = vms
        .vexec()
        .args(["exec", "-q", "par", "--", "sleep", "301"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    hog.kill().unwrap();
    hog2.kill().unwrap();
    let _ = (hog.wait(), hog2.wait());
    let o = vms.exec("par", &["sh", "-c", "pgrep -x sleep || echo none"]);
    assert_eq!(stdout(&o), "none\n");
}

#[test]
fn ctrl_c_reaches_the_command_and_the_vm_stays() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    vms.up("sig", &[]);
    let mut child = vms
        .vexec()
        .args([
            "exec",
            "-q",
            "sig",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    out.read_exact(&mut first).unwrap();
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-int\n");
    // As a plain run: 128 + the signal that stopped it.
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert_eq!(code(&vms.exec("sig", &["true"])), Some(0));
}

#[test]
fn down_and_a_killed_up_process_leave_nothing() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    let qga = vms.runtime.path().join("ga.sock");
    vms.up("gone", &["--qga", qga.to_str().unwrap()]);
    let ps = vms.vexec().arg("ps").output().unwrap();
    let table = stdout(&ps);
    assert!(table.contains("gone") && table.contains("up"), "{table}");

    // SIGKILL leaves no time to clean up: QEMU, its daemons and the
    // VM's files go all the same.
    let pid = vms.up_pid("gone");
    let qemu = vms.info("gone")["qemu_pid"].as_i64().expect("QEMU's pid") as i32;
    // SAFETY: plain kill of the test's own VM process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(10), || !vms
        .dir("gone")
        .exists()
        && !qga.exists()));
    assert!(eventually(Duration::from_secs(10), || !alive(qemu)));

    // A stale directory never blocks a new `up` of that name.
    std::fs::create_dir_all(vms.dir("gone")).unwrap();
    std::fs::write(vms.dir("gone").join("ctl.sock"), b"stale").unwrap();
    vms.up("gone", &[]);
    let pid = vms.up_pid("gone");
    let o = vms.vexec().args(["down", "gone"]).output().unwrap();
    assert_ok(&o);
    assert!(!vms.dir("gone").exists());
    assert!(eventually(Duration::from_secs(10), || !alive(pid)));
}

#[test]
fn bad_names_and_vms_that_are_not_there_are_clear_errors() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    let o = vms.exec("nosuch", &["true"]);
    assert_eq!(code(&o), Some(125));
    assert!(stderr(&o).contains("no VM named nosuch"), "{}", stderr(&o));
    let o = vms.exec("../x", &["true"]);
    assert_eq!(code(&o), Some(125));
    assert!(
        stderr(&o).contains("not a usable VM name"),
        "{}",
        stderr(&o)
    );
    let o = vms.vexec().args(["down", "nosuch"]).output().unwrap();
    assert_eq!(code(&o), Some(125), "{}", stderr(&o));

    vms.up("one", &["--idle", "3s"]);
    let o = vms
        .vexec()
        .args(["up", "-q", "--accel", "tcg", "--name", "one", "-k"])
        .arg(kernel("6.1"))
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(125));
    assert!(stderr(&o).contains("already up"), "{}", stderr(&o));
    // --idle: no command for 3 s and it goes by itself.
    assert!(eventually(Duration::from_secs(20), || !vms
        .dir("one")
        .exists()));
    let o = vms.exec("one", &["true"]);
    assert_eq!(code(&o), Some(125));
}
#[test]
fn a_shell_into_a_running_vm() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    vms.up("sh", &[]);
    // `script` gives vexec a terminal; the shell reads its commands there.
    let o = vms
        .vexec()
        .args(["exec", "-q", "-t", "sh", "--", "sh", "-c", "tty; stty size"])
        .output()
        .unwrap();
    // No terminal on the host side: -t still gives the command one.
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("/dev/pts/"), "{}", stdout(&o));
    let mut c = Command::new("script");
    c.args(["-qec"])
        .arg(format!("'{}' shell sh", env!("CARGO_BIN_EXE_vexec")))
        .arg("/dev/null")
        .env("XDG_RUNTIME_DIR", vms.runtime.path())
        // The user's login shell; dash starts in a blink under TCG, where
        // a login bash reads its profile for seconds.
        .env("SHELL", "/bin/sh")
        .current_dir(work.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo in-the-vm-$((6*7))\nexit 4\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(stdout(&o).contains("in-the-vm-42"), "{}", stdout(&o));
    assert_eq!(code(&o), Some(4));
}

#[test]
fn a_second_shell_reaches_a_one_shot_run_while_it_runs() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    // A "hung test": it leaves a mark only its own guest can see.
    let mut run = vms
        .vexec()
        .args(["-q", "--accel", "tcg", "-k"])
        .arg(kernel("6.1"))
        .args([
            "--",
            "sh",
            "-c",
            "echo hung > /var/tmp/only-in-this-guest; echo ready; sleep 120",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let name = format!("run-{}", run.id());
    let mut out = run.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    out.read_exact(&mut ready).unwrap();
    assert!(eventually(Duration::from_secs(20), || {
        let ps = vms.vexec().arg("ps").output().unwrap();
        stdout(&ps)
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("running") && l.contains("sleep 120"))
    }));
    let o = vms.exec(&name, &["cat", "/var/tmp/only-in-this-guest"]);
    assert_eq!(
        (code(&o), stdout(&o)),
        (Some(0), "hung\n".into()),
        "{}",
        stderr(&o)
    );
    // From the run's own directory (shared writable): no warning.
    let o = vms
        .vexec()
        .args(["exec", &name, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(0));
    assert!(
        !stderr(&o).contains("not shared writable"),
        "{}",
        stderr(&o)
    );
    // `down --all` stops VMs made with `up`, not another terminal's run.
    assert_ok(&vms.vexec().args(["down", "--all"]).output().unwrap());
    assert!(run.try_wait().unwrap().is_none());
    // `vexec down` stops it as Ctrl-C would; then it is gone from `ps`.
    assert_ok(&vms.vexec().args(["down", &name]).output().unwrap());
    assert_eq!(run.wait().unwrap().code(), Some(143));
    assert!(!stdout(&vms.vexec().arg("ps").output().unwrap()).contains(&name));
    let o = vms.exec(&name, &["true"]);
    assert_eq!(code(&o), Some(125));
}

#[test]
fn up_gives_its_options_and_config_to_every_exec_and_runs_the_vms_hooks() {
    let work = workdir("persist-opts");
    std::fs::write(
        work.path().join(".vexec.toml"),
        "setup = [\"echo set > /run/vm-setup; echo setup-said\"]\nteardown = [\"echo down > $PWD/torn\"]\n[env]\nset = { FROM_FILE = \"file\" }\n",
    )
    .unwrap();
    let vms = Vms::new(work.path());
    vms.up("opts", &["-e", "X=1", "--sudo", "--timeout", "20s"]);
    let o = vms.exec(
        "opts",
        &["sh", "-c", "echo $X $FROM_FILE; id -u; cat /run/vm-setup"],
    );
    assert_eq!(
        (code(&o), stdout(&o)),
        (Some(0), "1 file\n0\nset\n".into()),
        "{}",
        stderr(&o)
    );
    // The exec's own options win.
    let o = vms
        .vexec()
        .args([
            "exec", "-q", "-e", "X=2", "opts", "--", "sh", "-c", "echo $X",
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "2\n");
    // up's --timeout is every exec's, unless the exec sets its own.
    let o = vms
        .vexec()
        .args(["exec", "-q", "--timeout", "2s", "opts", "--", "sleep", "60"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(124));
    // The setup ran once (at up), not per exec; the teardown runs at down.
    assert!(!work.path().join("torn").exists());
    assert_ok(&vms.vexec().args(["down", "opts"]).output().unwrap());
    assert_eq!(
        std::fs::read_to_string(work.path().join("torn")).unwrap(),
        "down\n"
    );
}

#[test]
fn up_refuses_what_means_nothing_for_a_vm_that_stays_up() {
    let work = workdir("persist-refuse");
    let vms = Vms::new(work.path());
    for (args, says) in [
        (&["--junit", "x.xml"][..], "does not take --junit"),
        (&["--fail-on-oops"][..], "does not take --fail-on-oops"),
        (&["-t"][..], "give -t to `vexec exec`"),
        (&["-k", "6.1", "-k", "6.12"][..], "boots one kernel"),
    ] {
        let o = vms
            .vexec()
            .args(["up", "--name", "no"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(code(&o), Some(125), "{args:?}");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!vms.dir("no").exists());
    }
    // A failing setup command: the VM does not come up, and says why.
    std::fs::write(
        work.path().join(".vexec.toml"),
        "setup = [\"echo nope >&2; exit 3\"]\n",
    )
    .unwrap();
    let o = vms
        .vexec()
        .args(["up", "--accel", "tcg", "--name", "bad", "-k"])
        .arg(kernel("6.1"))
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(125));
    assert!(
        stderr(&o).contains("setup command `echo nope >&2; exit 3` failed"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
}

#[test]
fn a_guest_out_of_threads_refuses_an_exec_and_stays_up() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    vms.up("full", &["--sudo"]);
    // No process may fork or start a thread now, the agent included
    // (threads-max has no exemption for root).
    let o = vms.exec(
        "full",
        &["sh", "-c", "echo 20 > /proc/sys/kernel/threads-max"],
    );
    assert_ok(&o);
    let o = vms.exec("full", &["true"]);
    let err = stderr(&o);
    assert_eq!(code(&o), Some(125), "{err}");
    assert!(
        err.contains("cannot start the agent's exec thread") && err.contains("-m"),
        "{err}"
    );
    // The agent still answers: the VM goes down cleanly.
    let pid = vms.up_pid("full");
    let o = vms.vexec().args(["down", "full"]).output().unwrap();
    assert_ok(&o);
    assert!(eventually(Duration::from_secs(10), || !alive(pid)));
}
