//! The Rust half of a worker process.
//!
//! The I/O thread receives tasks, fetches inputs held by other workers,
//! serves this worker's results to peers and clients, and reports results.
//! Python execution threads hand over each finished task with
//! [`WorkerShared::report`] (buffered, sent every few milliseconds) and take
//! the next with [`WorkerShared::try_next`] (GIL held, no wait) or
//! [`WorkerShared::wait_next`] (GIL released), one task at a time so that
//! unstarted tasks stay here, where the scheduler can steal them.

use crate::net::{self, Address, Listener, Secret};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Condvar, Mutex};
use rustc_hash::{FxHashMap, FxHashSet};
use shoal_core::worker::{FetchReport, Fetched as FetchOutcome, Phase, Take, WorkerState};
use shoal_proto::{
    Activity, ActivityKind, DataReply, DataRequest, Dep, DepSource, FromScheduler, Payload, Role,
    TaskKind, Telemetry, Timing, ToScheduler, Welcome, WorkerMetrics, INLINE_LIMIT,
};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An input of a task ready to execute.
pub enum Input {
    /// A result this worker made: its Python side has it.
    Local,
    /// The pickled bytes (inline, or fetched from another host).
    Bytes(Bytes),
    /// An open file on this host holding the pickle (a peer's shared-memory
    /// segment or spill file): mapped by the task, not copied. Open, so the
    /// holder may unlink it at any time.
    File(std::fs::File),
    /// Its holder cannot pickle it (why): the task fails with that.
    Unavailable(String),
}

/// A task ready to execute.
pub struct ExecTask {
    /// Task id.
    pub id: u64,
    /// Task name.
    pub name: String,
    /// Task group.
    pub group: String,
    /// Call or batch.
    pub kind: TaskKind,
    /// Pickled function.
    pub func: Bytes,
    /// Pickled arguments.
    pub args: Bytes,
    /// Inputs.
    pub deps: Vec<(u64, Input)>,
    /// Resources it holds while running.
    pub resources: Vec<(String, f64)>,
    /// Milliseconds it may run (0: no limit).
    pub time_limit_ms: u64,
    /// Its job (0: none).
    pub job: u32,
}

/// What a worker needs to join its scheduler again.
struct Reconnect {
    scheduler: Address,
    role: Role,
    /// How long it tries before it gives up and exits.
    give_up: Duration,
}

/// Tasks the scheduler asked to stop while they run.
#[derive(Default)]
struct Stops {
    /// Running command tasks: their stop flags and process groups.
    commands: FxHashMap<u64, Arc<(AtomicBool, AtomicU32)>>,
    /// Asked to stop, not (yet) a registered command: a command that
    /// registers later stops at once; Python tasks are in `python` too.
    asked: FxHashSet<u64>,
    /// For the Python watchdog: running Python tasks to interrupt.
    python: Vec<u64>,
}

/// Outcome of one task, handed back by an execution thread.
pub enum Done {
    /// Pickled result; the Python side keeps the object if it is not inline.
    Ok {
        /// Task.
        id: u64,
        /// Pickled result.
        value: Bytes,
        /// When and where it ran.
        timing: Timing,
    },
    /// A large result pickled into a file of this worker's (shared memory):
    /// peers on this host map it, others get its bytes.
    File {
        /// Task.
        id: u64,
        /// The file.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// When and where it ran.
        timing: Timing,
    },
    /// A large result kept only as the Python object: pickled when a peer
    /// or client asks for it (see [`WorkerShared::pickle_requests`]).
    Held {
        /// Task.
        id: u64,
        /// Its size in bytes (buffer size: what a transfer would move).
        size: u64,
        /// When and where it ran.
        timing: Timing,
    },
    /// Pickled `(exception, traceback)`.
    Err {
        /// Task.
        id: u64,
        /// Pickled error.
        error: Bytes,
        /// The error as text.
        text: String,
        /// When and where it ran.
        timing: Timing,
    },
}

/// The worker's orders (see [`shoal_core::worker`]); a fetch in flight is
/// aborted through its task's handle when its order is cancelled or stolen.
type Orders = WorkerState<ExecTask, tokio::task::AbortHandle>;

/// Reports not sent yet (see [`WorkerShared::report`]).
#[derive(Default)]
struct Unsent {
    /// Tasks execution threads took since the last flush: sent first, so
    /// the scheduler hears of a start before its result.
    started: Vec<u64>,
    reports: Vec<ToScheduler>,
    /// When the oldest entry was buffered.
    since: Option<Instant>,
}

/// State shared between the I/O thread and the execution threads.
pub struct WorkerShared {
    /// Id assigned by the scheduler (a new one after a reconnect).
    id: AtomicU32,
    /// Execution threads.
    pub nthreads: u32,
    /// This worker's data server.
    pub data_addr: Address,
    orders: Mutex<Orders>,
    cv: Condvar,
    /// Results kept here for transfer.
    store: Mutex<FxHashMap<u64, Stored>>,
    /// Bounds the transfers this worker makes at once.
    fetch_slots: tokio::sync::Semaphore,
    /// The cluster's secret: peers prove it to fetch, and so do we.
    secret: Secret,
    /// Held results a transfer waits for, for the Python pickling thread.
    to_pickle: Mutex<PickleRequests>,
    /// Frames of held results the pickling thread made for transfers to
    /// other hosts, until their transfer takes them (`None`: it could not).
    framed: Mutex<FxHashMap<u64, Option<Vec<Bytes>>>>,
    to_pickle_cv: Condvar,
    /// Wakes transfers waiting for a result to be pickled.
    pickled: tokio::sync::Notify,
    /// The scheduler connection's sending half (replaced on a reconnect).
    out: parking_lot::RwLock<net::Outbox<ToScheduler>>,
    /// `shoal worker --reconnect`: how to reach the scheduler again, and
    /// the `Finished`/`Failed` reports it has not acknowledged (with how
    /// many of this connection's reports it has), sent again on rejoining.
    reconnect: Option<Reconnect>,
    unacked: Mutex<(VecDeque<ToScheduler>, u64)>,
    /// Starts and results not yet sent: sent together once the oldest is
    /// `FLUSH_AFTER` old (by the next report or the flusher task), and
    /// before the execution loop waits.
    unsent: Mutex<Unsent>,
    /// Wakes the flusher when the first report is buffered.
    unsent_first: tokio::sync::Notify,
    /// Memory figures from the Python memory manager, sent with heartbeats.
    metrics: Mutex<WorkerMetrics>,
    /// Results copied here from retiring workers (files this side made).
    copied: Mutex<FxHashSet<u64>>,
    /// Transfers, spills, profile samples and log lines since the last
    /// heartbeat (sent with it).
    telemetry: Mutex<Telemetry>,
    /// Syncs the scheduler asked for, waiting for the profiler to hand over
    /// its samples (answered by [`WorkerShared::synced`]).
    syncs: Mutex<Vec<u64>>,
    /// Counts sync requests: the profiler flushes when it changes.
    sync_epoch: AtomicU64,
    /// A profiler runs (else syncs are answered at once).
    sampler: std::sync::atomic::AtomicBool,
    /// Bytes fetched from peers / served to them, in all.
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    stops: Mutex<Stops>,
    /// `stops.asked` is not empty (read without the lock per report).
    stops_asked: AtomicBool,
    stops_cv: Condvar,
    /// Between SIGTERM (or a Python task's interrupt) and SIGKILL (or a
    /// restart of this process): `SHOAL_STOP_GRACE` seconds, default 5.
    pub stop_grace: Duration,
    /// Runs in a client's own process (`LocalCluster(processes=False)`):
    /// it never ends the process; losing the scheduler stops its execution
    /// threads instead, and a restart cannot be had.
    pub in_process: bool,
}

