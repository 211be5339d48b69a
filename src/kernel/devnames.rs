//! A kernel's `modules.devname`: the device nodes a host makes at boot
//! (`kmod static-nodes`) so that opening one loads its module.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::protocol::DeviceNode;

/// The mode `kmod static-nodes` gives a node the host has no rule for.
const DEFAULT_MODE: u32 = 0o600;

/// The nodes listed in the first `modules.devname` found in `dirs`, each
/// with the mode and owner of the host's own node of the same device
/// (udev rules set those: /dev/net/tun and /dev/fuse are 0666), else
/// root's 0600.
pub fn nodes(dirs: &[&Path]) -> Vec<DeviceNode> {
    let Some(text) = dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("modules.devname")).ok())
    else {
        return Vec::new();
    };
    let mut nodes = parse(&text);
    for n in &mut nodes {
        let host = std::fs::metadata(Path::new("/dev").join(&n.path));
        if let Ok(m) = host {
            let same_kind = if n.char {
                m.file_type().is_char_device()
            } else {
                m.file_type().is_block_device()
            };
            let dev = m.rdev();
            if same_kind && libc::major(dev) == n.major && libc::minor(dev) == n.minor {
                (n.mode, n.uid, n.gid) = (m.mode() & 0o7777, m.uid(), m.gid());
            }
        }
    }
    nodes
}

/// Lines `MODULE PATH TYPEMAJOR:MINOR` (type `c` or `b`); others skipped.
fn parse(text: &str) -> Vec<DeviceNode> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (_module, path, dev) = (words.next()?, words.next()?, words.next()?);
            let char = match dev.as_bytes().first()? {
                b'c' => true,
                b'b' => false,
                _ => return None,
            };
            let (major, minor) = dev[1..].split_once(':')?;
            Some(DeviceNode {
                path: path.to_string(),
                char,
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mode: DEFAULT_MODE,
                uid: 0,
                gid: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kmod_format() {
        let n = parse(
            "# Device nodes to trigger on-demand module loading.\nfuse fuse c10:229\ntun net/tun c10:200\nbad line\nx y z1:2\nloop loop0 b7:0\n",
        );
        assert_eq!(n.len(), 3);
        assert_eq!(
            (n[1].path.as_str(), n[1].char, n[1].major, n[1].minor),
            ("net/tun", true, 10, 200)
        );
        assert_eq!((n[2].char, n[2].mode), (false, 0o600));
    }
}
