//! Command tasks: a program run by a worker's execution thread, in its own
//! process group, with a time limit and a stop that reach every process the
//! program started (SIGTERM to the group, SIGKILL after a grace period).
//!
//! The thread waits on a pidfd, so a program that exits is noticed at once
//! and the group's id stays reserved (the leader is not reaped) until the
//! last signal is sent: no signal can reach a recycled process id.

use shoal_proto::{CommandSpec, OutputTarget};
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Bytes of standard error quoted in a failing task's error.
pub const STDERR_TAIL: usize = 2048;

/// How often a waiting thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// One run of a command task.
pub struct Run<'a> {
    /// What to run.
    pub spec: &'a CommandSpec,
    /// `SHOAL_JOB_ID` (0: not part of a job).
    pub job: u32,
    /// `SHOAL_CPUS`: the threads it holds.
    pub cpus: u32,
    /// Variables the worker adds (the GPUs it was given).
    pub extra_env: &'a [(String, String)],
    /// Stopped (as [`Ending::TimedOut`]) after this long.
    pub time_limit: Option<Duration>,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Set by the worker when the scheduler says stop (a cancel).
    pub stop: &'a AtomicBool,
    /// Set to the program's process group while it runs (0 before and
    /// after), so that a worker that exits can take it along.
    pub group: &'a AtomicU32,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this status.
    Exited(i32),
    /// A signal it did not send itself to killed it.
    Signaled(i32),
    /// It ran past its time limit and was stopped.
    TimedOut,
    /// It was stopped because its task was cancelled.
    Stopped,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// How it ended.
    pub ending: Ending,
    /// Standard output, when captured.
    pub stdout: Option<Vec<u8>>,
    /// Standard error, when captured.
    pub stderr: Option<Vec<u8>>,
    /// The last [`STDERR_TAIL`] bytes of standard error (captured or
    /// written to a file), lossily decoded: for the error of a failing task.
    pub stderr_tail: String,
    /// It ignored SIGTERM and was killed after the grace period.
    pub killed: bool,
}

/// Replaces `%{JOB_ID}`, `%{TASK_ID}` and `%{CWD}` in an output path.
pub fn expand(template: &str, job: u32, task: u64, cwd: &Path) -> PathBuf {
    let s = template
        .replace("%{JOB_ID}", &job.to_string())
        .replace("%{TASK_ID}", &task.to_string())
        .replace("%{CWD}", &cwd.to_string_lossy());
    let p = PathBuf::from(s);
    if p.is_absolute() {
        p
    } else {
        cwd.join(p)
    }
}

fn stdio(
    target: &OutputTarget,
    job: u32,
    task: u64,
    cwd: &Path,
) -> io::Result<(Stdio, Option<PathBuf>)> {
    Ok(match target {
        OutputTarget::Capture => (Stdio::piped(), None),
        OutputTarget::Null => (Stdio::null(), None),
        OutputTarget::File(t) => {
            let path = expand(t, job, task, cwd);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot make {}: {e}", dir.display()))
                })?;
            }
            let f = std::fs::File::create(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            })?;
            (Stdio::from(f), Some(path))
        }
    })
}

