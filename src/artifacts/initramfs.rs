//! The guest's initramfs: a cpio (newc) archive holding vexec itself as
//! `/init`, the shared libraries it links (so one `cargo install` suffices),
//! and the decompressed modules the guest must load before it can reach the
//! host, with their load order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::kernel::modules::LoadableModule;

pub use vexec_protocol::layout::{BATCH_DIR, MODULE_DIR, MODULE_LIST, parse_module_list};

/// Why the initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file vexec can inspect: {why}")]
    Elf { path: PathBuf, why: String },
    #[error(
        "vexec links {lib}, but it is in none of {searched}; is the C library installed normally?"
    )]
    MissingLib { lib: String, searched: String },
}

/// A cpio "newc" archive under construction.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so the archive is reproducible
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Adds a directory and its missing parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                let name = acc.clone();
                self.header(&name, 0o040755, 0, (0, 0));
            }
        }
    }

    /// Adds a regular file (parents created as needed).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o100000 | (mode & 0o7777), data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Adds a symbolic link (parents created as needed).
    pub fn symlink(&mut self, path: &str, target: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o120777, target.len(), (0, 0));
        self.buf.extend_from_slice(target);
        self.pad();
    }

    /// Adds the modules in load order, and the list the guest loads them by.
    pub fn modules(&mut self, modules: &[LoadableModule]) {
        let mut list = String::new();
        for m in modules {
            self.file(&format!("{MODULE_DIR}/{}.ko", m.name), 0o644, &m.data);
            list.push_str(&vexec_protocol::layout::module_list_line(
                &m.name, &m.depends,
            ));
        }
        self.file(MODULE_LIST, 0o644, list.as_bytes());
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, 0o020000 | (mode & 0o7777), 0, (major, minor));
    }

    /// Finishes the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Directories the dynamic loader searches by default on multiarch and
/// lib64 systems.
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The program interpreter and shared libraries (recursively) an ELF
/// executable needs, as absolute paths.
pub fn elf_dependencies(exe: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue = vec![exe.to_path_buf()];
    let mut first = true;
    while let Some(path) = queue.pop() {
        let data = std::fs::read(&path).map_err(|source| InitramfsError::Io {
            path: path.clone(),
            source,
        })?;
        let (interp, needed) = elf_links(&data).map_err(|why| InitramfsError::Elf {
            path: path.clone(),
            why,
        })?;
        if first {
            if let Some(i) = interp {
                out.push(PathBuf::from(i));
            }
            first = false;
        }
        for lib in needed {
            if !seen.insert(lib.clone()) {
                continue;
            }
            let found = LIB_DIRS
                .iter()
                .map(|d| Path::new(d).join(&lib))
                .find(|p| p.exists())
                .ok_or_else(|| InitramfsError::MissingLib {
                    lib: lib.clone(),
                    searched: LIB_DIRS.join(", "),
                })?;
            queue.push(found.clone());
            out.push(found);
        }
    }
    Ok(out)
}

