//! The initramfs of a batch run: an init, the programs of DIR, the files
//! of `--add`, busybox when wanted, the modules the guest needs, nothing
//! else.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::artifacts::initramfs::{self, BATCH_DIR, Cpio, InitramfsError};
use crate::kernel::image::Arch;
use crate::kernel::modules::LoadableModule;
#[cfg(test)]
use crate::protocol::GuestMsg;
use crate::protocol::VERSION;

/// Where the shell init finds the tag of the root to mount.
use vexec_protocol::layout::ROOT_TAG_FILE;

/// The init of foreign-architecture guests (a busybox `sh` script).
const SHELL_INIT: &str = include_str!("init.sh");

/// Why the initramfs could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a directory; give the directory whose executables should run")]
    NotADir(PathBuf),
    #[error("{0} holds no executable files (the programs to run must have an execute bit)")]
    Empty(PathBuf),
    #[error("{path} is a program for {found}, but the guest is {arch}")]
    WrongArch {
        path: PathBuf,
        found: String,
        arch: &'static str,
    },
    #[error(
        "{0} is dynamically linked; a guest of a foreign architecture has no libraries for it: link it statically"
    )]
    Dynamic(PathBuf),
    #[error(
        "an {arch} guest runs its init with busybox, and none was given: pass --busybox PATH to a static {arch} busybox (vexec run-dir fetches Debian's busybox-static:{deb} itself when it can)"
    )]
    NoForeignBusybox {
        arch: &'static str,
        deb: &'static str,
    },
    #[error(
        "{0} needs busybox (a #! script), but no `busybox` is on PATH: install busybox-static or pass --busybox PATH"
    )]
    NoBusybox(String),
    #[error("--add {0}: expected SRC or SRC:DST with SRC an existing file or directory")]
    BadAdd(String),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PayloadError + '_ {
    move |source| PayloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What goes in.
pub struct Inputs<'a> {
    pub arch: Arch,
    pub dir: &'a Path,
    /// `--add` values, unparsed.
    pub adds: &'a [String],
    pub busybox: Option<&'a Path>,
    /// `PATH` to find a host busybox on.
    pub path_var: Option<&'a std::ffi::OsStr>,
    /// vexec's own executable (the init of host-architecture guests).
    pub agent: &'a Path,
    pub modules: &'a [LoadableModule],
    /// The 9p tag of a root filesystem for the init to mount and overlay
    /// at /vexec/root (foreign-architecture `--root`).
    pub root_tag: Option<&'a str>,
}

/// The assembled initramfs and what it holds.
pub struct Payload {
    pub bytes: Vec<u8>,
    /// Program names in the order they run.
    pub programs: Vec<String>,
    /// The busybox included, if any.
    pub busybox: Option<PathBuf>,
}

/// The programs of `dir`: executable regular files, in byte order of names.
pub fn programs(dir: &Path) -> Result<Vec<(String, PathBuf)>, PayloadError> {
    if !dir.is_dir() {
        return Err(PayloadError::NotADir(dir.to_path_buf()));
    }
    let found = vexec_protocol::layout::programs(dir).map_err(io(dir))?;
    if found.is_empty() {
        return Err(PayloadError::Empty(dir.to_path_buf()));
    }
    Ok(found)
}

/// The busybox init with the protocol's numbers and the initramfs layout
/// filled in.
fn shell_init() -> String {
    use vexec_protocol::layout;
    let mut script = SHELL_INIT
        .replace("@VERSION@", &VERSION.to_string())
        .replace("@MODULE_LIST@", layout::MODULE_LIST)
        .replace("@MODULE_DIR@", layout::MODULE_DIR)
        .replace("@BATCH_DIR@", layout::BATCH_DIR)
        .replace("@ROOT_TAG_FILE@", ROOT_TAG_FILE);
    for (name, tag) in vexec_protocol::batch_tags() {
        script = script.replace(&format!("@{name}@"), &tag.to_string());
    }
    script
}

/// What a program file is.
enum Kind {
    Script,
    Elf { arch: Option<Arch>, other: String },
    Other,
}

fn kind(data: &[u8]) -> Kind {
    if data.starts_with(b"#!") {
        return Kind::Script;
    }
    match object::File::parse(data) {
        Ok(f) => {
            use object::Object;
            let a = f.architecture();
            let arch = match a {
                object::Architecture::X86_64 => Some(Arch::X86_64),
                object::Architecture::Aarch64 => Some(Arch::Aarch64),
                _ => None,
            };
            Kind::Elf {
                arch,
                other: format!("{a:?}").to_lowercase(),
            }
        }
        Err(_) => Kind::Other,
    }
}

