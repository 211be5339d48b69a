//! `--output DIR`: the run's record on disk — the console log, the kernel
//! log, run.json, and a directory the command can write to
//! (`$VEXEC_OUTPUT`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::report::oops::Splat;

/// Where a run keeps its record.
#[derive(Debug, Clone)]
pub struct OutputDir {
    pub root: PathBuf,
}

/// run.json, for every mode: the facts all runs share, then the mode's own.
#[derive(Debug, Serialize)]
pub struct RunRecord<'a> {
    pub kernel: &'a Path,
    pub release: &'a str,
    pub banner: &'a str,
    pub accel: &'a str,
    pub qemu_command: String,
    /// vexec's exit status.
    pub exit_status: i32,
    /// How the run ended, in words.
    pub outcome: String,
    pub timings_ms: Timings,
    #[serde(flatten)]
    pub mode: ModeRecord<'a>,
}

impl<'a> RunRecord<'a> {
    /// The record of a run of `kernel` that last ran as `config`.
    pub fn new(
        kernel: &'a crate::kernel::Kernel,
        config: &crate::vm::qemu::QemuConfig,
        exit_status: i32,
        outcome: String,
        timings_ms: Timings,
        mode: ModeRecord<'a>,
    ) -> Self {
        RunRecord {
            kernel: &kernel.image,
            release: kernel.release(),
            banner: &kernel.info.banner,
            accel: config.accel.name(),
            qemu_command: crate::vm::qemu::shell_line(
                &config.binary,
                &crate::vm::qemu::argv(config),
            ),
            exit_status,
            outcome,
            timings_ms,
            mode,
        }
    }
}

/// What only one mode records.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ModeRecord<'a> {
    /// A command run over the host's files.
    Command {
        transport: &'a str,
        command: Vec<String>,
        splats: &'a [Splat],
    },
    /// `vexec run-dir`: programs from an initramfs.
    Batch {
        arch: &'a str,
        firmware: Option<&'a Path>,
        dir: PathBuf,
        busybox: Option<&'a Path>,
        tags: &'a [String],
        programs: &'a [super::programs::ProgramResult],
        coverage: Option<&'a super::programs::Saved>,
    },
}

/// Milliseconds spent in each phase; a phase a mode does not have is left
/// out.
#[derive(Debug, Default, Serialize)]
pub struct Timings {
    /// "warm" (a saved guest restored) or "cold" (booted).
    pub start: &'static str,
    pub host_prep: u64,
    /// Until the agent reported in (command runs; for a warm start, when
    /// the saved guest's agent did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_to_agent: Option<u64>,
    /// Until the guest's init reported in (run-dir).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_to_init: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<u64>,
    pub total: u64,
}

/// The record could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot create the output directory {}: {source}; pass a writable --output DIR", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}; the run's record is incomplete", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes `record` as pretty JSON to `path`.
pub fn write_json(path: &Path, record: &RunRecord) -> Result<(), RecordError> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other);
    json.and_then(|j| std::fs::write(path, j))
        .map_err(|source| RecordError::Write {
            path: path.to_path_buf(),
            source,
        })
}

impl OutputDir {
    /// Creates the directory (and `output/` in it) if needed.
    pub fn create(root: &Path) -> Result<OutputDir, RecordError> {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        std::fs::create_dir_all(root.join("output")).map_err(|source| RecordError::Create {
            path: root.clone(),
            source,
        })?;
        Ok(OutputDir { root })
    }

    /// The directory the command writes to, shared read-write.
    pub fn command_dir(&self) -> PathBuf {
        self.root.join("output")
    }

    /// The console log's path.
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// Writes dmesg.txt and run.json.
    pub fn finish(&self, kernel_log: Option<&[u8]>, record: &RunRecord) -> Result<(), RecordError> {
        if let Some(log) = kernel_log {
            let path = self.root.join("dmesg.txt");
            std::fs::write(&path, log).map_err(|source| RecordError::Write { path, source })?;
        }
        write_json(&self.root.join("run.json"), record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mode: ModeRecord<'_>, timings: Timings) -> serde_json::Value {
        let r = RunRecord {
            kernel: Path::new("/boot/vmlinuz"),
            release: "6.1",
            banner: "6.1 (gcc)",
            accel: "tcg",
            qemu_command: "qemu".into(),
            exit_status: 0,
            outcome: "exited with status 0".into(),
            timings_ms: timings,
            mode,
        };
        serde_json::to_value(&r).unwrap()
    }

    #[test]
    fn every_mode_writes_the_shared_facts_and_its_own() {
        let run = record(
            ModeRecord::Command {
                transport: "virtiofs",
                command: vec!["true".into()],
                splats: &[],
            },
            Timings {
                boot_to_agent: Some(5),
                command: Some(1),
                ..Timings::default()
            },
        );
        assert_eq!(run["transport"], "virtiofs");
        assert_eq!(run["release"], "6.1");
        assert_eq!(run["timings_ms"]["boot_to_agent"], 5);
        assert!(run["timings_ms"].get("boot_to_init").is_none());
        assert!(run.get("programs").is_none());

        let batch = record(
            ModeRecord::Batch {
                arch: "aarch64",
                firmware: None,
                dir: "/t".into(),
                busybox: None,
                tags: &["ci".to_string()],
                programs: &[],
                coverage: None,
            },
            Timings {
                boot_to_init: Some(7),
                ..Timings::default()
            },
        );
        assert_eq!(batch["arch"], "aarch64");
        assert_eq!(batch["tags"][0], "ci");
        assert_eq!(batch["exit_status"], 0);
        assert_eq!(batch["timings_ms"]["boot_to_init"], 7);
        assert!(batch.get("transport").is_none());
    }
}
