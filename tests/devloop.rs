//! The kernel developer's loop: kernel-log reports (--fail-on-oops), the
//! run record (--output), and QEMU's gdb stub (--gdb) with real gdb.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const K: &str = "6.1";

/// Logs a WARNING report the way the kernel would, through /dev/kmsg (the
/// stock Debian kernel has no LKDTM to provoke a real one).
const FAKE_WARNING: &str = r#"printf '<4>------------[ cut here ]------------\n' > /dev/kmsg
printf '<4>WARNING: CPU: 0 PID: 1 at lib/fake.c:42 fake_warn+0x10/0x20\n' > /dev/kmsg
printf '<4>Call Trace:\n' > /dev/kmsg
printf '<4>---[ end trace 0000000000000000 ]---\n' > /dev/kmsg
echo command-done"#;

#[test]
fn fail_on_oops_turns_a_passing_run_into_a_failure() {
    let mut c = vexec(K);
    c.args(["--sudo", "--fail-on-oops", "--", "sh", "-c", FAKE_WARNING]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "command-done\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the kernel logged 1 report"), "{err}");
    assert!(
        err.contains("WARNING: CPU: 0 PID: 1 at lib/fake.c:42"),
        "{err}"
    );
    assert!(err.contains("---[ end trace"), "{err}");

    // Without the flag the same run passes, quietly.
    let mut c = vexec(K);
    c.args(["--sudo", "--", "sh", "-c", FAKE_WARNING]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("report"));
}

#[test]
fn output_dir_keeps_the_record_of_a_run() {
    let dir = workdir("output");
    let out_dir = dir.path().join("run 1");
    let mut c = vexec(K);
    c.arg("--output")
        .arg(&out_dir)
        .args(["--sudo", "--", "sh", "-c"])
        .arg(format!(
            "{FAKE_WARNING}; echo artifact > \"$VEXEC_OUTPUT/result.txt\"; exit 3"
        ));
    let out = run(c);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("output/result.txt")).unwrap(),
        "artifact\n"
    );
    let dmesg = std::fs::read_to_string(out_dir.join("dmesg.txt")).unwrap();
    assert!(dmesg.contains("Linux version"), "{dmesg}");
    assert!(dmesg.contains("WARNING: CPU: 0 PID: 1"), "{dmesg}");
    let console = std::fs::read_to_string(out_dir.join("console.log")).unwrap();
    assert!(!console.is_empty());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["exit_status"], 3);
    assert_eq!(record["release"], release_of(&kernel(K)));
    assert!(
        record["qemu_command"]
            .as_str()
            .unwrap()
            .contains("qemu-system-x86_64")
    );
    assert_eq!(record["splats"][0]["kind"], "WARNING");
    assert!(record["timings_ms"]["total"].as_u64().unwrap() > 0);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn gdb_stops_at_a_kernel_breakpoint() {
    if Command::new("gdb").arg("--version").output().is_err() {
        eprintln!("skipped: gdb is not installed (Debian: apt-get install gdb)");
        return;
    }
    // The address of the uname syscall, from the guest's own kallsyms
    // (Debian ships no System.map); nokaslr keeps it the same next boot.
    let mut c = vexec(K);
    c.args([
        "--sudo",
        "--kernel-arg",
        "nokaslr",
        "--",
        "sh",
        "-c",
        "grep ' T __x64_sys_newuname$' /proc/kallsyms | cut -d' ' -f1",
    ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let addr = stdout(&out).trim().to_string();
    assert!(addr.len() == 16, "no address: {addr:?}");

    let port = free_port();
    let mut vm = vexec(K);
    vm.arg(format!("--gdb={port}"))
        .args(["--", "uname", "-r"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = vm.spawn().unwrap();
    // vexec says how to attach before the guest starts, even with -q.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !said.contains("target remote") && Instant::now() < deadline {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        said.push_str(&line);
    }
    assert!(
        said.contains(&format!("target remote localhost:{port}")),
        "{said}"
    );
    let gdb = Command::new("gdb")
        .args(["-nx", "-batch", "-ex"])
        .arg(format!("target remote localhost:{port}"))
        .arg("-ex")
        .arg(format!("hbreak *0x{addr}"))
        .args([
            "-ex",
            "continue",
            "-ex",
            "info registers rip",
            "-ex",
            "delete",
            "-ex",
            "detach",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let gdb_out = String::from_utf8_lossy(&gdb.stdout);
    assert!(gdb_out.contains("hit Breakpoint 1"), "{gdb_out}");
    assert!(gdb_out.contains(&format!("0x{addr}")), "{gdb_out}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), format!("{}\n", release_of(&kernel(K))));
}

#[test]
fn net_reaches_the_host_and_forwards_a_port() {
    use std::io::{Read, Write};
    // A server on the host, reached from the guest through 10.0.2.2.
    let host_srv = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_srv.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = host_srv.accept() {
            let _ = c.write_all(b"hello from host\n");
        }
    });
    let fwd = free_port();
    let script = format!(
        r#"$| = 1;
my $h = IO::Socket::INET->new(PeerAddr => "10.0.2.2:{host_port}") or die "connect: $!";
print scalar <$h>;
my $s = IO::Socket::INET->new(LocalPort => 8000, Listen => 1, ReuseAddr => 1) or die "listen: $!";
print "listening\n";
my $c = $s->accept or die "accept: $!";
print $c "hello from guest\n";
close $c;"#
    );
    let mut vm = vexec(K);
    vm.arg("--forward")
        .arg(format!("{fwd}:8000"))
        .args(["--", "perl", "-MIO::Socket::INET", "-e", &script])
        .stdout(Stdio::piped());
    let mut child = vm.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut got = String::new();
    for _ in 0..2 {
        lines.read_line(&mut got).unwrap();
    }
    assert_eq!(got, "hello from host\nlistening\n");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", fwd)).unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "hello from guest\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
