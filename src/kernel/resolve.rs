//! Turning what the user typed after `-k` into a [`Kernel`]: an image file,
//! a kernel build tree, an unpacked package directory, or an installed
//! release name; and choosing a default when nothing was given.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::Kernel;
use super::image::{self, ImageError};

/// Why no kernel could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "kernel {0} does not exist; give an image file, a build tree or a release installed in /boot"
    )]
    NotFound(String),
    #[error(
        "{path} is readable only by {owner}, so vexec (running as you) cannot boot it; make it readable (e.g. `sudo chmod a+r {path}`) or choose another kernel with -k"
    )]
    Unreadable { path: PathBuf, owner: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Image { path: PathBuf, source: ImageError },
    #[error(
        "{0} is a directory but not a kernel build tree (no arch/x86/boot/bzImage; run `make` there) nor an unpacked kernel package (no boot/vmlinuz-*)"
    )]
    NotAKernelDir(PathBuf),
    #[error("no release {release} in /boot (no /boot/vmlinuz-{release}){available}")]
    NoSuchRelease { release: String, available: String },
    #[error(
        "no kernel given and none found to use by default: {why}; choose one with -k PATH or -k RELEASE (scripts/fetch-test-kernels.sh fetches Debian's)"
    )]
    NoDefault { why: String },
    #[error("module directory {0} does not exist")]
    NoModules(PathBuf),
}

/// Where vexec looks for kernels when none is named, after /boot.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// The running kernel's release (`uname -r`).
    pub running: Option<String>,
    /// Directory holding installed images (normally `/boot`).
    pub boot_dir: PathBuf,
    /// Directory of unpacked kernel packages kept by vexec, one per subdirectory.
    pub store: Option<PathBuf>,
}

/// Resolves a kernel reference (or the default when `None`).
pub fn resolve(
    reference: Option<&str>,
    modules: Option<&Path>,
    defaults: &Defaults,
) -> Result<Kernel, ResolveError> {
    let mut kernel = match reference {
        None => default_kernel(defaults)?,
        Some(r) => {
            let path = expand_tilde(r);
            if path.is_dir() {
                from_dir(&path)?
            } else if path.exists() {
                from_image(&path, None)?
            } else if r.contains('/') {
                return Err(ResolveError::NotFound(r.to_string()));
            } else {
                from_release(r, &defaults.boot_dir, defaults.store.as_deref())?
            }
        }
    };
    if let Some(m) = modules {
        if !m.is_dir() {
            return Err(ResolveError::NoModules(m.to_path_buf()));
        }
        kernel.modules = Some(m.to_path_buf());
    }
    Ok(kernel)
}

fn expand_tilde(r: &str) -> PathBuf {
    match (r.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(r),
    }
}

/// Reads the start of an image file (enough for every header vexec reads).
fn read_image(path: &Path) -> Result<Vec<u8>, ResolveError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == ErrorKind::PermissionDenied {
            ResolveError::Unreadable {
                path: path.to_path_buf(),
                owner: owner_of(path),
            }
        } else {
            ResolveError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn owner_of(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) if m.uid() == 0 => "root".into(),
        Ok(m) => format!("uid {}", m.uid()),
        Err(_) => "its owner".into(),
    }
}

/// A kernel from an image file; modules from the tree it sits in, else the
/// system's module directories.
fn from_image(path: &Path, build_tree: Option<&Path>) -> Result<Kernel, ResolveError> {
    let data = read_image(path)?;
    let info = image::inspect(&data).map_err(|source| ResolveError::Image {
        path: path.to_path_buf(),
        source,
    })?;
    let content_hash = blake3::hash(&data).to_hex()[..32].to_string();
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let rel = info.release.clone();
    let dir = path.parent().unwrap_or(Path::new("/"));
    let (modules, config) = match build_tree {
        Some(tree) => (
            // A build tree's modules live beside their sources; modules.order
            // says they were built.
            tree.join("modules.order")
                .exists()
                .then(|| tree.to_path_buf()),
            Some(tree.join(".config")).filter(|c| c.exists()),
        ),
        None => {
            let up = dir.parent().unwrap_or(Path::new("/"));
            let candidates = [
                up.join("lib/modules").join(&rel),
                up.join("usr/lib/modules").join(&rel),
                PathBuf::from("/lib/modules").join(&rel),
                PathBuf::from("/usr/lib/modules").join(&rel),
            ];
            let modules = candidates.into_iter().find(|p| p.join("kernel").is_dir());
            let config = [dir.join(format!("config-{rel}")), dir.join(".config")]
                .into_iter()
                .find(|p| p.is_file());
            (modules, config)
        }
    };
    Ok(Kernel {
        image: path,
        info,
        modules,
        config,
        content_hash,
    })
}