/// `SHOAL_STOP_GRACE` (seconds, default 5): how long a stopped task has
/// before it is killed (a command) or its process restarted (Python).
fn stop_grace() -> Duration {
    std::env::var("SHOAL_STOP_GRACE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map_or(Duration::from_secs(5), Duration::from_secs_f64)
}

/// Microseconds since the Unix epoch (task stream times; each host's clock).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// CPU time this process used, in microseconds (user + system).
fn cpu_time_us() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Where this worker keeps a large result, for transfers.
#[derive(Clone, Debug)]
pub enum Stored {
    /// Only the Python side has it: it is written to a file when asked for.
    Held,
    /// Pickled bytes in memory.
    Bytes(Bytes),
    /// A file with the pickle: a shared-memory segment, or spilled to disk.
    File {
        /// Absolute path.
        path: String,
        /// Its length.
        len: u64,
    },
    /// Kept as an object that cannot be pickled: consumers elsewhere fail
    /// with this reason.
    Unpicklable(String),
}

/// Steps of the worker's orders kept for their story (debugging).
const ORDER_LOG: usize = 0;

/// How long one transfer attempt may take: a holder that accepts and then
/// never answers must not pin a fetch slot for ever (a holder that dies is
/// noticed sooner: its task is cancelled here and the fetch aborted).
const FETCH_DEADLINE: Duration = Duration::from_secs(120);

/// How long a sync waits for the profiler's samples.
const SYNC_WAIT: Duration = Duration::from_millis(500);

/// Transfers a worker makes at once (each may move a large result).
const FETCH_SLOTS: usize = 16;

/// How long a transfer waits for a held result to be pickled.
const PICKLE_WAIT: Duration = Duration::from_secs(120);

/// How long finished results may wait to travel together.
const FLUSH_AFTER: Duration = Duration::from_millis(2);

/// Bytes of reports (results sent inline) that may wait to be written to
/// the scheduler before execution threads wait for it to read.
pub const REPORT_BACKLOG: usize = 256 << 20;

/// What a batch call returns.
pub enum Batch {
    /// Tasks to run and results to drop.
    Work(Vec<ExecTask>, Vec<u64>),
    /// The scheduler asked us to stop.
    Shutdown,
    /// This execution thread ends (a lent thread was taken back).
    Retire,
}

impl WorkerShared {
    /// Id assigned by the scheduler.
    pub fn id(&self) -> u32 {
        self.id.load(Ordering::Relaxed)
    }

    /// The scheduler connection's sending half.
    fn out(&self) -> net::Outbox<ToScheduler> {
        self.out.read().clone()
    }

    /// Buffers finished tasks' reports; sends the buffer once its oldest
    /// entry is `FLUSH_AFTER` old (one frame for many tiny tasks), here or
    /// from the flusher task.
    pub fn report(&self, done: Vec<Done>) {
        if done.is_empty() {
            return;
        }
        {
            let mut orders = self.orders.lock();
            for d in &done {
                orders.finished(d.id());
            }
        }
        // Stops asked for tasks not seen running: rare, so the common case
        // reads one atomic instead of taking the lock.
        if self.stops_asked.load(Ordering::Relaxed) {
            let mut st = self.stops.lock();
            for d in &done {
                st.asked.remove(&d.id());
            }
            self.stops_asked
                .store(!st.asked.is_empty(), Ordering::Relaxed);
        }
        let mut unsent = self.unsent.lock();
        for d in done {
            let msg = match d {
                Done::Ok { id, value, timing } => {
                    let size = value.len() as u64;
                    if value.len() <= INLINE_LIMIT {
                        ToScheduler::Finished {
                            id,
                            size,
                            value: Some(value),
                            timing,
                        }
                    } else {
                        self.store.lock().insert(id, Stored::Bytes(value));
                        ToScheduler::Finished {
                            id,
                            size,
                            value: None,
                            timing,
                        }
                    }
                }
                Done::File {
                    id,
                    path,
                    size,
                    timing,
                } => {
                    self.store
                        .lock()
                        .insert(id, Stored::File { path, len: size });
                    ToScheduler::Finished {
                        id,
                        size,
                        value: None,
                        timing,
                    }
                }
                Done::Held { id, size, timing } => {
                    self.store.lock().insert(id, Stored::Held);
                    ToScheduler::Finished {
                        id,
                        size,
                        value: None,
                        timing,
                    }
                }
                Done::Err {
                    id,
                    error,
                    text,
                    timing,
                } => ToScheduler::Failed {
                    id,
                    error,
                    text,
                    timing,
                },
            };
            unsent.reports.push(msg);
        }
        if self.buffered(&mut unsent).elapsed() >= FLUSH_AFTER {
            self.flush_locked(&mut unsent);
        }
    }

    /// When the oldest unsent entry was buffered (now, for the first one:
    /// the flusher then sends it within `FLUSH_AFTER`).
    fn buffered(&self, unsent: &mut Unsent) -> Instant {
        match unsent.since {
            Some(t) => t,
            None => {
                self.unsent_first.notify_one();
                *unsent.since.insert(Instant::now())
            }
        }
    }

    /// Blocks the calling (execution) thread while more than
    /// [`REPORT_BACKLOG`] bytes of reports wait to be written: a scheduler
    /// that reads slower than the worker produces slows the worker down.
    pub fn wait_room(&self) {
        self.out().wait_room(REPORT_BACKLOG, || false);
    }

    /// Whether reports wait beyond [`REPORT_BACKLOG`] (then call
    /// [`WorkerShared::wait_room`] without holding locks others need).
    pub fn backlogged(&self) -> bool {
        self.out().queued_bytes() > REPORT_BACKLOG
    }

    /// Sends buffered reports now.
    pub fn flush(&self) {
        self.flush_locked(&mut self.unsent.lock());
    }

    fn flush_locked(&self, unsent: &mut Unsent) {
        unsent.since = None;
        if !unsent.started.is_empty() {
            let _ = self
                .out()
                .send(ToScheduler::Started(std::mem::take(&mut unsent.started)));
        }
        let out = self.out();
        if self.reconnect.is_some() {
            // Kept until acknowledged: sent again if the scheduler is lost.
            let mut log = self.unacked.lock();
            for m in unsent.reports.drain(..) {
                if matches!(m, ToScheduler::Finished { .. } | ToScheduler::Failed { .. }) {
                    log.0.push_back(m.clone());
                }
                let _ = out.send(m);
            }
            return;
        }
        for m in unsent.reports.drain(..) {
            let _ = out.send(m);
        }
    }

    /// The scheduler recorded the first `n` reports of this connection.
    fn acked(&self, n: u64) {
        let mut log = self.unacked.lock();
        let fresh = n.saturating_sub(log.1) as usize;
        let fresh = fresh.min(log.0.len());
        log.0.drain(..fresh);
        log.1 = log.1.max(n);
    }

    /// A task waits on other tasks and lends its thread: the caller starts
    /// one more execution thread; the scheduler counts one more.
    pub fn lend_thread(&self) {
        let n = self.orders.lock().lend_thread();
        self.send_threads(n);
    }

    /// The waiting task takes its thread back: one execution thread retires
    /// at its next take ([`Batch::Retire`]).
    pub fn reclaim_thread(&self) {
        let n = self.orders.lock().reclaim_thread();
        self.send_threads(n);
    }

    fn send_threads(&self, n: u32) {
        // Reports buffered before this go first: ordering with results.
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(ToScheduler::Threads(n));
    }

    /// For the Python pickling thread: held results that transfers wait
    /// for, to write to files (for this host) and to frame in memory (for
    /// another: [`Self::put_frames`]); waits up to `timeout` (empty then).
    pub fn pickle_requests(&self, timeout: Duration) -> (Vec<u64>, Vec<u64>) {
        let deadline = Instant::now() + timeout;
        let mut q = self.to_pickle.lock();
        if !q.busy.is_empty() {
            // The last batch is done: transfers that found no frame of
            // theirs in it may ask again now.
            q.busy.clear();
            self.pickled.notify_waiters();
        }
        while q.files.is_empty() && q.frames.is_empty() {
            if self.to_pickle_cv.wait_until(&mut q, deadline).timed_out() {
                return (Vec::new(), Vec::new());
            }
        }
        let q = &mut *q;
        std::mem::swap(&mut q.busy, &mut q.queued);
        q.queued.clear();
        (q.files.drain(..).collect(), q.frames.drain(..).collect())
    }

    /// The pickling thread framed held results for a transfer to another
    /// host, as the parts of each frame (`None`: it could not): the
    /// transfers waiting for them go on. The results stay held (as the
    /// Python objects).
    pub fn put_frames(&self, items: Vec<(u64, Option<Vec<Bytes>>)>) {
        {
            let store = self.store.lock();
            let mut framed = self.framed.lock();
            for (id, frame) in items {
                if store.contains_key(&id) {
                    framed.insert(id, frame);
                }
            }
        }
        self.pickled.notify_waiters();
    }

    /// The Python side wrote a held result to a file, or spilled one
    /// (`None`: it could not, or the result was released): waiting
    /// transfers go on. Ignored for results this worker no longer keeps.
    pub fn put_stored(&self, id: u64, value: Option<Stored>) {
        self.put_stored_many(vec![(id, value)]);
    }

    /// [`Self::put_stored`] for a batch, waking waiting transfers once
    /// (the pickling thread answers thousands of requests at a time).
    pub fn put_stored_many(&self, items: Vec<(u64, Option<Stored>)>) {
        {
            let mut store = self.store.lock();
            for (id, value) in items {
                match value {
                    Some(v) if store.contains_key(&id) => {
                        store.insert(id, v);
                    }
                    _ => {
                        store.remove(&id);
                    }
                }
            }
        }
        self.pickled.notify_waiters();
    }

    /// Runs a command task on the calling thread (see [`crate::command`]):
    /// a stop from the scheduler reaches it through its flag.
    pub fn run_command(
        &self,
        task: u64,
        spec: &shoal_proto::CommandSpec,
        job: u32,
        cpus: u32,
        extra_env: &[(String, String)],
        time_limit: Option<Duration>,
    ) -> io::Result<crate::command::Outcome> {
        let flag = Arc::new((AtomicBool::new(false), AtomicU32::new(0)));
        {
            let mut st = self.stops.lock();
            if st.asked.remove(&task) {
                self.stops_asked
                    .store(!st.asked.is_empty(), Ordering::Relaxed);
                flag.0.store(true, Ordering::Release);
            }
            st.commands.insert(task, flag.clone());
        }
        let out = crate::command::run(&crate::command::Run {
            spec,
            job,
            cpus,
            extra_env,
            time_limit,
            grace: self.stop_grace,
            stop: &flag.0,
            group: &flag.1,
        });
        self.stops.lock().commands.remove(&task);
        out
    }

    /// A task that runs here is to stop (cancelled).
    fn stop_running(&self, task: u64) {
        let mut st = self.stops.lock();
        if let Some(flag) = st.commands.get(&task) {
            flag.0.store(true, Ordering::Release);
            return;
        }
        st.asked.insert(task);
        self.stops_asked.store(true, Ordering::Relaxed);
        st.python.push(task);
        self.stops_cv.notify_all();
    }

    /// Kills the process groups of the commands running here: called as
    /// this process exits, so that no program outlives its worker.
    pub fn kill_commands(&self) {
        for c in self.stops.lock().commands.values() {
            let g = c.1.load(Ordering::Acquire);
            if g != 0 {
                crate::command::signal_group(g, libc::SIGKILL);
            }
        }
    }

    /// For the Python watchdog: running tasks the scheduler asked to stop
    /// (waits up to `timeout`; empty on timeout).
    pub fn stop_requests(&self, timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        let mut st = self.stops.lock();
        while st.python.is_empty() {
            if self.stops_cv.wait_until(&mut st, deadline).timed_out() {
                return Vec::new();
            }
        }
        std::mem::take(&mut st.python)
    }

    /// A task told to stop does not (stuck in C code): report its failure,
    /// then ask the scheduler for a restart (it answers `Restart`, after
    /// which this process exits and its nanny starts a fresh one).
    pub fn report_stuck(&self, done: Done) {
        self.report(vec![done]);
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(ToScheduler::RestartMe);
    }

    /// Task `id`'s result cannot be pickled: the scheduler runs what takes
    /// it here (sent before the task's report).
    pub fn pin(&self, id: u64) {
        let _ = self.out().send(ToScheduler::Pinned(id));
    }

    /// Asks the scheduler to retire this worker gracefully (SIGTERM): its
    /// needed results move to other workers, then it is told to stop.
    pub fn retire(&self) {
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(ToScheduler::RetireMe);
    }

    /// The file holding a result, if this worker keeps it as one (for a
    /// result copied here from a retiring worker).
    pub fn stored_file(&self, id: u64) -> Option<(String, u64)> {
        match self.store.lock().get(&id) {
            Some(Stored::File { path, len }) => Some((path.clone(), *len)),
            _ => None,
        }
    }

    /// The memory manager's latest figures (travel with the next heartbeat;
    /// CPU and transfer figures are filled in here).
    pub fn set_metrics(&self, m: WorkerMetrics) {
        let mut cur = self.metrics.lock();
        *cur = WorkerMetrics {
            cpu: cur.cpu,
            bytes_in: cur.bytes_in,
            bytes_out: cur.bytes_out,
            ..m
        };
    }

    /// A transfer or spill, for the task stream (sent with the next heartbeat).
    pub fn record_activity(&self, a: Activity) {
        let mut t = self.telemetry.lock();
        // Bounded: a dashboard needs a picture, not every event of a storm.
        if t.activity.len() < 10_000 {
            t.activity.push(a);
        }
    }

    /// Profile samples `(group, folded stack, count)` from the sampler.
    pub fn add_profile(&self, samples: Vec<(String, String, u32)>) {
        self.telemetry.lock().profile.extend(samples);
    }

    fn take_telemetry(&self) -> Option<Telemetry> {
        let mut t = self.telemetry.lock();
        t.logs.extend(crate::logs::drain());
        if t.activity.is_empty() && t.profile.is_empty() && t.logs.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut *t))
    }

    /// A profiler thread runs: syncs wait for its samples.
    pub fn set_sampler(&self, on: bool) {
        self.sampler.store(on, Ordering::Relaxed);
    }

    /// Changes when the scheduler asks for a sync: the profiler then hands
    /// over its samples and calls [`WorkerShared::synced`].
    pub fn sync_epoch(&self) -> u64 {
        self.sync_epoch.load(Ordering::Relaxed)
    }

    /// Answers the pending syncs: buffered reports, telemetry, then `Synced`.
    pub fn synced(&self) {
        let syncs = std::mem::take(&mut *self.syncs.lock());
        if syncs.is_empty() {
            return;
        }
        self.flush();
        if let Some(t) = self.take_telemetry() {
            let _ = self.out().send(ToScheduler::Telemetry(t));
        }
        // Memory as of now, too (a report's last point).
        let m = {
            let mut m = self.metrics.lock();
            m.bytes_in = self.bytes_in.load(Ordering::Relaxed);
            m.bytes_out = self.bytes_out.load(Ordering::Relaxed);
            m.clone()
        };
        let _ = self.out().send(ToScheduler::Heartbeat(m));
        for sid in syncs {
            let _ = self.out().send(ToScheduler::Synced(sid));
        }
    }

    /// Tells the scheduler this worker's memory is above (true) or back
    /// below (false) its pause fraction.
    /// While paused, no task starts while another runs.
    pub fn set_paused(&self, paused: bool) {
        if !self.orders.lock().set_paused(paused) {
            return;
        }
        if !paused {
            self.cv.notify_all(); // threads held back may take work again
        }
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(ToScheduler::Paused(paused));
    }

    /// Results for a transfer: held ones are written to files on demand
    /// (bounded wait); a requester on this host gets file paths, another
    /// the bytes (a file's sent from the file). `None` for results this
    /// worker lacks.
    async fn pickled_results(&self, ids: &[u64], same_host: bool) -> Vec<(u64, Option<Reply>)> {
        let stored = self.stored_results(ids, !same_host).await;
        let mut out = Vec::with_capacity(stored.len());
        for (id, s) in stored {
            let p = match s.map(|f| match f {
                Found::Stored(s) => Ok(s),
                Found::Framed(parts) => Err(parts),
            }) {
                Some(Err(parts)) => Some(Reply::frame(parts)),
                Some(Ok(Stored::Bytes(b))) => Some(Reply::Payload(Payload::Bytes(b))),
                Some(Ok(Stored::File { path, len })) if same_host => {
                    Some(Reply::Payload(Payload::File { path, len }))
                }
                Some(Ok(Stored::File { mut path, len })) => {
                    // Another host: opened now, sent from the file (its
                    // first `len` bytes: a shared-memory block's file may be
                    // longer). A spill may move the file meanwhile: look again.
                    let mut got = None;
                    for _ in 0..3 {
                        if let Ok(f) = std::fs::File::open(&path) {
                            got = Some(Reply::Contents(f, len));
                            break;
                        }
                        match self.store.lock().get(&id) {
                            Some(Stored::File { path: now, .. }) if *now != path => {
                                path = now.clone()
                            }
                            _ => break,
                        }
                    }
                    got
                }
                Some(Ok(Stored::Unpicklable(why))) => {
                    Some(Reply::Payload(Payload::Unpicklable(why)))
                }
                Some(Ok(Stored::Held)) | None => None,
            };
            out.push((id, p));
        }
        out
    }

    /// What the store has of `ids`; held ones are queued for the pickling
    /// thread once, and waited for (each wake-up looks only at those still
    /// held: a request for thousands stays linear). `frames`: the requester
    /// is on another host, so held ones are framed in memory (taken here as
    /// bytes, sent from memory) rather than written to files first.
    async fn stored_results(&self, ids: &[u64], frames: bool) -> Vec<(u64, Option<Found>)> {
        let deadline = tokio::time::Instant::now() + PICKLE_WAIT;
        let mut waiting = Vec::new();
        let mut out: Vec<(u64, Option<Found>)> = {
            let store = self.store.lock();
            ids.iter()
                .enumerate()
                .map(|(i, id)| match store.get(id) {
                    Some(Stored::Held) => {
                        waiting.push(i);
                        (*id, None)
                    }
                    other => (*id, other.cloned().map(Found::Stored)),
                })
                .collect()
        };
        if waiting.is_empty() {
            return out;
        }
        {
            let mut q = self.to_pickle.lock();
            for &i in &waiting {
                let id = out[i].0;
                if q.queued.insert((id, frames)) {
                    if frames {
                        q.frames.push_back(id);
                    } else {
                        q.files.push_back(id);
                    }
                }
            }
        }
        self.to_pickle_cv.notify_one();
        loop {
            // Register for the wake-up before looking, so none is missed.
            let notified = self.pickled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let store = self.store.lock();
                let mut framed = self.framed.lock();
                waiting.retain(|&i| {
                    let id = out[i].0;
                    if frames {
                        match framed.remove(&id) {
                            Some(Some(parts)) => {
                                out[i].1 = Some(Found::Framed(parts));
                                return false;
                            }
                            // It could not be framed: whatever the store
                            // says now (exported meanwhile, or gone).
                            Some(None) => {
                                out[i].1 = match store.get(&id) {
                                    Some(Stored::Held) | None => None,
                                    other => other.cloned().map(Found::Stored),
                                };
                                return false;
                            }
                            None => {}
                        }
                    }
                    match store.get(&id) {
                        Some(Stored::Held) => true,
                        other => {
                            out[i].1 = other.cloned().map(Found::Stored);
                            false
                        }
                    }
                });
            }
            if waiting.is_empty() {
                return out;
            }
            if frames {
                // A frame another transfer of the same result took first:
                // ask again (neither queued nor in the batch being made).
                let mut q = self.to_pickle.lock();
                let mut again = false;
                for &i in &waiting {
                    let key = (out[i].0, true);
                    if !q.busy.contains(&key) && q.queued.insert(key) {
                        q.frames.push_back(key.0);
                        again = true;
                    }
                }
                drop(q);
                if again {
                    self.to_pickle_cv.notify_one();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("results {ids:x?} were not pickled within {PICKLE_WAIT:?}");
                return out;
            }
        }
    }

    /// Takes ready work; the tasks taken are reported started (buffered).
    fn take(&self, orders: &mut Orders, max: usize) -> Option<Batch> {
        match orders.take(max)? {
            Take::Shutdown => Some(Batch::Shutdown),
            Take::Retire => Some(Batch::Retire),
            Take::Work(tasks, released) => {
                if !tasks.is_empty() {
                    let mut unsent = self.unsent.lock();
                    unsent.started.extend(tasks.iter().map(|t| t.id));
                    self.buffered(&mut unsent);
                }
                Some(Batch::Work(tasks, released))
            }
        }
    }

    /// Takes ready work without blocking. Callable with the GIL held: the
    /// orders lock is never held while waiting for anything else.
    pub fn try_next(&self, max: usize) -> Option<Batch> {
        self.take(&mut self.orders.lock(), max)
    }

    /// Sends buffered reports, then waits up to `timeout` for work.
    pub fn wait_next(&self, max: usize, timeout: Duration) -> Batch {
        self.flush_locked(&mut self.unsent.lock());
        let deadline = Instant::now() + timeout;
        let mut orders = self.orders.lock();
        loop {
            if let Some(b) = self.take(&mut orders, max) {
                return b;
            }
            if self.cv.wait_until(&mut orders, deadline).timed_out() {
                return Batch::Work(Vec::new(), Vec::new());
            }
        }
    }
}

