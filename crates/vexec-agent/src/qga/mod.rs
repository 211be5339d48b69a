//! The QEMU guest agent's protocol, served by vexec's own agent (no qemu-ga
//! in the guest): JSON requests `{"execute": NAME, "arguments": {...}}`
//! on the `org.qemu.guest_agent.0` port, answered `{"return": ...}` or
//! `{"error": {"class": ..., "desc": ...}}` one per line, as qemu-ga 7.2
//! answers them (checked against it by the tests).

mod args;
mod commands;
mod exec;
mod file;
mod json;
mod stream;

use std::io::{Read, Write};
use std::path::Path;

use serde_json::{Value, json};

pub use args::QgaError;

/// Serves the port until it cannot be read any more.
pub fn serve(dev: &Path) {
    let port = std::fs::OpenOptions::new().read(true).write(true).open(dev);
    let mut port = match port {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vexec-init: error: opening {}: {e}", dev.display());
            return;
        }
    };
    let mut state = commands::State::default();
    let mut splitter = stream::Splitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match port.read(&mut buf) {
            // Nobody connected on the host: wait for someone.
            Ok(0) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut replies = Vec::new();
        splitter.feed(&buf[..n], &mut |piece| {
            replies.extend(answer(&mut state, piece))
        });
        for r in replies {
            if write_reply(&mut port, &r).is_err() {
                return;
            }
        }
        if state.shutdown {
            super::sys::sync();
            super::sys::power_off();
        }
    }
}

/// The reply to one piece of the stream, if it gets one.
fn answer(state: &mut commands::State, piece: stream::Piece) -> Option<Reply> {
    let parse_error = |what: String| {
        Some(Reply::error(QgaError::generic(format!(
            "JSON parse error, {what}"
        ))))
    };
    match piece {
        stream::Piece::Value(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => request(state, v),
            Err(e) => parse_error(e.to_string()),
        },
        // A number or literal is valid JSON, just not a request.
        stream::Piece::Word(w) => match serde_json::from_slice::<Value>(&w) {
            Ok(v) => request(state, v),
            Err(_) => parse_error(format!("invalid keyword '{}'", String::from_utf8_lossy(&w))),
        },
        stream::Piece::Stray(c) => parse_error(format!("stray '{c}'")),
        // qemu-ga's words; it then reads the rest of the request as new
        // input, where this skips it.
        stream::Piece::TooLong => Some(Reply::error(QgaError::generic(
            "JSON token size limit exceeded",
        ))),
    }
}

/// A reply to write: an optional 0xFF before it (`guest-sync-delimited`),
/// and the request's `id`, which qemu-ga echoes in every reply to a
/// request that is an object, success or error alike.
pub struct Reply {
    delimited: bool,
    id: Option<Value>,
    body: Result<Value, QgaError>,
}

impl Reply {
    fn error(e: QgaError) -> Reply {
        Reply {
            delimited: false,
            id: None,
            body: Err(e),
        }
    }

    /// The reply as a JSON value (keys unordered), for tests.
    #[cfg(test)]
    fn value(&self) -> Value {
        let mut v = match &self.body {
            Ok(r) => json!({ "return": r }),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        if let Some(id) = &self.id {
            v["id"] = id.clone();
        }
        v
    }
}

fn request(state: &mut commands::State, v: Value) -> Option<Reply> {
    let Value::Object(mut obj) = v else {
        return Some(Reply::error(QgaError::generic(
            "QMP input must be a JSON object",
        )));
    };
    // Taken first: even a request refused for its shape gets its id back.
    let id = obj.remove("id");
    let mut reply = checked(state, obj)?;
    reply.id = id;
    Some(reply)
}

/// The reply to a request object (its `id` taken out).
fn checked(state: &mut commands::State, mut obj: serde_json::Map<String, Value>) -> Option<Reply> {
    let generic = |desc: String| Some(Reply::error(QgaError::generic(desc)));
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return generic("QMP input member 'execute' must be a string".into()),
        None => return generic("QMP input lacks member 'execute'".into()),
    };
    let arguments = match obj.remove("arguments") {
        None => serde_json::Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return generic("QMP input member 'arguments' must be an object".into()),
    };
    if let Some(k) = obj.keys().next() {
        return generic(format!("QMP input member '{k}' is unexpected"));
    }
    let answer = commands::run(state, &name, args::Args::new(arguments))?;
    Some(Reply {
        delimited: name == "guest-sync-delimited" && answer.is_ok(),
        id: None,
        body: answer,
    })
}

