//! Kernels: where they come from, what their images and module trees hold,
//! and what they can do.

pub mod build;
pub mod decompress;
pub mod devnames;
pub mod image;
pub mod kconfig;
pub mod modules;
pub mod resolve;

use std::path::PathBuf;

pub use image::{ImageInfo, ImageKind};
pub use resolve::{ResolveError, resolve};

/// A kernel ready to be prepared for boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The image file (bzImage, vmlinuz or ELF vmlinux).
    pub image: PathBuf,
    /// What the image says about itself.
    pub info: ImageInfo,
    /// The module tree for this release, when one was found.
    pub modules: Option<PathBuf>,
    /// A `.config` file for this kernel, when one was found.
    pub config: Option<PathBuf>,
    /// Hex digest of the image's content, taken when it was read to be
    /// inspected, so later steps key their caches without reading it again.
    pub content_hash: String,
}

impl Kernel {
    /// `uname -r` of the kernel.
    pub fn release(&self) -> &str {
        &self.info.release
    }

    /// The image with debug symbols for gdb, when there is one: `vmlinux`
    /// in a build tree or beside the image, or from Debian's and Ubuntu's
    /// debug packages.
    pub fn symbol_file(&self) -> Option<PathBuf> {
        let rel = self.release();
        let mut candidates = Vec::new();
        // .../arch/x86/boot/bzImage (or arch/arm64/boot/Image) -> .../vmlinux
        if let Some(tree) = self.image.ancestors().nth(4)
            && (self.image.ends_with("arch/x86/boot/bzImage")
                || self.image.ends_with("arch/arm64/boot/Image"))
        {
            candidates.push(tree.join("vmlinux"));
        }
        if let Some(dir) = self.image.parent() {
            candidates.push(dir.join("vmlinux"));
            candidates.push(dir.join(format!("vmlinux-{rel}")));
        }
        candidates.push(PathBuf::from(format!("/usr/lib/debug/boot/vmlinux-{rel}")));
        candidates.push(PathBuf::from(format!(
            "/usr/lib/debug/lib/modules/{rel}/vmlinux"
        )));
        candidates.into_iter().find(|p| p.is_file())
    }
}