/// Runs the command to its end (or its stop). `Err` only when it could not
/// start; the message says what and why.
pub fn run(r: &Run<'_>) -> io::Result<Outcome> {
    let spec = r.spec;
    let Some(program) = spec.argv.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the command is empty",
        ));
    };
    let cwd = match &spec.cwd {
        Some(c) => PathBuf::from(c),
        None => std::env::current_dir()?,
    };
    let (out, out_path) = stdio(&spec.stdout, r.job, spec.task, &cwd)?;
    let (err, err_path) = stdio(&spec.stderr, r.job, spec.task, &cwd)?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(&spec.argv[1..])
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own group: a stop reaches what it started, and a Ctrl-C in
        // the worker's terminal does not.
        .process_group(0)
        .env("SHOAL_JOB_ID", r.job.to_string())
        .env("SHOAL_TASK_ID", spec.task.to_string())
        .env("SHOAL_CPUS", r.cpus.to_string());
    if let Some(e) = &spec.entry {
        cmd.env("SHOAL_ENTRY", e);
    }
    cmd.envs(r.extra_env.iter().map(|(k, v)| (k, v)));
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if r.stop.load(Ordering::Acquire) {
        return Ok(Outcome {
            ending: Ending::Stopped,
            stdout: None,
            stderr: None,
            stderr_tail: String::new(),
            killed: false,
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {program:?} (in {}): {e}", cwd.display()),
        )
    })?;
    r.group.store(child.id(), Ordering::Release);
    // Pipes are drained by helper threads so a chatty program never blocks.
    let readers = (
        child.stdout.take().map(drain),
        child.stderr.take().map(drain),
    );
    let (ending, killed) = wait(&mut child, r);
    let stdout = readers.0.map(|h| h.join().unwrap_or_default());
    let stderr = readers.1.map(|h| h.join().unwrap_or_default());
    let stderr_tail = match (&stderr, &err_path) {
        (Some(b), _) => tail_text(&b[b.len().saturating_sub(STDERR_TAIL)..]),
        (None, Some(p)) => file_tail(p).unwrap_or_default(),
        _ => String::new(),
    };
    let _ = out_path;
    Ok(Outcome {
        ending,
        stdout,
        stderr,
        stderr_tail,
        killed,
    })
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

fn tail_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn file_tail(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(io::SeekFrom::Start(len.saturating_sub(STDERR_TAIL as u64)))?;
    let mut b = Vec::new();
    f.read_to_end(&mut b)?;
    Ok(tail_text(&b))
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; on success it returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: fd is a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits up to `timeout` for the pidfd to say the process exited.
fn exited_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0
}

/// Sends `sig` to process group `pgid`.
pub fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: kill(-pgid) signals the group; the leader is not reaped yet,
    // so the id is still this group's.
    unsafe { libc::kill(-(pgid as libc::pid_t), sig) };
}

/// Waits for the leader to exit, stopping the group on a stop or at the
/// time limit (SIGTERM, then SIGKILL after the grace period); reaps it.
fn wait(child: &mut Child, r: &Run<'_>) -> (Ending, bool) {
    let pid = child.id();
    let started = Instant::now();
    let deadline = r.time_limit.map(|l| started + l);
    let pidfd = pidfd_open(pid);
    // Why it was stopped, and when SIGKILL is due.
    let mut stopping: Option<(Ending, Instant)> = None;
    let mut killed = false;
    loop {
        let now = Instant::now();
        let mut next = now + STOP_POLL;
        if let (Some(d), None) = (deadline, stopping) {
            next = next.min(d);
        }
        if let Some((_, kill_at)) = stopping {
            next = next.min(kill_at);
        }
        let timeout = next.saturating_duration_since(now);
        let exited = match &pidfd {
            Some(fd) => exited_within(fd, timeout),
            None => {
                // No pidfd (old kernel): poll.
                std::thread::sleep(timeout.min(Duration::from_millis(5)));
                matches!(peek_exited(pid), Some(true))
            }
        };
        if exited {
            break;
        }
        let now = Instant::now();
        if stopping.is_none() {
            let why = if r.stop.load(Ordering::Acquire) {
                Some(Ending::Stopped)
            } else if deadline.is_some_and(|d| now >= d) {
                Some(Ending::TimedOut)
            } else {
                None
            };
            if let Some(why) = why {
                signal_group(pid, libc::SIGTERM);
                stopping = Some((why, now + r.grace));
            }
        } else if let Some((_, kill_at)) = stopping {
            if now >= kill_at && !killed {
                signal_group(pid, libc::SIGKILL);
                killed = true;
            }
        }
    }
    if stopping.is_some() {
        // What the program left running in its group goes with it.
        signal_group(pid, libc::SIGKILL);
    }
    r.group.store(0, Ordering::Release);
    let status = child.wait();
    let ending = match (stopping, status) {
        (Some((why, _)), _) => why,
        (None, Ok(s)) => match (s.code(), s.signal()) {
            (Some(c), _) => Ending::Exited(c),
            (None, Some(sig)) => Ending::Signaled(sig),
            _ => Ending::Exited(-1),
        },
        (None, Err(_)) => Ending::Exited(-1),
    };
    (ending, killed)
}

