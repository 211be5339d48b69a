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
    /// The id of the next command: each reply is matched to its command
    /// by id, so a late reply to one that timed out is never read as the
    /// answer to the next.
    next_id: u64,
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
            next_id: 1,
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

    /// Runs `command` and returns its `return` value; events, and late
    /// replies to earlier commands, are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "execute": command, "arguments": arguments, "id": id });
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            if let Some(answer) = answer_to(id, command, &self.read()?) {
                return answer;
            }
        }
    }
}

/// `v` read as the answer to command `id` (`command`), or None when it is
/// something else: an event, or a reply to another command.
fn answer_to(id: u64, command: &str, v: &Value) -> Option<Result<Value, String>> {
    if v.get("id") != Some(&json!(id)) {
        return None;
    }
    if let Some(r) = v.get("return") {
        return Some(Ok(r.clone()));
    }
    let desc = (v.get("error"))
        .and_then(|e| e.get("desc"))
        .and_then(Value::as_str)
        .unwrap_or("failed");
    Some(Err(format!("QMP {command}: {desc}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_by_id() {
        // A late reply to a command that timed out, and an event: skipped.
        assert!(answer_to(2, "cont", &json!({"return": {}, "id": 1})).is_none());
        assert!(answer_to(2, "cont", &json!({"event": "RESUME"})).is_none());
        assert_eq!(
            answer_to(2, "cont", &json!({"return": {"a": 1}, "id": 2})),
            Some(Ok(json!({"a": 1})))
        );
        assert_eq!(
            answer_to(3, "migrate", &json!({"error": {"desc": "no"}, "id": 3})),
            Some(Err("QMP migrate: no".into()))
        );
    }
}
