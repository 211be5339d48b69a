//! Shares (--rw, --ro, --overlay) and the two transports: what the guest can
//! see and write, over 9p and virtio-fs (the Rust daemon and QEMU 7.2's C
//! one), on Debian's generic 6.1 kernel (both transports) and its cloud
//! kernel (virtio-fs only).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;

const K: &str = "6.1";

/// rw, ro and overlay shares with awkward names, and a file that is
/// unlinked while open (what every tempfile library does).
fn shares_behave(transport: &str) {
    let Some(targs) = transport_args(transport) else {
        return;
    };
    let base = workdir("shares");
    let root = base.path().join("shäre dir");
    for d in ["rw", "ro", "ov"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join("host"), "from host\n").unwrap();
    }
    let script = r#"
set -u
cd "$1"
echo guest > rw/new && echo "rw write ok"
(echo guest > ro/new) 2>/dev/null || echo "ro write refused"
cat ro/host
echo changed > ov/host && cat ov/host
echo made > ov/new && cat ov/new
perl -e '
  open(my $f, "+>", "rw/tmp") or die "open: $!";
  unlink("rw/tmp") or die "unlink: $!";
  print $f "hello" or die "write: $!";
  $f->flush;
  my @st = stat($f) or die "fstat: $!";
  seek($f, 0, 0);
  read($f, my $buf, 5) == 5 or die "read: $!";
  print "unlinked: size $st[7], read $buf\n";
  if ($ARGV[0] ne "9p") {
    truncate($f, 2) or die "ftruncate: $!";
    my @st2 = stat($f);
    print "truncated: $st2[7]\n";
  }
' "$2"
mountpoint -q "$1/rw" && echo "mounted at the host path"
"#;
    let mut c = vexec(K);
    c.args(&targs)
        .arg("--rw")
        .arg(root.join("rw"))
        .arg("--ro")
        .arg(root.join("ro"))
        .arg("--overlay")
        .arg(root.join("ov"))
        .args(["--", "sh", "-c", script, "sh"])
        .arg(&root)
        .arg(transport);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let mut want = String::from(
        "rw write ok\nro write refused\nfrom host\nchanged\nmade\nunlinked: size 5, read hello\n",
    );
    if transport != "9p" {
        want.push_str("truncated: 2\n");
    }
    want.push_str("mounted at the host path\n");
    assert_eq!(stdout(&out), want);
    // rw writes reached the host; ro and overlay left it as it was.
    assert_eq!(
        std::fs::read_to_string(root.join("rw/new")).unwrap(),
        "guest\n"
    );
    assert!(!root.join("rw/tmp").exists());
    assert!(!root.join("ro/new").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("ov/host")).unwrap(),
        "from host\n"
    );
    assert!(!root.join("ov/new").exists());
}

#[test]
fn shares_over_9p() {
    shares_behave("9p");
}

#[test]
fn shares_over_virtiofs_rust_daemon() {
    shares_behave("virtiofs-rust");
}

#[test]
fn shares_over_virtiofs_c_daemon() {
    shares_behave("virtiofs-c");
}

/// A guest running as root tries every way to change a host file outside
/// the rw shares: through the overlay, by remounting a read-only share
/// read-write, and by mounting the host root's tag again (virtio-fs allows
/// a second mount; 9p's channel is busy).
fn guest_root_cannot_write_host(transport: &str) {
    if !is_root() {
        eprintln!("skipped: needs a root caller (the guest runs as the caller)");
        return;
    }
    let Some(targs) = transport_args(transport) else {
        return;
    };
    let dir = workdir("safety");
    let victim = dir.path().join("victim");
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(&victim, "original\n").unwrap();
    std::fs::write(ro.join("file"), "original\n").unwrap();
    let fstype = if transport == "9p" { "9p" } else { "virtiofs" };
    let script = format!(
        r#"
v="$1"; ro="$2"
echo pwned > "$v"; echo pwned > "$ro/file"
mount -o remount,rw "$ro" && echo pwned > "$ro/file"
touch "$ro/new"
mkdir -p /mnt/r
if mount -t {fstype} -o trans=virtio vexec-root /mnt/r 2>/dev/null || mount -t {fstype} vexec-root /mnt/r 2>/dev/null; then
  mount -o remount,rw /mnt/r
  echo pwned > "/mnt/r$v"
  touch "/mnt/r$v.new"
fi
cat "$v"
true
"#
    );
    let mut c = vexec(K);
    c.args(&targs)
        .arg("--no-cwd")
        .arg("--ro")
        .arg(&ro)
        .args(["--", "sh", "-c", &script, "sh"])
        .arg(&victim)
        .arg(&ro);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    // The guest saw its own write (in the overlay)...
    assert_eq!(stdout(&out), "pwned\n");
    // ...and the host kept its files.
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original\n");
    assert_eq!(
        std::fs::read_to_string(ro.join("file")).unwrap(),
        "original\n"
    );
    assert!(!ro.join("new").exists());
    assert!(!dir.path().join("victim.new").exists());
}

#[test]
fn guest_root_cannot_write_host_over_9p() {
    guest_root_cannot_write_host("9p");
}

#[test]
fn guest_root_cannot_write_host_over_virtiofs_rust_daemon() {
    guest_root_cannot_write_host("virtiofs-rust");
}