impl Done {
    fn id(&self) -> u64 {
        match self {
            Done::Ok { id, .. }
            | Done::File { id, .. }
            | Done::Held { id, .. }
            | Done::Err { id, .. } => *id,
        }
    }
}

/// Connects to the scheduler at `scheduler`, starts the data server and the
/// I/O tasks. Call from outside the runtime (it blocks until registered).
pub fn start(
    rt: &tokio::runtime::Runtime,
    scheduler: &Address,
    nthreads: u32,
    name: &str,
    resources: Vec<(String, f64)>,
    secret: Secret,
    in_process: bool,
) -> io::Result<Arc<WorkerShared>> {
    // Data servers of several workers in one process need names of their own.
    static SERVERS: AtomicU32 = AtomicU32::new(0);
    let server = SERVERS.fetch_add(1, Ordering::Relaxed);
    rt.block_on(async {
        // Data server on the same kind of transport as the scheduler.
        let data_addr = match scheduler {
            Address::Unix(p) => {
                let dir = p.parent().unwrap_or_else(|| std::path::Path::new("/tmp"));
                Address::Unix(dir.join(format!("w-{}-{server}.sock", std::process::id())))
            }
            Address::Tcp(_) | Address::Tls(_) => {
                // Listen where we reach the scheduler from (a plain TCP
                // connection is enough to learn that address).
                let plain = match scheduler {
                    Address::Tls(hp) => Address::Tcp(hp.clone()),
                    other => other.clone(),
                };
                let (conn, ip) = net::connect(&plain).await?;
                drop(conn);
                let ip = ip.expect("tcp has an ip");
                // `--interface ib0`: that network's address instead.
                let ip = match std::env::var("SHOAL_INTERFACE") {
                    Ok(name) if !name.is_empty() => net::interface_ip(&name)?,
                    _ => ip,
                };
                scheduler.with_host_port(std::net::SocketAddr::new(ip, 0).to_string())
            }
        };
        let listener = Listener::bind(&data_addr).await?;
        let data_addr = listener.local_addr()?;
        let lifetime_end_us = lifetime_end_us();
        let role = Role::Worker {
            nthreads,
            data_addr: data_addr.to_string(),
            name: name.to_string(),
            pid: std::process::id(),
            resources,
            lifetime_end_us,
        };
        let (conn, id) = net::handshake(scheduler, role.clone(), &secret).await?;
        let (out, mut stream) = net::split_batched::<ToScheduler>(conn);
        let reconnect = reconnect_for().map(|give_up| Reconnect {
            scheduler: scheduler.clone(),
            role,
            give_up,
        });
        let shared = Arc::new(WorkerShared {
            id: AtomicU32::new(id),
            nthreads,
            data_addr,
            orders: Mutex::new(WorkerState::new(nthreads, ORDER_LOG)),
            cv: Condvar::new(),
            store: Mutex::new(FxHashMap::default()),
            fetch_slots: tokio::sync::Semaphore::new(FETCH_SLOTS),
            secret,
            to_pickle: Mutex::new(PickleRequests::default()),
            framed: Mutex::new(FxHashMap::default()),
            to_pickle_cv: Condvar::new(),
            pickled: tokio::sync::Notify::new(),
            out: parking_lot::RwLock::new(out),
            reconnect,
            unacked: Mutex::new((VecDeque::new(), 0)),
            unsent: Mutex::new(Unsent::default()),
            unsent_first: tokio::sync::Notify::new(),
            metrics: Mutex::new(WorkerMetrics::default()),
            copied: Mutex::new(FxHashSet::default()),
            telemetry: Mutex::new(Telemetry::default()),
            syncs: Mutex::new(Vec::new()),
            sync_epoch: AtomicU64::new(0),
            sampler: std::sync::atomic::AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            stops: Mutex::new(Stops::default()),
            stops_asked: AtomicBool::new(false),
            stops_cv: Condvar::new(),
            stop_grace: stop_grace(),
            in_process,
        });
        tokio::spawn(data_server(listener, shared.clone()));
        if lifetime_end_us > 0 {
            // Retire gracefully (hand results over, finish what runs) at the
            // end of its lifetime: before a batch job's walltime kills it.
            let sh = shared.clone();
            let left = Duration::from_micros(lifetime_end_us.saturating_sub(now_us()));
            tokio::spawn(async move {
                tokio::time::sleep(left).await;
                eprintln!(
                    "shoal worker {}: its lifetime is over; retiring",
                    std::process::id()
                );
                sh.retire();
            });
        }
        let sh = shared.clone();
        tokio::spawn(async move {
            // Reports wait at most FLUSH_AFTER, even while the execution
            // threads run queued tasks (and so neither report nor wait).
            loop {
                sh.unsent_first.notified().await;
                tokio::time::sleep(FLUSH_AFTER).await;
                let mut unsent = sh.unsent.lock();
                if unsent.since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER) {
                    sh.flush_locked(&mut unsent);
                } else if unsent.since.is_some() {
                    sh.unsent_first.notify_one(); // newer: look again later
                }
            }
        });
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(net::heartbeat_interval());
            let (mut cpu0, mut t0) = (cpu_time_us(), Instant::now());
            loop {
                beat.tick().await;
                let (cpu1, t1) = (cpu_time_us(), Instant::now());
                let wall = (t1 - t0).as_micros().max(1) as f32;
                let m = {
                    let mut m = sh.metrics.lock();
                    m.cpu = cpu1.saturating_sub(cpu0) as f32 * 100.0 / wall;
                    m.bytes_in = sh.bytes_in.load(Ordering::Relaxed);
                    m.bytes_out = sh.bytes_out.load(Ordering::Relaxed);
                    m.clone()
                };
                (cpu0, t0) = (cpu1, t1);
                if let Some(t) = sh.take_telemetry() {
                    let _ = sh.out().send(ToScheduler::Telemetry(t));
                }
                // A worker that reconnects beats on the next connection.
                if sh.out().send(ToScheduler::Heartbeat(m)).is_err() && sh.reconnect.is_none() {
                    return;
                }
            }
        });
        let sh = shared.clone();
        let timeout = net::heartbeat_timeout();
        tokio::spawn(async move {
            // The scheduler pings every second; silence means it died without
            // closing, hung, or the network is cut: exit rather than wait
            // (or, with --reconnect, join it again when it is back).
            let (why, status) = loop {
                let lost = loop {
                    let Ok(next) = tokio::time::timeout(timeout, stream.next()).await else {
                        let why = format!("heard nothing from the scheduler for {timeout:?}");
                        break (why, crate::local::EXIT_SCHEDULER_SILENT);
                    };
                    let Some(frame) = next else {
                        break ("lost the scheduler connection".to_string(), 1);
                    };
                    match net::decode_batch::<FromScheduler>(frame) {
                        Ok(msgs) => {
                            for m in msgs {
                                if handle(&sh, m) {
                                    return;
                                }
                            }
                        }
                        Err(e) => break (format!("bad frame from the scheduler: {e}"), 1),
                    }
                };
                let Some(rc) = &sh.reconnect else {
                    break lost;
                };
                eprintln!(
                    "shoal worker {}: {}; joining it again (for up to {:?})",
                    std::process::id(),
                    lost.0,
                    rc.give_up
                );
                match rejoin(&sh, rc).await {
                    Ok(next) => stream = next,
                    Err(gave_up) => break gave_up,
                }
            };
            sh.kill_commands();
            if sh.in_process {
                // The client's own process goes on: stop this worker's threads.
                tracing::warn!("in-process worker: {why}; stopping");
                sh.orders.lock().shutdown();
                sh.cv.notify_all();
                return;
            }
            // The scheduler is gone without asking us to stop: for an embedded
            // cluster this means the client process died. Leave no orphan.
            eprintln!("shoal worker {}: {why}; exiting", std::process::id());
            // SAFETY: _exit ends the process at once without running handlers;
            // nothing here needs flushing (results are useless without a scheduler).
            unsafe { libc::_exit(status) };
        });
        Ok(shared)
    })
}

