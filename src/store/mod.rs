//! The kernel store (`vexec kernel add|fetch|list|path|rm`): kernels kept
//! under the cache directory as `kernels/REL/{boot,lib/modules}`, the
//! layout of an unpacked package, so `-k REL` and patterns find them.
//!
//! Entries are assembled in a temporary directory beside the store and
//! renamed into place, so an interrupted add never leaves half an entry.

pub mod apt;
pub mod oci;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::artifacts;
use crate::artifacts::cache::{Cache, CacheError};
use crate::kernel::{self, ResolveError, resolve::Defaults};

/// Why the kernel store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error("{rel} is not in the kernel store ({}); see `vexec kernel list`", store.display())]
    NotStored { rel: String, store: PathBuf },
    #[error("{} does not exist; give a kernel image, build tree, unpacked package, tarball or .deb", .0.display())]
    Missing(PathBuf),
    #[error("no kernel image (vmlinuz*, bzImage) in {}", .0.display())]
    NoImage(PathBuf),
    #[error("{0} has no /boot/vmlinuz* or /boot/vmlinux*")]
    NoImageInOci(String),
    #[error("cannot tell the release of {}; is it a Linux kernel image?", .0.display())]
    NoRelease(PathBuf),
    #[error("apt-get could not download {0}; check the name with `apt-cache search linux-image`")]
    Download(String),
    #[error("apt-get downloaded no .deb for {0}")]
    NoDeb(String),
    /// A helper program (dpkg-deb, cp, apt-get) failed.
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Wraps an I/O error with what was being done.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// What `vexec kernel` does (see `vexec kernel --help`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelAction {
    /// Keep a kernel found at a path.
    Add {
        path: PathBuf,
    },
    /// Download a Debian package or an OCI image, for `arch` when given.
    Fetch {
        source: String,
        arch: Option<String>,
    },
    List,
    /// Print the image path of a stored release.
    Path {
        release: String,
    },
    /// Remove stored releases.
    Rm {
        releases: Vec<String>,
    },
}

/// `vexec kernel ACTION`; returns the exit status.
pub fn main(action: &KernelAction, cache_root: PathBuf) -> Result<i32, StoreError> {
    let cache = Cache::open(cache_root)?;
    let store = cache.root().join("kernels");
    match action {
        KernelAction::Add { path } => {
            let rel = add(&store, path, &path.to_string_lossy())?;
            crate::say!("vexec: added {rel}; run it with: vexec -k {rel} -- COMMAND");
        }
        KernelAction::Fetch { source, arch } => {
            let arch = arch.as_deref().map(debian_arch);
            let rel = match arch {
                Some(a) => fetch_with_own_apt(&store, source, a)?,
                None => fetch(&store, source)?,
            };
            match arch {
                Some(a) if a != debian_arch(std::env::consts::ARCH) => crate::say!(
                    "vexec: added {rel} ({a}); run programs in it with: vexec run-dir --arch {} -k {rel} DIR",
                    vexec_arch(a)
                ),
                _ => crate::say!("vexec: added {rel}; run it with: vexec -k {rel} -- COMMAND"),
            }
        }
        KernelAction::List => list(&cache, &store)?,
        KernelAction::Path { release } => {
            println!("{}", image_of(&store, release)?.display());
        }
        KernelAction::Rm { releases } => {
            for rel in releases {
                let dir = store.join(rel);
                if !dir.join("boot").is_dir() {
                    return Err(StoreError::NotStored {
                        rel: rel.clone(),
                        store,
                    });
                }
                std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
                crate::say!("vexec: removed {rel}");
            }
        }
    }
    Ok(0)
}

fn image_of(store: &Path, rel: &str) -> Result<PathBuf, StoreError> {
    let img = store.join(rel).join("boot").join(format!("vmlinuz-{rel}"));
    if img.is_file() {
        Ok(img)
    } else {
        Err(StoreError::NotStored {
            rel: rel.into(),
            store: store.into(),
        })
    }
}

/// A scratch directory beside the store, removed when dropped.
fn scratch(store: &Path) -> Result<tempfile::TempDir, StoreError> {
    std::fs::create_dir_all(store).map_err(io(format!("creating {}", store.display())))?;
    tempfile::Builder::new()
        .prefix(".incoming-")
        .tempdir_in(store)
        .map_err(io(format!(
            "creating a scratch directory in {}",
            store.display()
        )))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), StoreError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(io(what))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(StoreError::Tool {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().into(),
        })
    }
}

/// Resolves a kernel by its path only (never /boot or the store itself).
fn resolve_path(
    path: &Path,
    modules: Option<&Path>,
) -> Result<kernel::Kernel, kernel::ResolveError> {
    let defaults = Defaults {
        running: None,
        boot_dir: "/nonexistent".into(),
        store: None,
    };
    kernel::resolve(Some(&path.to_string_lossy()), modules, &defaults)
}

