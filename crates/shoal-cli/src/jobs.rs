//! `shoal submit` and `shoal job ...`: programs run as command tasks, one
//! or an array of them, owned by the scheduler as a job.

use crate::cluster::{join_target, CliResult, TlsArgs};
use clap::{Args, Subcommand};
use serde_json::Value;
use shoal_proto::{CommandSpec, OutputTarget, TaskKind, TaskSpec};
use shoal_runtime::client::{self, ClientShared};
use shoal_runtime::runtime;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the scheduler is (the same as `shoal status`, with the address as
/// an option: the program's arguments come last).
#[derive(Args, Debug)]
pub(crate) struct Target {
    /// The scheduler's address (default: the scheduler file's).
    #[arg(long = "scheduler")]
    address: Option<String>,
    /// The file `shoal scheduler --scheduler-file` wrote (default:
    /// $SHOAL_SCHEDULER_FILE).
    #[arg(long)]
    scheduler_file: Option<PathBuf>,
    /// The cluster's token file (default: the scheduler file's, else SHOAL_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl Target {
    fn connect(&self) -> Result<Arc<ClientShared>, String> {
        let (address, secret, _) = join_target(
            self.address.clone(),
            self.scheduler_file.as_deref(),
            self.token_file.as_deref(),
            &self.tls,
        )?;
        client::connect(runtime(), &address, &secret)
            .map_err(|e| format!("cannot connect to {address}: {e}"))
    }
}

/// `shoal submit`.
#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    target: Target,
    /// The job's name (default: the program's).
    #[arg(long)]
    name: Option<String>,
    /// Threads each task holds (`SHOAL_CPUS`; 1 to 4096).
    #[arg(long, default_value_t = 1, value_parser = crate::cluster::count::<4096>)]
    cpus: usize,
    /// A resource each task holds, NAME=AMOUNT (repeat for more).
    #[arg(long = "resource", value_name = "NAME=N")]
    resources: Vec<String>,
    /// Standard output: a file (`%{JOB_ID}`, `%{TASK_ID}`, `%{CWD}` expand),
    /// or `none`.
    #[arg(long, default_value = "%{CWD}/job-%{JOB_ID}/%{TASK_ID}.stdout")]
    stdout: String,
    /// Standard error, as --stdout (its tail goes into a failed task's error).
    #[arg(long, default_value = "%{CWD}/job-%{JOB_ID}/%{TASK_ID}.stderr")]
    stderr: String,
    /// Working directory of the tasks (default: this one).
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// A variable set for the tasks, NAME=VALUE (repeat for more).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Cancel the job's remaining tasks once this many failed.
    #[arg(long)]
    max_fails: Option<u32>,
    /// A task fails once this many workers died while running it (a
    /// program that crashes its worker, or the node): 1 to 255 (default 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..))]
    crash_limit: u8,
    /// Stop a task running longer than this ("90s", "10m", "1h30m"):
    /// SIGTERM to its process group, SIGKILL after the workers' grace
    /// period ($SHOAL_STOP_GRACE, 5 s); it fails with a timeout.
    #[arg(long, value_parser = shoal_runtime::duration::parse)]
    time_limit: Option<Duration>,
    /// How long a task expects to run: it is placed only on a worker whose
    /// lifetime (`shoal worker --lifetime`, a Slurm job's end) has at least
    /// that long left. A hint, not a limit.
    #[arg(long, value_parser = shoal_runtime::duration::parse)]
    time_request: Option<Duration>,
    /// A task array: ids "1-1000", "0-100:5", "1-3,7" (`SHOAL_TASK_ID`).
    /// With --each-line or --from-json: which entries to run.
    #[arg(long)]
    array: Option<String>,
    /// One task per line of this file (the line in `SHOAL_ENTRY`, ids from 0).
    #[arg(long, conflicts_with = "from_json")]
    each_line: Option<PathBuf>,
    /// One task per element of this file's JSON array (the element as JSON
    /// in `SHOAL_ENTRY`, ids from 0).
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Wait for the job to end (with progress), as `shoal job wait`.
    #[arg(long)]
    wait: bool,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    command: Vec<String>,
}

/// `shoal job ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum JobCommand {
    /// Every job: id, name, state, tasks by state.
    List(JobListArgs),
    /// One job: counts, times and the first errors.
    Info(JobArgs),
    /// Wait for a job to end, with progress; exits non-zero if a task failed
    /// or was cancelled.
    Wait(JobArgs),
    /// Cancel a job's unfinished tasks (running ones are stopped).
    Cancel(JobArgs),
    /// A job's task ids in a state, as ranges to give back to --array.
    TaskIds(TaskIdsArgs),
}