/// When this process retires: `SHOAL_LIFETIME_END` (Unix seconds; set by
/// `shoal worker --lifetime`, or from Slurm's job end) less a random part
/// of `SHOAL_LIFETIME_STAGGER` seconds, so that a job's workers do not all
/// leave at once. 0: no end.
fn lifetime_end_us() -> u64 {
    let secs = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let Some(end) = secs("SHOAL_LIFETIME_END") else {
        return 0;
    };
    let stagger = secs("SHOAL_LIFETIME_STAGGER").unwrap_or(0.0);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
    ((end - stagger * frac).max(0.0) * 1e6) as u64
}

/// `SHOAL_RECONNECT` (seconds; `shoal worker --reconnect` sets it): a worker
/// that loses its scheduler keeps its process, its running tasks, its
/// results and its unacknowledged reports, and joins again for up to that
/// long; a client keeps its futures and tasks and connects again.
pub(crate) fn reconnect_for() -> Option<Duration> {
    std::env::var("SHOAL_RECONNECT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
}

type Stream = futures::stream::SplitStream<net::Conn>;

/// Joins the scheduler again after losing it: orders not started are
/// dropped (the scheduler that comes back places its tasks anew), running
/// tasks run on, results held are kept. The first message on the new
/// connection is `Rejoin` (what runs, the reports not acknowledged, and
/// the results held: the scheduler releases those no client claims).
/// Err: gave up (why, exit status).
async fn rejoin(sh: &Arc<WorkerShared>, rc: &Reconnect) -> Result<Stream, (String, i32)> {
    sh.out().close();
    let aborts = sh.orders.lock().forget_orders();
    aborts.into_iter().for_each(|h| h.abort());
    let deadline = Instant::now() + rc.give_up;
    let (conn, id) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match net::handshake(&rc.scheduler, rc.role.clone(), &sh.secret).await {
            Ok(ok) => break ok,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err((e.to_string(), crate::local::EXIT_REFUSED));
            }
            Err(e) if Instant::now() >= deadline => {
                let why = format!(
                    "could not join the scheduler again within {:?}: {e}",
                    rc.give_up
                );
                return Err((why, crate::local::EXIT_SCHEDULER_SILENT));
            }
            Err(_) => {}
        }
    };
    let (out, stream) = net::split_batched::<ToScheduler>(conn);
    // Under the report lock: no report overtakes the Rejoin, so the
    // scheduler's count of reports matches the log's.
    let unsent = sh.unsent.lock();
    sh.id.store(id, Ordering::Relaxed);
    let running = sh.orders.lock().running_tasks();
    let held: Vec<(u64, u64)> = sh
        .store
        .lock()
        .iter()
        .map(|(&id, v)| {
            let size = match v {
                Stored::Bytes(b) => b.len() as u64,
                Stored::File { len, .. } => *len,
                // Held by Python only: the size is not known here.
                Stored::Held | Stored::Unpicklable(_) => 0,
            };
            (id, size)
        })
        .collect();
    let reports: Vec<ToScheduler> = {
        let mut log = sh.unacked.lock();
        log.1 = 0;
        log.0.iter().cloned().collect()
    };
    eprintln!(
        "shoal worker {}: joined the scheduler again as worker {id}: {} tasks running, {} \
         reports sent again, {} results held",
        std::process::id(),
        running.len(),
        reports.len(),
        held.len()
    );
    let _ = out.send(ToScheduler::Rejoin {
        running,
        reports,
        held,
    });
    *sh.out.write() = out;
    drop(unsent);
    Ok(stream)
}

