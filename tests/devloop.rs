//! The kernel developer's loop: kernel-log reports (--fail-on-oops), the
//! run record (--output), and QEMU's gdb stub (--gdb) with real gdb.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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
    // Quiet kernels print little or nothing on the console; the file is
    // there either way (dmesg.txt above has the whole log).
    assert!(out_dir.join("console.log").is_file());
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
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let said = read_gdb_notice(&mut err);
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
    assert!(
        gdb_out.contains("hit Breakpoint 1"),
        "{gdb_out}\ngdb's stderr:\n{}\nvexec said:\n{said}",
        String::from_utf8_lossy(&gdb.stderr)
    );
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

/// A repository whose commits each select a prebuilt kernel (through
/// .vexec.toml), so bisecting needs no compiling: 5.10, 6.1, 6.1, 6.12,
/// 6.12. The test command fails on 6.12, so the fourth commit is the first
/// bad one.
#[test]
fn bisect_finds_the_first_bad_commit() {
    let repo = workdir("bisect");
    let dir = repo.path();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    let mut shas = Vec::new();
    for (i, k) in ["5.10", "6.1", "6.1", "6.12", "6.12"].iter().enumerate() {
        std::fs::write(
            dir.join(".vexec.toml"),
            format!(
                "# step {i}\nkernel = {:?}\n",
                kernel(k).display().to_string()
            ),
        )
        .unwrap();
        git(&["add", ".vexec.toml"]);
        git(&["commit", "-q", "-m", &format!("step {i}: kernel {k}")]);
        shas.push(git(&["rev-parse", "HEAD"]));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .current_dir(dir)
        .env("XDG_CACHE_HOME", cache_dir())
        .env_remove("VEXEC_KERNEL")
        .args([
            "bisect", "--good", &shas[0], "--bad", &shas[4], "--accel", "tcg", "-q",
        ])
        .args(["--", "sh", "-c", "case $(uname -r) in 6.12*) exit 1;; esac"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out).trim(), shas[3], "{err}");
    assert!(
        err.contains("first bad commit:") && err.contains("step 3: kernel 6.12"),
        "{err}"
    );
    // The work tree is back where it was.
    assert_eq!(git(&["rev-parse", "HEAD"]), shas[4]);
}

#[test]
fn kconfig_merges_vexec_options_into_a_tree() {
    let tree = workdir("kconfig");
    let dir = tree.path();
    std::fs::write(dir.join("Kconfig"), "").unwrap();
    std::fs::write(dir.join("Makefile"), "").unwrap();
    std::fs::write(
        dir.join(".config"),
        "CONFIG_LOCALVERSION=\"-mine\"\n# CONFIG_9P_FS is not set\nCONFIG_OVERLAY_FS=m\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .args(["kconfig", "--debug"])
        .arg(dir)
        .output()
        .unwrap();
    assert_ok(&out);
    let config = std::fs::read_to_string(dir.join(".config")).unwrap();
    for want in [
        "CONFIG_LOCALVERSION=\"-mine\"",
        "CONFIG_9P_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_PVH=y",
        "CONFIG_GDB_SCRIPTS=y",
    ] {
        assert!(
            config.lines().any(|l| l == want),
            "{want} missing:\n{config}"
        );
    }
    assert!(!config.contains("CONFIG_OVERLAY_FS=m"));
    // Not a kernel tree: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .args(["kconfig", "/"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Linux source tree"));
}

/// Opt-in (VEXEC_SLOW_TESTS=1, ~10 minutes on 2 cores): builds Debian's
/// linux-source-6.1 with `vexec build` and boots the result from its tree.
#[test]
fn build_a_kernel_tree_and_boot_it() {
    if std::env::var_os("VEXEC_SLOW_TESTS").is_none() {
        eprintln!("skipped: set VEXEC_SLOW_TESTS=1 to build a kernel (needs linux-source-6.1)");
        return;
    }
    let work = workdir("kbuild");
    let tree = linux_source(work.path());
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .arg("build")
        .arg(&tree)
        .output()
        .unwrap();
    assert_ok(&out);
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .env_remove("VEXEC_KERNEL")
        .args(["--accel", "tcg", "-q", "-k"])
        .arg(&tree)
        .args([
            "--",
            "sh",
            "-c",
            "uname -r; grep -c virtiofs /proc/filesystems",
        ])
        .stdin(Stdio::null());
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("6.1."), "{}", stdout(&out));
}

#[test]
fn panic_dumps_guest_memory_as_an_elf_core() {
    let dir = workdir("dump");
    let core = dir.path().join("vmcore");
    let mut c = vexec(K);
    c.args(["-m", "256M", "--sudo", "--dump-on-panic"])
        .arg(&core)
        .args(["--", "sh", "-c", "echo c > /proc/sysrq-trigger"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the guest kernel panicked"), "{err}");
    assert!(err.contains("guest memory dumped to"), "{err}");
    let data = std::fs::read(&core).unwrap();
    // An ELF64 core file (e_type ET_CORE = 4) holding all 256 MiB.
    assert_eq!(&data[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([data[16], data[17]]), 4);
    assert!(data.len() > 256 << 20);
}