/// Unpacks a tarball, decompressing by its name (gzip, xz, zstd, bzip2).
fn untar(path: &Path, name: &str, dest: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let reader: Box<dyn Read> = if name.ends_with(".gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else if name.ends_with(".xz") || name.ends_with(".txz") {
        Box::new(liblzma::read::XzDecoder::new(file))
    } else if name.ends_with(".zst") {
        Box::new(zstd::Decoder::new(file)?)
    } else if name.ends_with(".bz2") {
        Box::new(bzip2::read::BzDecoder::new(file))
    } else {
        Box::new(file)
    };
    std::fs::create_dir_all(dest)?;
    tar::Archive::new(reader).unpack(dest)
}

/// Finds the kernel image inside an unpacked archive.
fn find_image(root: &Path) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    let mut found = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let ft = e.file_type().ok();
            if ft.is_some_and(|t| t.is_dir()) && name != "modules" && name != "debug" {
                stack.push(p);
            } else if name.starts_with("vmlinuz") || name == "bzImage" {
                found.push(p);
            }
        }
    }
    found.sort();
    found.into_iter().next()
}

/// Adds a kernel from `path`: an image, a build tree, an unpacked package
/// directory, a tarball, or a `.deb`. Returns its release.
pub fn add(store: &Path, path: &Path, source: &str) -> Result<String, StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing(path.into()));
    }
    let work = scratch(store)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unpacked = work.path().join("unpacked");
    let reference: PathBuf = if name.ends_with(".deb") {
        unpack_deb(path, &unpacked)?;
        unpacked.clone()
    } else if [
        ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.zst", ".tar.bz2",
    ]
    .iter()
    .any(|s| name.ends_with(s))
    {
        untar(path, &name, &unpacked).map_err(io(format!("unpacking {}", path.display())))?;
        // A package layout (boot/vmlinuz-*), else wherever the image is.
        if unpacked.join("boot").is_dir() {
            unpacked.clone()
        } else {
            find_image(&unpacked).ok_or_else(|| StoreError::NoImage(path.into()))?
        }
    } else {
        path.to_path_buf()
    };
    // drgn's packages put the module tree in `modules/` beside the image.
    let beside = reference
        .parent()
        .map(|d| d.join("modules"))
        .filter(|m| m.join("kernel").is_dir() || m.join("modules.order").is_file());
    let k = resolve_path(&reference, beside.as_deref())?;
    let rel = k.release().to_string();
    if rel.is_empty() || rel.contains('/') {
        return Err(StoreError::NoRelease(path.into()));
    }
    let entry = work.path().join("entry");
    let boot = entry.join("boot");
    std::fs::create_dir_all(&boot).map_err(io(format!("creating {}", boot.display())))?;
    std::fs::copy(&k.image, boot.join(format!("vmlinuz-{rel}")))
        .map_err(io(format!("copying {}", k.image.display())))?;
    if let Some(c) = &k.config {
        let _ = std::fs::copy(c, boot.join(format!("config-{rel}")));
    }
    if let Some(m) = &k.modules {
        let dest = entry.join("lib/modules");
        std::fs::create_dir_all(&dest).map_err(io(format!("creating {}", dest.display())))?;
        run(
            Command::new("cp").arg("-a").arg(m).arg(dest.join(&rel)),
            "copying the module tree",
        )?;
    }
    std::fs::write(entry.join("source"), format!("{source}\n"))
        .map_err(io(format!("writing {}", entry.join("source").display())))?;
    let target = store.join(&rel);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io(format!("replacing {}", target.display())))?;
    }
    std::fs::rename(&entry, &target).map_err(io(format!("storing {}", target.display())))?;
    Ok(rel)
}

/// Downloads a kernel: an OCI image reference (anything with a `/`, or
/// `oci://...`) through the registry API, else a package with `apt-get
/// download`; then adds it.
pub fn fetch(store: &Path, package: &str) -> Result<String, StoreError> {
    let work = scratch(store)?;
    if crate::store::oci::is_reference(package) {
        let root = work.path().join("image");
        let blobs = store.parent().unwrap_or(store).join("oci-blobs");
        crate::store::oci::pull(package, &root, &blobs)?;
        let image = crate::store::oci::image_in(&root)
            .ok_or_else(|| StoreError::NoImageInOci(package.into()))?;
        return add(store, &image, &format!("oci:{package}"));
    }
    crate::say!("vexec: downloading {package} with apt-get...");
    let status = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(work.path())
        .stdin(Stdio::null())
        .status()
        .map_err(io(
            "running apt-get (`vexec kernel fetch PACKAGE` needs apt)",
        ))?;
    if !status.success() {
        return Err(StoreError::Download(package.into()));
    }
    let deb = find_deb(work.path(), package)?;
    // A metapackage (linux-image-amd64, linux-image-cloud-amd64) holds no
    // kernel: follow it to the versioned image package it depends on.
    if let Some(next) = image_dependency(&deb)? {
        crate::say!("vexec: {package} is a metapackage for {next}");
        return fetch(store, &next);
    }
    add(store, &deb, &format!("apt:{package}"))
}

