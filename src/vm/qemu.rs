//! The QEMU command line, built by a pure function so it can be unit-tested
//! and printed (`--dry-run`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::accel::Accel;
use crate::kernel::image::Arch;

/// A directory exported to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDevice {
    pub tag: String,
    pub path: PathBuf,
    /// Enforced by QEMU (9p) or by the daemon (virtio-fs).
    pub readonly: bool,
    pub backend: Backend,
}

/// What serves a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// QEMU's own 9p server.
    NineP,
    /// A virtiofsd, reached through an inherited connected socket; the
    /// number is filled in when the daemon starts.
    Virtiofs { fd: i32 },
}

/// Everything the QEMU command line depends on.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: PathBuf,
    /// The guest's architecture: q35 for x86_64, `virt` for aarch64.
    pub arch: Arch,
    /// Firmware to boot through (`-bios`); None: QEMU loads the kernel
    /// directly.
    pub firmware: Option<PathBuf>,
    pub accel: Accel,
    /// Under TCG, run every vCPU in one thread (QEMU's `thread=single`)
    /// instead of one thread each: slower, but a vCPU is never left
    /// waiting for another that was not woken.
    pub tcg_single: bool,
    /// The second boot of a machine whose first stalled (single-threaded
    /// under TCG): a one-off, never saved.
    pub stall_retry: bool,
    pub cpus: u32,
    /// Memory as QEMU's `-m` takes it, e.g. `1G`.
    pub memory: String,
    /// The image QEMU loads: an ELF vmlinux with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub shares: Vec<ShareDevice>,
    /// QEMU user networking with these TCP forwards (host, guest).
    pub net: Option<Vec<(u16, u16)>>,
    /// Inherited socket for the serial console.
    pub console_fd: i32,
    /// Inherited socket for the control port.
    pub control_fd: i32,
    /// Inherited socket for a QMP monitor, when one is wanted.
    pub qmp_fd: Option<i32>,
    /// A persistent VM's exec ports: one inherited socket each (-1 until
    /// the session makes them).
    pub exec_port_fds: Vec<i32>,
    /// A persistent VM's QEMU guest agent port (its inherited socket).
    pub qga_fd: Option<i32>,
    /// Restore the machine from the saved state on this inherited
    /// descriptor instead of booting it: QEMU waits (`-incoming defer`)
    /// until told over QMP to read it.
    pub incoming_fd: Option<i32>,
    /// Guest RAM in this inherited shared-memory descriptor (a memfd the
    /// session owns, which QEMU opens through /proc/self/fd) instead of
    /// memory of QEMU's own: a saved guest's RAM is then written and
    /// restored apart from the migration stream.
    pub ram_fd: Option<i32>,
    /// The virtio-fs share devices are plugged in after QEMU starts (QEMU
    /// 7.2 cannot save a machine that has one): the command line has their
    /// daemon connections and an empty PCIe root port for each.
    pub plug_shares: bool,
    pub extra: Vec<OsString>,
}

impl QemuConfig {
    /// Whether any share is served over virtio-fs (vhost-user).
    pub fn has_virtiofs(&self) -> bool {
        (self.shares.iter()).any(|s| matches!(s.backend, Backend::Virtiofs { .. }))
    }
}

