//! The QEMU guest agent protocol served by vexec's own agent (`vexec up
//! --qga`), against Debian's qemu-ga running on the host: the same
//! requests must get the same replies.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::vms::*;
use common::*;

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
    // A request's id comes back in its reply, success or any error.
    for (name, request) in [
        ("id ping", json!({"execute": "guest-ping", "id": 5})),
        (
            "id unknown",
            json!({"execute": "guest-nonesuch", "id": "a"}),
        ),
        (
            "id missing arg",
            json!({"execute": "guest-sync", "id": [1]}),
        ),
        (
            "id bad type",
            json!({"execute": "guest-exec", "arguments": {"path": 5}, "id": 6}),
        ),
        ("id no execute", json!({"id": 7})),
        (
            "id extra member",
            json!({"execute": "guest-ping", "id": 8, "x": 1}),
        ),
        ("id execute type", json!({"execute": 5, "id": 9})),
        (
            "id arguments type",
            json!({"execute": "guest-ping", "arguments": [], "id": 10}),
        ),
        (
            "id no file",
            json!({"execute": "guest-file-open", "arguments": {"path": "/no/such", "mode": "r"}, "id": 11}),
        ),
    ] {
        let r = q.ask(request);
        assert!(r.get("id").is_some(), "{name}: {r}");
        keep(name, r);
    }
    let r = q.ask(json!({"execute": "guest-sync-delimited", "arguments": {"id": 3}, "id": 12}));
    assert_eq!(r, json!({"delimited": {"return": 3, "id": 12}}));
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

/// A Python with QEMU's own QMP library (PyPI `qemu.qmp`), which
/// scripts/test.sh sets up; the test fails with how to get one.
fn python_with_qemu_qmp() -> String {
    let python = std::env::var("VEXEC_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "{python} lacks qemu.qmp: run the tests through scripts/test.sh, or set VEXEC_TEST_PYTHON to a Python with `pip install qemu.qmp`"
    );
    python
}

#[test]
fn a_qga_client_library_nobody_here_wrote_drives_up_qga() {
    use std::os::unix::fs::PermissionsExt;
    let python = python_with_qemu_qmp();
    let work = workdir("qga-client");
    let vms = Vms::new(work.path());
    let sock = vms.runtime.path().join("lib.sock");
    // A permissive umask must not make the socket reachable by others.
    let base = vms.vexec();
    let mut up = Command::new("sh");
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => up.env(k, v),
            None => up.env_remove(k),
        };
    }
    let vexec = base.get_program().to_owned();
    up.current_dir(work.path())
        .stdin(Stdio::null())
        .arg("-c")
        .arg("umask 0; exec \"$@\"")
        .arg("sh")
        .arg(vexec)
        .args(["up", "-q", "--accel", "tcg", "--name", "lib", "-k"])
        .arg(kernel("6.1"))
        .args(["--qga", sock.to_str().unwrap()]);
    let out = up.output().unwrap();
    assert_ok(&out);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/qga_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&sock)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", stderr(&out));
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `nofile`.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    assert_eq!(
        said,
        format!(
            "ping {{}}\nerror guest-no-such-command CommandNotFound\nerror guest-sync GenericError\nerror guest-file-open GenericError\nsync 42\nexec 3 from-guest\nlimits {} session above 0\n",
            nofile.rlim_cur
        )
    );
}
