//! The Rust half of a worker process.
//!
//! The I/O thread receives tasks, fetches inputs held by other workers,
//! serves this worker's results to peers and clients, and reports results.
//! Python execution threads hand over each finished task with
//! [`WorkerShared::report`] (buffered, sent every few milliseconds) and take
//! the next with [`WorkerShared::try_next`] (GIL held, no wait) or
//! [`WorkerShared::wait_next`] (GIL released), one task at a time so that
//! unstarted tasks stay here, where the scheduler can steal them.

use crate::clock::now_us;
use crate::net::{self, Address, Listener, Secret};
use crate::slots::TaskSlots;
use crate::transfer::{fetch, fetch_some, Fetched};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Condvar, Mutex};
use rustc_hash::{FxHashMap, FxHashSet};
use shoal_core::worker::fetch::{FetchPolicy, Next};
use shoal_core::worker::reports::ReportLog;
use shoal_core::worker::stops::{Stop, Stops};
use shoal_core::worker::store::{travels_inline, Results};
use shoal_core::worker::{FetchReport, Fetched as FetchOutcome, Phase, Take, WorkerState};
use shoal_proto::{
    Activity, ActivityKind, DataReply, DataRequest, Dep, DepSource, FromWorker, Payload, Role,
    TaskKind, Telemetry, Timing, ToWorker, Welcome, WorkerMetrics, WorkerStep, INLINE_LIMIT,
};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The worker's service, by concern (each an `impl WorkerShared` of its own).
mod commands;
mod orders;
mod reports;
mod serve;

use orders::handle;
use serve::data_server;

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
    /// A batch to say which element runs (see `ToWorker::Compute`).
    pub careful: bool,
    /// What earlier runs of it did (see `ToWorker::Compute`).
    pub resume: Vec<Bytes>,
}

/// What a worker needs to join its scheduler again.
struct Reconnect {
    scheduler: Address,
    role: Role,
    /// How long it tries before it gives up and exits.
    give_up: Duration,
}

/// A running command task's stop: its flag and its process group.
type CommandStop = Arc<(AtomicBool, AtomicU32)>;

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
pub(crate) struct Unsent {
    /// Tasks execution threads took since the last flush: sent first, so
    /// the scheduler hears of a start before its result.
    started: Vec<u64>,
    reports: Vec<FromWorker>,
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
    store: Mutex<Results<Bytes>>,
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
    out: parking_lot::RwLock<net::Outbox<FromWorker>>,
    /// `shoal worker --reconnect`: how to reach the scheduler again, and
    /// the `Finished`/`Failed` reports it has not acknowledged (with how
    /// many of this connection's reports it has), sent again on rejoining.
    reconnect: Option<Reconnect>,
    unacked: Mutex<ReportLog<FromWorker>>,
    /// Starts and results not yet sent: sent together once the oldest is
    /// `FLUSH_AFTER` old (by the next report or the flusher task), and
    /// before the execution loop waits.
    unsent: Mutex<Unsent>,
    /// Wakes the flusher when the first report is buffered.
    unsent_first: tokio::sync::Notify,
    /// The last task an execution thread reported ran `FLUSH_AFTER` or
    /// longer: reports and starts go as soon as the thread takes its next
    /// task (one wake of the I/O thread), instead of waking the flusher to
    /// wait `FLUSH_AFTER` (two), as nothing would travel together anyway.
    eager: AtomicBool,
    /// Memory figures from the Python memory manager, sent with heartbeats.
    metrics: Mutex<WorkerMetrics>,
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
    stops: Mutex<Stops<CommandStop>>,
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
    /// Where it says which task each execution thread runs, for its
    /// supervisor to read if it dies ([`crate::slots`]); None without one.
    pub slots: Option<TaskSlots>,
}

