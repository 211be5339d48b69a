//! Deciding, before booting, whether a kernel can run vexec's guest and
//! which modules the initramfs must carry for it.
//!
//! The answer comes from the kernel's `.config` when one is known, else from
//! its module tree (`modules.builtin` and the module files present).

use crate::kernel::Kernel;
use crate::kernel::kconfig::{KernelConfig, Tristate};
use crate::kernel::modules::ModuleTree;
use crate::protocol::Transport;

/// One thing the guest needs from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// What a user would call it.
    pub what: &'static str,
    /// Every option that must be `y` or `m`, each with the module providing it.
    pub options: &'static [(&'static str, Option<&'static str>)],
}

/// What every guest needs: initramfs, devtmpfs, tmpfs, virtio-pci, the
/// virtio-serial control port and overlayfs. A transport comes on top.
pub const BASE: &[Feature] = &[
    Feature {
        what: "initramfs support",
        options: &[("CONFIG_BLK_DEV_INITRD", None)],
    },
    Feature {
        what: "devtmpfs",
        options: &[("CONFIG_DEVTMPFS", None)],
    },
    Feature {
        what: "tmpfs",
        options: &[("CONFIG_TMPFS", None)],
    },
    Feature {
        what: "virtio PCI devices",
        options: &[
            ("CONFIG_VIRTIO", Some("virtio")),
            ("CONFIG_VIRTIO_PCI", Some("virtio_pci")),
        ],
    },
    Feature {
        what: "the virtio console (vexec's control channel)",
        options: &[("CONFIG_VIRTIO_CONSOLE", Some("virtio_console"))],
    },
    Feature {
        what: "overlayfs",
        options: &[("CONFIG_OVERLAY_FS", Some("overlay"))],
    },
];

/// The 9p transport.
pub const NINEP: &[Feature] = &[Feature {
    what: "9p file sharing over virtio",
    options: &[
        ("CONFIG_NET_9P", Some("9pnet")),
        ("CONFIG_NET_9P_VIRTIO", Some("9pnet_virtio")),
        ("CONFIG_9P_FS", Some("9p")),
    ],
}];

/// The virtio-fs transport.
pub const VIRTIOFS: &[Feature] = &[Feature {
    what: "virtio-fs file sharing",
    options: &[
        ("CONFIG_FUSE_FS", Some("fuse")),
        ("CONFIG_VIRTIO_FS", Some("virtiofs")),
    ],
}];

/// Networking (`--net`).
pub const NET: &[Feature] = &[Feature {
    what: "virtio networking",
    options: &[("CONFIG_VIRTIO_NET", Some("virtio_net"))],
}];

/// Whether the kernel takes PCI devices plugged in while it runs, the way
/// QEMU's q35 offers them (ACPI hotplug, bool options).
pub fn hotplug(config: &KernelConfig) -> bool {
    [
        "CONFIG_ACPI",
        "CONFIG_HOTPLUG_PCI",
        "CONFIG_HOTPLUG_PCI_ACPI",
    ]
    .iter()
    .all(|o| config.get(o) == Tristate::Yes)
}

/// The features a transport needs.
pub fn transport_features(t: Transport) -> &'static [Feature] {
    match t {
        Transport::NineP => NINEP,
        Transport::Virtiofs => VIRTIOFS,
    }
}

/// A kernel that cannot run vexec's guest.
#[derive(Debug, thiserror::Error)]
#[error(
    "kernel {release} lacks {what} ({options} not set in {source_desc}); rebuild it with {options}=y (or =m)"
)]
pub struct MissingFeature {
    pub release: String,
    pub what: String,
    pub options: String,
    pub source_desc: String,
}

/// The outcome of the check.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Modules to load at boot, by name (dependencies are added later).
    pub modules: Vec<&'static str>,
    /// Features whose presence could not be determined (no config, not in
    /// the module tree); the boot will tell.
    pub unknown: Vec<&'static str>,
}

