//! `guest-file-*`: files opened by handle, as qemu-ga numbers them (from
//! 1000 up), with its modes, counts and limits.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::args::{Answer, Args, QgaError};

/// qemu-ga's default and largest read.
const READ_DEFAULT: i64 = 4096;
const READ_MAX: i64 = 48 << 20;
/// qemu-ga's first handle.
const FIRST_HANDLE: i64 = 1000;

/// The open files.
pub struct Files {
    open: HashMap<i64, File>,
    next: i64,
}

impl Default for Files {
    fn default() -> Self {
        Files {
            open: HashMap::new(),
            next: FIRST_HANDLE,
        }
    }
}

/// fopen(3)'s modes, as qemu-ga accepts them.
fn options(mode: &str) -> Option<OpenOptions> {
    let mut o = OpenOptions::new();
    let plus = mode.contains('+');
    match mode.replace('b', "").as_str() {
        "r" | "r+" => o.read(true).write(plus),
        "w" | "w+" => o.write(true).create(true).truncate(true).read(plus),
        "a" | "a+" => o.append(true).create(true).read(plus),
        _ => return None,
    };
    Some(o)
}

impl Files {
    fn get(&mut self, a: &Args) -> Result<&mut File, QgaError> {
        let h = a.int("handle")?;
        self.open
            .get_mut(&h)
            .ok_or_else(|| QgaError::generic(format!("handle '{h}' has not been found")))
    }

    pub fn open(&mut self, a: &Args) -> Answer {
        a.only(&["path", "mode"])?;
        let path = a.str("path")?;
        let mode = a.opt_str("mode")?.unwrap_or("r");
        let o = options(mode)
            .ok_or_else(|| QgaError::generic(format!("invalid file open mode '{mode}'")))?;
        let f = o.open(path).map_err(|e| {
            QgaError::generic(format!(
                "failed to open file '{path}' (mode: '{mode}'): {}",
                strerror(&e)
            ))
        })?;
        let h = self.next;
        self.next += 1;
        self.open.insert(h, f);
        Ok(Value::from(h))
    }

    pub fn close(&mut self, a: &Args) -> Answer {
        a.only(&["handle"])?;
        self.get(a)?;
        self.open.remove(&a.int("handle")?);
        Ok(json!({}))
    }

    pub fn read(&mut self, a: &Args) -> Answer {
        a.only(&["handle", "count"])?;
        let count = a.opt_int("count")?.unwrap_or(READ_DEFAULT);
        let f = self.get(a)?;
        if !(0..=READ_MAX).contains(&count) {
            return Err(invalid_count(count));
        }
        let mut buf = Vec::new();
        f.take(count as u64)
            .read_to_end(&mut buf)
            .map_err(|e| QgaError::generic(format!("failed to read file: {}", strerror(&e))))?;
        Ok(json!({
            "count": buf.len(),
            "buf-b64": B64.encode(&buf),
            // As fread(3)'s end-of-file flag: a short read.
            "eof": (buf.len() as i64) < count,
        }))
    }

    pub fn write(&mut self, a: &Args) -> Answer {
        a.only(&["handle", "buf-b64", "count"])?;
        let data = B64
            .decode(a.str("buf-b64")?)
            .map_err(|_| QgaError::generic("Base64 data contains invalid characters"))?;
        let count = a.opt_int("count")?.unwrap_or(data.len() as i64);
        let f = self.get(a)?;
        if !(0..=data.len() as i64).contains(&count) {
            return Err(invalid_count(count));
        }
        f.write_all(&data[..count as usize])
            .map_err(|e| QgaError::generic(format!("failed to write to file: {}", strerror(&e))))?;
        Ok(json!({"count": count, "eof": false}))
    }

    pub fn seek(&mut self, a: &Args) -> Answer {
        a.only(&["handle", "offset", "whence"])?;
        let offset = a.int("offset")?;
        let whence = a.int_or_name("whence", &["set", "cur", "end"])?;
        let f = self.get(a)?;
        let to = match whence {
            0 => SeekFrom::Start(offset.max(0) as u64),
            1 => SeekFrom::Current(offset),
            2 => SeekFrom::End(offset),
            w => return Err(QgaError::generic(format!("invalid whence code {w}"))),
        };
        let position = f
            .seek(to)
            .map_err(|e| QgaError::generic(format!("failed to seek file: {}", strerror(&e))))?;
        Ok(json!({"position": position, "eof": false}))
    }

    pub fn flush(&mut self, a: &Args) -> Answer {
        a.only(&["handle"])?;
        self.get(a)?
            .flush()
            .map_err(|e| QgaError::generic(format!("failed to flush file: {}", strerror(&e))))?;
        Ok(json!({}))
    }
}

fn invalid_count(count: i64) -> QgaError {
    QgaError::generic(format!("value '{count}' is invalid for argument count"))
}

/// The C library's words for an error, as qemu-ga prints them.
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Args {
        Args::new(v.as_object().unwrap().clone())
    }

    #[test]
    fn write_seek_read_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut files = Files::default();
        let h = files
            .open(&args(json!({"path": path, "mode": "w+"})))
            .unwrap();
        assert_eq!(h, 1000);
        let w = files.write(&args(json!({"handle": h, "buf-b64": "aGVsbG8="})));
        assert_eq!(w.unwrap(), json!({"count": 5, "eof": false}));
        let s = files.seek(&args(json!({"handle": h, "offset": 1, "whence": "set"})));
        assert_eq!(s.unwrap()["position"], 1);
        let r = files.read(&args(json!({"handle": h}))).unwrap();
        assert_eq!(r, json!({"count": 4, "buf-b64": "ZWxsbw==", "eof": true}));
        let bad = files.read(&args(json!({"handle": h, "count": -1})));
        assert_eq!(
            bad.unwrap_err().desc,
            "value '-1' is invalid for argument count"
        );
        files.close(&args(json!({"handle": h}))).unwrap();
        let gone = files.close(&args(json!({"handle": h})));
        assert_eq!(gone.unwrap_err().desc, "handle '1000' has not been found");
        let missing = files.open(&args(json!({"path": dir.path().join("none")})));
        assert!(
            missing
                .unwrap_err()
                .desc
                .ends_with("No such file or directory")
        );
    }
}