/// PT_INTERP and DT_NEEDED of an ELF file.
fn elf_links(data: &[u8]) -> Result<(Option<String>, Vec<String>), String> {
    use object::read::elf::{Dyn, FileHeader, ProgramHeader, SectionHeader};
    let elf =
        object::elf::FileHeader64::<object::Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = elf.endian().map_err(|e| e.to_string())?;
    let mut interp = None;
    for ph in elf
        .program_headers(endian, data)
        .map_err(|e| e.to_string())?
    {
        if let Ok(Some(i)) = ph.interpreter(endian, data) {
            interp = Some(String::from_utf8_lossy(i).into_owned());
        }
    }
    let sections = elf.sections(endian, data).map_err(|e| e.to_string())?;
    let mut needed = Vec::new();
    for section in sections.iter() {
        if let Ok(Some((dynamic, link))) = section.dynamic(endian, data) {
            let strings = sections
                .strings(endian, data, link)
                .map_err(|e| e.to_string())?;
            for d in dynamic {
                if d.tag32(endian).map(i64::from) == Some(object::elf::DT_NEEDED.0)
                    && let Ok(name) = d.string(endian, strings)
                {
                    needed.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Ok((interp, needed))
}

/// `exe` without its debug sections: the agent's debuginfo would only
/// make every guest unpack and map more. Falls back to the file as it is.
pub fn strip_debug(exe: &[u8]) -> Vec<u8> {
    let stripped = (|| -> Option<Vec<u8>> {
        let mut builder = object::build::elf::Builder::read(exe).ok()?;
        let mut changed = false;
        for section in builder.sections.iter_mut() {
            let name = section.name.as_slice();
            if name.starts_with(b".debug_") || name == b".gdb_index" {
                section.delete = true;
                changed = true;
            }
        }
        if !changed {
            return None;
        }
        let mut out = Vec::with_capacity(exe.len() / 2);
        builder.write(&mut out).ok()?;
        Some(out)
    })();
    stripped.unwrap_or_else(|| exe.to_vec())
}

/// The executable the guest runs as its init: `vexec-agent` beside the
/// running vexec (a few MB less for every boot to unpack than vexec itself),
/// else vexec itself, which is the agent too when it runs as PID 1.
pub fn agent_executable() -> Result<PathBuf, crate::artifacts::PrepareError> {
    let me = std::env::current_exe().map_err(crate::artifacts::PrepareError::SelfExe)?;
    let agent = me.with_file_name("vexec-agent");
    Ok(if agent.is_file() { agent } else { me })
}

/// Builds the guest initramfs: `agent` as `/init`, its libraries, and
/// `modules` in load order.
pub fn build(agent: &Path, modules: &[LoadableModule]) -> Result<Vec<u8>, InitramfsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| InitramfsError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut cpio = Cpio::new();
    for d in ["dev", "proc", "sys", "newroot", "tmp", MODULE_DIR] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, &strip_debug(&read(agent)?));
    // The loader is both the interpreter (/lib64/...) and a library libc
    // names (/lib/<triplet>/...): the same file once, then links to it.
    let mut added: Vec<(PathBuf, PathBuf)> = Vec::new();
    for lib in elf_dependencies(agent)? {
        let real = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone());
        match added.iter().find(|(r, _)| *r == real) {
            Some((_, first)) => {
                cpio.symlink(&lib.to_string_lossy(), first.to_string_lossy().as_bytes())
            }
            None => {
                cpio.file(&lib.to_string_lossy(), 0o755, &read(&lib)?);
                added.push((real, lib));
            }
        }
    }
    cpio.modules(modules);
    Ok(cpio.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout_is_newc() {
        let mut c = Cpio::new();
        c.file("a/b", 0o644, b"hello");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        // parent directory first, then the file, then the trailer
        let a = text.find("a\0").unwrap();
        let b = text.find("a/b\0").unwrap();
        assert!(a < b && text.contains("hello") && text.contains("TRAILER!!!"));
        // header field 7 (filesize) of the file entry is 5
        let hdr = &out[b - 110..b];
        assert_eq!(&hdr[54..62], b"00000005");
    }

    #[test]
    fn finds_own_libraries() {
        let exe = std::env::current_exe().unwrap();
        let deps = elf_dependencies(&exe).unwrap();
        assert!(
            deps.iter().any(|p| p.to_string_lossy().contains("libc.so")),
            "{deps:?}"
        );
    }

    #[test]
    fn stripping_keeps_a_valid_elf() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let stripped = strip_debug(&exe);
        assert!(stripped.len() <= exe.len());
        let (interp, needed) = elf_links(&stripped).unwrap();
        assert_eq!((interp, needed), elf_links(&exe).unwrap());
    }

    #[test]
    fn each_library_file_is_stored_once() {
        let exe = std::env::current_exe().unwrap();
        let cpio = build(&exe, &[]).unwrap();
        let size = strip_debug(&std::fs::read(&exe).unwrap()).len();
        let libs: usize = elf_dependencies(&exe)
            .unwrap()
            .iter()
            .map(|l| std::fs::canonicalize(l).unwrap())
            .collect::<BTreeSet<_>>()
            .iter()
            .map(|l| std::fs::metadata(l).unwrap().len() as usize)
            .sum();
        // The (stripped) agent plus each distinct library once, headers aside.
        assert!(cpio.len() < size + libs + 64 * 1024, "{}", cpio.len());
    }

    #[test]
    fn module_list_round_trip() {
        let l = parse_module_list("virtio \n9p 9pnet,netfs\n");
        assert_eq!(l[0], ("virtio".to_string(), vec![]));
        assert_eq!(l[1].1, ["9pnet", "netfs"]);
    }
}
