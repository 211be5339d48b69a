//! Persistent VMs: `vexec up`, `exec`, `shell`, `ps`, `down`, and the QEMU
//! guest agent protocol served by vexec's own agent, against real kernels.
//! Each test has its own runtime directory, so its VMs are its own.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A runtime directory and the VMs up in it; every one is taken down
/// (and checked gone) when the test ends, passed or not.
struct Vms {
    runtime: tempfile::TempDir,
    cwd: PathBuf,
}

impl Vms {
    /// Short paths: a unix socket path must fit in 108 bytes.
    fn new(cwd: &Path) -> Vms {
        Vms {
            runtime: tempfile::Builder::new().prefix("vx").tempdir().unwrap(),
            cwd: cwd.to_path_buf(),
        }
    }

    /// vexec with this test's runtime directory and cache, in `cwd`.
    fn vexec(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
        c.env("XDG_RUNTIME_DIR", self.runtime.path())
            .env("XDG_CACHE_HOME", cache_dir())
            .env_remove("VEXEC_KERNEL")
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        c
    }

    /// `vexec up --name NAME` on Debian 6.1, with `extra` options.
    fn up(&self, name: &str, extra: &[&str]) {
        let out = self
            .vexec()
            .args(["up", "-q", "--accel", "tcg", "--name", name, "-k"])
            .arg(kernel("6.1"))
            .args(extra)
            .output()
            .unwrap();
        assert_ok(&out);
    }

    fn exec(&self, name: &str, args: &[&str]) -> Output {
        self.vexec()
            .args(["exec", "-q", name, "--"])
            .args(args)
            .output()
            .unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.runtime.path().join("vexec/vms").join(name)
    }

    /// What VM `name`'s `up` process says of it.
    fn info(&self, name: &str) -> serde_json::Value {
        let info = std::fs::read(self.dir(name).join("info.json")).unwrap();
        serde_json::from_slice(&info).unwrap()
    }

