//! Command-line definitions: the plain run here, the other verbs in
//! [`verbs`].

pub mod config;
pub mod settings;

mod machine;
pub mod rundir;
pub mod verbs;
pub mod vms;

pub use machine::{DEFAULT_CPUS, DEFAULT_MEMORY, MachineOptions};

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

use crate::launch::transport::TransportChoice;

/// Run a command inside a throwaway VM booted with the Linux kernel of your
/// choice, with your own userspace, working directory, uid and environment.
///
/// The command's stdout, stderr and exit status come back as if it had run
/// here. vexec's own messages go to stderr.
///
/// Exit status: the command's own; 128+N when it died of signal N; 124 when
/// --timeout expired; 125 when vexec or the VM failed (git bisect run reads
/// this as "skip"); 126/127 when the command could not be executed / was not
/// found in the guest.
#[derive(Debug, Parser)]
#[command(
    name = "vexec",
    version,
    trailing_var_arg = true,
    after_help = "Examples:\n  vexec -k /boot/vmlinuz-6.1.0-56-amd64 -- uname -r\n  vexec -k 6.1.0-56-amd64 -- make check\n  vexec -k ~/src/linux -- ./run-tests.sh\n  go test -exec vexec ./...\n\nAlso:\n  vexec completions bash|zsh|fish|elvish|powershell   print shell completions\n  vexec manpage                                      print the man page (roff)\n  vexec bisect --good A --bad B [--build CMD] [OPTIONS] -- COMMAND\n                                                     find the first bad commit\n  vexec kernel add PATH|fetch PKG|list|path REL|rm REL  the kernel store\n  vexec kconfig [--debug] [--gcov] [--kunit] [DIR]   add vexec's options to DIR/.config\n  vexec build [--debug] [--gcov] [--kunit] [DIR]     configure and build a kernel tree\n  vexec run-dir [OPTIONS] DIR [-- QEMU-ARGS]          run DIR's executables in an initramfs-only guest\n  vexec up --name NAME [OPTIONS]                     a VM that stays up (--qga SOCKET: the QEMU guest agent protocol)\n  vexec exec NAME -- COMMAND / vexec shell NAME      a command / your shell in it, or in a run going on (run-PID)\n  vexec ps / vexec down NAME...|--all                list / end VMs and runs"
)]
pub struct Cli {
    /// Kernel to boot: an image file (bzImage/vmlinuz/vmlinux), a kernel build
    /// tree, an unpacked kernel package, or a release installed in /boot.
    /// Default: the running kernel's image, else the newest readable in /boot.
    /// Several kernels (repeat -k, or separate with commas; release
    /// patterns like '6.1.*' and config sets like @name too) make a matrix:
    /// the command runs once per kernel.
    #[arg(
        short,
        long,
        value_name = "KERNEL",
        env = "VEXEC_KERNEL",
        value_delimiter = ','
    )]
    pub kernel: Vec<String>,

    /// Machine options, shared with `vexec run-dir`.
    #[command(flatten)]
    pub machine: MachineOptions,

    /// Matrix: kernels run at once [default: what the host's cores and
    /// memory fit].
    #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub jobs: Option<u32>,

    /// Matrix: prefix each output line with its kernel as it comes, or show
    /// each kernel's output in one block when its run ends.
    #[arg(long, value_enum, default_value_t = crate::modes::matrix::OutputMode::Prefix)]
    pub matrix_output: crate::modes::matrix::OutputMode,

    /// Matrix: write a JUnit XML report (one test case per kernel; with
    /// --results, one per test case and kernel).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,

    /// Matrix: write a JSON report (with --results, each kernel's cases).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Matrix: run only the I-th of N deterministic slices of the kernel
    /// list (for CI job matrices).
    #[arg(long, value_name = "I/N", value_parser = crate::modes::matrix::parse_shard)]
    pub shard: Option<crate::modes::matrix::Shard>,

    /// Also write the report of a run stopped by --timeout or Ctrl-C, or of
    /// a guest that never reported in, into a file in DIR, with the
    /// console's last lines (for CI artifacts: a retried test keeps its
    /// trail).
    #[arg(long, value_name = "DIR", env = "VEXEC_HANG_REPORTS")]
    pub hang_reports: Option<PathBuf>,

    /// How long output may still arrive after the command exited (from a
    /// background process holding its stdout/stderr) before vexec reports
    /// the end and drops the rest, saying so [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub output_grace: Option<Duration>,

    /// Do not share the working directory read-write (writes then vanish
    /// with the VM like writes anywhere else).
    #[arg(long)]
    pub no_cwd: bool,

    /// Share the working directory read-write even if the config file says
    /// `cwd = false`.
    #[arg(long, conflicts_with = "no_cwd")]
    pub cwd: bool,

    /// Read settings from FILE instead of the nearest .vexec.toml (in the
    /// working directory or up to the VCS root).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Ignore .vexec.toml files.
    #[arg(long, conflicts_with = "config")]
    pub no_config: bool,

    /// Share DIR read-write at the same path in the guest (repeatable).
    #[arg(long = "rw", value_name = "DIR")]
    pub rw: Vec<PathBuf>,

    /// Share DIR read-only at the same path: a live view of the host that
    /// the guest cannot write (repeatable).
    #[arg(long = "ro", value_name = "DIR")]
    pub ro: Vec<PathBuf>,

    /// Share DIR writable in the guest, with its changes discarded when the
    /// VM ends (repeatable).
    #[arg(long = "overlay", value_name = "DIR")]
    pub overlay: Vec<PathBuf>,

    /// How host files reach the guest: auto picks virtio-fs when the kernel
    /// has it and a virtiofsd is found, else 9p [default: auto].
    #[arg(long, value_enum)]
    pub transport: Option<TransportChoice>,

    /// virtiofsd to use (default: PATH, then /usr/libexec and /usr/lib/qemu,
    /// then QEMU's vhost-user descriptors).
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,

    #[command(flatten)]
    pub how: CommandOpts,

    /// Give the guest a network: QEMU user-mode networking (NAT to the
    /// host's network, guest address 10.0.2.15, DNS 10.0.2.3). Loopback is
    /// up even without it.
    #[arg(long)]
    pub net: bool,

    /// Forward TCP port HOST on the host's 127.0.0.1 to port GUEST in the
    /// guest (repeatable; implies --net).
    #[arg(long = "forward", value_name = "HOST:GUEST", value_parser = parse_forward)]
    pub forwards: Vec<(u16, u16)>,

    /// Append ARG to QEMU's command line (repeatable).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<OsString>,

    /// Fail (exit 1) when the kernel logs a BUG, Oops, WARNING, KASAN,
    /// UBSAN, lockdep or similar report during the run, even if the command
    /// passed; the report is printed after the command's output.
    #[arg(long)]
    pub fail_on_oops: bool,

    /// Read the command's stdout as KTAP (kselftest, KUnit) or TAP 13/14
    /// test results, passing it through unchanged: a summary per case on
    /// stderr, and exit 1 when a case failed even if the command exited 0.
    /// `auto` starts at a `KTAP version` or `TAP version` line. KTAP in the
    /// kernel log (KUnit) counts too. In a matrix, --junit and --json list
    /// every case.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub results: Option<crate::report::tap::Format>,

    /// Where a matrix's run writes its test cases (those of the kernel log
    /// too) as JSON, for the matrix's reports; not for users.
    #[arg(long, value_name = "FILE", hide = true)]
    pub cases_out: Option<PathBuf>,

    /// Keep a record of the run in DIR: console.log, dmesg.txt, run.json,
    /// and output/, which the command sees as $VEXEC_OUTPUT.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Use DIR as the guest's root filesystem instead of the host's (read
    /// only, with a writable tmpfs overlay). With a kernel of another
    /// architecture (arm64), DIR is a root of that architecture (e.g. made
    /// with debootstrap --foreign and finished under qemu-user); the command
    /// then runs through vexec's busybox init (see --busybox).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// With --root and a foreign-architecture kernel: the static busybox of
    /// that architecture that runs the guest's init.
    #[arg(long, value_name = "PATH")]
    pub busybox: Option<PathBuf>,

    /// If the guest kernel panics, write its memory to FILE as an ELF core
    /// dump (readable by drgn and crash) before ending the run.
    #[arg(long, value_name = "FILE")]
    pub dump_on_panic: Option<PathBuf>,

    /// Write the guest's full serial console to FILE.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,

    /// Print the QEMU command line and exit.
    #[arg(long)]
    pub dry_run: bool,

    /// The command to run and its arguments. Without one (or with the word
    /// `shell`), your login shell runs in the guest; `-- shell` runs a
    /// program called shell.
    #[arg(value_name = "COMMAND", allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// How the command runs in the guest: its environment, its user and its
