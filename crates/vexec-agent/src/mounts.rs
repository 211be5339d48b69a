//! Building the guest's filesystem: the usual pseudo filesystems, the host
//! root read-only over 9p or virtio-fs with a tmpfs overlay on top, shares
//! mounted at their host paths, the kernel's module tree, then the switch
//! into the new root.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vexec_protocol::{Setup, ShareMode, Transport};

use super::sys::{self, mount, move_mount};

const NEWROOT: &str = "/newroot";
const LOWER: &str = "/vexec/lower";
const RW: &str = "/vexec/rw";

/// Mounts proc, sys and devtmpfs in the initramfs (before modules load).
pub fn early() -> Result<(), String> {
    let _ = std::fs::create_dir_all("/dev");
    // ensure_stdio may have mounted it already (EBUSY).
    match mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    ) {
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
            return Err(format!(
                "mounting devtmpfs on /dev: {e} (kernel needs CONFIG_DEVTMPFS)"
            ));
        }
        _ => {}
    }
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(|e| format!("mounting /sys: {e}"))?;
    Ok(())
}

fn p9_options(msize: u32, cache: &str, ro: bool) -> String {
    format!(
        "trans=virtio,version=9p2000.L,msize={msize},cache={cache},access=client,posixacl{}",
        if ro { ",ro" } else { "" }
    )
}

/// Mounts the share `tag` at `target` over the run's transport. `cached`
/// lets a 9p guest cache metadata and data (virtiofsd sets its own policy).
fn mount_share(
    setup: &Setup,
    tag: &str,
    target: &Path,
    ro: bool,
    cached: bool,
) -> std::io::Result<()> {
    let flags = if ro { libc::MS_RDONLY } else { 0 };
    match setup.transport {
        Transport::NineP => {
            let cache = if cached { "loose" } else { "mmap" };
            mount(
                tag,
                target,
                "9p",
                flags,
                Some(&p9_options(setup.msize, cache, ro)),
            )
        }
        Transport::Virtiofs => {
            let until = (setup.plugged > 0).then(|| Instant::now() + PLUG_WAIT);
            mount_virtiofs(tag, target, flags, until)
        }
    }
}

/// Where virtio-fs devices appear once their driver has taken them (their
/// tags are then known to `mount`).
const VIRTIOFS_DRIVER: &str = "/sys/bus/virtio/drivers/virtiofs";
/// How long plugged devices may take to appear.
const PLUG_WAIT: Duration = Duration::from_secs(20);

/// Waits until `count` virtio-fs devices are ready: a restored guest has
/// its share devices plugged in by the host just before its setup, and
/// the PCI hotplug that finds them runs beside the agent. A device is
/// linked to its driver before the driver's probe ends; the probe sets
/// DRIVER_OK just before it makes the tag known.
fn wait_for_plugged(count: u32, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let ready = std::fs::read_dir(VIRTIOFS_DRIVER).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().as_bytes().starts_with(b"virtio"))
                .filter(|e| driver_ok(&e.path().join("status")))
                .count()
        });
        if ready >= count as usize {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{}: {ready} of {count} virtio-fs devices became ready within {}s (kernel needs CONFIG_HOTPLUG_PCI_ACPI)",
                vexec_protocol::PLUG_FAILED,
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether a virtio device's status (hex, from sysfs) has DRIVER_OK.
fn driver_ok(status: &Path) -> bool {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|s| s & 4 != 0)
}

