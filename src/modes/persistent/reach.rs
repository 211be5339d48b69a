//! A one-shot run that `vexec exec`, `vexec shell` and `vexec ps` reach
//! while it runs (a second shell into a hung test): the run registers as
//! `run-PID` beside the persistent VMs, its guest serves a few exec ports
//! beside the command, and the run's vexec lends them out as `up` does.
//! Reaching a run is a convenience: when it cannot be set up, the run
//! goes on unreachable (said with -v), never fails for it.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use crate::host::params::Server;

use crate::host::events::SignalRelay;
use crate::modes::spec::RunSpec;

use super::VmsError;
use super::registry::{self, Entry, Info};
use super::server::PortServer;

/// Commands that may run at once in a one-shot run beside its own.
pub const RUN_PORTS: usize = 2;

/// A run's registration; its directory goes when this is dropped.
pub struct Reach {
    entry: Entry,
    _lock: File,
    server: Arc<PortServer>,
}

impl Reach {
    /// Registers this run, or says with -v why it cannot be reached.
    pub fn open(
        spec: &RunSpec,
        kernel: &str,
        writable: Vec<PathBuf>,
        relay: &SignalRelay,
    ) -> Option<Reach> {
        match Reach::try_open(spec, kernel, writable, relay) {
            Ok(r) => Some(r),
            Err(e) => {
                if spec.verbose {
                    crate::say!("vexec: this run cannot be reached by `vexec exec`: {e}");
                }
                None
            }
        }
    }

    fn try_open(
        spec: &RunSpec,
        kernel: &str,
        writable: Vec<PathBuf>,
        relay: &SignalRelay,
    ) -> Result<Reach, VmsError> {
        let root = registry::root()?;
        registry::sweep_dead_runs(&root);
        let entry = Entry::new(&root, &format!("run-{}", std::process::id()));
        let lock = entry.claim()?;
        let command = (spec.argv.iter())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let info = Info {
            ports: RUN_PORTS,
            command: Some(command),
            ..Info::starting(entry.name(), kernel.to_string(), spec, writable)
        };
        let made = entry
            .write_info(&info)
            .and_then(|()| UnixListener::bind(entry.socket()));
        let listener = match made {
            Ok(l) => l,
            Err(e) => {
                entry.remove();
                return Err(VmsError::RuntimeDir {
                    path: entry.dir.clone(),
                    why: e.to_string(),
                });
            }
        };
        let on_ready = {
            let (entry, mut info) = (entry.clone(), info);
            Box::new(move |qemu_pid| entry.mark_ready(&mut info, qemu_pid))
        };
        let server = PortServer::new(listener, None, relay.clone(), None, on_ready);
        Ok(Reach {
            entry,
            _lock: lock,
            server: Arc::new(server),
        })
    }

    /// What serves the run's exec ports once the guest runs the command.
    pub fn server(&self) -> Arc<dyn Server> {
        self.server.clone()
    }
}

impl Drop for Reach {
    fn drop(&mut self) {
        self.entry.remove();
    }
}
