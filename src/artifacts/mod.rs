//! Boot artifacts, prepared once per kernel and cached by content: the
//! uncompressed vmlinux for direct PVH entry, the guest initramfs, and the
//! module index that lets `modprobe` work in the guest.

pub mod cache;
pub mod caps;
pub mod initramfs;

use std::path::{Path, PathBuf};

use crate::artifacts::cache::{Cache, CacheError, hash_parts};
use crate::kernel::image;
use crate::kernel::kconfig::KernelConfig;
use crate::kernel::modules::{self, ModuleError, ModuleTree};
use crate::kernel::{ImageKind, Kernel};
use crate::protocol::Transport;
use caps::MissingFeature;
use initramfs::InitramfsError;

/// Bumped whenever the layout of an artifact changes.
const FORMAT: &[u8] = b"vexec-artifacts-6";

/// What QEMU boots.
#[derive(Debug, Clone)]
pub struct BootArtifacts {
    /// An ELF vmlinux (PVH entry) or the original bzImage.
    pub kernel: PathBuf,
    /// True when `kernel` is entered through PVH.
    pub pvh: bool,
    pub initramfs: PathBuf,
    /// The kernel's module tree, shown in the guest.
    pub modules: Option<PathBuf>,
    /// Generated modules.dep/modules.alias, layered over the tree.
    pub module_index: Option<PathBuf>,
    /// Notes for `-v` (what was built, what was unknown).
    pub notes: Vec<String>,
    /// The kernel takes PCIe devices plugged in while it runs.
    pub hotplug: bool,
}

/// Why the artifacts could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Missing(#[from] MissingFeature),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("cannot find vexec's own executable to use as the guest's init: {0}; reinstall vexec")]
    SelfExe(std::io::Error),
    #[error(
        "kernel {release} needs modules ({modules}) but no module tree for it was found in {searched}; pass --modules DIR"
    )]
    NoModuleTree {
        release: String,
        modules: String,
        searched: String,
    },
    #[error(
        "kernel {release} has its virtio drivers as modules (its image has no virtio console built in), and its module tree was not found: looked in {searched}; pass --modules DIR (the kernel's lib/modules/{release}), or keep the image in its unpacked package (boot/ beside lib/modules/)"
    )]
    ModulesNotFound { release: String, searched: String },
}

/// What a kernel offers vexec's guest, found once per kernel and cached.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Support {
    /// Why 9p cannot be used, or None when it can.
    pub ninep: Option<String>,
    /// Why virtio-fs cannot be used, or None when it can.
    pub virtiofs: Option<String>,
    /// Why `--net` cannot be used, or None when it can.
    pub net: Option<String>,
    /// Features assumed built in for lack of a kernel config.
    pub unknown: Vec<String>,
    /// The kernel takes PCIe devices plugged in while it runs (known only
    /// from a config: the option is never a module).
    pub hotplug: bool,
}

impl Support {
    /// Why `t` cannot be used with this kernel, if it cannot.
    pub fn missing(&self, t: Transport) -> Option<&str> {
        match t {
            Transport::NineP => self.ninep.as_deref(),
            Transport::Virtiofs => self.virtiofs.as_deref(),
        }
    }
}

/// The kernel as vexec will boot it, and what it supports.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// An ELF vmlinux (PVH entry) or the original bzImage.
    pub boot_kernel: PathBuf,
    /// True when `boot_kernel` is entered through PVH.
    pub pvh: bool,
    pub support: Support,
    /// Notes for `-v`.
    pub notes: Vec<String>,
    image_hash: String,
    modules_id: Vec<u8>,
    config_id: Vec<u8>,
}

