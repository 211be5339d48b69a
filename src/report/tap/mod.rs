//! Test results per case from KTAP (kselftest, KUnit) and TAP 13/14 output,
//! parsed as it streams past: bytes go in, cases come out at the end.
//!
//! What is understood: the `KTAP version N` / `TAP version N` header, plans
//! (`1..N`), result lines (`ok N - name # DIRECTIVE reason`), diagnostics
//! (`# ...`, kept with the case that follows them), `Bail out!`, and
//! subtests, told by their deeper indentation whatever its width. A plan
//! that promised more cases than arrived gives the missing ones as failed
//! (kcidb's MISS); so does a run that ends mid-suite. Lines that are not
//! TAP pass through unparsed; malformed ones become parse-error cases naming
//! their line. The parser never blocks and holds at most [`MAX_LINE`] bytes
//! of an unfinished line.

mod cases;
mod line;

pub use cases::{Case, Counts, Results, Status};
use line::{is_result_line, parse_plan, parse_result, strip_printk_time};

/// Longer lines are cut (their rest is ignored, not buffered).
pub const MAX_LINE: usize = 64 * 1024;

/// Which format to expect (`--results`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// KTAP (kselftest, KUnit), from the first line.
    Ktap,
    /// TAP 13/14, from the first line.
    Tap,
    /// Whichever a `KTAP version` or `TAP version` header announces;
    /// nothing before it is parsed.
    Auto,
}

impl crate::host::output::Tap for Parser {
    fn seen(&mut self, data: &[u8]) {
        self.feed(data);
    }
}

/// One nesting level: a test plan and the results seen at one indentation.
#[derive(Debug, Default)]
struct Level {
    indent: usize,
    plan: Option<u32>,
    last_number: u32,
    /// A second plan seen after results: another run of tests, from its
    /// first result line on.
    next_plan: Option<u32>,
    /// Diagnostics waiting for the next result line at this level.
    pending: Vec<String>,
    /// Finished cases, paths relative to this level.
    cases: Vec<Case>,
}

impl Level {
    /// A plan line. A second plan after results at the same level starts
    /// another run of tests (two programs' output one after the other)
    /// once a result line follows it. A trailing plan (TAP's "1..N" after
    /// the cases) just sets the plan.
    fn new_plan(&mut self, plan: u32) {
        if self.plan.is_some() && self.last_number > 0 {
            self.next_plan = Some(plan);
        } else {
            self.plan = Some(plan);
        }
    }

    /// Before a result line: a pending plan starts its run now, the
    /// previous run's missing cases settled.
    fn begin_next_run(&mut self) {
        if let Some(plan) = self.next_plan.take() {
            // Diagnostics since the plan belong to the new run's first case.
            let pending = std::mem::take(&mut self.pending);
            let done = std::mem::take(self);
            self.indent = done.indent;
            self.cases = close(done, "the next plan began before it");
            self.plan = Some(plan);
            self.pending = pending;
        }
    }
}

/// The streaming parser.
#[derive(Debug)]
pub struct Parser {
    started: bool,
    partial: Vec<u8>,
    line_no: usize,
    levels: Vec<Level>,
    /// Whether the outermost level's indentation is known (its first
    /// header, plan or result line sets it).
    anchored: bool,
    /// KTAP puts a case's diagnostics before its result line; TAP
    /// producers (Test::More) after it.
    ktap: bool,
    bailed: bool,
}

impl Parser {
    /// A parser for `format`.
    pub fn new(format: Format) -> Parser {
        Parser {
            started: format != Format::Auto,
            partial: Vec::new(),
            line_no: 0,
            levels: vec![Level::default()],
            anchored: false,
            ktap: format == Format::Ktap,
            bailed: false,
        }
    }

