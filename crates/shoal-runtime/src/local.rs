//! Worker processes of an embedded cluster: started, watched, replaced when
//! they die, and stopped with the cluster.
//!
//! No orphans: each child gets `PR_SET_PDEATHSIG` (SIGKILL when the thread
//! that started it, the supervisor thread, goes away, which includes the
//! client process dying), and a worker also exits by itself as soon as its
//! scheduler connection closes.

use parking_lot::Mutex;
use std::process::{Child, Command};
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
/// closes the connection instead). A replacement would wait on the same
/// silence, so for a scheduler elsewhere none is started unless the
/// supervisor was told to wait for it to come back (`reconnect`).
pub const EXIT_SCHEDULER_SILENT: i32 = 78;

/// Replacements allowed within [`RESPAWN_WINDOW`] before giving up: a worker
/// that cannot even start must not be restarted forever.
const MAX_RESPAWNS: usize = 20;
const RESPAWN_WINDOW: Duration = Duration::from_secs(30);

/// Supervises `n` worker processes.
pub struct LocalCluster {
    stop: Arc<AtomicBool>,
    /// Set: dead workers are no longer replaced (the cluster is stopping
    /// gracefully; those still alive hand their data over first).
    no_respawn: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<u32>>>,
    failure: Arc<Mutex<Option<String>>>,
    supervisor: Option<JoinHandle<()>>,
}

fn spawn(cmd: &WorkerCommand) -> std::io::Result<Child> {
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args).envs(cmd.env.iter().cloned());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: runs in the forked child before exec; prctl, getppid and
        // _exit are async-signal-safe and touch no memory of the parent.
        unsafe {
            c.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(0);
                }
                Ok(())
            });
        }
    }
    c.spawn()
}

impl LocalCluster {
    /// Starts `n` workers and a supervisor thread that replaces dead ones.
    pub fn start(cmd: WorkerCommand, n: usize) -> std::io::Result<LocalCluster> {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(Vec::new()));
        let failure = Arc::new(Mutex::new(None));
        let no_respawn = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop2, pids2, failure2) = (stop.clone(), pids.clone(), failure.clone());
        let no_respawn2 = no_respawn.clone();
        let supervisor = std::thread::Builder::new()
            .name("shoal-supervisor".into())
            .spawn(move || {
                // Leftovers of processes that crashed earlier (all of them at once).
                crate::shm::sweep(None);
                let mut children = Vec::new();
                for _ in 0..n {
                    match spawn(&cmd) {
                        Ok(c) => children.push(c),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                *pids2.lock() = children.iter().map(Child::id).collect();
                let _ = ready_tx.send(Ok(()));
                let flags = Flags {
                    stop: stop2,
                    no_respawn: no_respawn2,
                };
                supervise(cmd, children, flags, pids2, failure2);
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("worker supervisor died"))??;
        Ok(LocalCluster {
            stop,
            no_respawn,
            pids,
            failure,
            supervisor: Some(supervisor),
        })
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

struct Flags {
    stop: Arc<AtomicBool>,
    no_respawn: Arc<AtomicBool>,
}

fn supervise(
    cmd: WorkerCommand,
    mut children: Vec<Child>,
    flags: Flags,
    pids: Arc<Mutex<Vec<u32>>>,
    failure: Arc<Mutex<Option<String>>>,
) {
    let stop = flags.stop;
    let mut respawns: Vec<Instant> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut changed = false;
        let mut i = 0;
        while i < children.len() {
            match children[i].try_wait() {
                Ok(Some(status)) => {
                    let pid = children[i].id();
                    // Already reaped by try_wait. Its shared-memory segments
                    // and spilled data die with it.
                    let _ = children.swap_remove(i).wait();
                    crate::shm::remove_process(pid);
                    changed = true;
                    if stop.load(Ordering::SeqCst)
                        || flags.no_respawn.load(Ordering::SeqCst)
                        || status.code() == Some(EXIT_STOPPED)
                    {
                        continue;
                    }
                    if status.code() == Some(EXIT_REFUSED) {
                        let mut f = failure.lock();
                        if f.is_none() {
                            *f = Some(format!(
                                "worker process {pid} was refused by the scheduler (see its \
                                 message above); not starting more"
                            ));
                            eprintln!("shoal: {}", f.as_deref().unwrap_or_default());
                        }
                        continue;
                    }
                    if status.code() == Some(EXIT_SCHEDULER_SILENT)
                        && cmd.scheduler_elsewhere
                        && !cmd.reconnect
                    {
                        let mut f = failure.lock();
                        if f.is_none() {
                            *f = Some(format!(
                                "the scheduler stopped answering worker process {pid}; not \
                                 starting more (with --reconnect, workers wait for it to come back)"
                            ));
                            eprintln!("shoal: {}", f.as_deref().unwrap_or_default());
                        }
                        continue;
                    }
                    respawns.retain(|t| t.elapsed() < RESPAWN_WINDOW);
                    if respawns.len() >= MAX_RESPAWNS && cmd.reconnect {
                        // Waiting for the scheduler to come back: slowly.
                        std::thread::sleep(Duration::from_secs(1));
                    } else if respawns.len() >= MAX_RESPAWNS {
                        let mut f = failure.lock();
                        if f.is_none() {
                            *f = Some(format!(
                                "{MAX_RESPAWNS} worker processes died within {}s; not starting \
                                 more. Check that workers can start (run `python -m \
                                 shoal._worker --help`).",
                                RESPAWN_WINDOW.as_secs()
                            ));
                            eprintln!("shoal: {}", f.as_deref().unwrap_or_default());
                        }
                        continue;
                    }
                    eprintln!(
                        "shoal: worker process {pid} died ({status}); starting a replacement"
                    );
                    respawns.push(Instant::now());
                    match spawn(&cmd) {
                        Ok(c) => children.push(c),
                        Err(e) => eprintln!("shoal: cannot start a worker process: {e}"),
                    }
                }
                _ => i += 1,
            }
        }
        if changed {
            *pids.lock() = children.iter().map(Child::id).collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Closing: workers were asked to shut down; give them a moment, then kill.
    let deadline = Instant::now() + Duration::from_secs(3);
    let reap = |c: &mut Child| {
        let done = matches!(c.try_wait(), Ok(Some(_)));
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
        let _ = c.kill();
        let _ = c.wait();
        crate::shm::remove_process(c.id());
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.close();
    }
}
