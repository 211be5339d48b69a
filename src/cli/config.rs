//! The project file `.vexec.toml`: found in the working directory or an
//! enclosing directory up to the VCS root (nearest wins), parsed strictly
//! (unknown keys and wrong types name the file, line and key), with paths
//! taken relative to the file. Command-line flags override it; see
//! docs/config.md for every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file's name.
pub const FILE_NAME: &str = ".vexec.toml";

/// Directory entries that mark a VCS root.
const VCS_MARKERS: &[&str] = &[".git", ".hg", ".svn", ".jj", ".pijul", "_darcs"];

/// Everything `.vexec.toml` may say. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Default kernel (`-k`): a path (relative to the file) or a release.
    pub kernel: Option<String>,
    /// Default kernels for a matrix run (as `-k`, several).
    #[serde(default)]
    pub kernels: Vec<String>,
    /// Named kernel lists, used as `-k @name`.
    #[serde(default)]
    pub kernel_sets: BTreeMap<String, Vec<String>>,
    /// Module tree for that kernel (`--modules`).
    pub modules: Option<PathBuf>,
    pub memory: Option<String>,
    pub cpus: Option<u32>,
    pub accel: Option<String>,
    pub transport: Option<String>,
    pub virtiofsd: Option<PathBuf>,
    pub timeout: Option<String>,
    pub boot_timeout: Option<String>,
    /// How long output may still arrive after the command exited.
    pub output_grace: Option<String>,
    /// Share the working directory read-write (default true).
    pub cwd: Option<bool>,
    #[serde(default)]
    pub rw: Vec<PathBuf>,
    #[serde(default)]
    pub ro: Vec<PathBuf>,
    #[serde(default)]
    pub overlay: Vec<PathBuf>,
    /// Run the command as root in the guest.
    pub sudo: Option<bool>,
    /// Fail when the kernel logs a splat.
    pub fail_on_oops: Option<bool>,
    /// QEMU user-mode networking.
    pub net: Option<bool>,
    /// Always boot (no warm start).
    pub cold: Option<bool>,
    /// How TCG runs the vCPUs (`--tcg-threads`): "multi" or "single".
    pub tcg_threads: Option<String>,
    /// Size cap of saved booted guests (`--snapshot-cap`).
    pub snapshot_cap: Option<String>,
    /// TCP forwards, "HOST:GUEST".
    #[serde(default)]
    pub forward: Vec<String>,
    #[serde(default)]
    pub env: EnvConfig,
    #[serde(default)]
    pub kernel_args: Vec<String>,
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// Shell commands run as root in the guest before the command.
    #[serde(default)]
    pub setup: Vec<String>,
    /// Shell commands run as root in the guest after the command.
    #[serde(default)]
    pub teardown: Vec<String>,
}

/// The `[env]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Variables to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Variables to remove from the caller's environment.
    #[serde(default)]
    pub unset: Vec<String>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "kernel argument {0:?} contains a control character (a newline would reach the kernel as a separator between arguments); give each argument its own --kernel-arg"
    )]
    KernelArg(String),
    /// Options that cannot go together.
    #[error("{0}")]
    Conflict(String),
}

/// A loaded file and where it was.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: Config,
}

impl Loaded {
    /// The directory that relative paths in the file start from.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    /// `p` made absolute against the file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        self.dir().join(p)
    }

    /// The kernel reference: a release name as is, a path (anything with a
    /// slash) made absolute against the file's directory.
    pub fn kernel(&self) -> Option<String> {
        self.config.kernel.as_ref().map(|k| self.kernel_ref(k))
    }

    /// A kernel reference from the file, paths made absolute.
    pub fn kernel_ref(&self, k: &str) -> String {
        if k.contains('/') && !k.starts_with('@') {
            self.path(Path::new(k)).to_string_lossy().into_owned()
        } else {
            k.to_string()
        }
    }

    /// The `[kernel-sets]`, paths made absolute.
    pub fn kernel_sets(&self) -> BTreeMap<String, Vec<String>> {
        self.config
            .kernel_sets
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|r| self.kernel_ref(r)).collect()))
            .collect()
    }
}