fn from_dir(dir: &Path) -> Result<Kernel, ResolveError> {
    for built in ["arch/x86/boot/bzImage", "arch/arm64/boot/Image"] {
        let img = dir.join(built);
        if img.is_file() {
            return from_image(&img, Some(dir));
        }
    }
    let boot = dir.join("boot");
    if let Some(img) = newest_image(&boot, |_| true) {
        return from_image(&img, None);
    }
    Err(ResolveError::NotAKernelDir(dir.to_path_buf()))
}

fn from_release(
    release: &str,
    boot_dir: &Path,
    store: Option<&Path>,
) -> Result<Kernel, ResolveError> {
    let img = boot_dir.join(format!("vmlinuz-{release}"));
    if img.exists() {
        return from_image(&img, None);
    }
    // The kernel store: STORE/NAME/boot/vmlinuz-REL.
    let stored = store
        .and_then(|s| std::fs::read_dir(s).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("boot").join(format!("vmlinuz-{release}")))
        .find(|p| p.exists());
    if let Some(img) = stored {
        return from_image(&img, None);
    }
    let available: Vec<String> = images_in(boot_dir)
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(String::from)
        })
        .collect();
    let available = if available.is_empty() {
        String::new()
    } else {
        format!("; installed: {}", available.join(", "))
    };
    Err(ResolveError::NoSuchRelease {
        release: release.to_string(),
        available,
    })
}

fn images_in(dir: &Path) -> Vec<PathBuf> {
    image_files(dir, true)
}

/// Kernel images (`vmlinuz*`, `vmlinux*`) in `dir`, oldest release first;
/// with `versioned`, only names that carry a release (`vmlinuz-REL`).
pub fn image_files(dir: &Path, versioned: bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                ["vmlinuz", "vmlinux"]
                    .iter()
                    .any(|k| match n.strip_prefix(k) {
                        Some(rest) => !versioned || rest.starts_with('-'),
                        None => false,
                    })
            })
        })
        .filter(|p| p.is_file())
        .collect();
    v.sort_by(|a, b| version_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    v
}

fn newest_image(dir: &Path, ok: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    images_in(dir).into_iter().rev().find(|p| ok(p))
}

fn readable(p: &Path) -> bool {
    std::fs::File::open(p).is_ok()
}

fn default_kernel(d: &Defaults) -> Result<Kernel, ResolveError> {
    let mut why = Vec::new();
    if let Some(run) = &d.running {
        let img = d.boot_dir.join(format!("vmlinuz-{run}"));
        if readable(&img) {
            return from_image(&img, None);
        } else if img.exists() {
            why.push(format!(
                "{} is readable only by {}",
                img.display(),
                owner_of(&img)
            ));
        }
    }
    if let Some(img) = newest_image(&d.boot_dir, readable) {
        return from_image(&img, None);
    }
    let unreadable = images_in(&d.boot_dir);
    if !unreadable.is_empty() && why.is_empty() {
        why.push(format!(
            "the images in {} are readable only by root",
            d.boot_dir.display()
        ));
    }
    if let Some(store) = &d.store {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(store)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("boot").is_dir())
            .collect();
        dirs.sort_by(|a, b| version_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
        if let Some(img) = dirs
            .iter()
            .rev()
            .find_map(|dir| newest_image(&dir.join("boot"), readable))
        {
            return from_image(&img, None);
        }
    }
    if why.is_empty() {
        why.push(format!("{} holds no kernel image", d.boot_dir.display()));
    }
    Err(ResolveError::NoDefault {
        why: why.join("; "),
    })
}

