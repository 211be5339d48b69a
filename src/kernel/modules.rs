//! A kernel's module tree: finding modules by name, reading their `.modinfo`
//! (dependencies, aliases), decompressing them, ordering a set for loading,
//! and writing the `modules.dep`/`modules.alias` files that Debian's packages
//! leave out, so `modprobe` works in the guest.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use super::decompress;

/// Why the module tree could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module {name} ({path}) is damaged: {why}")]
    Bad {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("module {name} is needed (by {needed_by}) but is not in {tree}")]
    Missing {
        name: String,
        needed_by: String,
        tree: PathBuf,
    },
}

/// The module files of one kernel release.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    /// `/lib/modules/REL` or equivalent.
    pub root: PathBuf,
    /// Module name (with `_`, as the kernel spells it) → path relative to `root`.
    files: HashMap<String, PathBuf>,
    /// Names listed in `modules.builtin`.
    builtin: HashSet<String>,
}

/// The name the kernel gives a module file: basename without `.ko[.ext]`,
/// dashes folded to underscores.
pub fn module_name(file_name: &str) -> Option<String> {
    let stem = file_name
        .strip_suffix(".ko")
        .or_else(|| file_name.strip_suffix(".ko.xz"))
        .or_else(|| file_name.strip_suffix(".ko.zst"))
        .or_else(|| file_name.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

impl ModuleTree {
    /// Indexes the module files below `root` (names only; nothing is read).
    pub fn scan(root: &Path) -> Result<Self, ModuleError> {
        let mut files = HashMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let entries = std::fs::read_dir(&dir).map_err(|source| ModuleError::Io {
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    // A build tree's `source`/`build` links point back into it.
                    stack.push(rel.join(&*name));
                } else if let Some(m) = module_name(&name) {
                    files.entry(m).or_insert_with(|| rel.join(&*name));
                }
            }
        }
        let builtin = std::fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(l.rsplit('/').next()?))
            .collect();
        Ok(ModuleTree {
            root: root.to_path_buf(),
            files,
            builtin,
        })
    }

    /// The file of a module, relative to the root.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.files
            .get(&name.replace('-', "_"))
            .map(PathBuf::as_path)
    }

    /// True when `modules.builtin` lists the module.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Reads and decompresses one module by name.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, ModuleError> {
        let rel = self.path_of(name).ok_or_else(|| ModuleError::Missing {
            name: name.to_string(),
            needed_by: "vexec".into(),
            tree: self.root.clone(),
        })?;
        read_module_file(&self.root.join(rel), name)
    }

    /// The modules to load, dependencies first, so that `wanted` can all be
    /// loaded. Modules the kernel has built in are skipped.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<LoadableModule>, ModuleError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for w in wanted {
            self.visit(&w.replace('-', "_"), "vexec", &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        needed_by: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<LoadableModule>,
    ) -> Result<(), ModuleError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        if self.path_of(name).is_none() {
            if self.is_builtin(name) {
                return Ok(());
            }
            return Err(ModuleError::Missing {
                name: name.to_string(),
                needed_by: needed_by.to_string(),
                tree: self.root.clone(),
            });
        }
        let data = self.read(name)?;
        let info = ModInfo::parse(&data).map_err(|why| ModuleError::Bad {
            name: name.to_string(),
            path: self.root.join(self.path_of(name).unwrap()),
            why,
        })?;
        for dep in &info.depends {
            self.visit(dep, name, seen, order)?;
        }
        order.push(LoadableModule {
            name: name.to_string(),
            depends: info.depends,
            data,
        });
        Ok(())
    }
}

