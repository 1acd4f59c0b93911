//! Worker processes of an embedded cluster: started, watched, replaced when
//! they die, and stopped with the cluster.
//!
//! No orphans, nothing left behind: each child gets `PR_SET_PDEATHSIG`
//! (SIGTERM when the thread that started it, the supervisor thread, goes
//! away, which includes the client process dying: the worker retires), a
//! worker exits by itself as soon as its scheduler connection closes
//! (removing its files in tmpfs, and those of the dead processes before
//! it), and one whose parent is gone ends within 30 s whatever it runs.

use crate::net::{Address, Secret};
use crate::slots::SlotFile;
use crate::zygote::Zygote;
use parking_lot::Mutex;
use shoal_proto::Role;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to start one worker process.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    /// Executable (the Python interpreter).
    pub program: String,
    /// Arguments (the worker module and its options).
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Keep replacing dead workers, once a second, however often they die
    /// (workers that wait for a lost scheduler to come back); otherwise
    /// give up after [`MAX_RESPAWNS`] in [`RESPAWN_WINDOW`].
    pub reconnect: bool,
    /// The scheduler runs in another process (`shoal worker`): when it goes
    /// silent, replacements would wait on the same silence, so none is
    /// started (unless `reconnect`). An embedded cluster's scheduler lives
    /// in the supervisor's own process, which was frozen if it fell silent:
    /// replacements find it awake.
    pub scheduler_elsewhere: bool,
    /// Where to report a worker's death with the tasks it was running
    /// ([`crate::slots`]); None: its connection closing is all the
    /// scheduler learns.
    pub obituaries: Option<Obituaries>,
    /// Fork workers from this zygote ([`crate::zygote`]) instead of
    /// starting `program`: `args` are then the worker module's options.
    pub zygote: Option<Arc<Zygote>>,
}

/// The scheduler a supervisor reports deaths to.
#[derive(Clone)]
pub struct Obituaries {
    /// Its address.
    pub scheduler: Address,
    /// The cluster's secret.
    pub secret: Secret,
}

impl std::fmt::Debug for Obituaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Obituaries({})", self.scheduler)
    }
}

/// A worker process and the page where it says what it runs.
struct Kid {
    child: Proc,
    slots: Option<SlotFile>,
}

/// Started by this process, or forked by a zygote (which reaps it).
enum Proc {
    Own(Child),
    Forked(u32, Arc<Zygote>),
}

impl Kid {
    fn id(&self) -> u32 {
        match &self.child {
            Proc::Own(c) => c.id(),
            Proc::Forked(pid, _) => *pid,
        }
    }

    /// How it ended, once it has (reaped).
    fn try_wait(&mut self) -> Option<ExitStatus> {
        match &mut self.child {
            Proc::Own(c) => c.try_wait().ok().flatten(),
            Proc::Forked(pid, z) => match z.try_wait(*pid) {
                Ok(s) => s,
                // The zygote is gone, and its workers with it (PDEATHSIG).
                Err(_) => Some(ExitStatus::from_raw(libc::SIGKILL)),
            },
        }
    }

