//! The initramfs layout the host writes and the guest agent reads: where
//! the module list, the modules and a batch run's programs live, and the
//! formats of what is there.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where the guest agent finds its module list inside the initramfs.
pub const MODULE_LIST: &str = "vexec/modules.list";
/// Directory of module files inside the initramfs.
pub const MODULE_DIR: &str = "vexec/modules";
/// Batch runs (`vexec run-dir`): the programs to run, in name order.
pub const BATCH_DIR: &str = "vexec/run";
/// Batch runs in a foreign root: the 9p tag of the root to mount.
pub const ROOT_TAG_FILE: &str = "vexec/root.tag";

/// One line of the module list: a module and the modules it needs, in
/// the order they are to be loaded.
pub fn module_list_line(name: &str, depends: &[String]) -> String {
    format!("{name} {}\n", depends.join(","))
}

/// Parses the module list: (name, dependencies) per line.
pub fn parse_module_list(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?.to_string();
            let deps = parts
                .next()
                .map(|d| {
                    d.split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some((name, deps))
        })
        .collect()
}

/// The programs of `dir`: executable regular files, in byte order of
/// names. The host lists DIR with it, the guest the batch directory, so
/// both agree on what runs and in which order.
pub fn programs(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut found: Vec<(Vec<u8>, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let m = std::fs::metadata(&p)?;
        if m.is_file() && m.permissions().mode() & 0o111 != 0 {
            found.push((e.file_name().as_bytes().to_vec(), p));
        }
    }
    found.sort();
    Ok(found
        .into_iter()
        .map(|(n, p)| (String::from_utf8_lossy(&n).into_owned(), p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list_round_trips() {
        let deps = vec!["a".to_string(), "b_c".to_string()];
        let text = module_list_line("m", &deps) + &module_list_line("a", &[]);
        assert_eq!(
            parse_module_list(&text),
            vec![("m".into(), deps), ("a".into(), vec![])]
        );
    }
}
