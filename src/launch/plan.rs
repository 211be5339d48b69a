//! Planning a boot: the machine a mode asks for ([`BootRequest`]) and what
//! the host found for it ([`Found`]: QEMU, the accelerator, the kernel and
//! initramfs to load, the transport) become a [`BootPlan`]: QEMU's
//! configuration, the virtio-fs daemons, and the shares as the guest mounts
//! them. Pure (no file is read), so every mode's machine is unit-tested.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::kernel::image::Arch;
use crate::launch::shares::ResolvedShare;
use crate::protocol::{Share, ShareMode, Transport};
use crate::vm::accel::Accel;
use crate::vm::qemu::{self, Backend, QemuConfig, ShareDevice};
use crate::vm::virtiofsd::{DaemonSpec, Virtiofsd};

/// The mount tag of the guest's root share.
pub const ROOT_TAG: &str = "vexec-root";

/// The machine a mode asks for, in plain values.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub arch: Arch,
    pub cpus: u32,
    /// Memory as QEMU's `-m` takes it.
    pub memory: String,
    /// Kernel arguments after vexec's own.
    pub kernel_args: Vec<String>,
    /// QEMU arguments after vexec's own.
    pub qemu_args: Vec<OsString>,
    /// QEMU's gdb stub on this port, the CPUs halted until gdb continues.
    pub gdb: Option<u16>,
    /// Under TCG, run every vCPU in one host thread.
    pub tcg_single: bool,
    /// Keep the kernel's messages on the console.
    pub verbose: bool,
    /// Keep a panicked guest in memory (for `--dump-on-panic`).
    pub hold_on_panic: bool,
    /// QEMU user networking with these TCP forwards (host, guest).
    pub net: Option<Vec<(u16, u16)>>,
    /// The directory the guest's root is made of (read-only, overlaid in
    /// the guest); None when the initramfs is the whole system.
    pub root: Option<PathBuf>,
    /// Further shares, in mount order (parents first).
    pub shares: Vec<ResolvedShare>,
}

/// What the host found for a request: paths and choices made by looking,
/// so that planning need not look.
#[derive(Debug, Clone)]
pub struct Found {
    pub qemu: PathBuf,
    pub accel: Accel,
    /// Firmware the user asked for (`--firmware`, `--uefi`).
    pub firmware: Option<PathBuf>,
    /// Firmware QEMU's installation offers for a direct boot (qboot).
    pub default_firmware: Option<PathBuf>,
    /// The kernel image as given: what firmware and foreign guests boot.
    pub image: PathBuf,
    /// What a direct x86_64 boot loads: the PVH vmlinux, else the image.
    pub direct_kernel: PathBuf,
    pub initrd: PathBuf,
    pub transport: Transport,
    /// The daemon serving virtio-fs shares.
    pub virtiofsd: Option<Virtiofsd>,
    /// The kernel takes PCIe devices plugged in while it runs.
    pub hotplug: bool,
}

/// A boot, ready to launch.
#[derive(Debug, Clone)]
pub struct BootPlan {
    pub config: QemuConfig,
    /// The virtiofsd of each virtio-fs share, by index into
    /// `config.shares`.
    pub daemons: Vec<(usize, DaemonSpec)>,
    /// The shares beyond the root, as the guest mounts them.
    pub guest_shares: Vec<Share>,
    /// Devices may be plugged in once the guest runs (what lets a machine
    /// with virtio-fs be saved and restored, see [`super::warm`]).
    pub hotplug: bool,
}

