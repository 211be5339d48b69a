//! The device nodes a host makes at boot for its kernel's modules
//! (`kmod static-nodes` from `modules.devname`: /dev/net/tun,
//! /dev/loop-control, /dev/uinput...). Opening one makes the kernel load
//! its module; without the node, tools that open it fail where they pass
//! on the host.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use vexec_protocol::DeviceNode;

/// Makes each node under /dev (after the root switch) that is not there
/// yet, with the host's mode and owner; a node that cannot be made is
/// said on the console and skipped: the command may not need it.
pub fn make(nodes: &[DeviceNode]) {
    for n in nodes {
        if let Err(e) = make_one(Path::new("/dev"), n) {
            eprintln!("vexec-init: warning: /dev/{}: {e}", n.path);
        }
    }
    if !nodes.is_empty() {
        super::step(&format!("{} module device nodes", nodes.len()));
    }
}

fn make_one(dev: &Path, n: &DeviceNode) -> std::io::Result<()> {
    let rel = Path::new(&n.path);
    // Only plain relative paths under /dev.
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(std::io::Error::other("not a path under /dev"));
    }
    let path = dev.join(rel);
    if path.symlink_metadata().is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let c = CString::new(path.as_os_str().as_bytes())?;
    let kind = if n.char { libc::S_IFCHR } else { libc::S_IFBLK };
    let mode = kind | (n.mode & 0o7777);
    // SAFETY: valid C string; mknod, chown and chmod take no other pointers.
    unsafe {
        if libc::mknod(c.as_ptr(), mode, libc::makedev(n.major, n.minor)) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // mknod applies the umask; the host's mode is what counts.
        if libc::chown(c.as_ptr(), n.uid, n.gid) < 0 || libc::chmod(c.as_ptr(), n.mode & 0o7777) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_dev_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../etc/x", "/etc/x", "a/../../x"] {
            let n = DeviceNode {
                path: bad.into(),
                char: true,
                major: 1,
                minor: 3,
                mode: 0o666,
                uid: 0,
                gid: 0,
            };
            assert!(make_one(dir.path(), &n).is_err(), "{bad}");
        }
    }
}