/// Orders version-like strings so that `6.10` sorts after `6.9`.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, &str>> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits > 0 {
                out.push(Ok(rest[..digits].parse().unwrap_or(u64::MAX)));
                rest = &rest[digits..];
            } else {
                let n = rest
                    .find(|c: char| c.is_ascii_digit())
                    .unwrap_or(rest.len());
                out.push(Err(&rest[..n]));
                rest = &rest[n..];
            }
        }
        out
    }
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_naturally() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("vmlinuz-6.10.0", "vmlinuz-6.9.0"), Greater);
        assert_eq!(version_cmp("vmlinuz-6.1.0-56", "vmlinuz-6.1.0-9"), Greater);
        assert_eq!(version_cmp("a", "a"), Equal);
    }

    #[test]
    fn missing_things_are_clear_errors() {
        let d = Defaults {
            running: Some("9.9.9".into()),
            boot_dir: PathBuf::from("/nonexistent-boot"),
            store: None,
        };
        let e = resolve(Some("/no/such/vmlinuz"), None, &d).unwrap_err();
        assert!(matches!(e, ResolveError::NotFound(_)), "{e}");
        let e = resolve(Some("1.2.3-x"), None, &d).unwrap_err();
        assert!(e.to_string().contains("no release 1.2.3-x"), "{e}");
        let e = resolve(None, None, &d).unwrap_err();
        assert!(e.to_string().contains("choose one with -k"), "{e}");
    }

    /// A minimal bzImage header carrying `release`.
    fn fake_image(path: &Path, release: &str) {
        let mut d = vec![0u8; 0x1000];
        d[0x1f1] = 1;
        d[0x202..0x206].copy_from_slice(b"HdrS");
        d[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        d[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let banner = format!("{release} (test@host) #1");
        d[0x300..0x300 + banner.len()].copy_from_slice(banner.as_bytes());
        std::fs::write(path, d).unwrap();
    }

    #[test]
    fn releases_and_defaults_come_from_the_boot_dir() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir(&boot).unwrap();
        for r in ["6.9.0-1", "6.10.0-1", "6.1.0-56"] {
            fake_image(&boot.join(format!("vmlinuz-{r}")), r);
            std::fs::write(boot.join(format!("config-{r}")), "CONFIG_X=y\n").unwrap();
        }
        let d = Defaults {
            running: Some("6.1.0-56".into()),
            boot_dir: boot.clone(),
            store: None,
        };
        let k = resolve(Some("6.9.0-1"), None, &d).unwrap();
        assert_eq!(k.release(), "6.9.0-1");
        assert_eq!(k.config.unwrap(), boot.join("config-6.9.0-1"));
        // The running kernel first...
        assert_eq!(resolve(None, None, &d).unwrap().release(), "6.1.0-56");
        // ...else the newest.
        let d = Defaults {
            running: Some("5.0.0".into()),
            ..d
        };
        assert_eq!(resolve(None, None, &d).unwrap().release(), "6.10.0-1");
        let e = resolve(Some("7.0.0"), None, &d).unwrap_err().to_string();
        assert!(e.contains("installed: 6.1.0-56, 6.9.0-1, 6.10.0-1"), "{e}");
    }

    #[test]
    fn package_dirs_and_build_trees() {
        let dir = tempfile::tempdir().unwrap();
        // An unpacked package: boot/ and lib/modules/REL/kernel beside it.
        let pkg = dir.path().join("pkg");
        std::fs::create_dir_all(pkg.join("boot")).unwrap();
        std::fs::create_dir_all(pkg.join("lib/modules/6.1.0-9/kernel")).unwrap();
        fake_image(&pkg.join("boot/vmlinuz-6.1.0-9"), "6.1.0-9");
        let k = resolve(Some(pkg.to_str().unwrap()), None, &Defaults::default()).unwrap();
        assert_eq!(k.modules.unwrap(), pkg.join("lib/modules/6.1.0-9"));
        // A build tree: arch/x86/boot/bzImage, .config, modules.order.
        let tree = dir.path().join("linux");
        std::fs::create_dir_all(tree.join("arch/x86/boot")).unwrap();
        fake_image(&tree.join("arch/x86/boot/bzImage"), "6.13.0-rc1");
        std::fs::write(tree.join(".config"), "CONFIG_X=y\n").unwrap();
        std::fs::write(tree.join("modules.order"), "").unwrap();
        let k = resolve(Some(tree.to_str().unwrap()), None, &Defaults::default()).unwrap();
        assert_eq!(k.release(), "6.13.0-rc1");
        assert_eq!(k.modules.as_deref(), Some(tree.as_path()));
        assert_eq!(k.config.unwrap(), tree.join(".config"));
        // --modules overrides, and must exist.
        let e = resolve(
            Some(tree.to_str().unwrap()),
            Some(Path::new("/nonexistent")),
            &Defaults::default(),
        );
        assert!(matches!(e, Err(ResolveError::NoModules(_))));
    }

    #[test]
    fn a_non_kernel_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("notes.txt");
        std::fs::write(&f, "hello").unwrap();
        let e = resolve(Some(f.to_str().unwrap()), None, &Defaults::default()).unwrap_err();
        assert!(e.to_string().contains("not a Linux kernel image"), "{e}");
        let e = resolve(
            Some(dir.path().to_str().unwrap()),
            None,
            &Defaults::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ResolveError::NotAKernelDir(_)), "{e}");
    }
}