/// Plans the boot of `req` with what was `found`.
pub fn plan(req: &BootRequest, found: &Found) -> BootPlan {
    let mut devices = Devices {
        found,
        shares: Vec::new(),
        daemons: Vec::new(),
    };
    // The root is read-only and rarely changes under a run: cache it all.
    if let Some(root) = &req.root {
        devices.add(ROOT_TAG, root, ShareMode::Overlay, "always");
    }
    let mut guest_shares = Vec::new();
    for (i, s) in req.shares.iter().enumerate() {
        let tag = format!("vexec-s{i}");
        devices.add(&tag, &s.path, s.mode, "auto");
        guest_shares.push(Share {
            tag,
            path: s.path.as_os_str().as_bytes().to_vec(),
            mode: s.mode,
        });
    }
    let (mut kernel_args, mut qemu_args) = (req.kernel_args.clone(), req.qemu_args.clone());
    if let Some(port) = req.gdb {
        add_gdb(port, &mut kernel_args, &mut qemu_args);
    }
    // Firmware boots the image through its own loader, and a foreign
    // guest's image is what QEMU loads: the PVH vmlinux is for direct
    // x86_64 boots only.
    let direct = found.firmware.is_none() && req.arch == Arch::X86_64;
    let config = QemuConfig {
        binary: found.qemu.clone(),
        arch: req.arch,
        firmware: found
            .firmware
            .clone()
            .or_else(|| found.default_firmware.clone()),
        accel: found.accel,
        tcg_single: req.tcg_single && found.accel == Accel::Tcg,
        stall_retry: false,
        cpus: req.cpus,
        memory: req.memory.clone(),
        kernel: if direct {
            found.direct_kernel.clone()
        } else {
            found.image.clone()
        },
        initrd: found.initrd.clone(),
        cmdline: qemu::cmdline_for(req.arch, req.verbose, req.hold_on_panic, &kernel_args),
        shares: devices.shares,
        net: req.net.clone(),
        console_fd: 3,
        control_fd: 4,
        qmp_fd: None,
        exec_port_fds: Vec::new(),
        qga_fd: None,
        incoming_fd: None,
        ram_fd: None,
        plug_shares: false,
        extra: qemu_args,
    };
    BootPlan {
        config,
        daemons: devices.daemons,
        guest_shares,
        // The PCIe root ports plugged into are q35's.
        hotplug: found.hotplug && req.arch == Arch::X86_64,
    }
}

/// The share devices being planned, and their daemons.
struct Devices<'a> {
    found: &'a Found,
    shares: Vec<ShareDevice>,
    daemons: Vec<(usize, DaemonSpec)>,
}

impl Devices<'_> {
    fn add(&mut self, tag: &str, path: &std::path::Path, mode: ShareMode, cache: &'static str) {
        let readonly = mode != ShareMode::ReadWrite;
        let backend = match (&self.found.virtiofsd, self.found.transport) {
            (Some(v), Transport::Virtiofs) => {
                self.daemons.push((
                    self.shares.len(),
                    DaemonSpec {
                        virtiofsd: v.clone(),
                        source: path.to_path_buf(),
                        readonly,
                        cache,
                        // Overlay lower layers refuse automount points.
                        submounts: mode != ShareMode::Overlay,
                    },
                ));
                // The real descriptor is known once the daemon runs.
                Backend::Virtiofs { fd: -1 }
            }
            _ => Backend::NineP,
        };
        self.shares.push(ShareDevice {
            tag: tag.into(),
            path: path.to_path_buf(),
            readonly,
            backend,
        });
    }
}

