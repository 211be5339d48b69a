//! Boot artifacts, prepared once per kernel and cached by content: the
//! uncompressed vmlinux for direct PVH entry, the guest initramfs, and the
//! module index that lets `modprobe` work in the guest.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cache::{Cache, CacheError, hash_parts};
use crate::caps::{self, MissingFeature};
use crate::initramfs::{self, InitramfsError};
use crate::kernel::image;
use crate::kernel::kconfig::KernelConfig;
use crate::kernel::modules::{self, ModuleError, ModuleTree};
use crate::kernel::{ImageKind, Kernel};

/// Bumped whenever the layout of an artifact changes.
const FORMAT: &[u8] = b"vexec-artifacts-1";

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
    #[error(
        "kernel {release} needs modules ({modules}) but no module tree for it was found in {searched}; pass --modules DIR"
    )]
    NoModuleTree {
        release: String,
        modules: String,
        searched: String,
    },
}

/// A cheap identity for a file: path, size, mtime, inode.
fn file_identity(p: &Path) -> Vec<u8> {
    let m = std::fs::metadata(p).ok();
    format!(
        "{}|{:?}",
        p.display(),
        m.map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
    )
    .into_bytes()
}

/// Prepares (or finds in the cache) everything needed to boot `kernel`
/// with `agent` (normally vexec's own executable) as the guest's init.
///
/// `interactive` allows a progress notice for slow one-time steps.
pub fn prepare(
    cache: &Cache,
    kernel: &Kernel,
    agent: &Path,
    interactive: bool,
) -> Result<BootArtifacts, PrepareError> {
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
        ImageKind::BzImage { .. } => {
            let entry = cache.entry("vmlinux", &image_hash);
            if entry.exists() {
                let usable = std::fs::metadata(&entry).is_ok_and(|m| m.len() > 0);
                if usable {
                    (entry, true, None)
                } else {
                    (kernel.image.clone(), false, None)
                }
            } else {
                let extracted = image::extract_vmlinux(&read_image()?);
                match extracted {
                    Ok(elf) if image::has_pvh_entry(&elf) => {
                        cache.write(&entry, &elf)?;
                        notes.push("extracted the vmlinux for PVH boot".into());
                        (entry, true, Some(elf))
                    }
                    Ok(elf) => {
                        cache.write(&entry, b"")?;
                        notes.push("kernel has no PVH entry; booting the bzImage".into());
                        (kernel.image.clone(), false, Some(elf))
                    }
                    Err(e) => {
                        cache.write(&entry, b"")?;
                        notes.push(format!("cannot unpack the bzImage ({e}); booting it as is"));
                        (kernel.image.clone(), false, None)
                    }
                }
            }
        }
    };

    let agent_id = file_identity(agent);
    let modules_id = kernel
        .modules
        .as_deref()
        .map(file_identity)
        .unwrap_or_default();
    let config_id = kernel
        .config
        .as_deref()
        .map(file_identity)
        .unwrap_or_default();
    let key = hash_parts(&[
        FORMAT,
        image_hash.as_bytes(),
        &agent_id,
        &modules_id,
        &config_id,
    ]);
    let initramfs = cache.entry("initramfs", &key);
    // Debian's packages ship no modules.dep; generate one (once) so that
    // `modprobe` works in the guest.
    let module_index = kernel
        .modules
        .as_deref()
        .filter(|m| !m.join("modules.dep.bin").exists())
        .map(|_| cache.entry("modindex", &hash_parts(&[FORMAT, &modules_id])));
    let need_index = module_index
        .as_ref()
        .is_some_and(|i| !i.join("modules.dep.bin").exists());
    if initramfs.exists() && !need_index {
        return Ok(BootArtifacts {
            kernel: boot_kernel,
            pvh,
            initramfs,
            modules: kernel.modules.clone(),
            module_index,
            notes,
        });
    }
    let tree = kernel
        .modules
        .as_deref()
        .map(ModuleTree::scan)
        .transpose()?;
    if !initramfs.exists() {
        let config = load_config(kernel, vmlinux_data.as_deref(), &boot_kernel, pvh);
        let plan = caps::check(kernel, config.as_ref(), tree.as_ref(), caps::CORE)?;
        if !plan.unknown.is_empty() {
            notes.push(format!(
                "no kernel config found; assuming built in: {}",
                plan.unknown.join(", ")
            ));
        }
        let modules = match (&tree, plan.modules.is_empty()) {
            (_, true) => Vec::new(),
            (Some(t), false) => t.load_order(&plan.modules)?,
            (None, false) => {
                return Err(PrepareError::NoModuleTree {
                    release: kernel.release().to_string(),
                    modules: plan.modules.join(", "),
                    searched: format!(
                        "lib/modules/{0} beside the image, /lib/modules/{0}, /usr/lib/modules/{0}",
                        kernel.release()
                    ),
                });
            }
        };
        let cpio = initramfs::build(agent, &modules)?;
        cache.write(&initramfs, &cpio)?;
        notes.push(format!(
            "built the initramfs ({} modules: {})",
            modules.len(),
            modules
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    let mut module_index = module_index;
    if let (Some(tree), Some(idx), true) = (&tree, &module_index, need_index) {
        if interactive {
            eprintln!(
                "vexec: indexing the modules of {} for modprobe (once per kernel)...",
                kernel.release()
            );
        }
        let scratch = cache.root().join("tmp");
        let _ = std::fs::create_dir_all(&scratch);
        match modules::generate_index(&tree.root, kernel.release(), &scratch, idx) {
            Ok(()) => notes.push("indexed the module tree for modprobe".into()),
            Err(e) => {
                notes.push(format!("modprobe will not work in the guest: {e}"));
                module_index = None;
            }
        }
    }
    Ok(BootArtifacts {
        kernel: boot_kernel,
        pvh,
        initramfs,
        modules: kernel.modules.clone(),
        module_index,
        notes,
    })
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
    let owned;
    let elf = match vmlinux {
        Some(v) => v,
        None if pvh => {
            owned = std::fs::read(boot_kernel).ok()?;
            &owned
        }
        None => return None,
    };
    image::embedded_config(elf).map(|t| KernelConfig::parse(&t))
}