/// Escapes a value for QEMU's comma-separated option syntax.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Builds the argument vector (without the binary itself).
pub fn argv(c: &QemuConfig) -> Vec<OsString> {
    let mut a: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        // The guest powers off when done; a panic (panic=-1) resets, and a
        // reset must end QEMU rather than boot again.
        "-no-reboot".into(),
        "-M".into(),
        match c.arch {
            Arch::X86_64 => "q35",
            Arch::Aarch64 => "virt",
        }
        .into(),
    ];
    let tcg = if c.tcg_single {
        "tcg,thread=single"
    } else {
        "tcg"
    };
    let (accel, cpu) = match (c.accel, c.arch) {
        (Accel::Kvm, _) => ("kvm", "host"),
        (Accel::Tcg, Arch::X86_64) => (tcg, "max"),
        // Emulated pointer authentication with QEMU's cheap hash instead of
        // the architected one: the same guest behaviour, much faster TCG.
        (Accel::Tcg, Arch::Aarch64) => (tcg, "max,pauth-impdef=on"),
    };
    a.extend(["-accel".into(), accel.into(), "-cpu".into(), cpu.into()]);
    if let Some(fw) = &c.firmware {
        a.extend(["-bios".into(), fw.to_string_lossy().into_owned()]);
    }
    a.extend([
        "-smp".into(),
        c.cpus.to_string(),
        "-m".into(),
        c.memory.clone(),
        "-kernel".into(),
        c.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        c.initrd.to_string_lossy().into_owned(),
        "-append".into(),
        c.cmdline.clone(),
        "-chardev".into(),
        format!("socket,id=console,fd={}", c.console_fd),
        "-serial".into(),
        "chardev:console".into(),
        "-device".into(),
        "virtio-serial-pci,id=vser".into(),
        "-chardev".into(),
        format!("socket,id=ctl,fd={}", c.control_fd),
        "-device".into(),
        format!(
            "virtserialport,bus=vser.0,chardev=ctl,name={}",
            crate::protocol::PORT_NAME
        ),
    ]);
    // The QEMU guest agent's port rides on the control port's bus.
    if let Some(fd) = c.qga_fd {
        a.extend(serial_port(
            "vser",
            "qga",
            fd,
            crate::protocol::QGA_PORT_NAME,
        ));
    }
    // QEMU drops a control message when the guest has no buffer for it
    // (32 per bus): with many ports on one bus, a port's "host connected"
    // event is lost and the guest's writes to it block for ever. Each
    // port costs three such messages, so a bus carries at most eight: the
    // control port's first (a one-shot run's two need no device of their
    // own), then buses of their own.
    let on_control_bus = PORTS_PER_BUS - 1 - usize::from(c.qga_fd.is_some());
    for (i, fd) in c.exec_port_fds.iter().enumerate() {
        let bus = match i.checked_sub(on_control_bus) {
            None => "vser".to_string(),
            Some(j) => {
                let bus = format!("vexec{}", j / PORTS_PER_BUS);
                if j % PORTS_PER_BUS == 0 {
                    a.extend(["-device".into(), format!("virtio-serial-pci,id={bus}")]);
                }
                bus
            }
        };
        let name = format!("{}{i}", crate::protocol::EXEC_PORT_PREFIX);
        a.extend(serial_port(&bus, &format!("exec{i}"), *fd, &name));
    }
    // vhost-user devices access guest memory directly: it must be shared.
    if let Some(fd) = c.ram_fd {
        a.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={},mem-path=/proc/self/fd/{fd},share=on",
                c.memory
            ),
            "-numa".into(),
            "node,memdev=mem".into(),
        ]);
    } else if c.has_virtiofs() {
        a.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={},share=on", c.memory),
            "-numa".into(),
            "node,memdev=mem".into(),
        ]);
    }
    for (i, s) in c.shares.iter().enumerate() {
        match s.backend {
            Backend::NineP => a.extend([
                "-fsdev".into(),
                format!(
                    "local,id=fs{i},path={},security_model=none,multidevs=remap{}",
                    escape(&s.path.to_string_lossy()),
                    if s.readonly { ",readonly=on" } else { "" }
                ),
                "-device".into(),
                format!("virtio-9p-pci,fsdev=fs{i},mount_tag={}", escape(&s.tag)),
            ]),
            Backend::Virtiofs { fd } if c.plug_shares => a.extend([
                "-chardev".into(),
                format!("socket,id=vfs{i},fd={fd}"),
                "-device".into(),
                format!("pcie-root-port,id=vfsport{i},chassis={}", i + 1),
            ]),
            Backend::Virtiofs { fd } => a.extend([
                "-chardev".into(),
                format!("socket,id=vfs{i},fd={fd}"),
                "-device".into(),
                format!(
                    "vhost-user-fs-pci,chardev=vfs{i},tag={},queue-size=1024",
                    escape(&s.tag)
                ),
            ]),
        }
    }
    if let Some(fd) = c.qmp_fd {
        a.extend([
            "-chardev".into(),
            format!("socket,id=qmp,fd={fd}"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
    }
    if let Some(forwards) = &c.net {
        let mut netdev = "user,id=net0".to_string();
        for (h, g) in forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"));
        }
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            // No iPXE option ROM: the kernel is loaded directly, and running
            // the ROM under TCG costs time (and once stalled a boot here).
            "virtio-net-pci,netdev=net0,romfile=".into(),
        ]);
    }
    if c.incoming_fd.is_some() {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    let mut out: Vec<OsString> = a.into_iter().map(OsString::from).collect();
    out.extend(c.extra.iter().cloned());
    out
}

