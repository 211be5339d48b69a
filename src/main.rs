//! vexec: run a command inside a throwaway VM booted with any Linux kernel.
//!
//! The host tool. With no `vexec-agent` beside it, vexec puts itself in the
//! initramfs, and as PID 1 it is the guest agent too.

use std::ffi::OsString;

use vexec::artifacts::cache;
use vexec::cli::{self, config, settings};
use vexec::kernel::build as kbuild;
use vexec::modes::{bisect, command, matrix, persistent, run, rundir};
use vexec::{host, store};

use clap::Parser;

fn main() {
    if std::process::id() == 1 {
        vexec_agent::run();
    }
    let mut args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        // bisect's options may follow run options, which clap cannot
        // split: its words are split by bisect::parse (clap gives --help).
        Some("bisect") if !asks_help(&args) => std::process::exit(failed_is_125(
            bisect::parse(&args[2..]).and_then(|b| bisect::bisect(&b)),
        )),
        Some(word) if cli::verbs::is_verb(word) => std::process::exit(verb(&args)),
        Some("shell") => {
            // `vexec shell [RUN OPTIONS]`: the run's options, no command.
            let mut shell = cli::verbs::shell_command();
            let matches = parsed(shell.try_get_matches_from_mut(&args[1..]));
            let c = parsed(<cli::Cli as clap::FromArgMatches>::from_arg_matches(
                &matches,
            ));
            // `vexec shell NAME`: a login shell in a VM that is up.
            if let [name] = &c.command[..]
                && !args.iter().any(|a| a == "--")
            {
                std::process::exit(shell_in(&c, &name.to_string_lossy()));
            }
            if !c.command.is_empty() {
                parsed::<()>(Err(shell.error(
                    clap::error::ErrorKind::UnknownArgument,
                    "`vexec shell` takes run options only; run a command with `vexec [OPTIONS] -- COMMAND`",
                )));
            }
            args.remove(1);
        }
        Some("up") => std::process::exit(up(&args, false)),
        Some(persistent::up::DAEMON_WORD) => std::process::exit(up(&args, true)),
        Some(persistent::up::CLEANER_WORD) => {
            std::process::exit(persistent::up::cleaner(&args[2..]))
        }
        Some("__bisect-step") => std::process::exit(match bisect::parse(&args[2..]) {
            Ok(b) => bisect::step(&b),
            Err(e) => {
                vexec::say!("vexec: error: {e}");
                128
            }
        }),
        _ => {}
    }
    std::process::exit(failed_is_125(plain_run(&args)));
}

/// The exit status of a run, or 125 (vexec's own failure) with the error.
fn failed_is_125<E: std::fmt::Display>(r: Result<i32, E>) -> i32 {
    r.unwrap_or_else(|e| {
        vexec::say!("vexec: error: {e}");
        vexec::status::STATUS_FAILED
    })
}

/// `vexec [OPTIONS] [--] [COMMAND...]`: one kernel, or a matrix.
fn plain_run(args: &[OsString]) -> Result<i32, String> {
    let separator = args.iter().any(|a| a == "--");
    let mut cli = parsed(cli::Cli::try_parse_from(args));
    // Where the command starts in argv (for the matrix's per-kernel runs):
    // it is always the trailing words.
    let command_at = (!cli.command.is_empty()).then(|| args.len() - cli.command.len());
    let relay = host::events::SignalRelay::install()
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let host = host_facts()?;
    let config = load_config(&cli, &host.cwd).map_err(|e| e.to_string())?;
    let k = kernels(&cli, config.as_ref(), &host)?;
    if k.len() > 1 || cli.shard.is_some() || cli.junit.is_some() || cli.json.is_some() {
        return Ok(run_matrix(&cli, args, command_at, k));
    }
    cli.kernel = k;
    let spec = settings::build(cli, config.as_ref(), host, separator).map_err(|e| e.to_string())?;
    run::run(&spec, &relay).map_err(|e| e.to_string())
}

/// A parse's result; --help and --version are answers (exit 0), bad input
/// is vexec's failure: 125, which `git bisect run` skips.
fn parsed<T>(r: Result<T, clap::Error>) -> T {
    match r {
        Ok(v) => v,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            std::process::exit(vexec::status::STATUS_FAILED);
        }
    }
}

/// True when `-h`/`--help` comes before any `--`.
fn asks_help(args: &[OsString]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
}

