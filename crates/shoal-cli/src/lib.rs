//! # shoal-cli: the `shoal` command
//!
//! The parser and subcommands live here; the Python wheel exposes them as the
//! `shoal` console script through `shoal._core.cli_main`, and `cargo run -p
//! shoal-cli` runs the same code: `info`, `scheduler`, `worker`, `status`,
//! `top`, `certs`, `submit` and `job`.

#![warn(missing_docs, unreachable_pub)]

use clap::{Parser, Subcommand};

mod cluster;
mod jobs;
mod status;

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a parallel and distributed task runtime for Python"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print versions and what this machine offers.
    Info,
    /// Run a scheduler that workers and clients on other hosts join.
    Scheduler(cluster::SchedulerArgs),
    /// Run worker processes that join a scheduler (and replace any that die).
    Worker(cluster::WorkerArgs),
    /// Print a cluster's workers, their load and memory.
    Status(cluster::StatusArgs),
    /// Scale tests: run light workers that answer every task with None at
    /// once (each its own connection and heartbeats), in one process.
    #[command(hide = true)]
    NoopWorkers(cluster::NoopArgs),
    /// A live terminal view of the cluster's workers and task groups.
    Top(status::TopArgs),
    /// What happened to one task: its state, and its story on the scheduler
    /// and on each worker it was sent to.
    Task(status::TaskArgs),
    /// Make a site CA and a certificate for TLS (`--tls-*` options).
    Certs(cluster::CertsArgs),
    /// Run a program (or an array of them) on the cluster as a job:
    /// `shoal submit --array 1-100 -- ./sim --seed 7`.
    Submit(jobs::SubmitArgs),
    /// List, inspect, wait for and cancel jobs.
    #[command(subcommand)]
    Job(jobs::JobCommand),
    /// Under mpirun/srun: start a cluster on the job's ranks (rank 0: the
    /// scheduler, others: workers) and write --scheduler-file
    /// (`shoal mpi --help` for the options).
    #[command(disable_help_flag = true)]
    Mpi {
        /// Options (handled by `python -m shoal.mpi`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Under srun/mpirun: run a command on rank 0 with a cluster on the
    /// job's ranks, then stop it: `srun -n 4 shoal run -- python script.py`
    /// (`shoal run --help` for the options).
    #[command(disable_help_flag = true)]
    Run {
        /// Options, then `--` and the command.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Checks a worker process's arguments: what is wrong with them, or `Ok`.
pub type CheckArgs = fn(&[String]) -> Result<(), String>;

/// Facts only the embedding interpreter knows.
#[derive(Default, Debug, Clone)]
pub struct HostInfo {
    /// `sys.version` of the interpreter, when run from Python.
    pub python: Option<String>,
    /// Where the `shoal` package was imported from.
    pub package_path: Option<String>,
    /// The interpreter that runs worker processes (`sys.executable`).
    pub executable: Option<String>,
    /// Checks a worker process's arguments (`shoal._worker`'s own parsing of
    /// sizes and resources) before `shoal worker` starts any: what is wrong,
    /// or `Ok`.
    pub check_worker_args: Option<CheckArgs>,
}

/// Runs the command line; returns the exit code.
pub fn run(argv: Vec<String>, host: HostInfo) -> i32 {
    shoal_runtime::local::tie_to_parent();
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    // `shoal info` shows a bad settings file; every other command refuses it.
    if !matches!(cli.command, Command::Info) {
        if let Err(e) = shoal_runtime::settings::check() {
            eprintln!("shoal: {e}");
            return 2;
        }
    }
    let result = match cli.command {
        Command::Info => {
            print!("{}", info(&host));
            Ok(())
        }
        Command::Scheduler(a) => cluster::run_scheduler(a),
        Command::Worker(a) => cluster::run_worker(a, &host),
        Command::Status(a) => status::run_status(a),
        Command::NoopWorkers(a) => cluster::run_noop_workers(a),
        Command::Top(a) => status::run_top(a),
        Command::Task(a) => status::run_task(a),
        Command::Certs(a) => cluster::run_certs(a),
        Command::Submit(a) => jobs::run_submit(a),
        Command::Job(c) => jobs::run_job(c),
        Command::Mpi { args } => launch(&host, "mpi", args),
        Command::Run { args } => launch(&host, "run", args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shoal: {e}");
            1
        }
    }
}

/// `shoal mpi` and `shoal run` live in Python (`shoal.mpi`, which may use
/// mpi4py): this process becomes `python -m shoal.mpi COMMAND ARGS`, so the
/// launcher's environment and signals reach it unchanged.
fn launch(host: &HostInfo, command: &str, args: Vec<String>) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let python = host
        .executable
        .clone()
        .ok_or("`shoal mpi` and `shoal run` need Python: run them through the `shoal` command")?;
    let err = std::process::Command::new(&python)
        .args(["-m", "shoal.mpi", command])
        .args(args)
        .exec();
    Err(format!("cannot run {python}: {err}"))
}

/// The text of `shoal info`.
pub fn info(host: &HostInfo) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut s = String::new();
    s.push_str(&format!("shoal {}\n", env!("CARGO_PKG_VERSION")));
    s.push_str(&format!(
        "protocol version: {}\n",
        shoal_proto::PROTOCOL_VERSION
    ));
    s.push_str(&format!("cpus available: {cpus}\n"));
    s.push_str(&format!(
        "inline result limit: {} bytes\n",
        shoal_proto::INLINE_LIMIT
    ));
    s.push_str(&format!(
        "platform: {}-{}\n",
        std::env::consts::OS,
        std::env::consts::ARCH
    ));
    if let Some(p) = &host.python {
        s.push_str(&format!("python: {}\n", p.replace('\n', " ")));
    }
    if let Some(p) = &host.package_path {
        s.push_str(&format!("package: {p}\n"));
    }
    // Every setting's effective value (docs/configuration.md says what each does).
    use shoal_runtime::settings::{self, Source};
    match settings::check() {
        Ok(Some(p)) => s.push_str(&format!("settings file: {}\n", p.display())),
        Ok(None) => s.push_str(&format!(
            "settings file: none ({} does not exist)\n",
            settings::file_path().map_or("no home directory".into(), |p| p.display().to_string())
        )),
        Err(e) => s.push_str(&format!("settings file: NOT USED: {e}\n")),
    }
    s.push_str("settings (SHOAL_*; * = from the environment, f = from the file):\n");
    for (var, value, source) in settings::effective() {
        let shown = if var.name == "SHOAL_TOKEN" && source != Source::Default {
            "(set)".to_string()
        } else if value.is_empty() {
            "-".to_string()
        } else {
            value
        };
        let mark = match source {
            Source::Environment => "*",
            Source::File => "f",
            Source::Default => " ",
        };
        s.push_str(&format!("  {mark}{:<26} {shown}\n", var.name));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_names_version_and_cpus() {
        let s = info(&HostInfo {
            python: Some("3.11.7".into()),
            ..HostInfo::default()
        });
        assert!(s.starts_with(&format!("shoal {}", env!("CARGO_PKG_VERSION"))));
        assert!(s.contains("cpus available: "));
        assert!(s.contains("python: 3.11.7"));
        assert!(s.contains("SHOAL_HEARTBEAT_TIMEOUT"));
    }

    #[test]
    fn bad_arguments_exit_nonzero() {
        assert_eq!(
            run(vec!["shoal".into(), "nonsense".into()], HostInfo::default()),
            2
        );
        assert_eq!(
            run(vec!["shoal".into(), "info".into()], HostInfo::default()),
            0
        );
    }
}
