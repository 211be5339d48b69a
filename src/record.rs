//! `--output DIR`: the run's record on disk — the console log, the kernel
//! log, run.json, and a directory the command can write to
//! (`$VEXEC_OUTPUT`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::oops::Splat;

/// Where a run keeps its record.
#[derive(Debug, Clone)]
pub struct OutputDir {
    pub root: PathBuf,
}

/// run.json.
#[derive(Debug, Serialize)]
pub struct RunRecord<'a> {
    pub kernel: &'a Path,
    pub release: &'a str,
    pub banner: &'a str,
    pub transport: &'a str,
    pub accel: &'a str,
    pub command: Vec<String>,
    pub qemu_command: String,
    /// vexec's exit status.
    pub exit_status: i32,
    /// How the run ended, in words.
    pub outcome: String,
    pub timings_ms: Timings,
    pub splats: &'a [Splat],
}

/// Milliseconds spent in each phase.
#[derive(Debug, Default, Serialize)]
pub struct Timings {
    pub host_prep: u64,
    pub boot_to_agent: u64,
    pub command: u64,
    pub total: u64,
}

impl OutputDir {
    /// Creates the directory (and `output/` in it) if needed.
    pub fn create(root: &Path) -> Result<OutputDir, String> {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        std::fs::create_dir_all(root.join("output")).map_err(|e| {
            format!(
                "cannot create the output directory {}: {e}; pass a writable --output DIR",
                root.display()
            )
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
    pub fn finish(&self, kernel_log: Option<&[u8]>, record: &RunRecord) -> Result<(), String> {
        let write = |name: &str, data: &[u8]| {
            std::fs::write(self.root.join(name), data)
                .map_err(|e| format!("writing {}: {e}", self.root.join(name).display()))
        };
        if let Some(log) = kernel_log {
            write("dmesg.txt", log)?;
        }
        let json = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
        write("run.json", &json)
    }
}
