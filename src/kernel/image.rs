//! Reading kernel image files: x86 bzImage headers, ELF vmlinux files, the
//! release string embedded in either, the compressed payload of a bzImage,
//! the PVH entry note, and an embedded IKCONFIG.

use super::decompress::{self, Format};
use object::Object;

/// Whether the driver `name` is built into the uncompressed kernel `elf`:
/// a driver registers under its module name (KBUILD_MODNAME), so a
/// built-in one leaves that string in the image; a modular one does not.
pub fn has_builtin_driver(elf: &[u8], name: &str) -> bool {
    let mut needle = name.as_bytes().to_vec();
    needle.push(0);
    memchr::memmem::find(elf, &needle).is_some()
}

/// What kind of image a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageKind {
    /// An x86 boot image; the payload's compression if recognised.
    BzImage { payload: Option<Format> },
    /// An uncompressed ELF vmlinux.
    Elf,
    /// An arm64 `Image` (possibly gzip-compressed, as some distributions
    /// ship it); QEMU's `-M virt` loader takes either.
    Arm64,
}

/// The architecture a kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arch {
    #[default]
    X86_64,
    Aarch64,
}

impl Arch {
    /// The name users write (`--arch`) and QEMU's binary suffix.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

/// Facts read from an image file without booting it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub kind: ImageKind,
    pub arch: Arch,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The full version banner, when found.
    pub banner: String,
}

/// Why a file could not be used as a kernel image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a Linux kernel image (no bzImage header, not an ELF vmlinux, not an arm64 Image)")]
    NotAKernel,
    #[error("this is a kernel for {0}, which vexec cannot boot (it boots x86_64 and arm64)")]
    WrongArch(String),
    #[error("no Linux version string found in the image")]
    NoVersion,
    #[error("the bzImage payload cannot be unpacked: {0}")]
    Payload(String),
}

const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Inspects an image held in memory.
pub fn inspect(data: &[u8]) -> Result<ImageInfo, ImageError> {
    if data.starts_with(ELF_MAGIC) {
        return inspect_elf(data);
    }
    if is_arm64_image(data) {
        return arm64_info(data);
    }
    if data.starts_with(&[0x1f, 0x8b]) {
        // A gzip-compressed arm64 Image (Debian's arm64 vmlinuz before 6.x).
        let head =
            decompress::decompress(Format::Gzip, data).map_err(|_| ImageError::NotAKernel)?;
        if is_arm64_image(&head) {
            return arm64_info(&head);
        }
        return Err(ImageError::NotAKernel);
    }
    if data.len() > 0x40 && u32::from_le_bytes(data[0x24..0x28].try_into().unwrap()) == 0x016f2818 {
        return Err(ImageError::WrongArch("32-bit ARM (a zImage file)".into()));
    }
    if data.len() < 0x260 || &data[0x202..0x206] != b"HdrS" {
        return Err(ImageError::NotAKernel);
    }
    let version = u16::from_le_bytes([data[0x206], data[0x207]]);
    let payload = if version >= 0x208 {
        payload(data).and_then(Format::sniff)
    } else {
        None
    };
    info(
        ImageKind::BzImage { payload },
        Arch::X86_64,
        header_version(data),
    )
}