/// Finds (or extracts and caches) the image to boot, and what the kernel
/// supports. Fails when it lacks something every guest needs.
pub fn inspect(cache: &Cache, kernel: &Kernel) -> Result<Inspected, PrepareError> {
    let mut notes = Vec::new();
    // The image is read again only when something must be made from it.
    let read_image = || {
        std::fs::read(&kernel.image).map_err(|source| PrepareError::Io {
            path: kernel.image.clone(),
            source,
        })
    };
    let image_hash = hash_parts(&[FORMAT, kernel.content_hash.as_bytes()]);

    // The uncompressed kernel, for PVH entry (no decompression at boot). An
    // empty entry records that this kernel has no usable PVH entry.
    let (boot_kernel, pvh, vmlinux_data) = match &kernel.info.kind {
        ImageKind::Elf => (
            kernel.image.clone(),
            image::has_pvh_entry(&read_image()?),
            None,
        ),
        // QEMU's arm64 loader takes the Image (or its gzip) as it is.
        ImageKind::Arm64 => (kernel.image.clone(), false, None),
        // An empty entry records that the bzImage must be booted as is.
        ImageKind::BzImage { .. } => match cache.get("vmlinux", &image_hash) {
            Some(entry) if std::fs::metadata(&entry).is_ok_and(|m| m.len() > 0) => {
                (entry, true, None)
            }
            Some(_) => (kernel.image.clone(), false, None),
            None => match image::extract_vmlinux(&read_image()?) {
                Ok(elf) if image::has_pvh_entry(&elf) => {
                    let entry = cache.put("vmlinux", &image_hash, &elf)?;
                    notes.push("extracted the vmlinux for PVH boot".into());
                    (entry, true, Some(elf))
                }
                Ok(elf) => {
                    cache.put("vmlinux", &image_hash, b"")?;
                    notes.push("kernel has no PVH entry; booting the bzImage".into());
                    (kernel.image.clone(), false, Some(elf))
                }
                Err(e) => {
                    cache.put("vmlinux", &image_hash, b"")?;
                    notes.push(format!("cannot unpack the bzImage ({e}); booting it as is"));
                    (kernel.image.clone(), false, None)
                }
            },
        },
    };

    let modules_id = kernel
        .modules
        .as_deref()
        .map(crate::sys::files::identity)
        .unwrap_or_default();
    let config_id = kernel
        .config
        .as_deref()
        .map(crate::sys::files::identity)
        .unwrap_or_default();
    let support_key = hash_parts(&[FORMAT, image_hash.as_bytes(), &modules_id, &config_id]);
    let cached = cache
        .get("support", &support_key)
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| postcard::from_bytes::<Support>(&b).ok());
    let support = match cached {
        Some(s) => s,
        None => {
            let s = find_support(kernel, vmlinux_data.as_deref(), &boot_kernel, pvh)?;
            let bytes = postcard::to_allocvec(&s).map_err(|e| PrepareError::Io {
                path: cache.root().join("support").join(&support_key),
                source: std::io::Error::other(e),
            })?;
            cache.put("support", &support_key, &bytes)?;
            s
        }
    };
    if !support.unknown.is_empty() {
        notes.push(format!(
            "no kernel config found; assuming built in: {}",
            support.unknown.join(", ")
        ));
    }
    Ok(Inspected {
        boot_kernel,
        pvh,
        support,
        notes,
        image_hash,
        modules_id,
        config_id,
    })
}

/// What the kernel supports (each transport, networking), from its config
/// or module tree; fails when it lacks what every guest needs.
fn find_support(
    kernel: &Kernel,
    vmlinux: Option<&[u8]>,
    boot_kernel: &Path,
    pvh: bool,
) -> Result<Support, PrepareError> {
    let tree = scan_tree(kernel)?;
    let config = load_config(kernel, vmlinux, boot_kernel, pvh);
    if config.is_none() && tree.is_none() {
        modules_needed_but_missing(kernel, vmlinux, boot_kernel, pvh)?;
    }
    let base = caps::check(kernel, config.as_ref(), tree.as_ref(), caps::BASE)?;
    let why_not = |t| {
        caps::check(
            kernel,
            config.as_ref(),
            tree.as_ref(),
            caps::transport_features(t),
        )
        .err()
        .map(|e| e.to_string())
    };
    let mut unknown: Vec<String> = base.unknown.iter().map(|s| s.to_string()).collect();
    for t in [Transport::NineP, Transport::Virtiofs] {
        if let Ok(p) = caps::check(
            kernel,
            config.as_ref(),
            tree.as_ref(),
            caps::transport_features(t),
        ) {
            unknown.extend(p.unknown.iter().map(|s| s.to_string()));
        }
    }
    Ok(Support {
        ninep: why_not(Transport::NineP),
        virtiofs: why_not(Transport::Virtiofs),
        net: caps::check(kernel, config.as_ref(), tree.as_ref(), caps::NET)
            .err()
            .map(|e| e.to_string()),
        unknown,
        hotplug: config.as_ref().is_some_and(caps::hotplug),
    })
}

/// The `wanted` modules with their dependencies, in load order; none
/// wanted needs no tree.
fn load_order(
    kernel: &Kernel,
    tree: Option<&ModuleTree>,
    wanted: &[&str],
) -> Result<Vec<modules::LoadableModule>, PrepareError> {
    match (tree, wanted.is_empty()) {
        (_, true) => Ok(Vec::new()),
        (Some(t), false) => Ok(t.load_order(wanted)?),
        (None, false) => Err(PrepareError::NoModuleTree {
            release: kernel.release().to_string(),
            modules: wanted.join(", "),
            searched: searched_for_modules(kernel),
        }),
    }
}