/// `shoal job list`.
#[derive(Args, Debug)]
pub(crate) struct JobListArgs {
    #[command(flatten)]
    target: Target,
}

/// A command on one job.
#[derive(Args, Debug)]
pub(crate) struct JobArgs {
    /// The job's id.
    job: u32,
    #[command(flatten)]
    target: Target,
}

/// `shoal job task-ids`.
#[derive(Args, Debug)]
pub(crate) struct TaskIdsArgs {
    /// The job's id.
    job: u32,
    /// pending, finished, failed, cancelled, or all.
    #[arg(long, default_value = "all")]
    filter: String,
    #[command(flatten)]
    target: Target,
}

const ASK: Duration = Duration::from_secs(60);

/// "1-3,7,0-100:5": the ids, in order, without repeats.
pub(crate) fn parse_array(s: &str) -> Result<Vec<u64>, String> {
    let bad = |part: &str| {
        format!("{part:?} in --array {s:?} is not an id or a range: use 7, 1-1000 or 0-100:5")
    };
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (range, step) = match part.split_once(':') {
            Some((r, st)) => (r, st.parse::<u64>().map_err(|_| bad(part))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(bad(part));
        }
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (
                a.parse::<u64>().map_err(|_| bad(part))?,
                b.parse::<u64>().map_err(|_| bad(part))?,
            ),
            None => {
                let a = range.parse::<u64>().map_err(|_| bad(part))?;
                (a, a)
            }
        };
        if b < a {
            return Err(format!(
                "the range {part:?} in --array ends before it starts"
            ));
        }
        if (b - a) / step >= 10_000_000 {
            return Err(format!("--array {s:?} has more than 10,000,000 tasks"));
        }
        let mut i = a;
        while i <= b {
            if seen.insert(i) {
                ids.push(i);
            }
            i += step;
        }
    }
    if ids.is_empty() {
        return Err(format!("--array {s:?} names no task"));
    }
    Ok(ids)
}

fn output(s: &str) -> OutputTarget {
    if s == "none" {
        OutputTarget::Null
    } else {
        OutputTarget::File(s.to_string())
    }
}

fn key_value(s: &str, what: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{what} {s:?} must be NAME=VALUE")),
    }
}

/// The job's tasks: `(id, entry)` from --array / --each-line / --from-json.
fn entries(a: &SubmitArgs) -> Result<Vec<(u64, Option<String>)>, String> {
    let listed: Option<Vec<String>> = if let Some(p) = &a.each_line {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read --each-line {}: {e}", p.display()))?;
        Some(text.lines().map(str::to_string).collect())
    } else if let Some(p) = &a.from_json {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read --from-json {}: {e}", p.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("--from-json {}: not JSON: {e}", p.display()))?;
        let Value::Array(items) = v else {
            return Err(format!(
                "--from-json {}: must hold a JSON array (one element per task)",
                p.display()
            ));
        };
        Some(items.iter().map(Value::to_string).collect())
    } else {
        None
    };
    let ids = a.array.as_deref().map(parse_array).transpose()?;
    Ok(match (listed, ids) {
        (None, None) => vec![(0, None)],
        (None, Some(ids)) => ids.into_iter().map(|i| (i, None)).collect(),
        (Some(lines), ids) => {
            if lines.is_empty() {
                return Err("the entry file has no entries".into());
            }
            let ids = ids.unwrap_or_else(|| (0..lines.len() as u64).collect());
            let mut out = Vec::with_capacity(ids.len());
            for i in ids {
                let line = lines.get(i as usize).ok_or_else(|| {
                    format!("--array names entry {i}, but the file has {}", lines.len())
                })?;
                out.push((i, Some(line.clone())));
            }
            out
        }
    })
}

