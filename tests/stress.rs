//! Many short runs in a row, each writing output right before it exits:
//! none may hang or lose bytes.

mod common;
use common::*;

#[test]
fn fifty_short_runs_none_hang() {
    for i in 0..50 {
        let mut c = vexec("6.1");
        c.args([
            "--timeout",
            "120s",
            "--",
            "sh",
            "-c",
            &format!(
                "printf 'run {i} out'; printf 'run {i} err' >&2; exit {}",
                i % 3
            ),
        ]);
        let out = c.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(i % 3),
            "run {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout(&out), format!("run {i} out"));
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("run {i} err"));
    }
}