/// Applies one scheduler message; true on shutdown.
fn handle(sh: &Arc<WorkerShared>, msg: FromScheduler) -> bool {
    match msg {
        FromScheduler::Compute {
            id,
            name,
            group,
            kind,
            func,
            args,
            deps,
            resources,
            time_limit_ms,
            job,
        } => {
            let remote: Vec<&Dep> = deps
                .iter()
                .filter(|d| matches!(&d.source, DepSource::Worker { id, .. } if *id != sh.id()))
                .collect();
            let mut t = ExecTask {
                id,
                name,
                group,
                kind,
                func,
                args,
                deps: Vec::with_capacity(deps.len()),
                resources,
                time_limit_ms,
                job,
            };
            if remote.is_empty() {
                t.deps = deps
                    .into_iter()
                    .map(|d| match d.source {
                        DepSource::Inline(b) => (d.id, Input::Bytes(b)),
                        DepSource::Worker { .. } => (d.id, Input::Local),
                    })
                    .collect();
                let old = sh.orders.lock().compute(id, t);
                abort(old);
                sh.cv.notify_one();
            } else {
                let mut orders = sh.orders.lock();
                let old = orders.compute_fetching(id, |attempt| {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        let outcome = match fetch_inputs(&sh, deps).await {
                            Ok(deps) => {
                                t.deps = deps;
                                FetchOutcome::Ok(t)
                            }
                            Err(FetchFailure::Missing(deps)) => FetchOutcome::Missing(deps),
                            Err(FetchFailure::Unreachable(deps, why)) => {
                                tracing::warn!("task {id:x}: {why}");
                                FetchOutcome::Unreachable(deps)
                            }
                        };
                        let report = sh.orders.lock().fetched(id, attempt, outcome);
                        // Dropped here; the scheduler places the task again
                        // (after recomputing inputs its holder lacks).
                        let msg = match report {
                            FetchReport::None => {
                                sh.cv.notify_one();
                                return;
                            }
                            FetchReport::Missing(deps) => ToScheduler::Missing { task: id, deps },
                            FetchReport::Unreachable(deps) => {
                                ToScheduler::FetchFailed { task: id, deps }
                            }
                        };
                        sh.flush();
                        let _ = sh.out().send(msg);
                    })
                    .abort_handle()
                });
                drop(orders);
                abort(old);
            }
        }
        FromScheduler::Steal(ids) => {
            // The execution loop takes one task at a time, so every task not
            // started is still here (or fetching its inputs).
            let (given, aborts) = sh.orders.lock().steal(&ids);
            aborts.into_iter().for_each(|h| h.abort());
            if !given.is_empty() {
                let _ = sh.out().send(ToScheduler::Stolen(given));
            }
        }
        FromScheduler::Cancel(id) => {
            let old = sh.orders.lock().cancel(id);
            abort(old);
        }
        FromScheduler::Stop(id) => {
            let (old, running) = {
                let mut orders = sh.orders.lock();
                let old = orders.cancel(id);
                (old, orders.phase(id) == Some(Phase::Running))
            };
            abort(old);
            if running {
                sh.stop_running(id);
            }
        }
        FromScheduler::Release(ids) => {
            {
                let mut store = sh.store.lock();
                let mut copied = sh.copied.lock();
                let mut framed = sh.framed.lock();
                for id in &ids {
                    framed.remove(id); // a frame no transfer took
                    let gone = store.remove(id);
                    // Copies made here for a retiring peer are ours to delete
                    // (the Python side may not have seen them).
                    if let (true, Some(Stored::File { path, .. })) = (copied.remove(id), gone) {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            sh.orders.lock().release(ids);
            sh.cv.notify_one();
        }
        FromScheduler::Shutdown => {
            sh.orders.lock().shutdown();
            sh.cv.notify_all();
            return true;
        }
        FromScheduler::Ping => {}
        FromScheduler::Ack(n) => sh.acked(n),
        FromScheduler::Sync(sid) => {
            sh.syncs.lock().push(sid);
            if sh.sampler.load(Ordering::Relaxed) {
                sh.sync_epoch.fetch_add(1, Ordering::Relaxed);
                // The profiler answers within its interval; a task holding
                // the GIL may delay it: answer anyway after a while.
                let sh = sh.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(SYNC_WAIT).await;
                    sh.synced();
                });
            } else {
                sh.synced();
            }
        }
        FromScheduler::Replicate { id, from } => {
            let sh = sh.clone();
            tokio::spawn(async move {
                let ok = match replicate(&sh, id, &from).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!("could not copy {id:x} from {from}: {e}");
                        false
                    }
                };
                let _ = sh.out().send(ToScheduler::Replicated { id, ok });
            });
        }
        FromScheduler::Restart if sh.in_process => {
            eprintln!(
                "shoal: a worker in this process cannot be restarted (a task stuck in C \
                 code, or restart()): use worker processes (LocalCluster(processes=True))"
            );
        }
        FromScheduler::Restart => {
            eprintln!(
                "shoal worker {}: restart requested; exiting for a fresh process",
                std::process::id()
            );
            crate::shm::remove_process(std::process::id());
            sh.kill_commands();
            // SAFETY: as on scheduler loss; the nanny starts a new process.
            unsafe { libc::_exit(75) };
        }
        other => tracing::warn!("unexpected message for a worker: {other:?}"),
    }
    false
}