/// The version string the setup header points at (`kernel_version`).
fn header_version(data: &[u8]) -> Option<String> {
    let ptr = u16::from_le_bytes([data[0x20e], data[0x20f]]) as usize;
    if ptr == 0 {
        return None;
    }
    let start = ptr + 0x200;
    let rest = data.get(start..)?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(rest.len().min(256));
    let s = std::str::from_utf8(&rest[..end]).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The compressed payload of a bzImage (boot protocol 2.08+).
fn payload(data: &[u8]) -> Option<&[u8]> {
    // Any file may be handed here (extract_vmlinux checks nothing first).
    let setup_sects = match *data.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let offset = u32::from_le_bytes(data.get(0x248..0x24c)?.try_into().ok()?) as usize;
    let length = u32::from_le_bytes(data.get(0x24c..0x250)?.try_into().ok()?) as usize;
    let start = (setup_sects + 1) * 512 + offset;
    data.get(start..start + length)
}

/// The arm64 boot header's magic ("ARM\x64" at offset 56).
fn is_arm64_image(data: &[u8]) -> bool {
    data.len() > 0x40 && &data[0x38..0x3c] == b"ARM\x64"
}

fn arm64_info(image: &[u8]) -> Result<ImageInfo, ImageError> {
    info(ImageKind::Arm64, Arch::Aarch64, elf_banner(image))
}

/// The facts of an image whose version banner is `banner` (its first word
/// is the release).
fn info(kind: ImageKind, arch: Arch, banner: Option<String>) -> Result<ImageInfo, ImageError> {
    let banner = banner.ok_or(ImageError::NoVersion)?;
    let release = banner
        .split_whitespace()
        .next()
        .ok_or(ImageError::NoVersion)?
        .to_string();
    Ok(ImageInfo {
        kind,
        arch,
        release,
        banner,
    })
}

fn inspect_elf(data: &[u8]) -> Result<ImageInfo, ImageError> {
    let file = object::File::parse(data).map_err(|_| ImageError::NotAKernel)?;
    let arch = match file.architecture() {
        object::Architecture::X86_64 => Arch::X86_64,
        object::Architecture::Aarch64 => Arch::Aarch64,
        other => return Err(ImageError::WrongArch(format!("{other:?}").to_lowercase())),
    };
    info(ImageKind::Elf, arch, elf_banner(data))
}

/// Finds `Linux version X ...` in an uncompressed kernel.
fn elf_banner(data: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"Linux version ";
    let mut from = 0;
    while let Some(pos) = memchr::memmem::find(&data[from..], NEEDLE) {
        let start = from + pos + NEEDLE.len();
        let rest = &data[start..data.len().min(start + 512)];
        let end = rest
            .iter()
            .position(|&b| b == 0 || b == b'\n')
            .unwrap_or(rest.len());
        if let Ok(s) = std::str::from_utf8(&rest[..end]) {
            // Skip format strings like "Linux version %s".
            if s.starts_with(|c: char| c.is_ascii_digit()) {
                return Some(s.trim().to_string());
            }
        }
        from = start;
    }
    None
}

/// Decompresses the vmlinux ELF out of a bzImage.
pub fn extract_vmlinux(data: &[u8]) -> Result<Vec<u8>, ImageError> {
    let payload = payload(data).ok_or_else(|| ImageError::Payload("no payload found".into()))?;
    let format =
        Format::sniff(payload).ok_or_else(|| ImageError::Payload("unknown compression".into()))?;
    let out =
        decompress::decompress(format, payload).map_err(|e| ImageError::Payload(e.to_string()))?;
    if !out.starts_with(ELF_MAGIC) {
        return Err(ImageError::Payload("the payload is not an ELF file".into()));
    }
    Ok(out)
}

/// True when the ELF carries the Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`),
/// which lets QEMU jump straight into the uncompressed kernel.
pub fn has_pvh_entry(elf: &[u8]) -> bool {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let Ok(file) = object::read::elf::ElfFile64::<object::Endianness>::parse(elf) else {
        return false;
    };
    let endian = file.endian();
    for segment in file.elf_program_headers() {
        use object::read::elf::ProgramHeader;
        let Ok(Some(mut notes)) = segment.notes(endian, elf) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == b"Xen"
                && note.n_type(endian) == object::elf::NoteType(XEN_ELFNOTE_PHYS32_ENTRY)
            {
                return true;
            }
        }
    }
    false
}

/// The kernel's own .config when built with `CONFIG_IKCONFIG=y`.
pub fn embedded_config(vmlinux: &[u8]) -> Option<String> {
    let start = memchr::memmem::find(vmlinux, b"IKCFG_ST")? + 8;
    let end = start + memchr::memmem::find(&vmlinux[start..], b"IKCFG_ED")?;
    let raw = decompress::decompress(Format::Gzip, &vmlinux[start..end]).ok()?;
    String::from_utf8(raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(version: &str) -> Vec<u8> {
        let mut d = vec![0u8; 0x1000];
        d[0x1f1] = 1; // one setup sector
        d[0x202..0x206].copy_from_slice(b"HdrS");
        d[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        d[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        d[0x300..0x300 + version.len()].copy_from_slice(version.as_bytes());
        // payload at (1+1)*512 + 0x10
        let payload = [0x28u8, 0xb5, 0x2f, 0xfd, 0, 0];
        d[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        d[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        d[0x410..0x416].copy_from_slice(&payload);
        d
    }

    #[test]
    fn reads_bzimage_header() {
        let d = fake_bzimage("6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP");
        let info = inspect(&d).unwrap();
        assert_eq!(info.release, "6.1.0-56-amd64");
        assert_eq!(
            info.kind,
            ImageKind::BzImage {
                payload: Some(Format::Zstd)
            }
        );
    }

    #[test]
    fn rejects_other_files() {
        assert!(matches!(
            inspect(b"#!/bin/sh\n"),
            Err(ImageError::NotAKernel)
        ));
        let mut arm = vec![0u8; 0x100];
        arm[0x38..0x3c].copy_from_slice(b"ARM\x64");
        assert!(matches!(inspect(&arm), Err(ImageError::NoVersion)));
        arm.extend_from_slice(b"Linux version 6.1.0-56-arm64 (debian) #1 SMP\0");
        let info = inspect(&arm).unwrap();
        assert_eq!((info.arch, info.kind), (Arch::Aarch64, ImageKind::Arm64));
        assert_eq!(info.release, "6.1.0-56-arm64");
        let mut zarm = Vec::new();
        {
            use std::io::Write;
            let mut z = flate2::write::GzEncoder::new(&mut zarm, flate2::Compression::fast());
            z.write_all(&arm).unwrap();
            z.finish().unwrap();
        }
        assert_eq!(inspect(&zarm).unwrap().release, "6.1.0-56-arm64");
    }

    #[test]
    fn finds_banner_not_format_string() {
        let d = b"xxLinux version %s\0yyLinux version 6.12.1-test (me@host) #1\0".to_vec();
        assert_eq!(elf_banner(&d).unwrap(), "6.12.1-test (me@host) #1");
    }
}
