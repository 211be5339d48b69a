//! Every supported Debian kernel boots and runs a command, with its modules
//! loaded from the package as it is and `modprobe` working in the guest.

mod common;
use common::*;

use std::process::{Command, Stdio};

fn boots(name: &str, release_prefix: &str) {
    let mut c = vexec(name);
    c.args([
        "--",
        "sh",
        "-c",
        "uname -r; modprobe ext4 && grep -c '^ext4 ' /proc/modules",
    ]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with(release_prefix), "{text}");
    assert_eq!(
        lines.next(),
        Some("1"),
        "ext4 not loaded by modprobe: {text}"
    );
}

#[test]
fn debian_5_10() {
    boots("5.10", "5.10.");
}

#[test]
fn debian_6_1() {
    boots("6.1", "6.1.");
}

#[test]
fn debian_6_12() {
    boots("6.12", "6.12.");
}

#[test]
fn build_tree_with_separate_modules() {
    // A kernel build tree layout (arch/x86/boot/bzImage + .config) holding
    // Debian's 6.12 image, its modules given with --modules.
    let tree = workdir("linux-tree");
    let boot = tree.path().join("arch/x86/boot");
    std::fs::create_dir_all(&boot).unwrap();
    let image = kernel("6.12");
    std::fs::copy(&image, boot.join("bzImage")).unwrap();
    let rel = release_of(&image);
    std::fs::copy(
        image.with_file_name(format!("config-{rel}")),
        tree.path().join(".config"),
    )
    .unwrap();
    let modules = kernels_dir().join("6.12/usr/lib/modules").join(&rel);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vexec"))
        .env("XDG_CACHE_HOME", cache_dir())
        .args(["--accel", "tcg", "-q", "-k"])
        .arg(tree.path())
        .arg("--modules")
        .arg(&modules)
        .args(["--", "uname", "-r"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), rel);
}

#[test]
fn host_with_a_module_symlink_for_the_same_release() {
    // A host that "installed" the guest's release as a symlink in
    // /lib/modules (as benchmark setups and some distros do).
    if !is_root() {
        eprintln!("skipped: needs root to create a link in /lib/modules");
        return;
    }
    let image = kernel("6.12");
    let rel = release_of(&image);
    let link = std::path::Path::new("/lib/modules").join(&rel);
    if link.symlink_metadata().is_ok() {
        eprintln!("skipped: {} already exists", link.display());
        return;
    }
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    std::fs::create_dir_all("/lib/modules").unwrap();
    std::os::unix::fs::symlink(kernels_dir().join("6.12/usr/lib/modules").join(&rel), &link)
        .unwrap();
    let _guard = Remove(link);
    let mut c = vexec("6.12");
    c.args(["--", "sh", "-c", "modprobe ext4 && echo ok"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "ok\n");
}

#[test]
fn an_image_without_its_modules_is_refused_before_booting() {
    // Debian's vmlinuz copied alone: no config, no module tree beside it
    // or in /lib/modules, its virtio drivers modules.
    let image = kernel("6.1");
    let rel = release_of(&image);
    if std::path::Path::new("/lib/modules").join(&rel).exists() {
        eprintln!("skipped: the host has modules for {rel}");
        return;
    }
    let dir = workdir("lone-image");
    let lone = dir.path().join("vmlinuz");
    std::fs::copy(&image, &lone).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .env("XDG_CACHE_HOME", cache_dir())
        .args(["--accel", "tcg", "-k"])
        .arg(&lone)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("its module tree was not found"), "{err}");
    assert!(err.contains(&format!("/lib/modules/{rel}")), "{err}");
    assert!(err.contains("--modules DIR"), "{err}");
    // Said before booting: nothing about the guest or its control port.
    assert!(!err.contains("control port"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