/// Aborts a fetch whose order is gone (its permit and connection go with it).
fn abort(fetch: Option<tokio::task::AbortHandle>) {
    if let Some(h) = fetch {
        h.abort();
    }
}

/// Copies result `id` from the worker at `from` into a file of this
/// worker's (shared memory), for a retiring peer.
async fn replicate(sh: &WorkerShared, id: u64, from: &str) -> io::Result<()> {
    let mut got = fetch(from, vec![id], &sh.secret).await?;
    let (_, value) = got.pop().ok_or_else(|| io::Error::other("empty reply"))?;
    let dir = crate::shm::segment_dir(std::process::id());
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{id:x}"));
    let len = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> io::Result<u64> {
            let mut out = std::fs::File::create(&path)?;
            match value {
                Fetched::Bytes(b) => {
                    std::io::Write::write_all(&mut out, &b)?;
                    Ok(b.len() as u64)
                }
                // Same host: a kernel copy of the peer's segment.
                Fetched::File(mut f) => std::io::copy(&mut f, &mut out),
                // Cannot move: it is recomputed once its holder is gone.
                Fetched::Unpicklable(why) => Err(io::Error::other(why)),
            }
        }
    })
    .await
    .map_err(io::Error::other)??;
    let path = path.to_string_lossy().into_owned();
    sh.store.lock().insert(id, Stored::File { path, len });
    sh.copied.lock().insert(id);
    Ok(())
}