/// Checks `features` against the kernel's config or module tree.
pub fn check(
    kernel: &Kernel,
    config: Option<&KernelConfig>,
    tree: Option<&ModuleTree>,
    features: &[Feature],
) -> Result<Plan, MissingFeature> {
    let mut plan = Plan::default();
    for f in features {
        let mut missing = Vec::new();
        for &(opt, module) in f.options {
            let state = match config {
                Some(c) => c.get(opt),
                None => match (module, tree) {
                    (Some(m), Some(t)) if t.path_of(m).is_some() => Tristate::Module,
                    (Some(m), Some(t)) if t.is_builtin(m) => Tristate::Yes,
                    _ => {
                        if !plan.unknown.contains(&f.what) {
                            plan.unknown.push(f.what);
                        }
                        Tristate::Yes
                    }
                },
            };
            match (state, module) {
                (Tristate::No, _) => missing.push(opt),
                (Tristate::Module, Some(m)) => plan.modules.push(m),
                (Tristate::Module, None) => missing.push(opt),
                (Tristate::Yes, _) => {}
            }
        }
        if !missing.is_empty() {
            return Err(MissingFeature {
                release: kernel.release().to_string(),
                what: f.what.to_string(),
                options: missing.join(", "),
                source_desc: kernel
                    .config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "its configuration".into()),
            });
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::image::{ImageInfo, ImageKind};

    fn kernel() -> Kernel {
        Kernel {
            image: "/boot/vmlinuz-x".into(),
            info: ImageInfo {
                kind: ImageKind::Elf,
                arch: Default::default(),
                release: "6.1.0-test".into(),
                banner: String::new(),
            },
            modules: None,
            config: Some("/boot/config-x".into()),
            content_hash: String::new(),
        }
    }

    const ALL: &str = "CONFIG_BLK_DEV_INITRD=y\nCONFIG_DEVTMPFS=y\nCONFIG_TMPFS=y\nCONFIG_VIRTIO=m\nCONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_CONSOLE=y\nCONFIG_NET_9P=m\nCONFIG_NET_9P_VIRTIO=m\nCONFIG_9P_FS=m\nCONFIG_OVERLAY_FS=m\n";

    #[test]
    fn modules_for_m_options() {
        let c = KernelConfig::parse(ALL);
        let plan = check(&kernel(), Some(&c), None, BASE).unwrap();
        assert_eq!(plan.modules, ["virtio", "virtio_pci", "overlay"]);
        let plan = check(&kernel(), Some(&c), None, NINEP).unwrap();
        assert_eq!(plan.modules, ["9pnet", "9pnet_virtio", "9p"]);
    }

    #[test]
    fn names_missing_options() {
        let c = KernelConfig::parse(&ALL.replace("CONFIG_9P_FS=m", "# CONFIG_9P_FS is not set"));
        let e = check(&kernel(), Some(&c), None, NINEP).unwrap_err();
        assert!(e.to_string().contains("CONFIG_9P_FS"), "{e}");
        assert!(e.to_string().contains("9p file sharing"), "{e}");
        // Neither FUSE nor virtio-fs is in ALL.
        let e = check(&kernel(), Some(&c), None, VIRTIOFS).unwrap_err();
        assert!(
            e.to_string().contains("CONFIG_FUSE_FS, CONFIG_VIRTIO_FS"),
            "{e}"
        );
    }

    #[test]
    fn hotplug_needs_acpi_pci_hotplug_built_in() {
        let c = |text: &str| KernelConfig::parse(text);
        let all = "CONFIG_ACPI=y\nCONFIG_HOTPLUG_PCI=y\nCONFIG_HOTPLUG_PCI_ACPI=y\n";
        assert!(hotplug(&c(all)));
        let no_acpi = all.replace("CONFIG_ACPI=y", "# CONFIG_ACPI is not set");
        assert!(!hotplug(&c(&no_acpi)));
        // Native PCIe hotplug alone is not how q35 offers devices.
        assert!(!hotplug(&c(
            "CONFIG_PCIEPORTBUS=y\nCONFIG_HOTPLUG_PCI_PCIE=y\n"
        )));
    }
}