/// Unpacks a .deb's files into `into`.
pub fn unpack_deb(deb: &Path, into: &Path) -> Result<(), StoreError> {
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(into),
        &format!("unpacking {} with dpkg-deb", deb.display()),
    )
}

/// The .deb apt-get downloaded into `dir`.
fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, StoreError> {
    std::fs::read_dir(dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| StoreError::NoDeb(package.into()))
}

/// Debian's name for an architecture (`aarch64` is `arm64`).
pub fn debian_arch(arch: &str) -> &str {
    match arch {
        "aarch64" => "arm64",
        "x86_64" => "amd64",
        other => other,
    }
}

/// vexec's (and QEMU's) name for a Debian architecture.
fn vexec_arch(debian: &str) -> &str {
    match debian {
        "arm64" => "aarch64",
        "amd64" => "x86_64",
        other => other,
    }
}

/// The private apt of Debian architecture `arch`, its lists read.
pub fn own_apt(cache_root: &Path, arch: &str) -> Result<apt::PrivateApt, StoreError> {
    let sources = apt::host_sources(Path::new("/etc/apt"));
    let apt = apt::PrivateApt::new(&cache_root.join("apt").join(arch), arch, &sources)?;
    apt.update()?;
    Ok(apt)
}

/// `vexec kernel fetch --arch ARCH PACKAGE`: a kernel package of that
/// architecture through vexec's own apt configuration (a metapackage is
/// followed to its image), then added.
pub fn fetch_with_own_apt(store: &Path, package: &str, arch: &str) -> Result<String, StoreError> {
    let work = scratch(store)?;
    let apt = own_apt(store.parent().unwrap_or(store), arch)?;
    let mut deb = apt.download(package, work.path())?;
    if let Some(next) = image_dependency(&deb)? {
        crate::say!("vexec: {package} is a metapackage for {next}");
        std::fs::remove_file(&deb).map_err(io(format!("removing {}", deb.display())))?;
        deb = apt.download(&next, work.path())?;
    }
    add(store, &deb, &format!("apt:{package}:{arch}"))
}

/// For a package without a kernel image, the `linux-image-*` package it
/// depends on.
fn image_dependency(deb: &Path) -> Result<Option<String>, StoreError> {
    let contents = Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb)
        .output()
        .map_err(io("running dpkg-deb"))?;
    let listing = String::from_utf8_lossy(&contents.stdout);
    if listing.contains("/boot/vmlinuz") || listing.contains("/boot/vmlinux") {
        return Ok(None);
    }
    let depends = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .arg("Depends")
        .output()
        .map_err(io("running dpkg-deb"))?;
    Ok(String::from_utf8_lossy(&depends.stdout)
        .split(',')
        .map(|d| {
            d.trim()
                .split([' ', '(', '|'])
                .next()
                .unwrap_or("")
                .to_string()
        })
        .find(|d| d.starts_with("linux-image-")))
}

fn du(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn list(cache: &Cache, store: &Path) -> Result<(), StoreError> {
    let mut rels: Vec<String> = std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    rels.sort();
    if rels.is_empty() {
        crate::say!(
            "vexec: the kernel store ({}) is empty; add one with `vexec kernel add PATH` or `vexec kernel fetch PACKAGE`",
            store.display()
        );
        return Ok(());
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "{:<28} {:>8}  {:<7}  {:<3} {:<8} {:<3} {:<3}  SOURCE",
        "RELEASE", "SIZE", "ARCH", "9P", "VIRTIOFS", "PVH", "BTF"
    );
    for rel in rels {
        let dir = store.join(&rel);
        let source = std::fs::read_to_string(dir.join("source")).unwrap_or_default();
        let size = format!("{:.0}M", du(&dir) as f64 / (1 << 20) as f64);
        let img = dir.join("boot").join(format!("vmlinuz-{rel}"));
        let facts = resolve_path(&img, None)
            .ok()
            .and_then(|k| artifacts::inspect(cache, &k).ok().map(|i| (k, i)));
        match facts {
            Some((k, i)) => {
                let btf = k
                    .config
                    .as_deref()
                    .and_then(|c| std::fs::read_to_string(c).ok())
                    .is_some_and(|t| t.lines().any(|l| l == "CONFIG_DEBUG_INFO_BTF=y"));
                println!(
                    "{:<28} {:>8}  {:<7}  {:<3} {:<8} {:<3} {:<3}  {}",
                    rel,
                    size,
                    k.info.arch.name(),
                    yes(i.support.ninep.is_none()),
                    yes(i.support.virtiofs.is_none()),
                    yes(i.pvh),
                    yes(btf),
                    source.trim()
                );
            }
            None => println!("{rel:<28} {size:>8}  (unreadable)  {}", source.trim()),
        }
    }
    Ok(())
}