/// Held results transfers wait for, queued for the pickling thread.
#[derive(Default)]
struct PickleRequests {
    /// To write to files (a transfer on this host).
    files: VecDeque<u64>,
    /// To frame in memory (a transfer to another host).
    frames: VecDeque<u64>,
    /// What is queued, each way (asked twice, pickled once).
    queued: FxHashSet<(u64, bool)>,
    /// The batch the pickling thread works on (until it asks again).
    busy: FxHashSet<(u64, bool)>,
}

/// Why a task's inputs could not be had.
enum FetchFailure {
    /// A holder answered that it does not have these: the scheduler must
    /// recompute them.
    Missing(Vec<u64>),
    /// Transfers of these inputs kept failing (their holder is
    /// unreachable), and why.
    Unreachable(Vec<u64>, String),
}

/// Fetches the inputs held by other workers, at most `FETCH_SLOTS` at once
/// per worker, retrying briefly (if the holder died, the scheduler cancels
/// this task and recomputes the input).
async fn fetch_inputs(
    sh: &WorkerShared,
    deps: Vec<Dep>,
) -> Result<Vec<(u64, Input)>, FetchFailure> {
    let mut by_addr: FxHashMap<String, Vec<u64>> = FxHashMap::default();
    for d in &deps {
        if let DepSource::Worker { id, addr } = &d.source {
            if *id != sh.id() {
                by_addr.entry(addr.clone()).or_default().push(d.id);
            }
        }
    }
    let mut fetched: FxHashMap<u64, Input> = FxHashMap::default();
    for (addr, ids) in by_addr {
        let mut last_err = String::new();
        let mut ok = false;
        for attempt in 0..5u64 {
            let got = {
                let _slot = sh.fetch_slots.acquire().await;
                let (start_us, t0) = (now_us(), Instant::now());
                let got = tokio::time::timeout(
                    FETCH_DEADLINE,
                    fetch_some(&addr, ids.clone(), &sh.secret),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {FETCH_DEADLINE:?}"),
                    ))
                });
                if let Ok(items) = &got {
                    let bytes: u64 = items
                        .iter()
                        .map(|(_, v)| v.as_ref().map_or(0, Fetched::size))
                        .sum();
                    sh.bytes_in.fetch_add(bytes, Ordering::Relaxed);
                    sh.record_activity(Activity {
                        kind: ActivityKind::Transfer,
                        task: if ids.len() == 1 { ids[0] } else { 0 },
                        bytes,
                        start_us,
                        duration_us: t0.elapsed().as_micros() as u64,
                    });
                }
                got
            };
            match got {
                Ok(items) => {
                    let missing: Vec<u64> = items
                        .iter()
                        .filter(|(_, v)| v.is_none())
                        .map(|(id, _)| *id)
                        .collect();
                    if !missing.is_empty() {
                        return Err(FetchFailure::Missing(missing));
                    }
                    fetched.extend(
                        items
                            .into_iter()
                            .filter_map(|(id, v)| v.map(|v| (id, v.into_input()))),
                    );
                    ok = true;
                    break;
                }
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        if !ok {
            let why = format!("could not fetch inputs {ids:x?} from worker at {addr}: {last_err}");
            return Err(FetchFailure::Unreachable(ids, why));
        }
    }
    Ok(deps
        .into_iter()
        .map(|d| match d.source {
            DepSource::Inline(b) => (d.id, Input::Bytes(b)),
            DepSource::Worker { id, .. } if id == sh.id() => (d.id, Input::Local),
            DepSource::Worker { .. } => {
                let v = fetched.remove(&d.id).unwrap_or(Input::Local);
                (d.id, v)
            }
        })
        .collect())
}

/// A fetched result: bytes, or a file on this host, already open (so the
/// holder may unlink it once it is released).
pub enum Fetched {
    /// The pickled bytes.
    Bytes(Bytes),
    /// The open file with the pickle.
    File(std::fs::File),
    /// Its holder cannot pickle it (why).
    Unpicklable(String),
}

impl Fetched {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Fetched::Bytes(b) => b.len() as u64,
            Fetched::File(f) => f.metadata().map_or(0, |m| m.len()),
            Fetched::Unpicklable(_) => 0,
        }
    }

    fn into_input(self) -> Input {
        match self {
            Fetched::Bytes(b) => Input::Bytes(b),
            Fetched::File(f) => Input::File(f),
            Fetched::Unpicklable(why) => Input::Unavailable(why),
        }
    }
}

/// Fetches results from a worker's data server; files on this host are
/// opened, not read. Missing results are an error.
pub async fn fetch(addr: &str, ids: Vec<u64>, secret: &Secret) -> io::Result<Vec<(u64, Fetched)>> {
    fetch_some(addr, ids, secret)
        .await?
        .into_iter()
        .map(|(id, v)| {
            v.map(|v| (id, v)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("worker at {addr} does not hold {id:x}"),
                )
            })
        })
        .collect()
}

/// Like [`fetch`]; `None` for results the worker says it does not hold.
async fn fetch_some(
    addr: &str,
    ids: Vec<u64>,
    secret: &Secret,
) -> io::Result<Vec<(u64, Option<Fetched>)>> {
    let address =
        Address::parse(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // A kept connection may have been closed by its peer meanwhile: then a
    // new one (a fetch can be asked again).
    if let Some(mut conn) = idle_conns::take(addr) {
        if let Ok(out) = request(&mut conn, &ids).await {
            idle_conns::put(addr, conn);
            return Ok(out);
        }
    }
    let (mut conn, _) = net::handshake(&address, Role::Data, secret).await?;
    let out = request(&mut conn, &ids).await?;
    idle_conns::put(addr, conn);
    Ok(out)
}

/// One data request and its reply on an open data connection.
async fn request(conn: &mut net::Conn, ids: &[u64]) -> io::Result<Vec<(u64, Option<Fetched>)>> {
    let host = crate::shm::host_key().to_string();
    let ids = ids.to_vec();
    net::send(conn, &DataRequest { ids, host }).await?;
    let reply: DataReply = net::recv(conn).await?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "data server closed the connection",
        )
    })?;
    let mut out = Vec::with_capacity(reply.items.len());
    for (id, v) in reply.items {
        let got = match v {
            // Its own frame, received into its own buffer: no copy.
            Some(Payload::Follows(n)) => {
                let n = usize::try_from(n)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
                Some(Fetched::Bytes(net::recv_raw(conn, n).await?))
            }
            Some(Payload::Bytes(b)) => Some(Fetched::Bytes(b)),
            // Opened at once: the holder may unlink it once it is released.
            // (Gone already: it was spilled meanwhile; the caller asks again.)
            Some(Payload::File { path, .. }) => Some(Fetched::File(std::fs::File::open(path)?)),
            Some(Payload::Unpicklable(why)) => Some(Fetched::Unpicklable(why)),
            None => None,
        };
        out.push((id, got));
    }
    Ok(out)
}

/// Data connections kept open after a fetch for the next fetch from the
/// same worker: a new one costs a connection, the cluster's handshake and,
/// under TLS, a TLS handshake at both ends (a shuffle fetches from each
/// peer again and again). At most [`PER_PEER`](idle_conns::PER_PEER) per
/// worker and [`MAX`](idle_conns::MAX) in all, none kept past
/// [`FOR`](idle_conns::FOR).
mod idle_conns {
    use crate::net::Conn;
    use parking_lot::Mutex;
    use rustc_hash::FxHashMap;
    use std::time::{Duration, Instant};