/// Writes `r` with qemu-ga's key order: `{"return": R, "id": I}` and
/// `{"id": I, "error": E}`.
fn write_reply(port: &mut std::fs::File, r: &Reply) -> std::io::Result<()> {
    let mut out = Vec::new();
    if r.delimited {
        out.push(0xff);
    }
    let id = match &r.id {
        Some(id) => Some(json::to_vec(id)?),
        None => None,
    };
    match &r.body {
        Ok(v) => {
            out.extend_from_slice(b"{\"return\": ");
            out.extend(json::to_vec(v)?);
            if let Some(id) = &id {
                out.extend_from_slice(b", \"id\": ");
                out.extend_from_slice(id);
            }
        }
        Err(e) => {
            out.push(b'{');
            if let Some(id) = &id {
                out.extend_from_slice(b"\"id\": ");
                out.extend_from_slice(id);
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(b"\"error\": ");
            out.extend(json::to_vec(&json!({"class": e.class, "desc": e.desc}))?);
        }
    }
    out.extend_from_slice(b"}\n");
    port.write_all(&out)?;
    port.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(line: &str) -> Vec<Value> {
        let mut s = commands::State::default();
        let mut got = Vec::new();
        let mut splitter = stream::Splitter::default();
        splitter.feed(line.as_bytes(), &mut |p| got.extend(answer(&mut s, p)));
        splitter.feed(b"\n", &mut |p| got.extend(answer(&mut s, p)));
        got.into_iter().map(|r| r.value()).collect()
    }

    #[test]
    fn answers_like_qemu_ga() {
        assert_eq!(
            ask(r#"{"execute":"guest-sync","arguments":{"id":123}}"#),
            [json!({"return": 123})]
        );
        assert_eq!(
            ask(r#"{"execute":"guest-nonesuch"}"#)[0]["error"]["class"],
            "CommandNotFound"
        );
        assert_eq!(
            ask(r#"{"execute":"guest-sync"}"#)[0]["error"]["desc"],
            "Parameter 'id' is missing"
        );
        assert_eq!(
            ask(r#"{"execute":"guest-sync","arguments":{"id":"x"}}"#)[0]["error"]["desc"],
            "Invalid parameter type for 'id', expected: integer"
        );
        assert_eq!(
            ask(r#"{"execute":"guest-ping","arguments":{"x":1}}"#)[0]["error"]["desc"],
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            ask("[1]")[0]["error"]["desc"],
            "QMP input must be a JSON object"
        );
        assert_eq!(
            ask(r#"{"arguments":{}}"#)[0]["error"]["desc"],
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            ask(r#"{"execute":"guest-ping"}{"execute":"guest-ping"}"#).len(),
            2
        );
    }

    #[test]
    fn every_reply_to_an_object_carries_its_id() {
        for req in [
            r#"{"execute":"guest-ping","id":5}"#,
            r#"{"execute":"guest-nonesuch","id":5}"#,
            r#"{"execute":"guest-sync","id":5}"#,
            r#"{"id":5}"#,
            r#"{"execute":"guest-ping","id":5,"x":1}"#,
            r#"{"execute":5,"id":5}"#,
            r#"{"execute":"guest-ping","arguments":[],"id":5}"#,
        ] {
            assert_eq!(ask(req)[0]["id"], 5, "{req}");
        }
        assert_eq!(
            ask(r#"{"execute":"guest-ping","id":[1,"a"]}"#)[0]["id"],
            json!([1, "a"])
        );
        assert!(ask(r#"{"execute":"guest-ping"}"#)[0].get("id").is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        // As qemu-ga: one error per bad word; a value cut short waits
        // for its end.
        assert_eq!(ask("not json").len(), 2);
        assert_eq!(ask("{\"execute\":").len(), 0);
        for bad in ["\u{0}\u{1}\u{2}", "}", "{\"a\" 1}", "\u{ff}"] {
            let r = ask(bad);
            assert_eq!(r.len(), 1, "{bad}");
            assert_eq!(r[0]["error"]["class"], "GenericError");
        }
        let deep = "[".repeat(5000) + &"]".repeat(5000);
        assert_eq!(ask(&deep)[0]["error"]["class"], "GenericError");
    }
}