#[test]
fn guest_root_cannot_write_host_over_virtiofs_c_daemon() {
    guest_root_cannot_write_host("virtiofs-c");
}

#[test]
fn cloud_kernel_runs_over_virtiofs() {
    let mut c = vexec("6.1-cloud");
    let dir = workdir("cloud");
    c.arg("--virtiofsd")
        .arg(rust_virtiofsd())
        .current_dir(dir.path())
        .args([
            "--",
            "sh",
            "-c",
            "uname -r; grep -c virtiofs /proc/mounts; echo x > f",
        ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().ends_with("-cloud-amd64"), "{text}");
    // The cwd share (the root is below the overlay, not in /proc/mounts).
    assert_eq!(lines.next(), Some("1"), "{text}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "x\n"
    );
}

#[test]
fn cloud_kernel_refuses_9p_before_booting() {
    let mut c = vexec("6.1-cloud");
    c.args(["--transport", "9p", "true"]);
    let start = std::time::Instant::now();
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--transport 9p is not possible"), "{err}");
    assert!(err.contains("CONFIG_9P_FS"), "{err}");
    assert!(err.contains("--transport virtiofs"), "{err}");
    assert!(start.elapsed().as_secs() < 10, "should fail before booting");
}

#[test]
fn missing_share_and_bad_daemon_are_clear_errors() {
    let dir = workdir("bad-share");
    let mut c = vexec(K);
    c.arg("--rw")
        .arg(dir.path().join("does not exist"))
        .arg("true");
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot share") && err.contains("does not exist"),
        "{err}"
    );

    let mut c = vexec(K);
    c.args([
        "--transport",
        "virtiofs",
        "--virtiofsd",
        "/bin/true",
        "true",
    ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not look like a virtiofsd"), "{err}");
}

#[test]
fn unprivileged_user_gets_virtiofs_with_the_rust_daemon() {
    if !is_root() {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return;
    }
    let image = kernel(K);
    let daemon = rust_virtiofsd();
    if !world_reachable(&image) || !world_reachable(&daemon) {
        eprintln!("skipped: the kernel or virtiofsd is not reachable by other users");
        return;
    }
    let home = workdir("nobody-vfs");
    let mut c = as_nobody(home.path());
    c.args(["--transport", "virtiofs", "--virtiofsd"])
        .arg(&daemon)
        .arg("-k")
        .arg(&image)
        .args([
            "--",
            "sh",
            "-c",
            "grep -c virtiofs /proc/mounts; echo hi > by-guest; stat -c %u /usr/bin",
        ]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // Host root's files show as the overflow uid in the daemon's user
    // namespace; the user's own files keep their owner.
    assert_eq!(stdout(&out), "1\n65534\n");
    let meta = std::fs::metadata(home.path().join("by-guest")).unwrap();
    assert_eq!(meta.uid(), 65534);
}

/// `vexec --accel tcg -q` run as uid and gid 65534, in `home` (given to
/// that user) with its own cache there.
fn as_nobody(home: &std::path::Path) -> std::process::Command {
    std::os::unix::fs::chown(home, Some(65534), Some(65534)).unwrap();
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vexec"))
        .args(["--accel", "tcg", "-q"])
        .current_dir(home)
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env_remove("VEXEC_KERNEL")
        .stdin(std::process::Stdio::null());
    c
}

/// virtiofsd holds a descriptor for every inode the guest has cached
/// (unless it can use file handles, which takes root): a walk over more
/// files than its descriptor limit must still see them all (the guest lets
/// go of unused inodes), not fail with EMFILE halfway. The files are seen
/// through the root's overlay, whose lower layer the guest caches longest.
fn a_tree_larger_than_the_daemons_descriptor_limit(transport: &str, unprivileged: bool) {
    let Some(targs) = transport_args(transport) else {
        return;
    };
    let image = kernel(K);
    if unprivileged && !(is_root() && world_reachable(&image)) {
        eprintln!(
            "skipped: needs root to switch to an unprivileged user, and a kernel it can read"
        );
        return;
    }
    let base = workdir("many-files");
    let tree = base.path().join("tree");
    for d in 0..30 {
        let dir = tree.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f}")), "x").unwrap();
        }
    }
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // find stats every file; cat opens each.
    let script = "cd \"$1\" && find . -type f -size 1c | wc -l && cat d*/* | wc -c";
    let mut c = if unprivileged {
        let home = base.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let mut c = as_nobody(&home);
        c.arg("-k").arg(&image);
        c
    } else {
        vexec(K)
    };
    c.args(&targs)
        .args(["--no-cwd", "--", "sh", "-c", script, "sh"])
        .arg(&tree);
    // The daemons inherit this limit (fewer descriptors than files, and
    // the Rust one keeps 610 for itself); the guest is told what is left.
    let out = run(wrapped(&c, &["prlimit", "--nofile=2048:2048"]));
    assert_ok(&out);
    assert_eq!(stdout(&out), "3000\n3000\n");
}

#[test]
fn a_tree_larger_than_the_daemons_descriptor_limit_over_virtiofs_c_daemon() {
    a_tree_larger_than_the_daemons_descriptor_limit("virtiofs-c", false);
}

#[test]
fn a_tree_larger_than_the_daemons_descriptor_limit_unprivileged_over_virtiofs_rust_daemon() {
    a_tree_larger_than_the_daemons_descriptor_limit("virtiofs-rust", true);
}