/// `SHOAL_STOP_GRACE` (seconds, default 5): how long a stopped task has
/// before it is killed (a command) or its process restarted (Python).
fn stop_grace() -> Duration {
    crate::settings::seconds("SHOAL_STOP_GRACE", 0.0).unwrap_or(Duration::from_secs(5))
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

/// Where this worker keeps a large result, for transfers (see
/// [`shoal_core::worker::store`]).
pub type Stored = shoal_core::worker::store::Stored<Bytes>;

/// Steps of the worker's orders kept for their story (the dashboard's task
/// detail, `Client.story`, `shoal task`): about the last 2,700 tasks' three
/// steps each, some 400 KiB.
const ORDER_LOG: usize = 8192;

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
    fn out(&self) -> net::Outbox<FromWorker> {
        self.out.read().clone()
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

    fn timing(&self) -> &Timing {
        match self {
            Done::Ok { timing, .. }
            | Done::File { timing, .. }
            | Done::Held { timing, .. }
            | Done::Err { timing, .. } => timing,
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
            Address::Memory(name) => Address::Memory(format!("{name}-worker-{server}")),
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
                let ip = match crate::settings::raw("SHOAL_INTERFACE") {
                    Some(name) => net::interface_ip(&name)?,
                    None => ip,
                };
                scheduler.with_host_port(std::net::SocketAddr::new(ip, 0).to_string())
            }
        };
        let listener = Listener::bind(&data_addr).await?;
        let data_addr = listener.local_addr()?;
        let lifetime_end_us = lifetime_end_us();
        // A worker in a client's own process has no supervisor of its own
        // (the variables, if set, were meant for the process's parent).
        let slots = (!in_process).then(TaskSlots::from_env).flatten();
        let supervisor = match &slots {
            Some(_) => crate::settings::raw("SHOAL_SUPERVISOR")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            None => 0,
        };
        let role = Role::Worker {
            nthreads,
            data_addr: data_addr.to_string(),
            name: name.to_string(),
            pid: std::process::id(),
            resources,
            lifetime_end_us,
            supervisor,
        };
        let (conn, id) = net::handshake(scheduler, role.clone(), &secret).await?;
        if let Some(s) = &slots {
            s.set_joined();
        }
        let (out, mut stream) = net::split_batched::<FromWorker>(conn);
        let reconnect = reconnect_for().map(|give_up| Reconnect {
            scheduler: scheduler.clone(),
            role,
            give_up,
        });
        let shared = Arc::new(WorkerShared {
            id: AtomicU32::new(id),
            nthreads,
            data_addr,
            orders: Mutex::new(WorkerState::new(nthreads, ORDER_LOG).with_clock(now_us)),
            cv: Condvar::new(),
            store: Mutex::new(Results::default()),
            fetch_slots: tokio::sync::Semaphore::new(FETCH_SLOTS),
            secret,
            to_pickle: Mutex::new(PickleRequests::default()),
            framed: Mutex::new(FxHashMap::default()),
            to_pickle_cv: Condvar::new(),
            pickled: tokio::sync::Notify::new(),
            out: parking_lot::RwLock::new(out),
            reconnect,
            unacked: Mutex::new(ReportLog::default()),
            unsent: Mutex::new(Unsent::default()),
            unsent_first: tokio::sync::Notify::new(),
            eager: AtomicBool::new(false),
            metrics: Mutex::new(WorkerMetrics::default()),
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
            slots,
        });
        tokio::spawn(data_server(listener, shared.clone()));
        if shared.slots.is_some() {
            // Started by a supervisor (not by hand, not by an MPI launcher).
            watch_parent();
        }
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
                    let _ = sh.out().send(FromWorker::Telemetry(t));
                }
                // A worker that reconnects beats on the next connection.
                if sh.out().send(FromWorker::Heartbeat(m)).is_err() && sh.reconnect.is_none() {
                    return;
                }
            }
        });
        let sh = shared.clone();
        let timeout = net::heartbeat_timeout();
        // An embedded cluster's scheduler runs in this process's parent.
        let scheduler_in_parent = matches!(scheduler, Address::Unix(_));
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
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
                    match net::decode_batch::<ToWorker>(frame) {
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
            if scheduler_in_parent {
                // Its sockets close before it is done dying: wait (briefly)
                // until it is, so that the sweep takes its directories too.
                let deadline = Instant::now() + Duration::from_secs(2);
                // SAFETY: getppid has no preconditions.
                while unsafe { libc::getppid() } == parent && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            exit_leaving_nothing(status);
        });
        Ok(shared)
    })
}