/// Generates kmod's index files (`modules.dep.bin`, `modules.alias.bin`...)
/// for the tree at `root` into the new directory `out`, with the host's
/// own `depmod`, without
/// writing into the tree: depmod runs on a private directory of symlinks.
/// The guest runs the host's userspace, so the host's kmod is the one whose
/// index format `modprobe` in the guest reads.
pub fn generate_index(
    root: &Path,
    release: &str,
    scratch: &Path,
    out: &Path,
) -> Result<(), String> {
    let depmod = [
        "/usr/sbin/depmod",
        "/sbin/depmod",
        "/usr/bin/depmod",
        "/bin/depmod",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.exists())
    .ok_or("depmod not found on the host (install kmod)")?;
    let base = tempfile::Builder::new()
        .prefix("depmod-")
        .tempdir_in(scratch)
        .map_err(|e| format!("creating a scratch directory in {}: {e}", scratch.display()))?;
    let dir = base.path().join("lib/modules").join(release);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        // Stale indexes in the tree would be read instead of regenerated.
        if name.to_string_lossy().ends_with(".bin") {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dir.join(&name)).map_err(|e| e.to_string())?;
    }
    let result = std::process::Command::new(depmod)
        .arg("-b")
        .arg(base.path())
        .arg(release)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", depmod.display()))?;
    if !result.status.success() {
        return Err(format!(
            "depmod failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        ));
    }
    std::fs::create_dir(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), out.join(entry.file_name()))
                .map_err(|e| format!("storing the index in {}: {e}", out.display()))?;
        }
    }
    Ok(())
}

/// Reads a module file, decompressing by its extension.
pub fn read_module_file(path: &Path, name: &str) -> Result<Vec<u8>, ModuleError> {
    let raw = std::fs::read(path).map_err(|source| ModuleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(b"\x7fELF") {
        return Ok(raw);
    }
    decompress::decompress_any(&raw).map_err(|e| ModuleError::Bad {
        name: name.to_string(),
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// A module ready to be put in the initramfs.
#[derive(Debug, Clone)]
pub struct LoadableModule {
    pub name: String,
    pub depends: Vec<String>,
    /// The uncompressed ELF object.
    pub data: Vec<u8>,
}

/// The parts of a module's `.modinfo` section vexec uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
    pub aliases: Vec<String>,
}

impl ModInfo {
    /// Parses the `.modinfo` section of an uncompressed module.
    pub fn parse(elf: &[u8]) -> Result<Self, String> {
        let file = object::File::parse(elf).map_err(|e| e.to_string())?;
        let section = file
            .section_by_name(".modinfo")
            .ok_or("no .modinfo section")?;
        let data = section.data().map_err(|e| e.to_string())?;
        Ok(Self::parse_section(data))
    }

    /// Parses NUL-separated `key=value` records.
    pub fn parse_section(data: &[u8]) -> Self {
        let mut info = ModInfo::default();
        for rec in data.split(|&b| b == 0) {
            let Ok(rec) = std::str::from_utf8(rec) else {
                continue;
            };
            let Some((k, v)) = rec.split_once('=') else {
                continue;
            };
            match k {
                "name" => info.name = Some(v.to_string()),
                "depends" => info.depends.extend(
                    v.split(',')
                        .filter(|d| !d.is_empty())
                        .map(|d| d.replace('-', "_")),
                ),
                "alias" => info.aliases.push(v.to_string()),
                _ => {}
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_modules_like_the_kernel() {
        assert_eq!(module_name("virtio_pci.ko").unwrap(), "virtio_pci");
        assert_eq!(module_name("9pnet-virtio.ko.xz").unwrap(), "9pnet_virtio");
        assert_eq!(module_name("overlay.ko.zst").unwrap(), "overlay");
        assert_eq!(module_name("x.ko.gz").unwrap(), "x");
        assert!(module_name("modules.dep").is_none());
    }

    #[test]
    fn parses_modinfo_records() {
        let data = b"license=GPL\0depends=virtio_pci_modern_dev,virtio-ring\0\0alias=pci:v00001AF4d*\0name=virtio_pci\0";
        let info = ModInfo::parse_section(data);
        assert_eq!(info.name.as_deref(), Some("virtio_pci"));
        assert_eq!(info.depends, ["virtio_pci_modern_dev", "virtio_ring"]);
        assert_eq!(info.aliases, ["pci:v00001AF4d*"]);
        let none = ModInfo::parse_section(b"depends=\0");
        assert!(none.depends.is_empty());
    }
}
