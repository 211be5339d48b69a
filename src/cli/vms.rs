//! The persistent VM verbs' options: `up` takes a plain run's options plus
//! its own (so clap parses it like `shell`), `exec` a command's options,
//! `down` names.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args, CommandFactory};

use super::{Cli, parse_duration};
use crate::modes::persistent::up::UpOptions;

/// The default number of commands a VM runs at once.
pub const DEFAULT_PORTS: usize = 16;

/// `vexec up [RUN OPTIONS] [--name NAME] [--qga SOCKET] [--idle DURATION]`.
pub fn up_command() -> clap::Command {
    Cli::command()
        .name("up")
        .bin_name("vexec up")
        .about("Boot a VM that stays up: run commands in it with `vexec exec NAME -- COMMAND` or `vexec shell NAME`, list with `vexec ps`, end with `vexec down NAME`. Returns once the guest serves.")
        .long_about(None)
        .mut_arg("command", |a| a.hide(true))
        .arg(
            Arg::new("name")
                .long("name")
                .value_name("NAME")
                .default_value("default")
                .help("The VM's name, for exec, shell, ps and down"),
        )
        .arg(
            Arg::new("qga")
                .long("qga")
                .value_name("SOCKET")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Also serve the QEMU guest agent protocol (as qemu-ga speaks it) on this unix socket"),
        )
        .arg(
            Arg::new("idle")
                .long("idle")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .help("Shut the VM down after this long without a command [default: never]"),
        )
        .arg(
            Arg::new("max_execs")
                .long("max-execs")
                .value_name("N")
                .value_parser(clap::value_parser!(u16).range(1..=400))
                .help("How many commands may run at once; more wait [default: 16]"),
        )
        .after_help("Examples:\n  vexec up --name dev -k 6.12.57+deb13-amd64\n  vexec exec dev -- modprobe -v veth\n  vexec up --name ga --qga ./qga.sock --idle 30m")
}

/// Run options that mean nothing for a VM that stays up (they shape one
/// command's run or report), with what to do instead.
const NOT_FOR_UP: &[(&str, &str)] = &[
    ("jobs", "a matrix runs one VM per kernel: use a plain run"),
    (
        "matrix_output",
        "a matrix runs one VM per kernel: use a plain run",
    ),
    ("junit", "reports are a run's: use a plain run"),
    ("json", "reports are a run's: use a plain run"),
    ("shard", "a matrix runs one VM per kernel: use a plain run"),
    ("fail_on_oops", "give it to a plain run"),
    ("results", "give it to a plain run"),
    ("output", "give it to a plain run"),
    ("output_grace", "give it to a plain run"),
    ("root", "`up` serves the host's root; use a plain run"),
    ("busybox", "`up` serves the host's root; use a plain run"),
    ("dump_on_panic", "give it to a plain run"),
    (
        "console_log",
        "the VM's console is kept as console.log in its directory (`vexec ps` shows where)",
    ),
    (
        "dry_run",
        "use `vexec --dry-run` for a plain run's QEMU command line",
    ),
    ("tty", "give -t to `vexec exec`"),
    ("no_tty", "give -T to `vexec exec`"),
];

/// Why `up` refuses the options in `m`, if it does: one named on the
/// command line that means nothing for a VM that stays up, or more than
/// one kernel.
pub fn refused_by_up(m: &ArgMatches) -> Option<String> {
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    if m.get_many::<String>("kernel").is_some_and(|k| k.len() > 1) {
        return Some("`vexec up` boots one kernel: give one -k (start one VM per kernel, each with its --name)".into());
    }
    let (id, instead) = NOT_FOR_UP.iter().find(|(id, _)| given(id))?;
    let flag = Cli::command()
        .get_arguments()
        .find(|a| a.get_id() == *id)
        .map(|a| match (a.get_long(), a.get_short()) {
            (Some(l), _) => format!("--{l}"),
            (None, Some(s)) => format!("-{s}"),
            (None, None) => id.to_string(),
        })
        .unwrap_or_else(|| id.to_string());
    Some(format!("`vexec up` does not take {flag}: {instead}"))
}

/// `up`'s own options from its parsed words.
pub fn up_options(m: &ArgMatches) -> UpOptions {
    UpOptions {
        name: m.get_one::<String>("name").cloned().unwrap_or_default(),
        qga: m.get_one::<PathBuf>("qga").cloned(),
        idle: m.get_one::<Duration>("idle").copied(),
        ports: m
            .get_one::<u16>("max_execs")
            .map_or(DEFAULT_PORTS, |n| *n as usize),
        quiet: false,
    }
}

/// `vexec exec NAME [OPTIONS] -- COMMAND...`.
#[derive(Debug, Args)]
pub struct ExecCli {
    /// The VM (as `vexec up --name` named it, or `run-PID` from `vexec ps`).
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub how: super::CommandOpts,
    /// Kill the command after DURATION (exit status 124).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Say nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<OsString>,
}

impl ExecCli {
    /// The plain run these options describe (what builds the command).
    pub fn as_run(&self) -> Cli {
        let mut cli = Cli::try_parse_from(["vexec"]).expect("no arguments always parse");
        cli.how = self.how.clone();
        cli.machine.timeout = self.timeout;
        cli.machine.quiet = self.quiet;
        cli.command = self.command.clone();
        cli
    }
}

/// `vexec down NAME... | --all`.
#[derive(Debug, Args)]
pub struct DownCli {
    /// The VMs to shut down.
    #[arg(value_name = "NAME", required_unless_present = "all")]
    pub names: Vec<String>,
    /// Every VM of yours made with `vexec up`, and what dead ones left.
    #[arg(long, action = ArgAction::SetTrue, conflicts_with = "names")]
    pub all: bool,
    /// With --all: also stop plain runs still going (`run-PID` in
    /// `vexec ps`), which other terminals wait on.
    #[arg(long, requires = "all")]
    pub runs: bool,
}

use clap::Parser as _;