/// When this process retires: `SHOAL_LIFETIME_END` (Unix seconds; set by
/// `shoal worker --lifetime`, or from Slurm's job end) less a random part
/// of `SHOAL_LIFETIME_STAGGER` seconds, so that a job's workers do not all
/// leave at once. 0: no end.
fn lifetime_end_us() -> u64 {
    let secs = |k: &str| crate::settings::seconds(k, 0.0).map(|d| d.as_secs_f64());
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
    crate::settings::seconds("SHOAL_RECONNECT", f64::MIN_POSITIVE)
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
    let (out, stream) = net::split_batched::<FromWorker>(conn);
    // Under the report lock: no report overtakes the Rejoin, so the
    // scheduler's count of reports matches the log's.
    let unsent = sh.unsent.lock();
    sh.id.store(id, Ordering::Relaxed);
    let running = sh.orders.lock().running_tasks();
    // Held by Python only: the size is not known here (0).
    let held = sh.store.lock().held();
    let reports = sh.unacked.lock().rejoined();
    eprintln!(
        "shoal worker {}: joined the scheduler again as worker {id}: {} tasks running, {} \
         reports sent again, {} results held",
        std::process::id(),
        running.len(),
        reports.len(),
        held.len()
    );
    let _ = out.send(FromWorker::Rejoin {
        running,
        reports,
        held,
    });
    *sh.out.write() = out;
    drop(unsent);
    Ok(stream)
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

/// Payloads at least this large travel in frames of their own
/// ([`Payload::Follows`]).
const RAW_PAYLOAD: usize = 64 * 1024;

/// What the store had of a result a transfer asked for.
pub(crate) enum Found {
    /// What the store keeps.
    Stored(Stored),
    /// A held result framed for this transfer: the frame's parts.
    Framed(Vec<Bytes>),
}

/// One result in a data reply, as the data server has it.
pub(crate) enum Reply {
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

#[cfg(test)]
mod tests;

/// Ends this worker process at once, removing first what it leaves in tmpfs
/// and the temporary directory: its own shared-memory segments and spill
/// files, and those of processes that died before it (the SIGKILLed client
/// whose cluster this was, workers killed with it), which no one else may
/// ever sweep. Files in tmpfs hold memory.
pub fn exit_leaving_nothing(status: i32) -> ! {
    crate::shm::remove_process(std::process::id());
    crate::shm::sweep(None);
    // SAFETY: _exit ends the process at once without running handlers;
    // nothing here needs flushing (results are useless without a scheduler).
    unsafe { libc::_exit(status) }
}

/// How long a worker whose parent (its supervisor) died may go on: SIGTERM
/// (its parent-death signal) asked it to retire, which hands its data over
/// first; one that does not manage within this time ends anyway.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// A thread that ends this process (leaving nothing behind) once its
/// parent has been gone for [`ORPHAN_GRACE`]: no worker outlives its
/// supervisor for long, even one stuck in C code that cannot take SIGTERM.
fn watch_parent() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let _ = std::thread::Builder::new()
        .name("shoal-parent".into())
        .spawn(move || {
            // SAFETY: as above.
            while unsafe { libc::getppid() } == parent {
                std::thread::sleep(Duration::from_millis(250));
            }
            std::thread::sleep(ORPHAN_GRACE);
            eprintln!(
                "shoal worker {}: its supervisor died {}s ago; exiting",
                std::process::id(),
                ORPHAN_GRACE.as_secs()
            );
            exit_leaving_nothing(1);
        });
}
