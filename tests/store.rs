//! The kernel store: `vexec kernel add` from a package directory, a tarball
//! and a .deb (built here from Debian's unpacked cloud kernel), `list`,
//! `path`, booting a stored kernel by release, and `rm`.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

fn kernel_cmd(cache: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vexec"))
        .env("XDG_CACHE_HOME", cache)
        .env_remove("VEXEC_KERNEL")
        .arg("kernel")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn add_list_run_and_remove_stored_kernels() {
    let home = workdir("store-ops");
    let cache = home.path().join("cache");
    let generic = kernels_dir().join("6.12");
    let cloud = kernels_dir().join("6.1-cloud");
    let rel_generic = release_of(&kernel("6.12"));
    let rel_cloud = release_of(&kernel("6.1-cloud"));

    // A package directory.
    let out = kernel_cmd(&cache, &["add", generic.to_str().unwrap()]);
    assert_ok(&out);

    // A .deb, made from the unpacked cloud kernel.
    let pkg = home.path().join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::write(
        pkg.join("DEBIAN/control"),
        format!("Package: linux-image-{rel_cloud}\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@example.com>\nDescription: test\n"),
    )
    .unwrap();
    for d in ["boot", "lib", "usr"] {
        if cloud.join(d).exists() {
            let ok = Command::new("cp")
                .arg("-a")
                .arg(cloud.join(d))
                .arg(&pkg)
                .status()
                .unwrap();
            assert!(ok.success());
        }
    }
    let deb = home.path().join("cloud.deb");
    let ok = Command::new("dpkg-deb")
        .args(["--build", "-Znone"])
        .arg(&pkg)
        .arg(&deb)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let out = kernel_cmd(&cache, &["add", deb.to_str().unwrap()]);
    assert_ok(&out);

    // A tarball of the generic kernel replaces its entry in place.
    let tarball = home.path().join("generic.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&generic)
        .arg("-cf")
        .arg(&tarball)
        .args(
            ["boot", "lib", "usr"]
                .into_iter()
                .filter(|d| generic.join(d).exists()),
        )
        .status()
        .unwrap();
    assert!(ok.success());
    let out = kernel_cmd(&cache, &["add", tarball.to_str().unwrap()]);
    assert_ok(&out);

    let out = kernel_cmd(&cache, &["list"]);
    let list = stdout(&out);
    let line = |rel: &str| {
        list.lines()
            .find(|l| l.starts_with(rel))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line(&rel_generic).contains("yes yes"), "{list}");
    assert!(line(&rel_generic).contains("generic.tar"), "{list}");
    // The cloud kernel: no 9p, virtio-fs yes.
    assert!(line(&rel_cloud).contains(" no  yes"), "{list}");
    assert_eq!(list.lines().count(), 3, "{list}");

    let out = kernel_cmd(&cache, &["path", &rel_cloud]);
    let image = stdout(&out).trim().to_string();
    assert!(
        image.ends_with(&format!("{rel_cloud}/boot/vmlinuz-{rel_cloud}")),
        "{image}"
    );

    // A stored kernel boots by its release, modules from the store.
    assert_boots_by_release(&cache, &rel_cloud);

    let out = kernel_cmd(&cache, &["rm", &rel_cloud]);
    assert_eq!(out.status.code(), Some(0));
    let out = kernel_cmd(&cache, &["path", &rel_cloud]);
    assert_eq!(out.status.code(), Some(125));
    // drgn's package layout: vmlinuz and modules/ at the top of a tarball
    // (the cloud kernel's image again, with a token module tree).
    let drgn = home.path().join("drgn");
    let mods = home.path().join("drgn-modules");
    std::fs::create_dir_all(mods.join("kernel/fs")).unwrap();
    std::fs::write(mods.join("kernel/fs/token.ko"), b"").unwrap();
    std::fs::write(mods.join("modules.order"), "kernel/fs/token.ko\n").unwrap();
    std::fs::create_dir_all(&drgn).unwrap();
    let rel_old = release_of(&kernel("6.1-cloud"));
    std::fs::copy(kernel("6.1-cloud"), drgn.join("vmlinuz")).unwrap();
    let drgn_tar = home.path().join("kernel-drgn.tar.zst");
    {
        let enc = zstd::Encoder::new(std::fs::File::create(&drgn_tar).unwrap(), 1)
            .unwrap()
            .auto_finish();
        let mut b = tar::Builder::new(enc);
        b.follow_symlinks(true);
        b.append_path_with_name(drgn.join("vmlinuz"), "vmlinuz")
            .unwrap();
        b.append_dir_all("modules", &mods).unwrap();
        b.finish().unwrap();
    }
    let out = kernel_cmd(&cache, &["add", drgn_tar.to_str().unwrap()]);
    assert_ok(&out);
    assert!(
        cache
            .join("vexec/kernels")
            .join(&rel_old)
            .join("lib/modules")
            .join(&rel_old)
            .join("kernel")
            .is_dir()
    );
    let out = kernel_cmd(&cache, &["rm", &rel_old]);
    assert_ok(&out);

    // Nothing half-written is left in the store.
    let leftovers: Vec<_> = std::fs::read_dir(cache.join("vexec/kernels"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, [rel_generic]);
}

/// `vexec kernel fetch` through apt, from the metapackage Debian users
/// know (it follows it to the versioned image package).
#[test]
fn fetch_a_debian_kernel_package_with_apt() {
    if Command::new("apt-get").arg("--version").output().is_err() {
        eprintln!("skipped: no apt-get here");
        return;
    }
    let home = workdir("store-apt");
    let cache = home.path().join("cache");
    let out = kernel_cmd(&cache, &["fetch", "linux-image-cloud-amd64"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a metapackage for linux-image-"), "{err}");
    let list = stdout(&kernel_cmd(&cache, &["list"]));
    let line = list
        .lines()
        .find(|l| l.contains("-cloud-amd64"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        line.contains("apt:linux-image-") && line.contains(" no  yes"),
        "{list}"
    );
}

#[test]
fn fetch_an_arm64_kernel_and_run_a_directory_on_it_with_nothing_else_given() {
    if Command::new("apt-get").arg("--version").output().is_err()
        || Command::new("qemu-system-aarch64")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs apt-get and qemu-system-aarch64");
        return;
    }
    let home = workdir("store-arm64");
    let cache = home.path().join("cache");
    // Through vexec's own apt configuration: the host's dpkg state and
    // lists are not touched.
    let dpkg_status = std::fs::metadata("/var/lib/dpkg/status").and_then(|m| m.modified());
    let out = kernel_cmd(&cache, &["fetch", "--arch", "arm64", "linux-image-arm64"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let rel = err
        .lines()
        .find_map(|l| l.strip_prefix("vexec: added "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{err}"))
        .to_string();
    assert!(rel.ends_with("-arm64"), "{err}");
    assert!(err.contains("vexec run-dir --arch aarch64 -k"), "{err}");
    assert_eq!(
        std::fs::metadata("/var/lib/dpkg/status")
            .and_then(|m| m.modified())
            .ok(),
        dpkg_status.ok()
    );
    let list = stdout(&kernel_cmd(&cache, &["list"]));
    let line = list
        .lines()
        .find(|l| l.starts_with(&rel))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("aarch64"), "{list}");

    // No --busybox: run-dir fetches Debian's busybox-static for arm64.
    let dir = home.path().join("progs");
    std::fs::create_dir(&dir).unwrap();
    let script = dir.join("t");
    std::fs::write(&script, "#!/bin/sh\nuname -m\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .env("XDG_CACHE_HOME", &cache)
        .env_remove("VEXEC_KERNEL")
        .args(["run-dir", "--arch", "aarch64", "-k", &rel])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("fetching Debian's busybox-static for arm64"),
        "{err}"
    );
    assert_eq!(stdout(&out), "aarch64\n");
}