/// The nearest `.vexec.toml` from `cwd` up to the enclosing VCS root (or
/// only `cwd` itself when there is no VCS root above it).
pub fn find(cwd: &Path) -> Option<PathBuf> {
    let has_vcs_root = cwd
        .ancestors()
        .any(|d| VCS_MARKERS.iter().any(|m| d.join(m).exists()));
    for dir in cwd.ancestors() {
        let candidate = dir.join(FILE_NAME);
        if candidate.is_file() {
            return Some(candidate);
        }
        if !has_vcs_root || VCS_MARKERS.iter().any(|m| dir.join(m).exists()) {
            return None;
        }
    }
    None
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config = parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(Loaded { path, config })
}

/// Parses the text; errors say the line, the column and the key.
pub fn parse(text: &str) -> Result<Config, String> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                let snippet = text[span.clone()].lines().next().unwrap_or("").trim();
                format!("line {line}, column {col}: {msg} (at `{snippet}`); see docs/config.md")
            }
            None => format!("{msg}; see docs/config.md"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = parse(
            r#"
kernel = "6.1.0-56-amd64"
memory = "2G"
cpus = 4
accel = "tcg"
transport = "virtiofs"
timeout = "5m"
boot-timeout = "90s"
cwd = false
rw = ["out"]
ro = ["data"]
overlay = ["."]
sudo = true
kernel-args = ["nokaslr"]
qemu-args = ["-s"]
setup = ["sysctl -w kernel.foo=1"]
teardown = ["dmesg | tail"]
[env]
set = { RUST_LOG = "debug" }
unset = ["HISTFILE"]
"#,
        )
        .unwrap();
        assert_eq!(c.cpus, Some(4));
        assert_eq!(c.cwd, Some(false));
        assert_eq!(c.env.set["RUST_LOG"], "debug");
        assert_eq!(c.setup.len(), 1);
        assert_eq!(c.boot_timeout.as_deref(), Some("90s"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_line_and_key() {
        let e = parse("memory = \"1G\"\ncpu = 4\n").unwrap_err();
        assert!(e.starts_with("line 2, column 1"), "{e}");
        assert!(e.contains("cpu"), "{e}");
        let e = parse("cpus = \"four\"\n").unwrap_err();
        assert!(e.starts_with("line 1"), "{e}");
        assert!(e.contains("cpus") || e.contains("four"), "{e}");
        let e = parse("[env]\nsett = {}\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("sett"), "{e}");
    }

    #[test]
    fn nearest_file_up_to_the_vcs_root() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        let sub = repo.join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir(repo.join(".git")).unwrap();
        // Above the VCS root: ignored.
        std::fs::write(d.path().join(FILE_NAME), "").unwrap();
        assert_eq!(find(&sub), None);
        std::fs::write(repo.join(FILE_NAME), "").unwrap();
        assert_eq!(find(&sub), Some(repo.join(FILE_NAME)));
        std::fs::write(repo.join("a").join(FILE_NAME), "").unwrap();
        assert_eq!(find(&sub), Some(repo.join("a").join(FILE_NAME)));
        // Outside any VCS tree: only the working directory counts.
        let lone = d.path().join("lone/x");
        std::fs::create_dir_all(&lone).unwrap();
        assert_eq!(find(&lone), None);
    }

    #[test]
    fn paths_are_relative_to_the_file() {
        let l = Loaded {
            path: "/p/.vexec.toml".into(),
            config: parse("kernel = \"build/bzImage\"\nrw = [\"out\"]\n").unwrap(),
        };
        assert_eq!(l.kernel().unwrap(), "/p/build/bzImage");
        assert_eq!(l.path(&l.config.rw[0]), Path::new("/p/out"));
        let l = Loaded {
            path: "/p/.vexec.toml".into(),
            config: parse("kernel = \"6.1.0-56-amd64\"\n").unwrap(),
        };
        assert_eq!(l.kernel().unwrap(), "6.1.0-56-amd64");
    }
}