    /// Takes the next bytes of output.
    pub fn feed(&mut self, mut data: &[u8]) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            self.take(&data[..nl]);
            let line = std::mem::take(&mut self.partial);
            self.line(&String::from_utf8_lossy(&line));
            data = &data[nl + 1..];
        }
        self.take(data);
    }

    /// Takes a kernel log (KUnit prints there): each line without its
    /// `[    1.234567] ` timestamp.
    pub fn feed_kernel_log(&mut self, log: &[u8]) {
        for line in log.split(|&b| b == b'\n') {
            let line = strip_printk_time(line);
            self.feed(line);
            self.feed(b"\n");
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The results, once the output has ended. `ended_early` (a crash, a
    /// timeout) names why cases still open are missing.
    pub fn finish(mut self, ended_early: Option<&str>) -> Results {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&String::from_utf8_lossy(&line));
        }
        let why = if self.bailed {
            "the producer bailed out"
        } else {
            ended_early.unwrap_or("the output ended before it")
        };
        while self.levels.len() > 1 {
            let open = self.levels.pop().unwrap_or_default();
            let parent = self.levels.last_mut().expect("the top level stays");
            for mut c in close(open, why) {
                c.path = format!("?.{}", c.path);
                parent.cases.push(c);
            }
        }
        let top = self.levels.pop().unwrap_or_default();
        Results {
            cases: close(top, why),
        }
    }

    fn line(&mut self, raw: &str) {
        self.line_no += 1;
        if self.bailed {
            return;
        }
        let indent = raw.len() - raw.trim_start_matches([' ', '\t']).len();
        let text = raw.trim();
        if text.starts_with("KTAP version") || text.starts_with("TAP version") {
            self.started = true;
            self.ktap = text.starts_with("KTAP");
            self.open(indent);
            return;
        }
        if !self.started {
            return;
        }
        if text.starts_with("Bail out!") {
            self.bailed = true;
        } else if let Some(plan) = parse_plan(text) {
            self.open(indent);
            self.top().new_plan(plan);
        } else if text.starts_with("# Subtest") {
            // TAP 14 puts it at the subtest's indentation, TAP 13 at its
            // parent's (the subtest's plan opens it then).
            self.open(indent);
        } else if let Some(d) = text.strip_prefix('#') {
            let after = !self.ktap;
            let level = self.level_at(indent);
            let d = d.trim().to_string();
            match level.cases.last_mut() {
                Some(case) if after => case.diagnostics.push(d),
                _ => level.pending.push(d),
            }
        } else if is_result_line(text) {
            self.result(indent, text);
        }
    }

    fn top(&mut self) -> &mut Level {
        self.levels.last_mut().expect("the top level stays")
    }

    /// The deepest open level at or above `indent` (diagnostics belong to
    /// the suite whose indentation they have).
    fn level_at(&mut self, indent: usize) -> &mut Level {
        let i = self
            .levels
            .iter()
            .rposition(|l| l.indent <= indent)
            .unwrap_or(0);
        &mut self.levels[i]
    }

    /// Sets the outermost indentation from the first TAP line.
    fn anchor(&mut self, indent: usize) -> bool {
        if self.anchored {
            return false;
        }
        self.anchored = true;
        self.top().indent = indent;
        true
    }

    /// A header or plan at `indent`: deeper than the current level starts a
    /// subtest.
    fn open(&mut self, indent: usize) {
        if self.anchor(indent) {
            return;
        }
        if indent > self.top().indent {
            self.levels.push(Level {
                indent,
                ..Level::default()
            });
        }
    }

    fn result(&mut self, indent: usize, text: &str) {
        self.anchor(indent);
        // Close the subtests this result line ends (those indented deeper).
        let mut children = Vec::new();
        while self.levels.len() > 1 && self.top().indent > indent {
            let open = self.levels.pop().unwrap_or_default();
            let mut closed = close(open, "its suite ended before it");
            closed.extend(children);
            children = closed;
        }
        if self.top().indent != indent {
            let line = self.line_no;
            let case = parse_error(line, "indentation matches no open suite", text);
            self.top().cases.push(case);
            return;
        }
        let line_no = self.line_no;
        let level = self.top();
        level.begin_next_run();
        let mut case = match parse_result(text) {
            Ok((number, case)) => {
                if let Some(n) = number {
                    if n <= level.last_number {
                        let why = format!("test number {n} after {}", level.last_number);
                        level.cases.push(parse_error(line_no, &why, text));
                    }
                    level.last_number = level.last_number.max(n);
                } else {
                    level.last_number += 1;
                }
                case
            }
            Err(why) => parse_error(line_no, why, text),
        };
        case.diagnostics = std::mem::take(&mut level.pending);
        case.suite = !children.is_empty();
        for mut c in children {
            c.path = format!("{}.{}", case.path, c.path);
            level.cases.push(c);
        }
        level.cases.push(case);
    }
}

/// A level's cases, with a missing case for each number its plan promised
/// and no result line gave.
fn close(level: Level, why: &str) -> Vec<Case> {
    let mut cases = level.cases;
    let missing = |from: u32, to: u32, cases: &mut Vec<Case>| {
        for n in from..=to {
            cases.push(Case {
                path: format!("#{n}"),
                status: Status::Missing,
                reason: format!("planned, but {why}"),
                diagnostics: Vec::new(),
                suite: false,
            });
        }
    };
    if let Some(plan) = level.plan {
        missing(level.last_number + 1, plan, &mut cases);
        // A plan after a complete run with no result after it: the same
        // plan again is a copy (a forked child flushing its stdio buffer,
        // as kselftests do into a pipe); another promised a run that
        // never came.
        match level.next_plan {
            Some(next) if !(next == plan && level.last_number >= plan) => {
                missing(1, next, &mut cases)
            }
            _ => {}
        }
    }
    cases
}