/// Adds QEMU's gdb stub (CPUs halted until gdb continues) and `nokaslr`
/// (breakpoints by symbol need the kernel where it was linked).
pub fn add_gdb(port: u16, kernel_args: &mut Vec<String>, qemu_args: &mut Vec<OsString>) {
    kernel_args.push("nokaslr".into());
    qemu_args.splice(
        0..0,
        [
            OsString::from("-gdb"),
            format!("tcp:127.0.0.1:{port}").into(),
            "-S".into(),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::virtiofsd::Flavour;

    fn request() -> BootRequest {
        BootRequest {
            arch: Arch::X86_64,
            cpus: 2,
            memory: "1024M".into(),
            kernel_args: vec!["quiet".into()],
            qemu_args: vec!["-d".into()],
            gdb: None,
            tcg_single: false,
            verbose: false,
            hold_on_panic: false,
            net: None,
            root: Some("/".into()),
            shares: vec![
                ResolvedShare {
                    path: "/src".into(),
                    mode: ShareMode::ReadWrite,
                },
                ResolvedShare {
                    path: "/data".into(),
                    mode: ShareMode::ReadOnly,
                },
            ],
        }
    }

    fn found(transport: Transport) -> Found {
        Found {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            firmware: None,
            default_firmware: Some("/usr/share/qemu/qboot.rom".into()),
            image: "/boot/vmlinuz".into(),
            direct_kernel: "/cache/vmlinux".into(),
            initrd: "/cache/initramfs".into(),
            transport,
            virtiofsd: (transport == Transport::Virtiofs).then(|| Virtiofsd {
                path: "/usr/libexec/virtiofsd".into(),
                flavour: Flavour::Rust,
            }),
            hotplug: true,
        }
    }

    #[test]
    fn the_root_comes_first_then_the_shares_in_order() {
        let p = plan(&request(), &found(Transport::NineP));
        let tags: Vec<_> = p.config.shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, [ROOT_TAG, "vexec-s0", "vexec-s1"]);
        let ro: Vec<_> = p.config.shares.iter().map(|s| s.readonly).collect();
        assert_eq!(ro, [true, false, true]);
        assert!(p.daemons.is_empty());
        assert!(p.config.shares.iter().all(|s| s.backend == Backend::NineP));
        let guest: Vec<_> = p.guest_shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(guest, ["vexec-s0", "vexec-s1"]);
        assert_eq!(p.guest_shares[0].path, b"/src");
    }

    #[test]
    fn virtio_fs_gives_each_share_a_daemon() {
        let p = plan(&request(), &found(Transport::Virtiofs));
        let indices: Vec<_> = p.daemons.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [0, 1, 2]);
        let root = &p.daemons[0].1;
        assert_eq!(
            (root.cache, root.submounts, root.readonly),
            ("always", false, true)
        );
        let rw = &p.daemons[1].1;
        assert_eq!((rw.cache, rw.submounts, rw.readonly), ("auto", true, false));
    }

    #[test]
    fn an_initramfs_only_machine_has_no_devices() {
        let req = BootRequest {
            root: None,
            shares: Vec::new(),
            ..request()
        };
        let p = plan(&req, &found(Transport::Virtiofs));
        assert!(p.config.shares.is_empty() && p.daemons.is_empty());
    }

    #[test]
    fn direct_boots_load_the_pvh_kernel_and_firmware_the_image() {
        let direct = plan(&request(), &found(Transport::NineP));
        assert_eq!(direct.config.kernel, PathBuf::from("/cache/vmlinux"));
        assert_eq!(
            direct.config.firmware,
            Some(PathBuf::from("/usr/share/qemu/qboot.rom"))
        );
        let uefi = Found {
            firmware: Some("/usr/share/ovmf/OVMF.fd".into()),
            ..found(Transport::NineP)
        };
        let p = plan(&request(), &uefi);
        assert_eq!(p.config.kernel, PathBuf::from("/boot/vmlinuz"));
        assert_eq!(p.config.firmware, uefi.firmware);
        let arm = BootRequest {
            arch: Arch::Aarch64,
            ..request()
        };
        let p = plan(&arm, &found(Transport::NineP));
        assert_eq!(p.config.kernel, PathBuf::from("/boot/vmlinuz"));
        assert!(p.config.cmdline.contains("console=ttyAMA0"));
    }

    #[test]
    fn gdb_halts_the_cpus_and_pins_the_kernel() {
        let req = BootRequest {
            gdb: Some(4321),
            ..request()
        };
        let p = plan(&req, &found(Transport::NineP));
        assert_eq!(p.config.extra, ["-gdb", "tcp:127.0.0.1:4321", "-S", "-d"]);
        assert!(p.config.cmdline.ends_with(" quiet nokaslr"));
    }

    #[test]
    fn the_machine_is_what_was_asked() {
        let req = BootRequest {
            net: Some(vec![(8080, 80)]),
            hold_on_panic: true,
            ..request()
        };
        let p = plan(&req, &found(Transport::NineP));
        assert_eq!((p.config.cpus, p.config.memory.as_str()), (2, "1024M"));
        assert_eq!(p.config.net, Some(vec![(8080, 80)]));
        assert!(p.config.cmdline.contains("panic=0"));
        assert_eq!(p.config.initrd, PathBuf::from("/cache/initramfs"));
    }
}