fn scan_tree(kernel: &Kernel) -> Result<Option<ModuleTree>, PrepareError> {
    Ok(kernel
        .modules
        .as_deref()
        .map(ModuleTree::scan)
        .transpose()?)
}

/// Prepares (or finds in the cache) the initramfs and module index to boot
/// the inspected kernel with `agent` (normally vexec's own executable) as
/// the guest's init, carrying the modules `transport` needs (and those of
/// virtio-net with `net`).
///
/// `interactive` allows a progress notice for slow one-time steps.
pub fn prepare(
    cache: &Cache,
    kernel: &Kernel,
    inspected: &Inspected,
    transport: Transport,
    net: bool,
    agent: &Path,
    interactive: bool,
) -> Result<BootArtifacts, PrepareError> {
    let mut notes = inspected.notes.clone();
    let agent_id = crate::sys::files::identity(agent);
    let key = hash_parts(&[
        FORMAT,
        inspected.image_hash.as_bytes(),
        &agent_id,
        &inspected.modules_id,
        &inspected.config_id,
        transport.name().as_bytes(),
        if net { b"net" } else { b"" },
    ]);
    // Debian's packages ship no modules.dep; generate one (once) so that
    // `modprobe` works in the guest.
    let index_key = kernel
        .modules
        .as_deref()
        .filter(|m| !m.join("modules.dep.bin").exists())
        .map(|_| hash_parts(&[FORMAT, &inspected.modules_id]));
    let mut module_index = index_key.as_ref().and_then(|k| cache.get("modindex", k));
    let cached = cache.get("initramfs", &key);
    if let (Some(initramfs), true) = (&cached, module_index.is_some() == index_key.is_some()) {
        return Ok(BootArtifacts {
            kernel: inspected.boot_kernel.clone(),
            pvh: inspected.pvh,
            initramfs: initramfs.clone(),
            modules: kernel.modules.clone(),
            module_index,
            notes,
            hotplug: inspected.support.hotplug,
        });
    }
    let tree = scan_tree(kernel)?;
    let initramfs = match cached {
        Some(p) => p,
        None => {
            let (cpio, names) =
                build_initramfs(kernel, inspected, tree.as_ref(), transport, net, agent)?;
            notes.push(format!(
                "built the initramfs ({} modules: {names})",
                names.split_whitespace().count()
            ));
            cache.put("initramfs", &key, &cpio)?
        }
    };
    if let (Some(tree), Some(idx), None) = (&tree, &index_key, &module_index) {
        if interactive {
            crate::say!(
                "vexec: indexing the modules of {} for modprobe (once per kernel)...",
                kernel.release()
            );
        }
        let scratch = cache.root().join("tmp");
        let _ = std::fs::create_dir_all(&scratch);
        let built = cache.put_with("modindex", idx, |out| {
            modules::generate_index(&tree.root, kernel.release(), &scratch, out)
                .map_err(std::io::Error::other)
        });
        match built {
            Ok(p) => {
                notes.push("indexed the module tree for modprobe".into());
                module_index = Some(p);
            }
            Err(e) => notes.push(format!("modprobe will not work in the guest: {e}")),
        }
    }
    Ok(BootArtifacts {
        kernel: inspected.boot_kernel.clone(),
        pvh: inspected.pvh,
        initramfs,
        modules: kernel.modules.clone(),
        module_index,
        notes,
        hotplug: inspected.support.hotplug,
    })
}

/// The initramfs for `transport` (and virtio-net with `net`): the agent and
/// the modules those need, in load order; and the modules' names.
fn build_initramfs(
    kernel: &Kernel,
    inspected: &Inspected,
    tree: Option<&ModuleTree>,
    transport: Transport,
    net: bool,
    agent: &Path,
) -> Result<(Vec<u8>, String), PrepareError> {
    let config = load_config(kernel, None, &inspected.boot_kernel, inspected.pvh);
    let mut wanted = caps::check(kernel, config.as_ref(), tree, caps::BASE)?.modules;
    wanted.extend(
        caps::check(
            kernel,
            config.as_ref(),
            tree,
            caps::transport_features(transport),
        )?
        .modules,
    );
    if net {
        wanted.extend(caps::check(kernel, config.as_ref(), tree, caps::NET)?.modules);
    }
    let modules = load_order(kernel, tree, &wanted)?;
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    Ok((initramfs::build(agent, &modules)?, names.join(" ")))
}