/// terminal. A plain run and `vexec exec` take the same options.
#[derive(Debug, Clone, Args)]
pub struct CommandOpts {
    /// Set KEY to VALUE in the command's environment (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(OsString, OsString)>,

    /// Remove KEY from the command's environment (repeatable).
    #[arg(long = "unset-env", value_name = "KEY")]
    pub unset_env: Vec<OsString>,

    /// Run the command as root in the guest, keeping your environment (like
    /// `sudo --preserve-env`). Needs no rights on the host: only the guest's
    /// root, and host files outside rw shares stay unwritable.
    #[arg(long)]
    pub sudo: bool,

    /// Run the command on a pseudo-terminal (stdin, stdout and stderr), as
    /// if typed at a terminal. Default: each of them is a terminal in the
    /// guest when it is one here.
    #[arg(short = 't', long)]
    pub tty: bool,

    /// Never use a pseudo-terminal: plain pipes.
    #[arg(short = 'T', long, conflicts_with = "tty")]
    pub no_tty: bool,
}

/// Accepts QEMU-style sizes: a number of MiB, or with a K/M/G/T suffix.
pub fn parse_memory(s: &str) -> Result<String, String> {
    let mib = parse_mib(s)?;
    if mib < 64 {
        return Err(format!(
            "`{s}` is too little memory for a Linux guest; use at least 64M"
        ));
    }
    Ok(format!("{mib}M"))
}

