//! The grammar of single TAP lines: plans, result lines and their
//! directives, and kernel log timestamps.

use super::{Case, Status};

/// A kernel log line without its leading `[ seconds.micros] `.
pub(super) fn strip_printk_time(line: &[u8]) -> &[u8] {
    if line.first() != Some(&b'[') {
        return line;
    }
    match line.iter().position(|&b| b == b']') {
        Some(end)
            if line[1..end]
                .iter()
                .all(|b| b.is_ascii_digit() || *b == b'.' || *b == b' ') =>
        {
            let rest = &line[end + 1..];
            rest.strip_prefix(b" ").unwrap_or(rest)
        }
        _ => line,
    }
}

/// `ok` or `not ok`, alone or followed by a blank (`okay` is just text).
pub(super) fn is_result_line(text: &str) -> bool {
    ["ok", "not ok"].iter().any(|w| {
        text.strip_prefix(w)
            .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']))
    })
}

/// `1..N` (with an optional `# SKIP reason`).
pub(super) fn parse_plan(text: &str) -> Option<u32> {
    let rest = text.strip_prefix("1..")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = rest[digits.len()..].trim_start();
    if digits.is_empty() || !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    digits.parse().ok()
}

/// `ok|not ok [N] [-] [name] [# DIRECTIVE [reason]]`: its number and case.
pub(super) fn parse_result(text: &str) -> Result<(Option<u32>, Case), &'static str> {
    let (ok, rest) = if let Some(r) = text.strip_prefix("not ok") {
        (false, r)
    } else if let Some(r) = text.strip_prefix("ok") {
        (true, r)
    } else {
        return Err("not a result line");
    };
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return Err("no space after ok");
    }
    let rest = rest.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let number = if digits.is_empty() {
        None
    } else {
        Some(digits.parse().map_err(|_| "test number out of range")?)
    };
    let rest = rest[digits.len()..].trim_start();
    let rest = rest.strip_prefix("- ").unwrap_or(rest);
    let (name, directive) = match rest.split_once(" # ").or_else(|| {
        rest.strip_prefix("# ")
            .map(|d| ("", d))
            .or_else(|| rest.strip_suffix(" #").map(|n| (n, "")))
    }) {
        Some((n, d)) => (n.trim(), d.trim()),
        None => (rest.trim(), ""),
    };
    let (status, reason) = status_of(ok, directive);
    let path = if name.is_empty() {
        format!(
            "#{}",
            number.map_or("?".to_string(), |n: u32| n.to_string())
        )
    } else {
        name.to_string()
    };
    Ok((
        number,
        Case {
            path,
            status,
            reason,
            diagnostics: Vec::new(),
            suite: false,
        },
    ))
}

/// The status a result line and its directive give.
fn status_of(ok: bool, directive: &str) -> (Status, String) {
    let (word, reason) = match directive.split_once([' ', '\t']) {
        Some((w, r)) => (w, r.trim()),
        None => (directive, ""),
    };
    let status = match word.to_ascii_uppercase().as_str() {
        "SKIP" => Status::Skip,
        "TODO" => Status::Todo,
        "XFAIL" => Status::Xfail,
        "TIMEOUT" => Status::Timeout,
        "ERROR" => Status::Error,
        _ if ok => Status::Pass,
        _ => Status::Fail,
    };
    let reason = if matches!(status, Status::Pass | Status::Fail) {
        directive.to_string()
    } else {
        reason.to_string()
    };
    (status, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_and_results_parse() {
        assert_eq!(parse_plan("1..0 # SKIP no hw"), Some(0));
        assert_eq!(parse_plan("1..12"), Some(12));
        assert_eq!(parse_plan("1..x"), None);
        assert_eq!(parse_plan("1..3x"), None);
        let (n, c) = parse_result("ok 7 - name with # hash # SKIP why").unwrap();
        assert_eq!((n, c.path.as_str()), (Some(7), "name with"));
        assert_eq!(c.status, Status::Pass);
        let (n, c) = parse_result("not ok").unwrap();
        assert_eq!((n, c.status, c.path.as_str()), (None, Status::Fail, "#?"));
        let (_, c) = parse_result("ok 3 # skip lower case").unwrap();
        assert_eq!((c.status, c.reason.as_str()), (Status::Skip, "lower case"));
    }
}