    pub(super) const PER_PEER: usize = 4;
    pub(super) const MAX: usize = 64;
    pub(super) const FOR: Duration = Duration::from_secs(30);

    struct Idle {
        /// The process they belong to: a forked child must not use (or
        /// drop: their runtime is its parent's) its parent's connections.
        pid: u32,
        by_addr: FxHashMap<String, Vec<(Conn, Instant)>>,
        count: usize,
    }

    static IDLE: Mutex<Option<Idle>> = Mutex::new(None);

    fn with<R>(f: impl FnOnce(&mut Idle) -> R) -> R {
        let mut g = IDLE.lock();
        let pid = std::process::id();
        if g.as_ref().is_some_and(|i| i.pid != pid) {
            std::mem::forget(g.take()); // the parent's: leaked, never dropped here
        }
        let idle = g.get_or_insert_with(|| Idle {
            pid,
            by_addr: FxHashMap::default(),
            count: 0,
        });
        f(idle)
    }

    /// A kept connection to `addr` (the most recently used), if any.
    pub(super) fn take(addr: &str) -> Option<Conn> {
        let stale = with(|i| {
            let v = i.by_addr.get_mut(addr)?;
            let now = Instant::now();
            let before = v.len();
            // Kept in the order they were put: the stale ones come first.
            let n = v
                .iter()
                .take_while(|(_, t)| now.duration_since(*t) > FOR)
                .count();
            let old: Vec<_> = v.drain(..n).collect();
            let got = v.pop();
            i.count -= before - v.len();
            if v.is_empty() {
                i.by_addr.remove(addr);
            }
            Some((got.map(|(c, _)| c), old))
        });
        let (got, old) = stale?;
        drop(old); // closed outside the lock
        got
    }

    /// Keeps `conn` to `addr` for the next fetch (or closes it: too many).
    pub(super) fn put(addr: &str, conn: Conn) {
        let evicted = with(|i| {
            let v = i.by_addr.entry(addr.to_string()).or_default();
            if v.len() >= PER_PEER {
                return Some(conn);
            }
            v.push((conn, Instant::now()));
            i.count += 1;
            if i.count <= MAX {
                return None;
            }
            // Over the total: the oldest connection anywhere goes.
            let (k, at) = i
                .by_addr
                .iter()
                .flat_map(|(k, v)| v.iter().enumerate().map(move |(j, (_, t))| (k, j, *t)))
                .min_by_key(|&(_, _, t)| t)
                .map(|(k, j, _)| (k.clone(), j))?;
            let v = i.by_addr.get_mut(&k)?;
            let (c, _) = v.remove(at);
            if v.is_empty() {
                i.by_addr.remove(&k);
            }
            i.count -= 1;
            Some(c)
        });
        drop(evicted);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn conn() -> Conn {
            crate::net::framed(Box::new(tokio::io::duplex(64).0))
        }

        #[test]
        fn kept_per_peer_and_in_all_and_taken_newest_first() {
            let _rt = crate::runtime().enter();
            for _ in 0..PER_PEER + 2 {
                put("a", conn());
            }
            let mut taken = 0;
            while take("a").is_some() {
                taken += 1;
            }
            assert_eq!(taken, PER_PEER);
            for p in 0..MAX + 10 {
                put(&format!("p{p}"), conn());
            }
            assert_eq!(with(|i| i.count), MAX);
            // The oldest went: the first peers have none left.
            assert!(take("p0").is_none());
            assert!(take(&format!("p{}", MAX + 9)).is_some());
            with(|i| {
                i.by_addr.clear();
                i.count = 0;
            });
        }
    }
}

/// Payloads at least this large travel in frames of their own
/// ([`Payload::Follows`]).
const RAW_PAYLOAD: usize = 64 * 1024;

/// What the store had of a result a transfer asked for.
enum Found {
    /// What the store keeps.
    Stored(Stored),
    /// A held result framed for this transfer: the frame's parts.
    Framed(Vec<Bytes>),
}

/// One result in a data reply, as the data server has it.
enum Reply {
    /// Sent as it is (large bytes in a frame of their own).
    Payload(Payload),
    /// The first bytes of an open file, sent in a frame of their own.
    Contents(std::fs::File, u64),
    /// A frame's parts (buffers of a held result, not copied), sent as one
    /// frame of their own.
    Parts(Vec<Bytes>, u64),
}

impl Reply {
    /// A framed result: small ones joined (sent inside the reply).
    fn frame(parts: Vec<Bytes>) -> Reply {
        let n: usize = parts.iter().map(Bytes::len).sum();
        if n >= RAW_PAYLOAD {
            return Reply::Parts(parts, n as u64);
        }
        let mut b = Vec::with_capacity(n);
        for p in &parts {
            b.extend_from_slice(p);
        }
        Reply::Payload(Payload::Bytes(Bytes::from(b)))
    }

    fn size(&self) -> u64 {
        match self {
            Reply::Payload(Payload::Bytes(b)) => b.len() as u64,
            Reply::Payload(Payload::File { len, .. })
            | Reply::Contents(_, len)
            | Reply::Parts(_, len) => *len,
            Reply::Payload(Payload::Follows(n)) => *n,
            Reply::Payload(Payload::Unpicklable(_)) => 0,
        }
    }
}

/// Sends a data reply: large byte payloads and file contents after it,
/// each in a raw frame.
async fn send_reply(conn: &mut net::Conn, items: Vec<(u64, Option<Reply>)>) -> io::Result<()> {
    let mut raw = Vec::new();
    let items = items
        .into_iter()
        .map(|(id, r)| {
            let p = match r {
                Some(Reply::Payload(Payload::Bytes(b))) if b.len() >= RAW_PAYLOAD => {
                    let n = b.len() as u64;
                    raw.push(net::RawPart::Bytes(b));
                    Some(Payload::Follows(n))
                }
                Some(Reply::Contents(f, len)) => {
                    raw.push(net::RawPart::File(f, len));
                    Some(Payload::Follows(len))
                }
                Some(Reply::Parts(parts, len)) => {
                    raw.push(net::RawPart::Gather(parts));
                    Some(Payload::Follows(len))
                }
                Some(Reply::Payload(p)) => Some(p),
                None => None,
            };
            (id, p)
        })
        .collect();
    net::send(conn, &DataReply { items }).await?;
    net::send_raw_parts(conn, raw).await
}

async fn data_server(listener: Listener, sh: Arc<WorkerShared>) {
    loop {
        let (incoming, peer) = listener.accept().await;
        let sh = sh.clone();
        tokio::spawn(async move {
            // A peer that cannot prove it has the secret fetches nothing.
            let mut conn = match incoming.authenticate(&sh.secret, &peer).await {
                Ok((conn, h)) if h.role == Role::Data => conn,
                Ok((mut conn, _)) => {
                    let reason = "this is a worker's data server: only data requests".into();
                    let _ = net::send(&mut conn, &Welcome::Rejected { reason }).await;
                    return;
                }
                Err(()) => return,
            };
            if net::send(&mut conn, &Welcome::Accepted { id: sh.id() })
                .await
                .is_err()
            {
                return;
            }
            while let Ok(Some(req)) = net::recv::<DataRequest>(&mut conn).await {
                let same_host = req.host == crate::shm::host_key();
                let items = sh.pickled_results(&req.ids, same_host).await;
                let bytes: u64 = items
                    .iter()
                    .filter_map(|(_, r)| r.as_ref())
                    .map(Reply::size)
                    .sum();
                sh.bytes_out.fetch_add(bytes, Ordering::Relaxed);
                if send_reply(&mut conn, items).await.is_err() {
                    return;
                }
            }
        });
    }
}