/// Mounts a virtio-fs share; a plugged device whose tag is not known yet
/// (EINVAL, for a moment after DRIVER_OK) is tried again until `until`.
fn mount_virtiofs(
    tag: &str,
    target: &Path,
    flags: libc::c_ulong,
    until: Option<Instant>,
) -> std::io::Result<()> {
    loop {
        match mount(tag, target, "virtiofs", flags, None) {
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && until.is_some_and(|u| Instant::now() < u) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

fn transport_hint(t: Transport) -> &'static str {
    match t {
        Transport::NineP => "kernel needs CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO",
        Transport::Virtiofs => "kernel needs CONFIG_VIRTIO_FS and CONFIG_FUSE_FS",
    }
}

fn in_newroot(host_path: &[u8]) -> PathBuf {
    Path::new(NEWROOT).join(
        Path::new(OsStr::from_bytes(host_path))
            .strip_prefix("/")
            .unwrap_or(Path::new("")),
    )
}

/// Mounts the new root and the shares under /newroot, then switches into it;
/// `before_switch` runs just before /dev, /proc and /sys move over.
pub fn build_root(
    setup: &Setup,
    before_switch: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    for d in [LOWER, RW, NEWROOT] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {d}: {e}"))?;
    }
    if setup.plugged > 0 {
        wait_for_plugged(setup.plugged, PLUG_WAIT)?;
        super::step("plugged virtio-fs devices bound");
    }
    // The root is read-only and host edits under it are rare during a run,
    // so let the guest cache it (the rw shares below are not cached).
    mount_share(setup, &setup.root_tag, Path::new(LOWER), true, true).map_err(|e| {
        format!(
            "mounting the host root over {}: {e} ({})",
            setup.transport.name(),
            transport_hint(setup.transport)
        )
    })?;
    mount("tmpfs", RW, "tmpfs", 0, Some("mode=0755"))
        .map_err(|e| format!("mounting tmpfs for the overlay: {e}"))?;
    for d in ["upper", "work"] {
        std::fs::create_dir(Path::new(RW).join(d))
            .map_err(|e| format!("creating overlay dirs: {e}"))?;
    }
    super::step("host root mounted");
    overlay(
        NEWROOT,
        &format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work"),
    )
    .map_err(|e| format!("mounting the overlay root: {e} (kernel needs CONFIG_OVERLAY_FS)"))?;

    // /tmp stays the host's, through the overlay: programs live there
    // (`go test -exec` runs /tmp/go-build*/pkg.test) and guest writes go to
    // the overlay's tmpfs, never to the host. /run is fresh (no host daemons
    // here); mounted before the shares so a share below it stays visible.
    let run = Path::new(NEWROOT).join("run");
    let _ = std::fs::create_dir_all(&run);
    mount(
        "tmpfs",
        &run,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| format!("mounting /run: {e}"))?;

    for (i, share) in setup.shares.iter().enumerate() {
        let target = in_newroot(&share.path);
        std::fs::create_dir_all(&target)
            .map_err(|e| format!("creating mount point {}: {e}", target.display()))?;
        let err = |e: std::io::Error| format!("mounting share {}: {e}", target.display());
        match share.mode {
            // No guest caching on live shares: host and guest see each
            // other's writes.
            ShareMode::ReadWrite => mount_share(setup, &share.tag, &target, false, false),
            ShareMode::ReadOnly => mount_share(setup, &share.tag, &target, true, false),
            ShareMode::Overlay => {
                // Read-only on the host side, writable through a tmpfs layer.
                let base = Path::new(RW).join(format!("share{i}"));
                let lower = base.join("lower");
                for d in ["lower", "upper", "work"] {
                    std::fs::create_dir_all(base.join(d)).map_err(err)?;
                }
                mount_share(setup, &share.tag, &lower, true, true).map_err(err)?;
                overlay(
                    &target,
                    &format!(
                        "lowerdir={},upperdir={}/upper,workdir={}/work",
                        lower.display(),
                        base.display(),
                        base.display()
                    ),
                )
            }
        }
        .map_err(err)?;
    }

    super::step("overlay and shares mounted");
    if let Some(mods) = &setup.modules {
        mount_modules(setup, mods)?;
        super::step("module tree shown");
    }

    // Keep the initramfs's /dev, /proc and /sys: move them into place.
    before_switch()?;
    for d in ["dev", "proc", "sys"] {
        let to = Path::new(NEWROOT).join(d);
        let _ = std::fs::create_dir_all(&to);
        move_mount(Path::new("/").join(d), &to).map_err(|e| format!("moving /{d}: {e}"))?;
    }
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("entering new root: {e}"))?;
    move_mount(".", "/").map_err(|e| format!("switching root: {e}"))?;
    sys::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Mounts a writable overlay at `target`. With `xino=on` a file's inode
/// number is the same from readdir (d_ino) and stat (st_ino), as on the
/// host; without it directories read from the host's layer disagree,
/// which breaks programs that match `scandir` entries to `stat` results.
/// Kernels that refuse the option (before 4.17) get the overlay without.
fn overlay(target: impl AsRef<Path>, layers: &str) -> std::io::Result<()> {
    let target = target.as_ref();
    match mount(
        "overlay",
        target,
        "overlay",
        0,
        Some(&format!("{layers},xino=on")),
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount("overlay", target, "overlay", 0, Some(layers))
        }
        r => r,
    }
}