/// The architecture vexec itself runs on.
pub fn host_arch() -> Arch {
    if cfg!(target_arch = "aarch64") {
        Arch::Aarch64
    } else {
        Arch::X86_64
    }
}

/// Checks an ELF file is for `arch`; on the host's architecture, returns
/// the libraries it links, else refuses dynamic linking.
fn elf_needs(path: &Path, data: &[u8], arch: Arch) -> Result<Vec<PathBuf>, PayloadError> {
    let Kind::Elf { arch: found, other } = kind(data) else {
        return Ok(Vec::new());
    };
    if found != Some(arch) {
        return Err(PayloadError::WrongArch {
            path: path.to_path_buf(),
            found: found.map_or(other, |a| a.name().to_string()),
            arch: arch.name(),
        });
    }
    if arch == host_arch() {
        return Ok(initramfs::elf_dependencies(path)?);
    }
    let dynamic = object::File::parse(data).is_ok_and(|f| {
        use object::{Object, ObjectSection};
        f.section_by_name(".interp").is_some_and(|s| s.size() > 0)
    });
    if dynamic {
        return Err(PayloadError::Dynamic(path.to_path_buf()));
    }
    Ok(Vec::new())
}

/// `SRC[:DST]` → (SRC, DST in the guest).
pub fn parse_add(spec: &str) -> Result<(PathBuf, String), PayloadError> {
    let (src, dst) = match spec.rsplit_once(':') {
        Some((s, d)) if d.starts_with('/') => (s, Some(d.to_string())),
        _ => (spec, None),
    };
    let src = PathBuf::from(src);
    if src.as_os_str().is_empty() || std::fs::symlink_metadata(&src).is_err() {
        return Err(PayloadError::BadAdd(spec.to_string()));
    }
    let dst = match dst {
        Some(d) => d,
        None => format!(
            "/{}",
            src.file_name()
                .ok_or_else(|| PayloadError::BadAdd(spec.to_string()))?
                .to_string_lossy()
        ),
    };
    Ok((src, dst))
}

/// Adds `src` (a file, a symlink, or a directory recursively) at `dst`.
fn add_tree(cpio: &mut Cpio, src: &Path, dst: &str) -> Result<(), PayloadError> {
    let m = std::fs::symlink_metadata(src).map_err(io(src))?;
    if m.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(io(src))?;
        cpio.symlink(dst, target.as_os_str().as_bytes());
    } else if m.is_dir() {
        cpio.dir(dst);
        let mut entries: Vec<_> = std::fs::read_dir(src)
            .map_err(io(src))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        entries.sort();
        for name in entries {
            add_tree(
                cpio,
                &src.join(&name),
                &format!("{}/{}", dst.trim_end_matches('/'), name.to_string_lossy()),
            )?;
        }
    } else if m.is_file() {
        let data = std::fs::read(src).map_err(io(src))?;
        cpio.file(dst, m.permissions().mode(), &data);
    }
    Ok(())
}