/// Runs `vexec VERB ...`; returns the exit status.
fn verb(args: &[OsString]) -> i32 {
    use cli::verbs::{Verb, VerbCli};
    let cache_root = || {
        cache::Cache::default_root(
            std::env::var_os("XDG_CACHE_HOME").map(Into::into),
            std::env::var_os("HOME").map(Into::into),
        )
    };
    match parsed(VerbCli::try_parse_from(args)).verb {
        Verb::Kernel(action) => failed_is_125(store::main(&action.plain(), cache_root())),
        Verb::Cache(action) => {
            failed_is_125(vexec::modes::cache::main(&action.plain(), cache_root()))
        }
        Verb::RunDir(c) => rundir::main(&c.options()),
        Verb::Kconfig(a) => failed_is_125(kbuild::kconfig(&a.plain()).map(|_| 0)),
        Verb::Build(a) => failed_is_125(kbuild::build(&a.plain()).map(|_| 0)),
        // Reached only when clap answered nothing itself (see main).
        Verb::Bisect(_) => {
            failed_is_125(bisect::parse(&args[2..]).and_then(|b| bisect::bisect(&b)))
        }
        Verb::Exec(e) => failed_is_125(in_vm(&e.name, e.as_run())),
        Verb::Ps => failed_is_125(persistent::ps()),
        Verb::Down(d) => failed_is_125(persistent::down(&d.names, d.all, d.runs)),
        Verb::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut cli::verbs::everything(), "vexec", &mut out);
            0
        }
        Verb::Manpage => failed_is_125(
            clap_mangen::Man::new(cli::verbs::everything())
                .render(&mut std::io::stdout().lock())
                .map(|_| 0)
                .map_err(|e| format!("writing the man page: {e}")),
        ),
    }
}

/// `vexec up ...` (`daemon`: the up process it starts, given the same
/// words): the run options, with no config file change.
fn up(args: &[OsString], daemon: bool) -> i32 {
    let mut command = cli::vms::up_command();
    let matches = parsed(command.try_get_matches_from_mut(&args[1..]));
    let mut opts = cli::vms::up_options(&matches);
    let c = parsed(<cli::Cli as clap::FromArgMatches>::from_arg_matches(
        &matches,
    ));
    opts.quiet = c.machine.quiet;
    if let Some(refused) = cli::vms::refused_by_up(&matches) {
        vexec::say!("vexec: error: {refused}");
        return vexec::status::STATUS_FAILED;
    }
    if !c.command.is_empty() {
        vexec::say!(
            "vexec: error: `vexec up` takes run options only; run commands with `vexec exec NAME -- COMMAND` once it is up"
        );
        return vexec::status::STATUS_FAILED;
    }
    if !daemon {
        return failed_is_125(persistent::up::up(&args[2..], &opts));
    }
    let built = host_facts().and_then(|host| {
        let config = load_config(&c, &host.cwd).map_err(|e| e.to_string())?;
        settings::build(c, config.as_ref(), host, false).map_err(|e| e.to_string())
    });
    failed_is_125(
        built.and_then(|spec| persistent::up::daemon(&spec, &opts).map_err(|e| e.to_string())),
    )
}

/// The run a command in VM `entry` describes: the caller's environment
/// with the VM's defaults (`up`'s `-e`, `--sudo`, `--timeout`...), then
/// the config file found from here and the command's own options over
/// them. The file's setup and teardown are the VM's (run by `up` and
/// `down`), not each command's.
fn exec_spec(
    entry: &persistent::registry::Entry,
    c: cli::Cli,
) -> Result<vexec::modes::spec::RunSpec, String> {
    let defaults = entry.info().map(|i| i.defaults).unwrap_or_default();
    let mut host = host_facts()?;
    host.env = defaults.env_changes().apply(host.env);
    let config = load_config(&c, &host.cwd).map_err(|e| e.to_string())?;
    let mut spec = settings::build(c, config.as_ref(), host, true).map_err(|e| e.to_string())?;
    spec.sudo |= defaults.sudo;
    spec.timeout = spec
        .timeout
        .or(defaults.timeout_ms.map(std::time::Duration::from_millis));
    spec.setup.clear();
    spec.teardown.clear();
    Ok(spec)
}

/// Runs the command `c` describes in the VM `name`.
fn in_vm(name: &str, c: cli::Cli) -> Result<i32, String> {
    let entry = persistent::attach::find(name).map_err(|e| e.to_string())?;
    let spec = exec_spec(&entry, c)?;
    let relay = host::events::SignalRelay::install()
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    persistent::attach::warn_unshared_cwd(&entry, &spec);
    persistent::attach::exec(&entry, &spec, command::exec_for(&spec), &relay)
        .map_err(|e| e.to_string())
}

/// `vexec shell NAME`: the login shell in that VM, with `shell`'s options.
fn shell_in(c: &cli::Cli, name: &str) -> i32 {
    let mut s = cli::Cli::try_parse_from(["vexec"]).expect("no arguments always parse");
    s.how = c.how.clone();
    s.machine.quiet = c.machine.quiet;
    failed_is_125(in_vm(name, s))
}