/// The kernel's configuration: its .config file, else IKCONFIG.
fn load_config(
    kernel: &Kernel,
    vmlinux: Option<&[u8]>,
    boot_kernel: &Path,
    pvh: bool,
) -> Option<KernelConfig> {
    if let Some(text) = kernel
        .config
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        return Some(KernelConfig::parse(&text));
    }
    image::embedded_config(&elf_of(vmlinux, boot_kernel, pvh)?).map(|t| KernelConfig::parse(&t))
}

/// The uncompressed kernel: extracted just now, or the ELF booted through
/// PVH; None when only a bzImage is at hand.
fn elf_of<'a>(
    vmlinux: Option<&'a [u8]>,
    boot_kernel: &Path,
    pvh: bool,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    match vmlinux {
        Some(v) => Some(v.into()),
        None if pvh => std::fs::read(boot_kernel).ok().map(Into::into),
        None => None,
    }
}

/// With neither a config nor a module tree to ask, the image itself tells
/// whether the guest's control channel needs a module: a built-in driver
/// leaves its name in the image. Such a kernel would boot and wait in
/// vain for the channel; say so before booting.
fn modules_needed_but_missing(
    kernel: &Kernel,
    vmlinux: Option<&[u8]>,
    boot_kernel: &Path,
    pvh: bool,
) -> Result<(), PrepareError> {
    let Some(elf) = elf_of(vmlinux, boot_kernel, pvh) else {
        return Ok(());
    };
    if image::has_builtin_driver(&elf, "virtio_console") {
        return Ok(());
    }
    Err(PrepareError::ModulesNotFound {
        release: kernel.release().to_string(),
        searched: searched_for_modules(kernel),
    })
}

/// Where vexec looks for a kernel's module tree, for messages.
fn searched_for_modules(kernel: &Kernel) -> String {
    let beside = kernel
        .image
        .parent()
        .and_then(Path::parent)
        .map(|p| {
            p.join("lib/modules")
                .join(kernel.release())
                .display()
                .to_string()
        })
        .unwrap_or_else(|| format!("lib/modules/{} beside the image", kernel.release()));
    format!(
        "{beside}, /lib/modules/{0}, /usr/lib/modules/{0}",
        kernel.release()
    )
}

/// The modules a batch run's guest must load (virtio PCI and the console
/// port; 9p and overlayfs too with `ninep_root`, for `--root`), in load
/// order. Keyed in the cache like
/// [`prepare`]'s initramfs, as module selection reads every module's
/// `.modinfo`.
pub fn batch_modules(
    cache: &Cache,
    kernel: &Kernel,
    inspected: &Inspected,
    ninep_root: bool,
) -> Result<Vec<modules::LoadableModule>, PrepareError> {
    let key = hash_parts(&[
        FORMAT,
        if ninep_root {
            b"batch-9p-root"
        } else {
            b"batch"
        },
        inspected.image_hash.as_bytes(),
        &inspected.modules_id,
        &inspected.config_id,
    ]);
    if let Some(b) = cache
        .get("batch-modules", &key)
        .and_then(|p| std::fs::read(p).ok())
        && let Ok(list) = postcard::from_bytes::<Vec<(String, Vec<String>, Vec<u8>)>>(&b)
    {
        return Ok(list
            .into_iter()
            .map(|(name, depends, data)| modules::LoadableModule {
                name,
                depends,
                data,
            })
            .collect());
    }
    let tree = scan_tree(kernel)?;
    let config = load_config(kernel, None, &inspected.boot_kernel, inspected.pvh);
    // A root shared over 9p is overlaid like the host's; without one,
    // overlayfs is not needed.
    let features: Vec<caps::Feature> = caps::BASE
        .iter()
        .copied()
        .filter(|f| ninep_root || f.what != "overlayfs")
        .chain(caps::NINEP.iter().copied().filter(|_| ninep_root))
        .collect();
    let wanted = caps::check(kernel, config.as_ref(), tree.as_ref(), &features)?.modules;
    let list = load_order(kernel, tree.as_ref(), &wanted)?;
    let stored: Vec<(&str, &[String], &[u8])> = list
        .iter()
        .map(|m| (m.name.as_str(), &m.depends[..], &m.data[..]))
        .collect();
    if let Ok(b) = postcard::to_allocvec(&stored) {
        cache.put("batch-modules", &key, &b)?;
    }
    Ok(list)
}