    /// The `up` process of VM `name`.
    fn up_pid(&self, name: &str) -> i32 {
        self.info(name)["pid"].as_i64().unwrap() as i32
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        let _ = self.vexec().args(["down", "--all"]).output();
    }
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits up to `limit` for `cond`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Running (a zombie waiting for its reaper is not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

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

/// One connection to a guest agent socket, read value by value.
struct Qga {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl Qga {
    fn connect(path: &Path) -> Qga {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Qga {
            sock,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// The next reply (a leading 0xFF kept as a `"delimited"` mark).
    fn read(&mut self) -> serde_json::Value {
        loop {
            let delimited = self.buf.first() == Some(&0xff);
            let start = usize::from(delimited);
            let mut it = serde_json::Deserializer::from_slice(&self.buf[start..])
                .into_iter::<serde_json::Value>();
            if let Some(Ok(v)) = it.next() {
                let used = start + it.byte_offset();
                self.buf.drain(..used);
                while self.buf.first().is_some_and(|b| b.is_ascii_whitespace()) {
                    self.buf.remove(0);
                }
                return if delimited {
                    serde_json::json!({"delimited": v})
                } else {
                    v
                };
            }
            let mut chunk = [0u8; 65536];
            let n = self.sock.read(&mut chunk).expect("a reply in time");
            assert!(n > 0, "the agent closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn ask(&mut self, request: serde_json::Value) -> serde_json::Value {
        self.send(format!("{request}\n").as_bytes());
        self.read()
    }
}

/// The keys and JSON types of `v` (a list's first element stands for all).
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value::*;
    match v {
        Object(m) => Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Array(a) => Array(a.first().map(shape).into_iter().collect()),
        Null => "null".into(),
        Bool(_) => "bool".into(),
        Number(_) => "number".into(),
        String(_) => "string".into(),
    }
}

/// A request sequence every QGA client uses, with the replies' shapes,
/// and error replies whole (their texts are part of the protocol).
fn session(path: &Path) -> Vec<(String, serde_json::Value)> {
    use serde_json::json;
    let mut q = Qga::connect(path);
    let mut got = Vec::new();
    let mut keep = |name: &str, v: serde_json::Value| {
        let kept = if v.get("error").is_some() {
            v
        } else {
            shape(&v)
        };
        got.push((name.to_string(), kept));
    };
    q.send(b"\xff");
    let stray = q.read();
    keep("0xff", stray);
    let r = q.ask(json!({"execute": "guest-sync-delimited", "arguments": {"id": 7}}));
    assert_eq!(r, json!({"delimited": {"return": 7}}));
    keep("ping", q.ask(json!({"execute": "guest-ping"})));
    let info = q.ask(json!({"execute": "guest-info"}));
    let names: Vec<&str> = info["return"]["supported_commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in [
        "guest-exec",
        "guest-exec-status",
        "guest-file-open",
        "guest-file-read",
        "guest-get-osinfo",
        "guest-shutdown",
        "guest-sync-delimited",
    ] {
        assert!(names.contains(&c), "{c} missing from {names:?}");
    }
    keep("info", info);
    keep("osinfo", q.ask(json!({"execute": "guest-get-osinfo"})));
    keep("time", q.ask(json!({"execute": "guest-get-time"})));
    keep("unknown", q.ask(json!({"execute": "guest-nonesuch"})));
    keep(
        "bad type",
        q.ask(json!({"execute": "guest-exec", "arguments": {"path": 5}})),
    );
    keep(
        "missing",
        q.ask(json!({"execute": "guest-exec", "arguments": {}})),
    );
    keep("not an object", q.ask(json!([1])));
    // Split over lines, and no newline at the end: the parser streams.
    q.send(b"{\"execute\":\n\"guest-sync\", \"arguments\": {\"id\": 9}}");
    assert_eq!(q.read(), json!({"return": 9}));
    let pid = q.ask(json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", "cat; printf err >&2; exit 3"],
        "input-data": "aW4h", "capture-output": true}}))["return"]["pid"]
        .clone();
    let status = loop {
        let s = q.ask(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
        if s["return"]["exited"] == json!(true) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["return"]["out-data"], "aW4h");
    assert_eq!(status["return"]["exitcode"], 3);
    keep("exec-status", status);
    keep(
        "exec-status again",
        q.ask(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}})),
    );
    let h = q.ask(
        json!({"execute": "guest-file-open", "arguments": {"path": "/tmp/qga-file", "mode": "w+"}}),
    );
    keep("file-open", h.clone());
    let h = h["return"].clone();
    keep("file-write", q.ask(json!({"execute": "guest-file-write", "arguments": {"handle": h, "buf-b64": "aGVsbG8="}})));
    keep("file-seek", q.ask(json!({"execute": "guest-file-seek", "arguments": {"handle": h, "offset": 0, "whence": "set"}})));
    let read =
        q.ask(json!({"execute": "guest-file-read", "arguments": {"handle": h, "count": 100}}));
    assert_eq!(read["return"]["buf-b64"], "aGVsbG8=");
    keep("file-read", read);
    keep(
        "file-close",
        q.ask(json!({"execute": "guest-file-close", "arguments": {"handle": h}})),
    );
    keep(
        "file-open missing",
        q.ask(
            json!({"execute": "guest-file-open", "arguments": {"path": "/no/such", "mode": "r"}}),
        ),
    );
    q.send(b"not json\n");
    keep("not json 1", q.read());
    keep("not json 2", q.read());
    got
}

#[test]
fn the_guest_agent_protocol_answers_as_qemu_ga_does() {
    let work = workdir("persist");
    let vms = Vms::new(work.path());
    let ours = vms.runtime.path().join("qga.sock");
    vms.up("qga", &["--qga", ours.to_str().unwrap()]);
    let guest = session(&ours);

    // Debian's qemu-ga on the host, as the reference.
    let state = tempfile::tempdir().unwrap();
    let theirs = state.path().join("ref.sock");
    let mut reference = Command::new("qemu-ga")
        .arg("-m")
        .arg("unix-listen")
        .arg("-p")
        .arg(&theirs)
        .arg("-t")
        .arg(state.path())
        .arg("-f")
        .arg(state.path().join("pid"))
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-ga missing: apt-get install qemu-guest-agent");
    assert!(eventually(Duration::from_secs(10), || theirs.exists()));
    let host = session(&theirs);
    let _ = reference.kill();
    let _ = reference.wait();

    assert_eq!(guest.len(), host.len());
    for ((name, g), (_, h)) in guest.iter().zip(&host) {
        // qemu-ga numbers file handles from 1000 on, kept across runs in
        // its state directory, and names itself in guest-info.
        if name == "info" {
            assert_eq!(
                g["return"].as_object().unwrap().keys().collect::<Vec<_>>(),
                h["return"].as_object().unwrap().keys().collect::<Vec<_>>()
            );
            continue;
        }
        assert_eq!(g, h, "{name}: vexec's agent vs qemu-ga");
    }

    // A 100 MB request: one error, and the agent keeps serving.
    let mut q = Qga::connect(&ours);
    let mut huge = b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":1,\"pad\":\"".to_vec();
    huge.resize(huge.len() + (100 << 20), b'x');
    huge.extend_from_slice(b"\"}}\n");
    q.send(&huge);
    assert_eq!(q.read()["error"]["desc"], "JSON token size limit exceeded");
    assert_eq!(
        q.ask(serde_json::json!({"execute": "guest-sync", "arguments": {"id": 5}})),
        serde_json::json!({"return": 5})
    );
    drop(q);

    // guest-shutdown powers the VM off; `up` then cleans up after it.
    let mut q = Qga::connect(&ours);
    q.send(b"{\"execute\":\"guest-shutdown\"}\n");
    assert!(eventually(Duration::from_secs(20), || !vms
        .dir("qga")
        .exists()
        && !ours.exists()));
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
    // `vexec down` stops it as Ctrl-C would; then it is gone from `ps`.
    assert_ok(&vms.vexec().args(["down", &name]).output().unwrap());
    assert_eq!(run.wait().unwrap().code(), Some(143));
    assert!(!stdout(&vms.vexec().arg("ps").output().unwrap()).contains(&name));
    let o = vms.exec(&name, &["true"]);
    assert_eq!(code(&o), Some(125));
}