/// Builds the job's task specs (ids from the client).
fn build(a: &SubmitArgs, c: &ClientShared) -> Result<(String, Vec<TaskSpec>), String> {
    let program = a.command.first().ok_or("give the program after --")?;
    let cwd = match &a.cwd {
        Some(p) => std::fs::canonicalize(p).map_err(|e| format!("--cwd {}: {e}", p.display()))?,
        None => std::env::current_dir().map_err(|e| e.to_string())?,
    };
    let env = a
        .env
        .iter()
        .map(|e| key_value(e, "--env"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut resources = Vec::new();
    for r in &a.resources {
        let (k, v) = key_value(r, "--resource")?;
        let n: f64 = v
            .parse()
            .ok()
            .filter(|n: &f64| *n > 0.0 && n.is_finite())
            .ok_or_else(|| format!("--resource {r:?}: the amount must be a positive number"))?;
        resources.push((k, n));
    }
    if a.cpus > 1 {
        resources.push(("CPU".to_string(), a.cpus as f64));
    }
    let name = a.name.clone().unwrap_or_else(|| {
        std::path::Path::new(program)
            .file_name()
            .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned())
    });
    let entries = entries(a)?;
    let first = c.new_ids(entries.len() as u64);
    let time_limit_ms = a.time_limit.map_or(0, |d| (d.as_millis() as u64).max(1));
    let time_request_ms = a.time_request.map_or(0, |d| (d.as_millis() as u64).max(1));
    let cwd_s = cwd.to_string_lossy().into_owned();
    let tasks = entries
        .into_iter()
        .enumerate()
        .map(|(i, (task, entry))| {
            let cmd = CommandSpec {
                argv: a.command.clone(),
                env: env.clone(),
                cwd: Some(cwd_s.clone()),
                stdout: output(&a.stdout),
                stderr: output(&a.stderr),
                task,
                entry,
            };
            TaskSpec {
                id: first + i as u64,
                group: name.clone(),
                key: Some(format!("{name}[{task}]")),
                kind: TaskKind::Command,
                func: Default::default(),
                args: cmd.encode(),
                deps: Vec::new(),
                priority: a.priority,
                retries: 0,
                resources: resources.clone(),
                recompute: true,
                time_limit_ms,
                crash_limit: a.crash_limit,
                time_request_ms,
            }
        })
        .collect();
    Ok((name, tasks))
}

fn answer(json: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("bad answer: {e}"))?;
    match v.get("error").and_then(Value::as_str) {
        Some(e) => Err(e.to_string()),
        None => Ok(v),
    }
}

/// `shoal submit`.
pub(crate) fn run_submit(a: SubmitArgs) -> CliResult {
    let c = a.target.connect()?;
    let t0 = Instant::now();
    let (name, tasks) = build(&a, &c)?;
    let n = tasks.len();
    let reply = c.submit_job(name, a.max_fails.unwrap_or(0), tasks, ASK)?;
    let job = answer(&reply)?["job"]
        .as_u64()
        .ok_or("the scheduler gave no job id")? as u32;
    println!(
        "job {job} submitted: {n} task{} ({:.0} ms)",
        if n == 1 { "" } else { "s" },
        t0.elapsed().as_secs_f64() * 1000.0
    );
    if a.wait {
        drop(c);
        return wait_reconnecting(&a.target, job);
    }
    Ok(())
}