    /// Kills it and waits for its end (a forked one: up to 2 s).
    fn kill(&mut self) {
        match &mut self.child {
            Proc::Own(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Forked(pid, _) => {
                // SAFETY: kill(2) of a worker the zygote has not reported
                // ended, so not yet reaped: the pid is still that worker's.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.try_wait().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

/// Exit status of a worker process that the scheduler told to stop: the
/// only exit a supervisor takes as quiet. Not 0: a task may end its process
/// with `os._exit(0)`, C `exit(0)` or a Fortran `STOP`, and that is a crash
/// (replaced, and counted against the task).
pub const EXIT_STOPPED: i32 = 80;

/// Exit status of a worker process the scheduler refused (wrong token,
/// another protocol version): starting another cannot help, so none is
/// started and the supervisor reports why ([`LocalCluster::failure`]).
pub const EXIT_REFUSED: i32 = 77;

/// Exit status of a worker process whose scheduler went silent (hung,
/// frozen, or cut off by the network; a scheduler that dropped the worker
/// closes the connection instead), or could not be reached at all. A
/// replacement would meet the same silence, so for a scheduler elsewhere
/// none is started unless the supervisor was told to wait for it to come
/// back (`reconnect`).
pub const EXIT_SCHEDULER_SILENT: i32 = 78;

/// Replacements allowed within [`RESPAWN_WINDOW`] before giving up: a worker
/// that cannot even start must not be restarted forever. Only workers that
/// died before joining their scheduler count, where the supervisor can tell
/// ([`SlotFile::joined`]): workers killed from outside, however often, are
/// replaced.
const MAX_RESPAWNS: usize = 20;
const RESPAWN_WINDOW: Duration = Duration::from_secs(30);

/// Supervises worker processes: keeps [`target`](LocalCluster::scale) of
/// them running, replacing those that crash.
pub struct LocalCluster {
    stop: Arc<AtomicBool>,
    /// Set: dead workers are no longer replaced (the cluster is stopping
    /// gracefully; those still alive hand their data over first).
    no_respawn: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<u32>>>,
    failure: Arc<Mutex<Option<String>>>,
    /// How many workers to keep, and the processes asked to retire (never
    /// replaced, not counted against the target).
    wanted: Arc<Mutex<Wanted>>,
    supervisor: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Wanted {
    target: usize,
    retiring: Vec<u32>,
}

fn spawn(cmd: &WorkerCommand, supervisor: u64) -> std::io::Result<Kid> {
    // Without a page (no memfd here), deaths are judged as before: by what
    // the worker reported started.
    let slots = match cmd.obituaries {
        Some(_) => SlotFile::create()
            .inspect_err(|e| tracing::warn!("no task slots for a worker: {e}"))
            .ok(),
        None => None,
    };
    let slot_fd = slots.as_ref().map(SlotFile::raw_fd);
    let mut env = cmd.env.clone();
    if slots.is_some() {
        env.push(("SHOAL_SUPERVISOR".into(), supervisor.to_string()));
    }
    if let Some(z) = &cmd.zygote {
        // SHOAL_SLOT_FD: the zygote sets the number the page gets there.
        let pid = z.fork(&cmd.args, &env, slot_fd)?;
        return Ok(Kid {
            child: Proc::Forked(pid, z.clone()),
            slots,
        });
    }
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args).envs(env);
    if let Some(fd) = slot_fd {
        c.env("SHOAL_SLOT_FD", fd.to_string());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: runs in the forked child before exec; prctl, getppid,
        // fcntl and _exit are async-signal-safe and touch no memory of the
        // parent.
        unsafe {
            c.pre_exec(move || {
                if !die_with(parent) {
                    libc::_exit(0);
                }
                if let Some(fd) = slot_fd {
                    crate::slots::inherit(fd)?;
                }
                Ok(())
            });
        }
    }
    let child = c.spawn()?;
    Ok(Kid {
        child: Proc::Own(child),
        slots,
    })
}

/// Tells the scheduler that worker process `pid` died running `running`.
/// Best effort, within a few seconds: without it the scheduler judges by
/// what the worker reported started.
fn report_death(to: &Obituaries, supervisor: u64, pid: u32, running: Vec<(u64, Option<u32>)>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::warn!("cannot report worker {pid}'s death: {e}"),
    };
    let role = Role::Obituary {
        supervisor,
        pid,
        running,
    };
    let sent = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(3),
            crate::net::handshake(&to.scheduler, role, &to.secret),
        )
        .await
    });
    match sent {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::info!("cannot report worker {pid}'s death: {e}"),
        Err(_) => tracing::info!("cannot report worker {pid}'s death: timed out"),
    }
}

impl LocalCluster {
    /// Starts `n` workers and a supervisor thread that replaces dead ones.
    pub fn start(cmd: WorkerCommand, n: usize) -> std::io::Result<LocalCluster> {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(Vec::new()));
        let failure = Arc::new(Mutex::new(None));
        let no_respawn = Arc::new(AtomicBool::new(false));
        let wanted = Arc::new(Mutex::new(Wanted {
            target: n,
            retiring: Vec::new(),
        }));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let shared = Supervised {
            // Nonzero: 0 says "no supervisor reports".
            id: u64::from_le_bytes(crate::net::nonce()[..8].try_into().expect("8 bytes")) | 1,
            stop: stop.clone(),
            no_respawn: no_respawn.clone(),
            pids: pids.clone(),
            failure: failure.clone(),
            wanted: wanted.clone(),
        };
        let supervisor = std::thread::Builder::new()
            .name("shoal-supervisor".into())
            .spawn(move || {
                // Leftovers of processes that crashed earlier (all of them at once).
                crate::shm::sweep(None);
                let mut children = Vec::new();
                for _ in 0..n {
                    match spawn(&cmd, shared.id) {
                        Ok(c) => children.push(c),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                *shared.pids.lock() = children.iter().map(Kid::id).collect();
                let _ = ready_tx.send(Ok(()));
                supervise(cmd, children, shared);
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("worker supervisor died"))??;
        Ok(LocalCluster {
            stop,
            no_respawn,
            pids,
            failure,
            wanted,
            supervisor: Some(supervisor),
        })
    }

    /// Keeps `n` workers: starts more (within a few tens of milliseconds),
    /// or asks the newest to retire (SIGTERM: each hands the results still
    /// needed to the others, then exits; one still starting exits at once).
    /// Returns the process ids asked to retire.
    pub fn scale(&self, n: usize) -> Vec<u32> {
        let mut w = self.wanted.lock();
        w.target = n;
        let live: Vec<u32> = self
            .pids()
            .into_iter()
            .filter(|p| !w.retiring.contains(p))
            .collect();
        let extra = live.len().saturating_sub(n);
        // The newest first: they hold the least.
        let chosen: Vec<u32> = live.iter().rev().take(extra).copied().collect();
        for &pid in &chosen {
            w.retiring.push(pid);
            // SAFETY: kill(2) of our own child process.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        chosen
    }

    /// How many workers it keeps (what [`scale`](Self::scale) set, less
    /// those the scheduler stopped).
    pub fn target(&self) -> usize {
        self.wanted.lock().target
    }

    /// Sends SIGTERM to every worker process (each retires: hands the
    /// results still needed to other workers, then exits) and replaces none
    /// of them, nor any that was still starting (those exit at once).
    pub fn terminate(&self) {
        self.no_respawn.store(true, Ordering::SeqCst);
        for pid in self.pids() {
            // SAFETY: kill(2) of our own child processes.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Why the supervisor stopped replacing workers, if it did: refused by
    /// the scheduler, or dying too often.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// Stops supervising from anywhere (the scheduler is gone: replacements
    /// could never join); the workers are then stopped as by [`close`](Self::close).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.stop.clone();
        move || stop.store(true, Ordering::SeqCst)
    }

    /// Current worker process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.pids.lock().clone()
    }

    /// Stops supervising; the supervisor waits briefly for the workers to
    /// exit (the caller asked them to), then kills the rest.
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
        self.pids.lock().clear();
    }
}

/// What the supervisor thread shares with its [`LocalCluster`].
struct Supervised {
    /// Its id in its workers' [`Role::Worker::supervisor`].
    id: u64,
    stop: Arc<AtomicBool>,
    no_respawn: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<u32>>>,
    failure: Arc<Mutex<Option<String>>>,
    wanted: Arc<Mutex<Wanted>>,
}

impl Supervised {
    /// Stops replacing workers, saying why once.
    fn give_up(&self, why: String) {
        self.no_respawn.store(true, Ordering::SeqCst);
        let mut f = self.failure.lock();
        if f.is_none() {
            eprintln!("shoal: {why}");
            *f = Some(why);
        }
    }
}

fn supervise(cmd: WorkerCommand, mut children: Vec<Kid>, sh: Supervised) {
    let stop = &sh.stop;
    let mut respawns: Vec<Instant> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut changed = false;
        let mut i = 0;
        while i < children.len() {
            let Some(status) = children[i].try_wait() else {
                i += 1;
                continue;
            };
            let pid = children[i].id();
            // Already reaped by try_wait. Its shared-memory segments and
            // spilled data die with it.
            let mut kid = children.swap_remove(i);
            crate::shm::remove_process(pid);
            // One that had joined its scheduler could start: its death is
            // no sign that workers cannot (however often they are killed).
            let joined = kid.slots.as_ref().is_some_and(SlotFile::joined);
            // What its threads ran, for the scheduler to blame (not for a
            // worker it stopped: that one is gone from its books already).
            if let (Some(to), Some(slots)) = (&cmd.obituaries, kid.slots.take()) {
                if status.code() != Some(EXIT_STOPPED) {
                    if let Some(running) = slots.running() {
                        let (to, id) = (to.clone(), sh.id);
                        let _ = std::thread::Builder::new()
                            .name("shoal-obituary".into())
                            .spawn(move || report_death(&to, id, pid, running));
                    }
                }
            }
            changed = true;
            {
                let mut w = sh.wanted.lock();
                if let Some(at) = w.retiring.iter().position(|&p| p == pid) {
                    w.retiring.swap_remove(at); // scaled down: already off the target
                    continue;
                }
                if status.code() == Some(EXIT_STOPPED) {
                    // The scheduler stopped it (retire_workers): not replaced.
                    w.target = w.target.saturating_sub(1);
                    continue;
                }
            }
            if stop.load(Ordering::SeqCst) || sh.no_respawn.load(Ordering::SeqCst) {
                continue;
            }
            if status.code() == Some(EXIT_REFUSED) {
                sh.give_up(format!(
                    "worker process {pid} was refused by the scheduler (see its message \
                     above); not starting more"
                ));
                continue;
            }
            if status.code() == Some(EXIT_SCHEDULER_SILENT)
                && cmd.scheduler_elsewhere
                && !cmd.reconnect
            {
                sh.give_up(format!(
                    "worker process {pid} could not reach the scheduler, or it stopped \
                     answering (see the message above); not starting more (with \
                     --reconnect, workers wait for it to come back)"
                ));
                continue;
            }
            respawns.retain(|t| t.elapsed() < RESPAWN_WINDOW);
            if respawns.len() >= MAX_RESPAWNS && cmd.reconnect {
                // Waiting for the scheduler to come back: slowly.
                std::thread::sleep(Duration::from_secs(1));
            } else if respawns.len() >= MAX_RESPAWNS {
                sh.give_up(format!(
                    "{MAX_RESPAWNS} worker processes died within {}s; not starting more. \
                     Check that workers can start (run `python -m shoal._worker --help`).",
                    RESPAWN_WINDOW.as_secs()
                ));
                continue;
            }
            eprintln!("shoal: worker process {pid} died ({status}); starting a replacement");
            if !joined {
                respawns.push(Instant::now());
            }
        }
        // Up to the target: replacements for crashed workers, and scale-ups.
        if !stop.load(Ordering::SeqCst) && !sh.no_respawn.load(Ordering::SeqCst) {
            let mut w = sh.wanted.lock();
            // (A pid chosen to retire as it was being reaped is no child.)
            w.retiring.retain(|p| children.iter().any(|c| c.id() == *p));
            let live = children.len() - w.retiring.len();
            for _ in live..w.target {
                match spawn(&cmd, sh.id) {
                    Ok(c) => {
                        children.push(c);
                        changed = true;
                    }
                    Err(e) => {
                        sh.give_up(format!("cannot start a worker process: {e}"));
                        break;
                    }
                }
            }
        }
        if changed {
            *sh.pids.lock() = children.iter().map(Kid::id).collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Closing: workers were asked to shut down; give them a moment, then kill.
    let deadline = Instant::now() + Duration::from_secs(3);
    let reap = |c: &mut Kid| {
        let done = c.try_wait().is_some();
        if done {
            crate::shm::remove_process(c.id());
        }
        !done
    };
    while Instant::now() < deadline {
        children.retain_mut(reap);
        if children.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in &mut children {
        c.kill();
        crate::shm::remove_process(c.id());
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.close();
    }
}

/// A process started by one that cannot tie it to itself before exec
/// (`shoal.mpi`'s ranks, Python's `subprocess`) and says so with
/// `SHOAL_PARENT_PID`: it ends (SIGTERM) when that parent does, as
/// [`spawn`]'s children do, rather than outlive a job its launcher
/// killed. The variable is removed, so that this process's own children
/// do not take it for theirs. Call it first, while this process has one
/// thread.
pub fn tie_to_parent() {
    let Some(pid) = crate::settings::raw("SHOAL_PARENT_PID") else {
        return;
    };
    // Rust 2021: removing a variable is safe to call; only one thread runs.
    std::env::remove_var("SHOAL_PARENT_PID");
    let Ok(parent) = pid.trim().parse::<libc::pid_t>() else {
        eprintln!("shoal: SHOAL_PARENT_PID is not a process id: {pid:?}; ignored");
        return;
    };
    // Gone before the tie was made: end now, as the signal would have.
    if !die_with(parent) {
        std::process::exit(143);
    }
}

/// This process gets SIGTERM when `parent` ends; false if it already has
/// (this process was reparented before the tie was made). Only
/// async-signal-safe calls: [`spawn`]'s children make it between fork and
/// exec.
#[cfg(target_os = "linux")]
fn die_with(parent: libc::pid_t) -> bool {
    // SAFETY: prctl and getppid change and read only this process's state.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        libc::getppid() == parent
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with(_parent: libc::pid_t) -> bool {
    true
}