/// Shows the module tree at /lib/modules/REL, with generated index files
/// layered on top so `modprobe` works even where the package shipped none.
fn mount_modules(setup: &Setup, mods: &[u8]) -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("reading the kernel release: {e}"))?;
    let target = Path::new(NEWROOT).join("lib/modules").join(release.trim());
    // The host may have this release installed, or a symlink there whose
    // absolute target does not resolve before the root switch: replace the
    // link (in the overlay only) with a directory to mount on.
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&target)
            .map_err(|e| format!("replacing the link {}: {e}", target.display()))?;
    }
    std::fs::create_dir_all(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
    let tree = in_newroot(mods);
    let lower = match &setup.module_index {
        Some(idx) => format!("{}:{}", in_newroot(idx).display(), tree.display()),
        // A single lower layer needs an upper one; bind instead.
        None => {
            return mount(&tree.to_string_lossy(), &target, "", libc::MS_BIND, None)
                .map_err(|e| format!("showing the module tree: {e}"));
        }
    };
    mount(
        "overlay",
        &target,
        "overlay",
        libc::MS_RDONLY,
        Some(&format!("lowerdir={lower}")),
    )
    .map_err(|e| format!("showing the module tree at {}: {e}", target.display()))
}

/// Mounts the pseudo filesystems a normal system has under the initramfs's
/// /dev and /sys (they move into the new root with those) and brings up the
/// loopback interface. Needs no module, so it runs while modules load and
/// the host answers.
pub fn pseudo_filesystems() {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has = |name: &str| {
        fs.lines()
            .any(|l| l.split_whitespace().last() == Some(name))
    };
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let _ = std::fs::create_dir_all("/dev/pts");
    let _ = mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
    );
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = std::fs::create_dir_all("/dev/shm");
    let _ = mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    );
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    let optional = [
        ("debugfs", "/sys/kernel/debug"),
        ("tracefs", "/sys/kernel/tracing"),
        ("securityfs", "/sys/kernel/security"),
        ("cgroup2", "/sys/fs/cgroup"),
        ("bpf", "/sys/fs/bpf"),
    ];
    for (fstype, target) in optional {
        if !has(fstype) {
            continue;
        }
        // Mounting bpffs asks for the bpf_preload module through a usermode
        // helper (half a second under TCG when it ran the host's modprobe
        // after the root switch), for two debug files (maps.debug,
        // progs.debug). Skip that autoload even here, before the switch,
        // where it would only start a helper that fails; remounting bpffs
        // in the guest brings the files.
        let saved = (fstype == "bpf")
            .then(|| std::fs::read("/proc/sys/kernel/modprobe").ok())
            .flatten();
        if saved.is_some() {
            let _ = std::fs::write("/proc/sys/kernel/modprobe", "\n");
        }
        let _ = mount(fstype, target, fstype, nosuid_nodev, None);
        if let Some(path) = saved {
            let _ = std::fs::write("/proc/sys/kernel/modprobe", path);
        }
        super::step(&format!("mounted {fstype}"));
    }
    let _ = sys::loopback_up();
}

/// Brings up the first network interface on QEMU's user-mode network and
/// points the resolver at its DNS server.
pub fn network() -> Result<(), String> {
    let iface = std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("listing network interfaces: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .min()
        .ok_or("no network interface appeared (kernel needs CONFIG_VIRTIO_NET)")?;
    sys::configure_user_net(&iface).map_err(|e| format!("configuring {iface}: {e}"))?;
    // The host's resolv.conf may point at a local resolver or be a link
    // into /run; replace it in the overlay only.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write("/etc/resolv.conf", "nameserver 10.0.2.3\n")
        .map_err(|e| format!("writing /etc/resolv.conf: {e}"))?;
    super::step(&format!("network up on {iface}"));
    Ok(())
}