/// Accepts a size in bytes (`--snapshot-cap`): `500M`, `2G` (MiB when no
/// unit is given).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    Ok(parse_mib(s)? << 20)
}

/// A size with an optional K/M/G/T unit (binary), in MiB.
fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'M'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; use e.g. 512M or 2G"))?;
    match unit {
        'K' => Ok(n / 1024),
        'M' => Ok(n),
        'G' => Ok(n * 1024),
        'T' => Ok(n * 1024 * 1024),
        _ => Err(format!("`{s}`: unknown unit {unit}; use K, M, G or T")),
    }
}

/// Accepts `HOST:GUEST` TCP port pairs.
pub fn parse_forward(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{s}` is not HOST:GUEST (two TCP port numbers, e.g. 8080:80)");
    let (h, g) = s.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad);
    Ok((port(h)?, port(g)?))
}

/// Accepts `KEY=VALUE` (the value may be empty or contain `=`).
pub fn parse_env(s: &str) -> Result<(OsString, OsString), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Accepts `30`, `30s`, `1.5s`, `5m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("`{s}` must be a positive duration"));
    }
    match humantime::parse_duration(t) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("`{s}` must be a positive duration")),
        Err(_) => {
            // humantime wants whole numbers; allow fractions like 1.5s.
            let (num, unit) =
                t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
            let n: f64 = num
                .parse()
                .map_err(|_| format!("`{s}` is not a duration; use e.g. 30s, 5m or 1h"))?;
            let mult = match unit {
                "ms" => 0.001,
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                _ => return Err(format!("`{s}` is not a duration; use e.g. 30s, 5m or 1h")),
            };
            Ok(Duration::from_secs_f64(n * mult))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("1G").unwrap(), "1024M");
        assert_eq!(parse_memory("512m").unwrap(), "512M");
        assert_eq!(parse_memory("2048").unwrap(), "2048M");
        assert_eq!(parse_memory("2GiB").unwrap(), "2048M");
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("16M").is_err());
    }

    #[test]
    fn completions_and_man_page_know_every_verb() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut verbs::everything(),
            "vexec",
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        for word in [
            "--transport",
            "run-dir",
            "kernel",
            "fetch",
            "bisect",
            "shell",
            "--gcov",
        ] {
            assert!(text.contains(word), "{word} missing from the completions");
        }
        let mut out = Vec::new();
        clap_mangen::Man::new(verbs::everything())
            .render(&mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH vexec"), "{text}");
        assert!(text.contains("run\\-dir"), "{text}");
    }

    #[test]
    fn forwards() {
        assert_eq!(parse_forward("8080:80").unwrap(), (8080, 80));
        assert!(parse_forward("8080").is_err());
        assert!(parse_forward("0:80").is_err());
        assert!(parse_forward("x:80").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn command_after_options_keeps_its_flags() {
        let c = Cli::try_parse_from(["vexec", "-k", "x", "--", "ls", "-l", "--kernel"]).unwrap();
        assert_eq!(c.kernel, ["x"]);
        assert_eq!(c.command, ["ls", "-l", "--kernel"]);
        let c = Cli::try_parse_from(["vexec", "/tmp/pkg.test", "-test.v"]).unwrap();
        assert_eq!(c.command, ["/tmp/pkg.test", "-test.v"]);
    }
}