/// How long `shoal job wait` tries to reach a scheduler that is gone (one
/// with a journal may be started again meanwhile).
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// [`wait`], connecting again when the scheduler goes away: a scheduler
/// started again with its journal still knows the job.
fn wait_reconnecting(target: &Target, job: u32) -> CliResult {
    let mut lost: Option<Instant> = None;
    loop {
        let err = match target.connect() {
            Ok(c) => match wait(&c, job) {
                Err(Waiting::Ended(e)) => return Err(e),
                Ok(()) => return Ok(()),
                Err(Waiting::Lost(e)) => e,
            },
            Err(e) => e,
        };
        let since = *lost.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_FOR {
            return Err(format!("{err} (gave up after {RECONNECT_FOR:?})"));
        }
        eprintln!("shoal: {err}; trying again");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Why [`wait`] stopped without the job ending well.
enum Waiting {
    /// The job ended with failures or cancellations (or does not exist).
    Ended(String),
    /// The scheduler is gone.
    Lost(String),
}

/// `shoal job ...`.
pub(crate) fn run_job(cmd: JobCommand) -> CliResult {
    match cmd {
        JobCommand::List(a) => {
            let c = a.target.connect()?;
            let v = answer(&c.query("/api/jobs", ASK)?)?;
            print!("{}", list_table(&v));
            Ok(())
        }
        JobCommand::Info(a) => {
            let c = a.target.connect()?;
            let v = answer(&c.query(&format!("/api/jobs/{}", a.job), ASK)?)?;
            print!("{}", info_text(&v));
            Ok(())
        }
        JobCommand::Wait(a) => wait_reconnecting(&a.target, a.job),
        JobCommand::Cancel(a) => {
            let c = a.target.connect()?;
            let v = answer(&c.cancel_job(a.job, ASK)?)?;
            println!("job {}: {} task(s) cancelled", a.job, v["cancelled"]);
            Ok(())
        }
        JobCommand::TaskIds(a) => {
            let c = a.target.connect()?;
            let path = format!("/api/jobs/{}/tasks?filter={}", a.job, a.filter);
            let v = answer(&c.query(&path, ASK)?)?;
            println!("{}", v["ids"].as_str().unwrap_or(""));
            Ok(())
        }
    }
}

fn counts(v: &Value) -> String {
    format!(
        "{} finished, {} failed, {} cancelled, {} running, {} waiting (of {})",
        v["finished"], v["failed"], v["cancelled"], v["running"], v["waiting"], v["tasks"]
    )
}

/// Polls the job until it ends; progress on stderr.
fn wait(c: &ClientShared, job: u32) -> Result<(), Waiting> {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let mut last_print = Instant::now();
    loop {
        let reply = c
            .query(&format!("/api/jobs/{job}"), ASK)
            .map_err(|e| Waiting::Lost(e.into()))?;
        let v = answer(&reply).map_err(Waiting::Ended)?;
        let line = format!("job {job}: {}", counts(&v));
        let done = v["state"] != "running";
        if tty {
            eprint!("\r\x1b[2K{line}");
            if done {
                eprintln!();
            }
        } else if line != last && (done || last_print.elapsed() >= Duration::from_secs(5)) {
            eprintln!("{line}");
            last_print = Instant::now();
        }
        let _ = std::io::stderr().flush();
        last = line;
        if done {
            return match v["state"].as_str() {
                Some("finished") => Ok(()),
                _ => {
                    print!("{}", errors_text(&v));
                    Err(Waiting::Ended(format!(
                        "job {job} {}: {}",
                        v["state"].as_str().unwrap_or("?"),
                        counts(&v)
                    )))
                }
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn list_table(v: &Value) -> String {
    let mut s = format!(
        "{:>5}  {:<20} {:<10} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
        "ID", "NAME", "STATE", "TASKS", "RUNNING", "FINISHED", "FAILED", "CANCELLED"
    );
    for j in v.as_array().into_iter().flatten() {
        let n = |k: &str| j[k].as_u64().unwrap_or(0);
        s.push_str(&format!(
            "{:>5}  {:<20} {:<10} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            n("id"),
            j["name"].as_str().unwrap_or(""),
            j["state"].as_str().unwrap_or(""),
            n("tasks"),
            n("running"),
            n("finished"),
            n("failed"),
            n("cancelled")
        ));
    }
    s
}

fn errors_text(v: &Value) -> String {
    let mut s = String::new();
    for e in v["errors"].as_array().into_iter().flatten().take(10) {
        s.push_str(&format!(
            "task {}: {}\n",
            e["task"],
            e["error"].as_str().unwrap_or("").trim_end()
        ));
    }
    let failed = v["failed"].as_u64().unwrap_or(0);
    if failed > 10 {
        s.push_str(&format!("... {} more failed tasks\n", failed - 10));
    }
    s
}

fn info_text(v: &Value) -> String {
    let secs = |us: &Value| us.as_u64().map(|u| u as f64 / 1e6);
    let took = match (secs(&v["submitted_us"]), secs(&v["ended_us"])) {
        (Some(a), Some(b)) => format!("{:.3} s", b - a),
        _ => "not ended".into(),
    };
    let mut s = format!(
        "job {}: {}\nstate: {}\ntasks: {}\nduration: {took}\n",
        v["id"],
        v["name"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or(""),
        counts(v)
    );
    if v["max_fails"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!("max fails: {}\n", v["max_fails"]));
    }
    s.push_str(&errors_text(v));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_parse() {
        assert_eq!(parse_array("1-3,7").unwrap(), vec![1, 2, 3, 7]);
        assert_eq!(parse_array("0-10:5").unwrap(), vec![0, 5, 10]);
        assert_eq!(parse_array("3,3,1-3").unwrap(), vec![3, 1, 2]);
        assert_eq!(parse_array("1-100000").unwrap().len(), 100_000);
        for bad in ["", "a", "3-1", "1-5:0", "1-", "0-99999999999"] {
            assert!(parse_array(bad).is_err(), "{bad}");
        }
    }
}