/// Assembles the initramfs.
pub fn build(i: &Inputs) -> Result<Payload, PayloadError> {
    let programs = programs(i.dir)?;
    let foreign = i.arch != host_arch();
    let mut batch = Cpio::new();
    let mut libs: Vec<PathBuf> = Vec::new();
    let mut script: Option<&Path> = None;
    for (name, path) in &programs {
        let data = std::fs::read(path).map_err(io(path))?;
        if matches!(kind(&data), Kind::Script) {
            script.get_or_insert(path);
        }
        libs.extend(elf_needs(path, &data, i.arch)?);
        batch.file(&format!("{BATCH_DIR}/{name}"), 0o755, &data);
    }
    let busybox = match (i.busybox, foreign, script) {
        (Some(b), _, _) => Some(b.to_path_buf()),
        (None, true, _) => {
            let (arch, deb) = (i.arch.name(), "arm64");
            return Err(PayloadError::NoForeignBusybox { arch, deb });
        }
        (None, false, Some(s)) => Some(
            crate::sys::programs::on_path("busybox", i.path_var)
                .ok_or_else(|| PayloadError::NoBusybox(s.display().to_string()))?,
        ),
        (None, false, None) => None,
    };
    if let Some(b) = &busybox {
        let data = std::fs::read(b).map_err(io(b))?;
        libs.extend(elf_needs(b, &data, i.arch)?);
        batch.file("bin/busybox", 0o755, &data);
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        let data = std::fs::read(lib).map_err(io(lib))?;
        batch.file(&lib.to_string_lossy(), 0o755, &data);
    }
    if let Some(tag) = i.root_tag {
        batch.file(ROOT_TAG_FILE, 0o644, tag.as_bytes());
    }
    for spec in i.adds {
        let (src, dst) = parse_add(spec)?;
        add_tree(&mut batch, &src, &dst)?;
    }
    let mut bytes = if foreign {
        let mut base = Cpio::new();
        for d in ["dev", "proc", "sys", "tmp", "bin", "sbin"] {
            base.dir(d);
        }
        base.char_dev("dev/console", 0o600, 5, 1);
        base.char_dev("dev/null", 0o666, 1, 3);
        base.file("init", 0o755, shell_init().as_bytes());
        base.modules(i.modules);
        base.finish()
    } else {
        initramfs::build(i.agent, i.modules)?
    };
    // The kernel unpacks concatenated archives one after the other.
    bytes.extend_from_slice(&batch.finish());
    Ok(Payload {
        bytes,
        programs: programs.into_iter().map(|(n, _)| n).collect(),
        busybox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busybox_init_gets_every_number_and_path_filled_in() {
        let script = shell_init();
        assert!(!script.contains('@'), "a placeholder is left");
        // The values the host fills in are the protocol's own.
        let var = |name: &str| {
            script
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} not set"))
                .to_string()
        };
        let tag = |msg: GuestMsg| postcard::to_stdvec(&msg).unwrap()[0].to_string();
        assert_eq!(var("MSG_FINISHED"), tag(GuestMsg::Finished));
        assert_eq!(var("MSG_STDERR"), tag(GuestMsg::Stderr(vec![])));
        assert_eq!(var("MSG_BEGIN"), tag(GuestMsg::Begin { name: "x".into() }));
        assert_eq!(var("BATCH_DIR"), format!("/{BATCH_DIR}"));
        // Every message the script sends goes by name, none by number.
        for line in script.lines() {
            assert!(
                !line.contains("varint 0;") && !line.contains("send_file 2"),
                "{line}"
            );
        }
    }

    #[test]
    fn add_specs() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("mods");
        std::fs::create_dir(&f).unwrap();
        let s = f.to_str().unwrap();
        assert_eq!(parse_add(s).unwrap(), (f.clone(), "/mods".to_string()));
        assert_eq!(
            parse_add(&format!("{s}:/lib/modules")).unwrap(),
            (f.clone(), "/lib/modules".to_string())
        );
        assert!(parse_add("/nonexistent/x").is_err());
        assert!(parse_add("").is_err());
    }

    #[test]
    fn programs_in_name_order_only_executables() {
        let d = tempfile::tempdir().unwrap();
        for (n, mode) in [
            ("b", 0o755),
            ("a", 0o700),
            ("data.txt", 0o644),
            ("c", 0o555),
        ] {
            let p = d.path().join(n);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::create_dir(d.path().join("subdir")).unwrap();
        let names: Vec<String> = programs(d.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            programs(empty.path()),
            Err(PayloadError::Empty(_))
        ));
        assert!(matches!(
            programs(&d.path().join("a")),
            Err(PayloadError::NotADir(_))
        ));
    }

    #[test]
    fn the_missing_busybox_error_names_the_script_that_needs_it() {
        let d = tempfile::tempdir().unwrap();
        let agent = std::env::current_exe().unwrap();
        // A program that is no script comes first.
        std::fs::copy(&agent, d.path().join("a-binary")).unwrap();
        let script = d.path().join("b-script");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let i = Inputs {
            arch: host_arch(),
            dir: d.path(),
            adds: &[],
            busybox: None,
            path_var: Some(std::ffi::OsStr::new("")),
            agent: &agent,
            modules: &[],
            root_tag: None,
        };
        match build(&i) {
            Err(PayloadError::NoBusybox(p)) => assert!(p.ends_with("b-script"), "{p}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn foreign_guests_need_a_busybox() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let agent = std::env::current_exe().unwrap();
        let i = Inputs {
            arch: Arch::Aarch64,
            dir: d.path(),
            adds: &[],
            busybox: None,
            path_var: None,
            agent: &agent,
            modules: &[],
            root_tag: None,
        };
        assert!(matches!(
            build(&i),
            Err(PayloadError::NoForeignBusybox { .. })
        ));
        // The host's own programs are refused for a foreign guest.
        let i = Inputs {
            busybox: Some(&agent),
            ..i
        };
        assert!(matches!(build(&i), Err(PayloadError::WrongArch { .. })));
    }
}