/// Whether the process exited, without reaping it (waitid with WNOWAIT).
fn peek_exited(pid: u32) -> Option<bool> {
    // SAFETY: waitid writes only the siginfo it is given.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: filled by waitid; 0 when nothing exited.
    Some(unsafe { info.si_pid() } != 0)
}

/// A signal's name, for errors (`SIGKILL`), or its number.
pub fn signal_name(sig: i32) -> String {
    let names = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGXCPU, "SIGXCPU"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == sig)
        .map_or_else(|| format!("signal {sig}"), |(_, s)| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: None,
            stdout: OutputTarget::Capture,
            stderr: OutputTarget::Capture,
            task: 7,
            entry: Some("line".into()),
        }
    }

    fn go(spec: &CommandSpec, limit: Option<Duration>, stop: &AtomicBool) -> Outcome {
        run(&Run {
            spec,
            job: 3,
            cpus: 2,
            extra_env: &[],
            time_limit: limit,
            grace: Duration::from_millis(300),
            stop,
            group: &AtomicU32::new(0),
        })
        .unwrap()
    }

    #[test]
    fn exit_status_output_and_environment() {
        let stop = AtomicBool::new(false);
        let s = spec(&[
            "sh",
            "-c",
            "echo $SHOAL_JOB_ID $SHOAL_TASK_ID $SHOAL_CPUS $SHOAL_ENTRY; echo oops >&2; exit 3",
        ]);
        let o = go(&s, None, &stop);
        assert_eq!(o.ending, Ending::Exited(3));
        assert_eq!(o.stdout.unwrap(), b"3 7 2 line\n");
        assert_eq!(o.stderr_tail, "oops\n");
        let e = run(&Run {
            spec: &spec(&["no-such-program-shoal"]),
            job: 0,
            cpus: 1,
            extra_env: &[],
            time_limit: None,
            grace: Duration::ZERO,
            stop: &stop,
            group: &AtomicU32::new(0),
        })
        .unwrap_err();
        assert!(e.to_string().contains("no-such-program-shoal"), "{e}");
    }

    #[test]
    fn a_time_limit_stops_the_whole_group_even_when_sigterm_is_ignored() {
        let stop = AtomicBool::new(false);
        let dir = std::env::temp_dir().join(format!("shoal-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        // The shell ignores TERM and leaves a grandchild behind.
        let script = format!(
            "trap '' TERM; sleep 60 & echo $! > {}; while true; do sleep 0.05; done",
            pidfile.display()
        );
        let t = Instant::now();
        let o = go(
            &spec(&["sh", "-c", &script]),
            Some(Duration::from_millis(300)),
            &stop,
        );
        assert_eq!(o.ending, Ending::TimedOut);
        assert!(o.killed, "needed SIGKILL");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let grandchild: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: signal 0 only checks existence.
        let alive = unsafe { libc::kill(grandchild, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "the group's other processes are killed too");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_stop_flag_ends_it_with_sigterm() {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::Release);
            });
            let o = go(&spec(&["sleep", "30"]), None, &stop);
            assert_eq!(o.ending, Ending::Stopped);
            assert!(!o.killed, "sleep obeys SIGTERM");
        });
    }

    #[test]
    fn output_files_expand_placeholders() {
        let stop = AtomicBool::new(false);
        let dir = std::env::temp_dir().join(format!("shoal-out-{}", std::process::id()));
        let mut s = spec(&["sh", "-c", "echo hi; echo err >&2; exit 1"]);
        s.cwd = Some(dir.to_string_lossy().into_owned());
        std::fs::create_dir_all(&dir).unwrap();
        s.stdout = OutputTarget::File("job-%{JOB_ID}/%{TASK_ID}.stdout".into());
        s.stderr = OutputTarget::File("%{CWD}/job-%{JOB_ID}/%{TASK_ID}.stderr".into());
        let o = go(&s, None, &stop);
        assert_eq!(o.ending, Ending::Exited(1));
        assert_eq!(
            std::fs::read_to_string(dir.join("job-3/7.stdout")).unwrap(),
            "hi\n"
        );
        assert_eq!(o.stderr_tail, "err\n");
        let _ = std::fs::remove_dir_all(dir);
    }
}