/// The only place that reads the process environment and host facts.
/// Fails when the working directory is gone: the command must never run
/// somewhere else than where it was asked to.
fn host_facts() -> Result<settings::Host, String> {
    let cwd = std::env::current_dir().map_err(|e| {
        format!(
            "the working directory cannot be found ({e}): it was deleted or moved away; cd to an existing directory and run again"
        )
    })?;
    // SAFETY: plain queries of the process's credentials and hostname.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let groups = {
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut g = vec![0 as libc::gid_t; n.max(0) as usize];
        let n = unsafe { libc::getgroups(g.len() as i32, g.as_mut_ptr()) };
        g.truncate(n.max(0) as usize);
        g
    };
    let hostname = {
        let mut buf = [0u8; 256];
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    };
    Ok(settings::Host {
        uid,
        gid,
        groups,
        hostname,
        cwd,
        env: std::env::vars_os().collect(),
        cache_dir: cache::Cache::default_root(
            std::env::var_os("XDG_CACHE_HOME").map(Into::into),
            std::env::var_os("HOME").map(Into::into),
        ),
        running_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        path_var: std::env::var_os("PATH"),
        limits: caller_limits(),
    })
}

/// The caller's resource limits (soft and hard), every one Linux has.
fn caller_limits() -> Vec<vexec::protocol::Rlimit> {
    use libc::*;
    [
        RLIMIT_CPU,
        RLIMIT_FSIZE,
        RLIMIT_DATA,
        RLIMIT_STACK,
        RLIMIT_CORE,
        RLIMIT_RSS,
        RLIMIT_NPROC,
        RLIMIT_NOFILE,
        RLIMIT_MEMLOCK,
        RLIMIT_AS,
        RLIMIT_LOCKS,
        RLIMIT_SIGPENDING,
        RLIMIT_MSGQUEUE,
        RLIMIT_NICE,
        RLIMIT_RTPRIO,
        RLIMIT_RTTIME,
    ]
    .into_iter()
    .filter_map(|r| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into `l`.
        (unsafe { libc::getrlimit(r as _, &mut l) } == 0).then_some(vexec::protocol::Rlimit {
            resource: r,
            soft: l.rlim_cur,
            hard: l.rlim_max,
        })
    })
    .collect()
}

/// The kernels asked for (flags, else the config's `kernels`), with sets
/// and patterns expanded.
fn kernels(
    cli: &cli::Cli,
    config: Option<&config::Loaded>,
    host: &settings::Host,
) -> Result<Vec<String>, String> {
    let refs: Vec<String> = if !cli.kernel.is_empty() {
        cli.kernel.clone()
    } else {
        config
            .map(|c| c.config.kernels.iter().map(|k| c.kernel_ref(k)).collect())
            .unwrap_or_default()
    };
    let sets = config.map(|c| c.kernel_sets()).unwrap_or_default();
    let needs_known = refs
        .iter()
        .any(|r| matrix::is_pattern(r) || r.starts_with('@'));
    let known = if needs_known {
        matrix::known_kernels(
            std::path::Path::new("/boot"),
            Some(&host.cache_dir.join("kernels")),
        )
    } else {
        Vec::new()
    };
    matrix::expand(&refs, &sets, &known).map_err(|e| e.to_string())
}

/// Runs a kernel matrix; returns the exit status.
fn run_matrix(
    cli: &cli::Cli,
    args: &[OsString],
    command_at: Option<usize>,
    kernels: Vec<String>,
) -> i32 {
    let Some(at) = command_at else {
        vexec::say!(
            "vexec: error: a run on several kernels needs a command: vexec -k A,B -- COMMAND"
        );
        return vexec::status::STATUS_FAILED;
    };
    let mut sorted = kernels;
    if let Some(s) = cli.shard {
        // Shards are taken from a stable order, whatever order -k gave.
        sorted.sort();
        sorted = matrix::shard(&sorted, s);
    }
    let guest_mib = cli
        .machine
        .memory
        .as_deref()
        .and_then(|m| m.trim_end_matches('M').parse().ok())
        .unwrap_or(1024);
    let m = matrix::Matrix {
        kernels: sorted,
        options: matrix::run_options(&args[1..at]),
        command: args[at..].to_vec(),
        jobs: cli
            .jobs
            .map(|j| j as usize)
            .unwrap_or_else(|| matrix::default_jobs(guest_mib)),
        mode: cli.matrix_output,
        junit: cli.junit.clone(),
        json: cli.json.clone(),
        results: cli.results,
        dry_run: cli.dry_run,
    };
    match matrix::run(&m) {
        Ok(code) => code,
        Err(e) => {
            vexec::say!("vexec: error: {e}");
            vexec::status::STATUS_FAILED
        }
    }
}

/// The config file in force: `--config`, else the nearest `.vexec.toml`,
/// unless `--no-config`.
fn load_config(
    cli: &cli::Cli,
    cwd: &std::path::Path,
) -> Result<Option<config::Loaded>, config::ConfigError> {
    if cli.no_config {
        return Ok(None);
    }
    match cli.config.clone().or_else(|| config::find(cwd)) {
        Some(p) => config::load(&p).map(Some),
        None => Ok(None),
    }
}
