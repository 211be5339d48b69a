//! A minimal QMP (QEMU Machine Protocol) client over an inherited socket:
//! the handshake, and commands that wait for their answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{Value, json};

/// A QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads QEMU's greeting and enters command mode.
    pub fn connect(stream: UnixStream, timeout: Duration) -> Result<Qmp, String> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("QMP: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP: {e}"))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: QEMU closed the monitor".into()),
            Ok(_) => {
                serde_json::from_str(&line).map_err(|e| format!("QMP: bad reply {line:?}: {e}"))
            }
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `command` and returns its `return` value; events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!(
                    "QMP {command}: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("failed")
                ));
            }
            // An asynchronous event: keep reading.
        }
    }
}

/// Writes the guest's memory to `path` as an ELF core file (what drgn and
/// crash read), stopping the guest first.
pub fn dump_guest_memory(q: &mut Qmp, path: &std::path::Path) -> Result<(), String> {
    let _ = q.execute("stop", json!({}));
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    q.execute(
        "dump-guest-memory",
        json!({ "paging": false, "protocol": format!("file:{}", abs.display()) }),
    )?;
    Ok(())
}

/// A QMP monitor connected on first use: the greeting waits in the socket
/// until then, so a run that never needs QMP never waits for it.
pub struct LazyQmp {
    stream: Option<UnixStream>,
    session: Option<Qmp>,
}

impl LazyQmp {
    /// A monitor on `stream`, or none.
    pub fn new(stream: Option<UnixStream>) -> Self {
        LazyQmp {
            stream,
            session: None,
        }
    }

    /// The session, connecting it the first time; each command then waits
    /// at most `timeout` for its answer.
    pub fn get(&mut self, timeout: Duration) -> Result<&mut Qmp, String> {
        if self.session.is_none() {
            let stream = self
                .stream
                .take()
                .ok_or("QMP: no monitor was set up for this machine")?;
            self.session = Some(Qmp::connect(stream, timeout)?);
        }
        let q = self.session.as_mut().ok_or("QMP: not connected")?;
        q.writer
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("QMP: {e}"))?;
        Ok(q)
    }
}