/// The `device_add` arguments that plug in the virtio-fs share devices of
/// a machine started with [`QemuConfig::plug_shares`], in share order.
pub fn plugged_devices(c: &QemuConfig) -> Vec<serde_json::Value> {
    (c.shares.iter().enumerate())
        .filter(|(_, s)| matches!(s.backend, Backend::Virtiofs { .. }))
        .map(|(i, s)| {
            serde_json::json!({
                "driver": "vhost-user-fs-pci",
                "id": format!("vfsdev{i}"),
                "bus": format!("vfsport{i}"),
                "chardev": format!("vfs{i}"),
                "tag": s.tag,
                "queue-size": 1024,
            })
        })
        .collect()
}

/// The firmware a guest boots through when the user names none. On x86_64
/// that is qboot, which QEMU ships (Debian: qemu-system-data), looked for in
/// the data directory of the QEMU binary's own prefix, then the usual ones:
/// it loads the kernel from fw_cfg without SeaBIOS's option-ROM detour
/// (about 0.3-0.5 s under TCG here). None (QEMU's own default) when absent,
/// and on aarch64, whose `virt` machine loads the kernel itself.
pub fn default_firmware(arch: Arch, qemu: &Path) -> Option<PathBuf> {
    if arch != Arch::X86_64 {
        return None;
    }
    let own = qemu
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("share/qemu/qboot.rom"));
    own.into_iter()
        .chain(
            [
                "/usr/share/qemu/qboot.rom",
                "/usr/local/share/qemu/qboot.rom",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

/// The kernel command line. `verbose` keeps the kernel's own messages;
/// `hold_on_panic` keeps a panicked guest in memory (for a dump) instead
/// of ending the VM at once.
pub fn cmdline(verbose: bool, hold_on_panic: bool, extra: &[String]) -> String {
    cmdline_for(Arch::X86_64, verbose, hold_on_panic, extra)
}

/// [`cmdline`] for a guest of architecture `arch`.
pub fn cmdline_for(arch: Arch, verbose: bool, hold_on_panic: bool, extra: &[String]) -> String {
    let mut parts: Vec<&str> = vec![
        match arch {
            Arch::X86_64 => "console=ttyS0",
            // The virt machine's PL011 UART.
            Arch::Aarch64 => "console=ttyAMA0",
        },
        // Any panic ends the VM at once (with -no-reboot) instead of hanging.
        if hold_on_panic { "panic=0" } else { "panic=-1" },
        "oops=panic",
        "rdinit=/init",
    ];
    if arch == Arch::X86_64 {
        // No firmware-provided entropy wait, no PS/2 probing, one UART.
        parts.extend([
            "random.trust_cpu=on",
            "i8042.noaux",
            "i8042.nomux",
            "i8042.nopnp",
            "8250.nr_uarts=1",
            "tsc=reliable",
            "no_timer_check",
        ]);
    }
    parts.push(if verbose {
        "loglevel=7 vexec.debug"
    } else {
        "loglevel=4"
    });
    let mut s = parts.join(" ");
    for e in extra {
        s.push(' ');
        s.push_str(e);
    }
    s
}

/// Renders an argv as a shell-pasteable line.
pub fn shell_line(binary: &std::path::Path, args: &[OsString]) -> String {
    std::iter::once(binary.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| crate::sys::programs::quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exec ports per virtio-serial bus (see where they are added).
const PORTS_PER_BUS: usize = 8;

/// A virtio-serial port named `name` on `bus`, backed by inherited socket `fd`.
fn serial_port(bus: &str, id: &str, fd: i32, name: &str) -> [String; 4] {
    [
        "-chardev".into(),
        format!("socket,id={id},fd={fd}"),
        "-device".into(),
        format!("virtserialport,bus={bus}.0,chardev={id},name={name}"),
    ]
}

/// A machine for unit tests: two 9p shares, no descriptors set up.
#[cfg(test)]
pub(crate) fn example_config() -> QemuConfig {
    QemuConfig {
        binary: "qemu-system-x86_64".into(),
        arch: Arch::X86_64,
        firmware: None,
        accel: Accel::Tcg,
        tcg_single: false,
        stall_retry: false,
        cpus: 2,
        memory: "1G".into(),
        kernel: "/c/vmlinux".into(),
        initrd: "/c/initrd".into(),
        cmdline: "console=ttyS0".into(),
        shares: vec![
            ShareDevice {
                tag: "vexec-root".into(),
                path: "/".into(),
                readonly: true,
                backend: Backend::NineP,
            },
            ShareDevice {
                tag: "vexec-1".into(),
                path: "/home/a,b c".into(),
                readonly: false,
                backend: Backend::NineP,
            },
        ],
        net: None,
        console_fd: 5,
        control_fd: 6,
        qmp_fd: None,
        exec_port_fds: Vec::new(),
        qga_fd: None,
        incoming_fd: None,
        ram_fd: None,
        plug_shares: false,
        extra: vec!["-s".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        example_config()
    }

    #[test]
    fn qboot_beside_qemu_comes_first() {
        let d = tempfile::tempdir().unwrap();
        let qemu = d.path().join("bin/qemu-system-x86_64");
        std::fs::create_dir_all(d.path().join("share/qemu")).unwrap();
        std::fs::create_dir_all(qemu.parent().unwrap()).unwrap();
        std::fs::write(&qemu, b"").unwrap();
        std::fs::write(d.path().join("share/qemu/qboot.rom"), b"rom").unwrap();
        assert_eq!(
            default_firmware(Arch::X86_64, &qemu),
            Some(d.path().join("share/qemu/qboot.rom"))
        );
        assert_eq!(default_firmware(Arch::Aarch64, &qemu), None);
        // Without one there, a system-wide copy or none at all.
        std::fs::remove_file(d.path().join("share/qemu/qboot.rom")).unwrap();
        assert!(
            default_firmware(Arch::X86_64, &qemu)
                .is_none_or(|p| p.starts_with("/usr/share/qemu") || p.starts_with("/usr/local"))
        );
    }

    /// Ports per virtio-serial bus, by bus, for `exec` exec ports.
    fn buses(exec: usize, qga: bool) -> Vec<(String, usize)> {
        let mut c = config();
        c.exec_port_fds = vec![7; exec];
        c.qga_fd = qga.then_some(8);
        let mut per: Vec<(String, usize)> = Vec::new();
        for a in argv(&c) {
            let a = a.to_string_lossy().into_owned();
            if let Some(id) = a.strip_prefix("virtio-serial-pci,id=") {
                per.push((id.to_string(), 0));
            }
            if let Some(rest) = a.strip_prefix("virtserialport,bus=") {
                let bus = rest.split(".0,").next().unwrap();
                per.iter_mut().find(|(b, _)| b == bus).unwrap().1 += 1;
            }
        }
        per
    }

    #[test]
    fn exec_ports_fill_the_control_bus_then_buses_of_eight() {
        assert_eq!(buses(0, false), [("vser".into(), 1)]);
        assert_eq!(buses(2, false), [("vser".into(), 3)]);
        assert_eq!(
            buses(16, true),
            [
                ("vser".into(), 8),
                ("vexec0".into(), 8),
                ("vexec1".into(), 2)
            ]
        );
    }

    #[test]
    fn builds_argv() {
        let a: Vec<String> = argv(&config())
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(joined.contains("-accel tcg -cpu max"));
        assert!(joined.contains("socket,id=console,fd=5"));
        assert!(joined.contains("socket,id=ctl,fd=6"));
        assert!(joined.contains("path=/,security_model=none,multidevs=remap,readonly=on"));
        assert!(joined.contains("path=/home/a,,b c,security_model=none,multidevs=remap -device"));
        assert_eq!(a.last().unwrap(), "-s");
        assert!(!joined.contains("kvm"));
    }

    #[test]
    fn single_threaded_tcg_is_an_accel_property() {
        let c = QemuConfig {
            tcg_single: true,
            ..config()
        };
        let joined = shell_line(Path::new("q"), &argv(&c));
        assert!(
            joined.contains("-accel tcg,thread=single -cpu max"),
            "{joined}"
        );
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let mut c = config();
        c.accel = Accel::Kvm;
        let joined = argv(&c)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("-accel kvm -cpu host"));
    }

    #[test]
    fn user_net_with_forwards() {
        let mut c = config();
        c.net = Some(vec![(8080, 80)]);
        let joined = argv(&c)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains(
            "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80 -device virtio-net-pci,netdev=net0,romfile= -s"
        ));
    }

    #[test]
    fn virtiofs_shares_memory() {
        let mut c = config();
        c.shares[1].backend = Backend::Virtiofs { fd: 9 };
        let joined = argv(&c)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains("memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem")
        );
        assert!(joined.contains(
            "-chardev socket,id=vfs1,fd=9 -device vhost-user-fs-pci,chardev=vfs1,tag=vexec-1"
        ));
        assert!(joined.contains("virtio-9p-pci,fsdev=fs0,mount_tag=vexec-root"));
    }

    #[test]
    fn plugged_shares_wait_in_root_ports_and_ram_is_the_sessions() {
        let mut c = config();
        c.shares[1].backend = Backend::Virtiofs { fd: 9 };
        (c.plug_shares, c.ram_fd, c.incoming_fd) = (true, Some(12), Some(13));
        let joined = shell_line(Path::new("q"), &argv(&c));
        assert!(joined.contains(
            "memory-backend-file,id=mem,size=1G,mem-path=/proc/self/fd/12,share=on -numa node,memdev=mem"
        ));
        assert!(
            joined.contains(
                "-chardev socket,id=vfs1,fd=9 -device pcie-root-port,id=vfsport1,chassis=2"
            )
        );
        assert!(!joined.contains("vhost-user-fs-pci"), "{joined}");
        assert!(joined.contains("-incoming defer"), "{joined}");
        // The 9p root stays a device of the command line.
        assert!(joined.contains("virtio-9p-pci,fsdev=fs0,mount_tag=vexec-root"));
        let plugged = plugged_devices(&c);
        assert_eq!(plugged.len(), 1);
        assert_eq!(
            plugged[0],
            serde_json::json!({
                "driver": "vhost-user-fs-pci", "id": "vfsdev1", "bus": "vfsport1",
                "chardev": "vfs1", "tag": "vexec-1", "queue-size": 1024
            })
        );
    }

    #[test]
    fn cmdline_and_shell_line() {
        let c = cmdline(false, false, &["foo=bar".into()]);
        assert!(c.starts_with("console=ttyS0 panic=-1"));
        assert!(c.ends_with("loglevel=4 foo=bar"));
        let l = shell_line(
            "qemu".as_ref(),
            &["-append".into(), "a b".into(), "it's".into()],
        );
        assert_eq!(l, r"qemu -append 'a b' 'it'\''s'");
    }
}
