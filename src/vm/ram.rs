//! Guest RAM kept apart from QEMU's migration stream: a memfd vexec owns
//! and QEMU maps shared (what vhost-user devices need), saved as an image
//! of its non-zero pages and loaded into a new memfd for each restore.
//!
//! Image layout: the pages' bytes, run after run; then a table of runs
//! (offset, length: u64 little-endian each); then a trailer of the run
//! count, the RAM size and [`MAGIC`]. Reading the trailer first lets the
//! image be written in one pass.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Marks an image (and its format's version).
const MAGIC: &[u8; 8] = b"VXRAM001";
/// The unit of "touched": a page of the guest.
const PAGE: usize = 4096;
/// How much is read at a time when saving.
const CHUNK: usize = 1 << 20;
const TRAILER: u64 = 24;

/// Why an image could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("guest RAM: {0}")]
    Io(#[from] std::io::Error),
    #[error("the saved guest RAM image is damaged: {0}")]
    Damaged(String),
}

/// A new, empty shared-memory file for a guest's RAM (QEMU sizes it).
pub fn new_shared() -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name; the descriptor is new and ours.
    let fd = unsafe { libc::memfd_create(c"vexec-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Writes the non-zero pages of `ram` (a stopped guest's) to `out`;
/// returns how many bytes of pages were written. Only extents the file
/// has are read: reading a hole of a memfd allocates nothing.
pub fn save(ram: &File, out: &Path) -> Result<u64, RamError> {
    let size = ram.metadata()?.len();
    let mut w = BufWriter::with_capacity(CHUNK, File::create(out)?);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while let Some((data, hole)) = extent(ram, pos, size)? {
        let mut off = data;
        while off < hole {
            let n = CHUNK.min((hole - off) as usize);
            ram.read_exact_at(&mut buf[..n], off)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if is_zero(page) {
                    continue;
                }
                let at = off + (i * PAGE) as u64;
                match runs.last_mut() {
                    Some((start, len)) if *start + *len == at => *len += page.len() as u64,
                    _ => runs.push((at, page.len() as u64)),
                }
                w.write_all(page)?;
            }
            off += n as u64;
        }
        pos = hole;
    }
    for (start, len) in &runs {
        w.write_all(&start.to_le_bytes())?;
        w.write_all(&len.to_le_bytes())?;
    }
    w.write_all(&(runs.len() as u64).to_le_bytes())?;
    w.write_all(&size.to_le_bytes())?;
    w.write_all(MAGIC)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(runs.iter().map(|r| r.1).sum())
}

/// Fills `ram` (new and empty) from `image` and sizes it as the saved one.
pub fn load(image: &File, ram: &File) -> Result<(), RamError> {
    let (runs, size) = table(image)?;
    ram.set_len(size)?;
    let mut from = 0u64;
    for (at, len) in runs {
        copy(image, from, ram, at, len)?;
        from += len;
    }
    Ok(())
}

/// An image's runs and RAM size, checked against the image's length.
fn table(image: &File) -> Result<(Vec<(u64, u64)>, u64), RamError> {
    let damaged = |why: &str| RamError::Damaged(why.to_string());
    let len = image.metadata()?.len();
    if len < TRAILER {
        return Err(damaged("shorter than its trailer"));
    }
    let mut trailer = [0u8; TRAILER as usize];
    image.read_exact_at(&mut trailer, len - TRAILER)?;
    if &trailer[16..] != MAGIC {
        return Err(damaged("no image trailer"));
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let (count, size) = (word(&trailer[..8]), word(&trailer[8..16]));
    let table_len = count
        .checked_mul(16)
        .filter(|t| t + TRAILER <= len)
        .ok_or_else(|| damaged("its run table is longer than the image"))?;
    let mut raw = vec![0u8; table_len as usize];
    image.read_exact_at(&mut raw, len - TRAILER - table_len)?;
    let runs: Vec<(u64, u64)> = raw
        .chunks(16)
        .map(|r| (word(&r[..8]), word(&r[8..])))
        .collect();
    let (mut end, mut total) = (0u64, 0u64);
    for &(at, n) in &runs {
        if at < end || at.checked_add(n).is_none_or(|e| e > size) {
            return Err(damaged("its runs overlap or pass the end of RAM"));
        }
        end = at + n;
        total += n;
    }
    if total != len - TRAILER - table_len {
        return Err(damaged("its pages and its run table disagree"));
    }
    Ok((runs, size))
}

/// The next extent of data at or after `pos`: (start, end), or None.
fn extent(f: &File, pos: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    if pos >= size {
        return Ok(None);
    }
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own.
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((data as u64, (hole as u64).min(size))))
}

/// Copies `len` bytes at `from` in `src` to `at` in `dst`, in the kernel.
fn copy(src: &File, from: u64, dst: &File, at: u64, len: u64) -> std::io::Result<()> {
    let (mut from, mut done) = (from as libc::off_t, 0u64);
    // SAFETY: lseek on a descriptor we own.
    if unsafe { libc::lseek(dst.as_raw_fd(), at as libc::off_t, libc::SEEK_SET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: valid descriptors and a valid offset pointer.
        let n = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut from, want) };
        match n {
            n if n > 0 => done += n as u64,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    // Wide words: a page is compared a few times faster than byte by byte.
    // SAFETY: every bit pattern is a valid u128.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memfd of `size` bytes with `pages` (index, byte) written.
    fn ram(size: u64, pages: &[(u64, u8)]) -> File {
        let f = new_shared().unwrap();
        f.set_len(size).unwrap();
        for &(i, b) in pages {
            f.write_all_at(&vec![b; PAGE], i * PAGE as u64).unwrap();
        }
        f
    }

    fn bytes(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn saves_touched_pages_only_and_loads_them_back() {
        let d = tempfile::tempdir().unwrap();
        // Pages 1-2 adjacent (one run), 5 written with zeros (skipped), 9.
        let src = ram(16 * PAGE as u64, &[(1, 7), (2, 8), (5, 0), (9, 0xff)]);
        let image = d.path().join("ram");
        assert_eq!(save(&src, &image).unwrap(), 3 * PAGE as u64);
        let (runs, size) = table(&File::open(&image).unwrap()).unwrap();
        assert_eq!(
            runs,
            [
                (PAGE as u64, 2 * PAGE as u64),
                (9 * PAGE as u64, PAGE as u64)
            ]
        );
        assert_eq!(size, 16 * PAGE as u64);
        let dst = new_shared().unwrap();
        load(&File::open(&image).unwrap(), &dst).unwrap();
        assert_eq!(bytes(&dst), bytes(&src));
    }

    #[test]
    fn an_empty_guest_is_an_empty_image() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("ram");
        assert_eq!(save(&ram(8 * PAGE as u64, &[]), &image).unwrap(), 0);
        let dst = new_shared().unwrap();
        load(&File::open(&image).unwrap(), &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 8 * PAGE as u64);
    }

    #[test]
    fn damaged_images_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("ram");
        save(&ram(8 * PAGE as u64, &[(3, 1)]), &image).unwrap();
        let good = std::fs::read(&image).unwrap();
        let try_load = |bytes: &[u8]| {
            std::fs::write(&image, bytes).unwrap();
            load(&File::open(&image).unwrap(), &new_shared().unwrap())
        };
        // Truncated, a page short, garbage, a run past the end of RAM.
        assert!(try_load(&good[..good.len() - 1]).is_err());
        assert!(try_load(&good[PAGE..]).is_err());
        assert!(try_load(b"not an image at all, not at all").is_err());
        let mut past = good.clone();
        let run = good.len() - 24 - 16;
        past[run..run + 8].copy_from_slice(&(8 * PAGE as u64).to_le_bytes());
        assert!(matches!(try_load(&past), Err(RamError::Damaged(_))));
        assert!(try_load(&good).is_ok());
    }
}
