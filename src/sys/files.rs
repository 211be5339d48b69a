//! Files as more than one module needs them: what tells a rewritten file
//! from the one read before, and a lock only one process holds.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file's path and what changes when it is replaced or rewritten
/// (device, inode, size, mtime to the nanosecond), as bytes for a hash.
/// A missing file is its path alone.
pub fn identity(path: &Path) -> Vec<u8> {
    let mut v = path.as_os_str().as_bytes().to_vec();
    if let Ok(m) = std::fs::metadata(path) {
        for n in [m.dev(), m.ino(), m.len()] {
            v.extend(n.to_le_bytes());
        }
        v.extend((m.mtime() * 1_000_000_000 + m.mtime_nsec()).to_le_bytes());
    }
    v
}

/// Takes the exclusive flock of `f` without waiting: false while another
/// open file description holds it. The lock goes with the last descriptor.
pub fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a descriptor the caller owns.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}