fn parse_error(line: usize, why: &str, text: &str) -> Case {
    let shown: String = text.chars().take(200).collect();
    Case {
        path: format!("line {line}"),
        status: Status::ParseError,
        reason: format!("{why}: {shown}"),
        diagnostics: Vec::new(),
        suite: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(format: Format, text: &str) -> Results {
        let mut p = Parser::new(format);
        // Fed in awkward pieces: lines split anywhere.
        for chunk in text.as_bytes().chunks(7) {
            p.feed(chunk);
        }
        p.finish(None)
    }

    fn summary(r: &Results) -> Vec<(String, Status)> {
        r.reported().map(|c| (c.path.clone(), c.status)).collect()
    }

    #[test]
    fn kunit_nested_suites_with_skip_and_diagnostics() {
        let text = "\
KTAP version 1
1..2
    KTAP version 1
    # Subtest: example
    # module: example_test
    1..3
    # example_simple_test: initializing
    ok 1 example_simple_test
    ok 2 example_skip_test # SKIP this test should be skipped
    # example_fail: EXPECTATION FAILED at lib/kunit/x.c:10
    not ok 3 example_fail
# example: pass:1 fail:1 skip:1 total:3
not ok 1 example
    KTAP version 1
    # Subtest: other
    1..1
    ok 1 other_test
ok 2 other
";
        let r = parse(Format::Auto, text);
        assert_eq!(
            summary(&r),
            [
                ("example.example_simple_test".into(), Status::Pass),
                ("example.example_skip_test".into(), Status::Skip),
                ("example.example_fail".into(), Status::Fail),
                ("other.other_test".into(), Status::Pass),
            ]
        );
        let fail = r.cases.iter().find(|c| c.path == "example.example_fail");
        assert_eq!(
            fail.unwrap().diagnostics,
            ["example_fail: EXPECTATION FAILED at lib/kunit/x.c:10"]
        );
        let skip = r.cases.iter().find(|c| c.status == Status::Skip).unwrap();
        assert_eq!(skip.reason, "this test should be skipped");
        assert_eq!(
            r.counts(),
            Counts {
                passed: 2,
                failed: 1,
                skipped: 1
            }
        );
    }

    #[test]
    fn tap14_subtests_with_two_space_indent_and_directives() {
        let text = "\
TAP version 14
1..3
  # Subtest: inner
  1..2
  ok 1 - a
  not ok 2 - b # TODO not yet
ok 1 - inner
ok 2 - xf # XFAIL known bug
not ok 3 - slow # TIMEOUT 30s
";
        let r = parse(Format::Auto, text);
        assert_eq!(
            summary(&r),
            [
                ("inner.a".into(), Status::Pass),
                ("inner.b".into(), Status::Todo),
                ("xf".into(), Status::Xfail),
                ("slow".into(), Status::Timeout),
            ]
        );
        assert_eq!(r.counts().failed, 1);
    }

    #[test]
    fn a_plan_promising_more_gives_missing_cases() {
        let r = parse(Format::Ktap, "1..4\nok 1 a\nok 2 b\n");
        assert_eq!(
            summary(&r),
            [
                ("a".into(), Status::Pass),
                ("b".into(), Status::Pass),
                ("#3".into(), Status::Missing),
                ("#4".into(), Status::Missing),
            ]
        );
        let mut p = Parser::new(Format::Ktap);
        p.feed(b"1..2\nok 1 a\n");
        let r = p.finish(Some("the guest crashed"));
        assert_eq!(r.cases[1].reason, "planned, but the guest crashed");
    }

    #[test]
    fn a_suite_that_crashes_mid_way_misses_its_remaining_cases() {
        let text = "KTAP version 1\n1..1\n    KTAP version 1\n    1..3\n    ok 1 x\n";
        let r = parse(Format::Auto, text);
        let statuses: Vec<_> = r.cases.iter().map(|c| c.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Pass,
                Status::Missing,
                Status::Missing,
                Status::Missing
            ]
        );
    }

    #[test]
    fn auto_ignores_everything_before_a_header() {
        let r = parse(
            Format::Auto,
            "ok 1 not tap yet\nnoise\nTAP version 13\nok 1 real\n",
        );
        assert_eq!(summary(&r), [("real".into(), Status::Pass)]);
        assert!(parse(Format::Auto, "ok 1 a\nnot ok 2 b\n").cases.is_empty());
    }

    #[test]
    fn malformed_lines_are_parse_errors_naming_their_line() {
        let r = parse(Format::Tap, "ok 1 a\nok 1 again\nokay\nnot okish\n");
        let errors: Vec<_> = r
            .cases
            .iter()
            .filter(|c| c.status == Status::ParseError)
            .collect();
        // "okay" and "not okish" are text, not results.
        assert_eq!(errors.len(), 1, "{r:?}");
        assert_eq!(errors[0].path, "line 2");
        assert!(errors[0].reason.contains("test number 1 after 1"));
        assert_eq!(r.cases.len(), 3);
    }

    #[test]
    fn bad_indentation_is_a_parse_error() {
        let r = parse(Format::Ktap, "    1..2\n    ok 1 a\n  ok 2 b\n");
        assert!(
            r.cases
                .iter()
                .any(|c| c.status == Status::ParseError && c.reason.contains("indentation")),
            "{r:?}"
        );
    }

    #[test]
    fn binary_garbage_and_huge_lines_do_not_break_it() {
        let mut p = Parser::new(Format::Ktap);
        p.feed(&[0xff, 0xfe, b'\n', 0, 1, 2, b'\n']);
        p.feed(&vec![b'x'; 3 * MAX_LINE]);
        p.feed(b"\nok 1 after\n");
        assert!(p.partial.is_empty());
        let r = p.finish(None);
        assert_eq!(summary(&r), [("after".into(), Status::Pass)]);
    }

    #[test]
    fn bail_out_misses_the_rest() {
        let r = parse(Format::Tap, "1..3\nok 1 a\nBail out! no disk\nok 2 b\n");
        assert_eq!(r.cases.len(), 3);
        assert_eq!(r.cases[1].status, Status::Missing);
        assert!(r.cases[1].reason.contains("bailed out"));
    }

    #[test]
    fn ktap_in_a_kernel_log_is_read_without_timestamps() {
        let log = b"[    0.100000] Linux version 6.1\n\
[    1.000001] KTAP version 1\n\
[    1.000002] 1..1\n\
[    1.000003]     KTAP version 1\n\
[    1.000004]     # Subtest: s\n\
[    1.000005]     1..1\n\
[    1.000006]     ok 1 t\n\
[    1.000007] ok 1 s\n";
        let mut p = Parser::new(Format::Auto);
        p.feed_kernel_log(log);
        let r = p.finish(None);
        assert_eq!(summary(&r), [("s.t".into(), Status::Pass)]);
    }

    #[test]
    fn test_more_output_keeps_diagnostics_after_their_case() {
        // perl -MTest::More, as it prints: no header, a trailing plan.
        let text = "\
ok 1 - first
# Subtest: grp
    1..2
    ok 1 - in1
    not ok 2 - in2
    #   Failed test 'in2'
not ok 2 - grp
#   Failed test 'grp'
ok 3 # skip no hw
not ok 4 - td # TODO later
1..4
";
        let r = parse(Format::Tap, text);
        assert_eq!(
            summary(&r),
            [
                ("first".into(), Status::Pass),
                ("grp.in1".into(), Status::Pass),
                ("grp.in2".into(), Status::Fail),
                ("#3".into(), Status::Skip),
                ("td".into(), Status::Todo),
            ]
        );
        let in2 = r.cases.iter().find(|c| c.path == "grp.in2").unwrap();
        assert_eq!(in2.diagnostics, ["Failed test 'in2'"]);
        let grp = r.cases.iter().find(|c| c.path == "grp").unwrap();
        assert_eq!(grp.diagnostics, ["Failed test 'grp'"]);
        assert_eq!(
            r.counts(),
            Counts {
                passed: 2,
                failed: 1,
                skipped: 2
            }
        );
    }

    #[test]
    fn two_programs_one_after_the_other_each_keep_their_numbers() {
        let r = parse(Format::Ktap, "1..2\nok 1 a\nok 2 b\n1..3\nok 1 c\nok 2 d\n");
        assert_eq!(
            summary(&r),
            [
                ("a".into(), Status::Pass),
                ("b".into(), Status::Pass),
                ("c".into(), Status::Pass),
                ("d".into(), Status::Pass),
                ("#3".into(), Status::Missing),
            ]
        );
        // Test::More's trailing plan is no new run.
        let r = parse(Format::Tap, "ok 1 a\nok 2 b\n1..2\n");
        assert_eq!(r.counts().passed, 2);
        assert_eq!(r.cases.len(), 2);
        // A kselftest that forks repeats its plan at the end: no new run.
        let r = parse(Format::Ktap, "1..2\nok 1 a\nok 2 b\n1..2\n");
        assert_eq!(r.cases.len(), 2);
        // A second program that printed its plan and nothing else.
        let r = parse(Format::Ktap, "1..1\nok 1 a\n1..2\n");
        assert_eq!(r.counts().failed, 2);
    }
}
