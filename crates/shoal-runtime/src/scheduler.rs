//! The scheduler service: one task owns the [`Core`] and all payloads; each
//! connection has a reader task that forwards decoded batches to it and a
//! writer task that batches what it sends back. The owner drains every event
//! available before writing, so bursts become a few large frames.

mod api;
mod http;
mod jobs;
mod journal;
mod monitor;

pub use http::{APP_CSS, APP_JS, INDEX_HTML};

use crate::net::{self, Address, Listener, Secret};
use bytes::Bytes;
use futures::StreamExt;
use rustc_hash::{FxHashMap, FxHashSet};
use shoal_core::{Action, ClientId, Core, ErrorKind, Location, NewTask, TaskId, WorkerId};
use shoal_proto::{
    task_name, ClusterInfo, Dep, DepSource, FromScheduler, Role, TaskError, TaskSpec, ToScheduler,
    Welcome, WorkerInfo, WorkerMetrics,
};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

type Tx = net::Outbox<FromScheduler>;

/// A client query that makes every worker send its telemetry first.
pub const SYNC_PATH: &str = "/api/sync";

/// Transitions the core keeps for task stories (about 80 bytes each).
const STORY_LOG: usize = 100_000;

/// How often the core learns the time.
const TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// How long the owner works through queued messages before it lets the
/// rest of the I/O thread run (readers, writers, heartbeats, the dashboard).
const SLICE: std::time::Duration = std::time::Duration::from_millis(2);

/// Tasks (or ids) per piece a big `Submit` (`Release`, `Cancel`, ...) is
/// cut into, so that no one message holds the owner for long.
const PIECE: usize = 4096;

/// Frames at least this big are decoded off the I/O thread.
const BIG_FRAME: usize = 4 << 20;

enum Event {
    ClientJoined(u32, Tx),
    WorkerJoined {
        id: u32,
        pid: u32,
        nthreads: u32,
        data_addr: String,
        name: String,
        resources: Vec<(String, f64)>,
        lifetime_end_us: u64,
        tx: Tx,
    },
    FromClient(u32, Vec<ToScheduler>),
    FromWorker(u32, Vec<ToScheduler>),
    ClientLeft(u32),
    WorkerLeft(u32, String),
    ShutdownWorkers,
    /// A dashboard request: the answer, and the task stream's next sequence
    /// number (where the next live update starts).
    Query(String, oneshot::Sender<(api::Reply, u64)>),
    /// Tests: a bug in the owner.
    #[cfg(test)]
    Panic,
    /// Tests: a smaller [`PEER_BACKLOG`].
    #[cfg(test)]
    PeerBacklog(usize),
}

/// A running scheduler.
pub struct SchedulerHandle {
    /// Where clients and workers connect.
    pub address: Address,
    /// The dashboard's URL (without its token), if it has one.
    pub dashboard: Option<String>,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Sender<bool>,
    crashed: watch::Receiver<Option<String>>,
}

impl SchedulerHandle {
    /// Waits until the scheduler crashed (a panic in its owner task, which
    /// then stops it: every connection closes, so clients and workers fail
    /// fast); returns the panic's message. Never returns while it runs.
    pub fn crashed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.crashed.clone();
        async move {
            let why = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|w| w.clone());
            match why {
                Some(why) => why,
                // The sender went without a crash: the scheduler was stopped.
                None => std::future::pending().await,
            }
        }
    }

    /// Asks every worker to finish and exit.
    pub fn shutdown_workers(&self) {
        let _ = self.events.send(Event::ShutdownWorkers);
    }

    /// Stops accepting and drops every connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `address` and serves on the current tokio runtime. Every peer
/// must prove it knows `secret`. `dashboard` is the `HOST:PORT` to serve
/// the dashboard on (None: no dashboard); if that port is taken, another
/// is chosen (as Dask does with 8787).
pub async fn start(
    address: &Address,
    secret: Secret,
    dashboard: Option<&str>,
) -> io::Result<SchedulerHandle> {
    start_with_journal(address, secret, dashboard, None).await
}

/// How long a scheduler restored from its journal holds the unfinished
/// tasks back, for workers that rejoin to claim what they still run or
/// finished (`SHOAL_RECOVERY_WAIT` seconds, default 3: `--reconnect`
/// workers try once a second).
fn recovery_wait() -> std::time::Duration {
    std::env::var("SHOAL_RECOVERY_WAIT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map_or(
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs_f64,
        )
}

/// What a journal gave back at start.
struct Recovery {
    journal: journal::Journal,
    jobs: jobs::Jobs,
    /// Pending tasks of each job, to submit again.
    pending: Vec<(u32, Vec<TaskSpec>)>,
}

/// Reads the journal, rebuilds the jobs, and compacts the file.
fn recover(path: &std::path::Path) -> io::Result<Recovery> {
    let (mut journal, records) = journal::Journal::open(path)?;
    let mut jobs = jobs::Jobs::default();
    let mut pending: std::collections::BTreeMap<u32, FxHashMap<u64, TaskSpec>> = Default::default();
    let n = records.len();
    for r in records {
        match r {
            journal::Record::Job {
                id,
                name,
                max_fails,
                submitted_us,
                ids,
                tasks,
            } => {
                jobs.add_with_id(id, name, max_fails, &ids, submitted_us);
                pending.insert(id, tasks.into_iter().map(|t| (t.id, t)).collect());
            }
            journal::Record::Ended {
                task,
                outcome,
                error,
                at_us,
            } => {
                let job = jobs.job_of_task(task);
                let cancel = jobs.ended(task, jobs::outcome_of(outcome), error, at_us);
                // Past max_fails the rest was cancelled (maybe not journaled
                // before the crash): cancelled here too.
                for t in &cancel {
                    jobs.ended(t.0, jobs::Outcome::Cancelled, None, at_us);
                }
                if let Some(specs) = job.and_then(|j| pending.get_mut(&j)) {
                    specs.remove(&task);
                    for t in &cancel {
                        specs.remove(&t.0);
                    }
                }
            }
            journal::Record::Snapshot(snap) => {
                let id = snap.id;
                let specs = jobs.restore(snap);
                pending.insert(id, specs.into_iter().map(|t| (t.id, t)).collect());
            }
        }
    }
    let pending: Vec<(u32, Vec<TaskSpec>)> = pending
        .into_iter()
        .map(|(j, specs)| {
            let mut v: Vec<TaskSpec> = specs.into_values().collect();
            v.sort_by_key(|t| t.id);
            (j, v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let by_id: FxHashMap<u64, &TaskSpec> = pending
        .iter()
        .flat_map(|(_, v)| v.iter().map(|t| (t.id, t)))
        .collect();
    let snaps = jobs.snapshots(|t| by_id.get(&t).map(|s| (*s).clone()));
    let records: Vec<journal::Record> = snaps.into_iter().map(journal::Record::Snapshot).collect();
    journal.rewrite(&records)?;
    let left: usize = pending.iter().map(|(_, v)| v.len()).sum();
    tracing::info!(
        "journal {}: {n} records read; {} jobs, {left} tasks to run again",
        path.display(),
        records.len()
    );
    Ok(Recovery {
        journal,
        jobs,
        pending,
    })
}

/// [`start`], with a journal (`shoal scheduler --journal`): the jobs it
/// holds are restored and their unfinished tasks submitted again, and new
/// jobs and their tasks' ends are written to it.
pub async fn start_with_journal(
    address: &Address,
    secret: Secret,
    dashboard: Option<&str>,
    journal: Option<&std::path::Path>,
) -> io::Result<SchedulerHandle> {
    let recovery = journal.map(recover).transpose()?;
    // Connection ids above those of restored tasks (`client << 40 | n`):
    // new clients' task ids never collide with them.
    let min_id = recovery
        .iter()
        .flat_map(|r| r.pending.iter().flat_map(|(_, v)| v.iter()))
        .map(|t| (t.id >> 40) as u32 + 1)
        .max()
        .unwrap_or(0);
    // Ids (and so the task ids a client makes, `id << 40 | n`) start at a
    // random point below 4,096: two clusters' first clients get different
    // ones, so a future carried to another cluster does not name a task
    // there, and task ids stay below 2^53 (exact in the dashboard's
    // JavaScript) for the first few thousand connections.
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let first = (1 + u32::from(u16::from_le_bytes(r)) % 4095).max(min_id);
    let ids = Arc::new(AtomicU32::new(first));
    let listener = Listener::bind(address).await?;
    let address = listener.local_addr()?;
    let (events, rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    let mut url = None;
    if let Some(d) = dashboard {
        let http = match tokio::net::TcpListener::bind(d).await {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let host = d.rsplit_once(':').map_or(d, |(h, _)| h);
                let l = tokio::net::TcpListener::bind((host.trim_matches(['[', ']']), 0)).await?;
                tracing::info!("dashboard port of {d} is taken; using {}", l.local_addr()?);
                l
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot serve the dashboard on {d}: {e}"),
                ))
            }
        };
        let local = http.local_addr()?;
        // A TLS cluster's dashboard speaks HTTPS with the cluster's
        // certificate (issued for the name `shoal` by the site's CA).
        let tls = match address {
            Address::Tls(_) => Some(net::https_acceptor()?),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shown = if local.ip().is_unspecified() {
            format!("{scheme}://{}:{}/", hostname(), local.port())
        } else {
            format!("{scheme}://{local}/")
        };
        url = Some(shown);
        let token = secret.dashboard_token();
        tokio::spawn(http::serve(
            http,
            tls,
            events.clone(),
            token,
            stop_rx.clone(),
        ));
    }
    // No half-alive scheduler: a panic in the owner (a bug; no input should
    // reach one) stops everything, loudly, instead of leaving the listener
    // accepting connections that nothing serves.
    let (crash_tx, crashed) = watch::channel(None);
    let run = std::panic::AssertUnwindSafe(owner(
        rx,
        stop_rx.clone(),
        address.to_string(),
        url.clone().unwrap_or_default(),
        recovery,
        ids.clone(),
    ));
    let stop_all = stop.clone();
    tokio::spawn(async move {
        if let Err(panic) = futures::FutureExt::catch_unwind(run).await {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(
                "the scheduler crashed ({why}); stopping it: every client and worker \
                 connection closes. Please report this as a bug."
            );
            let _ = crash_tx.send(Some(why));
            let _ = stop_all.send(true);
        }
    });
    tokio::spawn(accept_loop(listener, events.clone(), stop_rx, secret, ids));
    Ok(SchedulerHandle {
        address,
        dashboard: url,
        events,
        stop,
        crashed,
    })
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

async fn accept_loop(
    listener: Listener,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    secret: Secret,
    ids: Arc<AtomicU32>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            (conn, peer) = listener.accept() => {
                let (events, ids, stop, secret) = (events.clone(), ids.clone(), stop.clone(), secret.clone());
                tokio::spawn(async move { serve_conn(conn, peer, events, ids, stop, &secret).await });
            }
        }
    }
}

async fn serve_conn(
    incoming: net::Incoming,
    peer: String,
    events: mpsc::UnboundedSender<Event>,
    ids: Arc<AtomicU32>,
    mut stop: watch::Receiver<bool>,
    secret: &Secret,
) {
    // Nothing but the handshake is read before the peer proves it has the
    // cluster's secret.
    let Ok((mut conn, hello)) = incoming.authenticate(secret, &peer).await else {
        return;
    };
    let id = ids.fetch_add(1, Ordering::Relaxed);
    if net::send(&mut conn, &Welcome::Accepted { id })
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut stream) = net::split_batched::<FromScheduler>(conn);
    let is_worker = match hello.role {
        Role::Client => {
            let _ = events.send(Event::ClientJoined(id, tx));
            false
        }
        Role::Worker {
            nthreads,
            data_addr,
            name,
            pid,
            resources,
            lifetime_end_us,
        } => {
            tracing::info!("worker {name} (pid {pid}) joined with {nthreads} threads");
            let _ = events.send(Event::WorkerJoined {
                id,
                pid,
                nthreads,
                data_addr,
                name,
                resources,
                lifetime_end_us,
                tx,
            });
            true
        }
        Role::Data => return,
    };
    let reason = loop {
        tokio::select! {
            _ = stop.changed() => return,
            frame = stream.next() => match frame {
                None => break "connection closed".to_string(),
                Some(frame) => match decode(frame).await {
                    Ok(msgs) => {
                        let ev = if is_worker { Event::FromWorker(id, msgs) } else { Event::FromClient(id, msgs) };
                        if events.send(ev).is_err() { return; }
                    }
                    // TLS peers that exit without close_notify: a plain close.
                    Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => break "connection closed".to_string(),
                    Err(e) => break format!("bad frame: {e}"),
                },
            }
        }
    };
    let _ = events.send(if is_worker {
        Event::WorkerLeft(id, reason)
    } else {
        Event::ClientLeft(id)
    });
}

/// Decodes a peer's frame; a big one on a blocking thread, so that decoding
/// it does not hold the I/O thread (the reader waits: order is kept).
async fn decode(frame: io::Result<bytes::BytesMut>) -> io::Result<Vec<ToScheduler>> {
    match frame {
        Ok(f) if f.len() >= BIG_FRAME => {
            tokio::task::spawn_blocking(move || net::decode_batch::<ToScheduler>(Ok(f)))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        }
        f => net::decode_batch::<ToScheduler>(f),
    }
}

struct WorkerConn {
    tx: Tx,
    /// Its queue was over [`PEER_BACKLOG`] at the last beat.
    behind: bool,
    data_addr: String,
    pid: u32,
    /// When it was last heard from (any message; heartbeats every second).
    last_seen: tokio::time::Instant,
    metrics: WorkerMetrics,
    name: String,
    nthreads: u32,
    resources: Vec<(String, f64)>,
    /// `Finished`/`Failed` reports received on this connection, and how
    /// many of them it was told are recorded (`Ack`, each heartbeat).
    reports: u64,
    acked: u64,
    /// When it retires (Unix microseconds; 0: no limit).
    lifetime_end_us: u64,
}

/// A connected client.
struct ClientConn {
    tx: Tx,
    /// When it was last heard from (it beats every second).
    last_seen: tokio::time::Instant,
    /// Its queue was over [`PEER_BACKLOG`] at the last beat.
    behind: bool,
}

/// Bytes the scheduler may queue for one peer. A peer over it at two
/// beats running reads slower than the cluster talks to it (or not at
/// all): it is let go, so the scheduler's memory stays bounded.
const PEER_BACKLOG: usize = 1 << 30;

/// Whether a peer's queue has been over `limit` for two beats.
fn fell_behind(tx: &Tx, behind: &mut bool, limit: usize) -> bool {
    let over = tx.queued_bytes() > limit;
    let twice = over && *behind;
    *behind = over;
    twice
}

struct State {
    address: String,
    /// Syncs in progress: id -> (client, its query id, workers yet to answer).
    syncs: FxHashMap<u64, (u32, u64, FxHashSet<u32>)>,
    next_sync: u64,
    /// Wall clock when the core's clock (its ticks) started.
    started_us: u64,
    /// The dashboard's URL, empty if none.
    dashboard: String,
    /// Task group names by id.
    group_names: Vec<String>,
    monitor: monitor::Monitor,
    heartbeat_timeout: std::time::Duration,
    /// [`PEER_BACKLOG`] (smaller in tests).
    peer_backlog: usize,
    /// Cluster-wide names (named actors): name -> (owning client, value).
    names: FxHashMap<String, (u32, String)>,
    /// The core, each task's [`Kept`] spec in its record.
    core: Core<Kept>,
    /// Function pickles, each kept once for all its tasks.
    funcs: Funcs,
    errors: FxHashMap<u64, Bytes>,
    groups: FxHashMap<String, u32>,
    /// Resource names as the core's ids.
    resource_ids: FxHashMap<String, u32>,
    clients: FxHashMap<u32, ClientConn>,
    workers: FxHashMap<u32, WorkerConn>,
    actions: Vec<Action>,
    /// Workers were asked to exit; late joiners are sent away.
    closing: bool,
    /// Workers told to stop after retiring (their leaving is no news).
    retired: rustc_hash::FxHashSet<u32>,
    /// Jobs of command tasks (`shoal submit`).
    jobs: jobs::Jobs,
    /// `--journal`: jobs and their tasks' ends are written to it.
    journal: Option<journal::Journal>,
    /// Unfinished job tasks restored from the journal, held out of the core
    /// until `restored_until`, so that workers that rejoin can claim the
    /// ones they still run or finished: task -> (job, spec).
    restored: FxHashMap<u64, (u32, TaskSpec)>,
    restored_until: Option<tokio::time::Instant>,
    /// Restored tasks a rejoined worker runs: task -> (worker, job, spec).
    adopted: FxHashMap<u64, (u32, u32, TaskSpec)>,
    /// Connection ids given out (a resumed client's old one is taken too).
    ids: Arc<AtomicU32>,
    /// Results rejoined workers hold, until a resumed client claims them
    /// or the recovery wait ends: task -> (worker, size).
    orphans: FxHashMap<u64, Orphan>,
    /// Resumed clients' messages, held (in order) until the recovery wait
    /// ends, so that their resubmitted tasks find every rejoined worker's
    /// results.
    held_back: Vec<(u32, Vec<ToScheduler>)>,
}

async fn owner(
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut stop: watch::Receiver<bool>,
    address: String,
    dashboard: String,
    recovery: Option<Recovery>,
    ids: Arc<AtomicU32>,
) {
    let mut st = State {
        ids,
        orphans: FxHashMap::default(),
        held_back: Vec::new(),
        address,
        dashboard,
        group_names: Vec::new(),
        monitor: monitor::Monitor::default(),
        heartbeat_timeout: net::heartbeat_timeout(),
        peer_backlog: PEER_BACKLOG,
        names: FxHashMap::default(),
        core: Core::with_specs(shoal_core::Config {
            log_capacity: STORY_LOG,
            ..Default::default()
        }),
        started_us: crate::worker::now_us(),
        syncs: FxHashMap::default(),
        next_sync: 0,
        funcs: Funcs::default(),
        errors: FxHashMap::default(),
        groups: FxHashMap::default(),
        resource_ids: FxHashMap::default(),
        clients: FxHashMap::default(),
        workers: FxHashMap::default(),
        actions: Vec::new(),
        closing: false,
        retired: Default::default(),
        jobs: Default::default(),
        journal: None,
        restored: FxHashMap::default(),
        restored_until: None,
        adopted: FxHashMap::default(),
    };
    if let Some(r) = recovery {
        st.jobs = r.jobs;
        st.journal = Some(r.journal);
        for (job, specs) in r.pending {
            st.restored
                .extend(specs.into_iter().map(|t| (t.id, (job, t))));
        }
        // Always: workers and clients that come back are waited for.
        st.restored_until = Some(tokio::time::Instant::now() + recovery_wait());
    }
    let mut batch = Vec::with_capacity(64);
    // Messages received and not yet handled, in arrival order: worked
    // through SLICE at a time, so that a million-task submission (or
    // release, or cancel) never holds the I/O thread for more than a few
    // milliseconds at once.
    let mut queue = VecDeque::new();
    // The core has no clock: time reaches it as ticks (stall detection).
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(TICK);
    let mut next_ping = start;
    let beat = net::heartbeat_interval();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            n = rx.recv_many(&mut batch, 1024) => {
                if n == 0 { break; }
                for ev in batch.drain(..) {
                    st.arrived(ev, &mut queue);
                }
                st.work(&mut queue).await;
            }
            _ = std::future::ready(()), if !queue.is_empty() => {
                st.work(&mut queue).await;
            }
            now = tick.tick() => {
                // How late this tick runs: the event loop's lag.
                let lag = tokio::time::Instant::now().saturating_duration_since(now).as_micros() as u64;
                st.monitor.lag_us = lag;
                st.monitor.lag_max_us = st.monitor.lag_max_us.max(lag);
                st.core.handle_tick((now - start).as_micros() as u64);
                if st.restored_until.is_some_and(|t| now >= t) {
                    // What resumed clients sent meanwhile goes first.
                    for item in st.release_restored().into_iter().rev() {
                        queue.push_front(item);
                    }
                }
                st.process();
                st.flush_journal();
                if now >= next_ping {
                    next_ping = now + beat;
                    st.heartbeat(now);
                    if let Some(j) = &mut st.journal {
                        j.sync();
                    }
                }
            }
        }
    }
}

/// What the scheduler keeps of a task's spec, to send it to a worker (and
/// again, to recompute it), and its small result, in the core's record of
/// the task (`Core<Kept>`: one allocation and one table slot per task).
/// Its id, priority and inputs are the core's (see `State::full_spec`),
/// its group name is in the group table, its function's pickle is shared
/// with every task of that function ([`Funcs`]), and what few tasks have
/// is boxed apart ([`Rare`]).
pub(crate) struct Kept {
    /// (A boxed slice, copied into each message: 16 bytes, not a `Bytes`'s
    /// 32 and the shared header its first clone allocates.)
    args: Box<[u8]>,
    /// Its small result, kept here once it finished (empty until then; a
    /// pickle is never empty), in place up to 16 bytes (a number, a short
    /// string: no allocation), copied into each message that carries it.
    value: smallvec::SmallVec<[u8; 16]>,
    key: Option<Box<str>>,
    func: Arc<Bytes>,
    kind: shoal_proto::TaskKind,
    crash_limit: u8,
    recompute: bool,
    rare: Option<Box<Rare>>,
}

/// The parts of a spec most tasks leave at their defaults.
#[derive(Default, PartialEq)]
struct Rare {
    resources: Box<[(String, f64)]>,
    time_limit_ms: u64,
    time_request_ms: u64,
    retries: u32,
}

impl Kept {
    fn rare(&self) -> &Rare {
        static NONE: std::sync::LazyLock<Rare> = std::sync::LazyLock::new(Rare::default);
        self.rare.as_deref().unwrap_or(&NONE)
    }
}

/// Function pickles, each kept once and shared by the specs of its tasks;
/// one no spec uses any more is dropped by the next sweep (the table is
/// swept whenever it has doubled since the last one).
#[derive(Default)]
struct Funcs {
    table: FxHashMap<Bytes, Arc<Bytes>>,
    swept_at: usize,
    /// The last one interned: the tasks of a batch share one buffer (see
    /// `shoal_proto::fill_funcs`), found by address without hashing it.
    last: Option<Arc<Bytes>>,
}

impl Funcs {
    fn intern(&mut self, func: Bytes) -> Arc<Bytes> {
        if let Some(l) = &self.last {
            if l.as_ptr() == func.as_ptr() && l.len() == func.len() {
                return l.clone();
            }
        }
        let f = match self.table.get(&func) {
            Some(f) => f.clone(),
            None => {
                if self.table.len() >= (2 * self.swept_at).max(64) {
                    self.table.retain(|_, f| Arc::strong_count(f) > 1);
                    self.swept_at = self.table.len();
                }
                let f = Arc::new(func.clone());
                self.table.insert(func, f.clone());
                f
            }
        };
        self.last = Some(f.clone());
        f
    }
}

/// A result that came back without its task (the scheduler restarted), kept
/// for a resumed client to claim.
enum Orphan {
    /// A rejoined worker holds it: (worker, size).
    Held(u32, u64),
    /// Its value came inline with a report.
    Value(Bytes),
}

/// One unit of the owner's queue: a peer's message, or any other event.
enum Item {
    Client(u32, ToScheduler),
    Worker(u32, ToScheduler),
    Event(Event),
    /// The end of a recovery wait, after resumed clients' messages.
    DropOrphans,
}

/// Queues a peer's message as `item`s: one carrying many tasks or ids is
/// cut into pieces of [`PIECE`], in order (each element moved once); any
/// other goes as it is (no allocation on the per-message path).
fn queue_pieces(queue: &mut VecDeque<Item>, msg: ToScheduler, item: impl Fn(ToScheduler) -> Item) {
    fn cut<T>(
        queue: &mut VecDeque<Item>,
        mut v: Vec<T>,
        wrap: fn(Vec<T>) -> ToScheduler,
        item: impl Fn(ToScheduler) -> Item,
    ) {
        let mut pieces = Vec::with_capacity(v.len() / PIECE + 1);
        while v.len() > PIECE {
            // From the back: each element moves once.
            pieces.push(v.split_off(v.len() - (v.len() - 1) % PIECE - 1));
        }
        pieces.push(v);
        queue.extend(pieces.into_iter().rev().map(|p| item(wrap(p))));
    }
    match msg {
        ToScheduler::Submit(mut v) => {
            // Before cutting: a piece's first task may share its function.
            shoal_proto::fill_funcs(&mut v);
            if v.len() > PIECE {
                cut(queue, v, ToScheduler::Submit, item)
            } else {
                queue.push_back(item(ToScheduler::Submit(v)))
            }
        }
        ToScheduler::Release(v) if v.len() > PIECE => cut(queue, v, ToScheduler::Release, item),
        ToScheduler::Cancel(v) if v.len() > PIECE => cut(queue, v, ToScheduler::Cancel, item),
        ToScheduler::Detach(v) if v.len() > PIECE => cut(queue, v, ToScheduler::Detach, item),
        ToScheduler::Where(v) if v.len() > PIECE => cut(queue, v, ToScheduler::Where, item),
        ToScheduler::Adopt(v) if v.len() > PIECE => cut(queue, v, ToScheduler::Adopt, item),
        ToScheduler::Resubmit(v) if v.len() > PIECE => cut(queue, v, ToScheduler::Resubmit, item),
        m => queue.push_back(item(m)),
    }
}

impl State {
    /// Queues what arrived. A peer counts as heard from when its message
    /// arrives, not when its turn comes: a client whose own huge submission
    /// is still being worked through is not silent.
    fn arrived(&mut self, ev: Event, queue: &mut VecDeque<Item>) {
        let now = tokio::time::Instant::now();
        match ev {
            Event::FromClient(c, msgs) => {
                // Already given up on (heartbeat timeout): ignored.
                let Some(conn) = self.clients.get_mut(&c) else {
                    return;
                };
                conn.last_seen = now;
                self.monitor.messages_in += msgs.len() as u64;
                for m in msgs {
                    queue_pieces(queue, m, |m| Item::Client(c, m));
                }
            }
            Event::FromWorker(w, msgs) => {
                let Some(conn) = self.workers.get_mut(&w) else {
                    return;
                };
                conn.last_seen = now;
                self.monitor.messages_in += msgs.len() as u64;
                for m in msgs {
                    queue_pieces(queue, m, |m| Item::Worker(w, m));
                }
            }
            // Joins at once: a new peer's first messages may arrive before
            // the queue reaches its join, and would be taken for a stranger's.
            ev @ (Event::ClientJoined(..) | Event::WorkerJoined { .. }) => self.handle(ev),
            // Leaves keep their place among the messages (a peer's last
            // messages come before its leaving).
            ev => queue.push_back(Item::Event(ev)),
        }
    }

    /// Handles queued items for up to [`SLICE`], then yields the I/O thread.
    async fn work(&mut self, queue: &mut VecDeque<Item>) {
        let begun = std::time::Instant::now();
        while let Some(item) = queue.pop_front() {
            match item {
                Item::Event(ev) => self.handle(ev),
                Item::DropOrphans => self.drop_orphans(),
                Item::Client(c, m) => {
                    if let Some((_, held)) = self.held_back.iter_mut().find(|(h, _)| *h == c) {
                        held.push(m);
                    } else if matches!(m, ToScheduler::Resume(_)) && self.restored_until.is_some() {
                        self.held_back.push((c, vec![m]));
                    } else if self.clients.contains_key(&c) {
                        self.client_msg(c, m);
                        self.process();
                    }
                }
                Item::Worker(w, m) => {
                    if self.workers.contains_key(&w) {
                        self.worker_msg(w, m);
                        self.process();
                    }
                }
            }
            if begun.elapsed() >= SLICE {
                break;
            }
        }
        self.flush_journal();
        if !queue.is_empty() {
            tokio::task::yield_now().await;
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::ClientJoined(id, tx) => {
                let last_seen = tokio::time::Instant::now();
                self.clients.insert(
                    id,
                    ClientConn {
                        tx,
                        last_seen,
                        behind: false,
                    },
                );
            }
            Event::WorkerJoined {
                id,
                pid,
                nthreads,
                data_addr,
                name,
                resources,
                lifetime_end_us,
                tx,
            } => {
                if self.closing {
                    // Joined after the shutdown request: send it away too.
                    let _ = tx.send(FromScheduler::Shutdown);
                    return;
                }
                let ids = self.resource_ids(&resources);
                self.monitor.worker_names.insert(id, name.clone());
                self.workers.insert(
                    id,
                    WorkerConn {
                        tx,
                        behind: false,
                        data_addr,
                        pid,
                        last_seen: tokio::time::Instant::now(),
                        metrics: WorkerMetrics::default(),
                        name,
                        nthreads,
                        resources,
                        reports: 0,
                        acked: 0,
                        lifetime_end_us,
                    },
                );
                self.core
                    .handle_worker_added_with(WorkerId(id), nthreads, ids);
                if lifetime_end_us > 0 {
                    // The core's clock started at `started_us`.
                    let at = lifetime_end_us.saturating_sub(self.started_us);
                    self.core.handle_worker_expires(WorkerId(id), at);
                }
                self.process();
            }
            Event::ClientLeft(id) => {
                if let Some(c) = self.clients.remove(&id) {
                    self.monitor.messages_out_gone += c.tx.sent();
                }
                self.client_gone(id);
            }
            Event::WorkerLeft(id, reason) => {
                self.monitor.worker_left(id);
                if let Some(w) = self.workers.remove(&id) {
                    self.monitor.messages_out_gone += w.tx.sent();
                    // Expected when the cluster closes or the worker retired.
                    if self.closing || self.retired.remove(&id) {
                        tracing::info!("worker {} left: {reason}", w.name);
                    } else {
                        tracing::warn!("worker {} left: {reason}", w.name);
                    }
                }
                self.synced_all(id);
                self.adopted_lost(id);
                self.core.handle_worker_lost(WorkerId(id));
                self.process();
            }
            Event::Query(path, reply) => {
                let _ = reply.send((self.query(&path), self.monitor.next_seq()));
            }
            #[cfg(test)]
            Event::Panic => panic!("injected by a test"),
            #[cfg(test)]
            Event::PeerBacklog(bytes) => self.peer_backlog = bytes,
            Event::ShutdownWorkers => {
                self.closing = true;
                for w in self.workers.values() {
                    let _ = w.tx.send(FromScheduler::Shutdown);
                }
            }
            // Split into items by `arrived`.
            Event::FromClient(..) | Event::FromWorker(..) => {}
        }
    }

    fn client_msg(&mut self, client: u32, msg: ToScheduler) {
        let cid = ClientId(client);
        match msg {
            ToScheduler::Submit(specs) => self.submit(cid, specs),
            ToScheduler::Resume(old) => {
                // Its task ids go on in `old`'s range: no connection may be
                // given that id now, nor later.
                let taken = old != client
                    && (self.clients.contains_key(&old) || self.workers.contains_key(&old));
                if taken || old == 0 {
                    tracing::warn!("client {client} asked to resume as {old}, which is taken");
                    if let Some(c) = self.clients.remove(&client) {
                        self.monitor.messages_out_gone += c.tx.sent();
                        c.tx.close();
                    }
                    self.client_gone(client);
                    return;
                }
                self.ids.fetch_max(old + 1, Ordering::Relaxed);
                tracing::info!("client {client} resumed the session of client {old}");
            }
            ToScheduler::Resubmit(tasks) => self.resubmit_held(cid, tasks),
            ToScheduler::SubmitJob {
                query,
                name,
                max_fails,
                tasks,
            } => {
                let json = match self.submit_job(name, max_fails, tasks) {
                    Ok(job) => serde_json::json!({ "job": job }),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                self.reply(client, query, json);
            }
            ToScheduler::CancelJob { query, job } => {
                let json = match self.jobs.pending(job) {
                    Some(ids) => {
                        self.core.handle_cancel(jobs::job_client(job), &ids);
                        serde_json::json!({ "cancelled": ids.len() })
                    }
                    None => serde_json::json!({ "error": format!("no job {job}") }),
                };
                self.reply(client, query, json);
            }
            ToScheduler::Release(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_release(cid, &ids);
            }
            ToScheduler::Cancel(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_cancel(cid, &ids);
            }
            ToScheduler::CancelQueued(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_cancel_queued(cid, &ids);
            }
            ToScheduler::Detach(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_detach(cid, &ids);
            }
            ToScheduler::Withdraw(name) => {
                let r = self.resource_ids(&[(name, 0.0)])[0].0;
                self.core.handle_resource_withdrawn(r);
            }
            ToScheduler::Expect(name) => {
                let r = self.resource_ids(&[(name, 0.0)])[0].0;
                self.core.handle_resource_expected(r);
            }
            ToScheduler::Retire(names) => {
                let ids: Vec<u32> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| {
                        names
                            .iter()
                            .any(|n| *n == w.data_addr || *n == w.name || *n == w.pid.to_string())
                    })
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    tracing::info!("retiring worker {}", self.workers[&id].name);
                    self.core.handle_retire(WorkerId(id));
                }
            }
            ToScheduler::Where(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_where(cid, &ids);
            }
            ToScheduler::Hold { by, tasks } => {
                let tasks: Vec<TaskId> = tasks.into_iter().map(TaskId).collect();
                self.core.handle_hold(TaskId(by), &tasks);
            }
            ToScheduler::Adopt(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                let unknown = self.core.handle_adopt(cid, &ids);
                if let Some(tx) = self.client_tx(client) {
                    for TaskId(id) in unknown {
                        let error = TaskError::MissingDependency { dep: id };
                        let _ = tx.send(FromScheduler::Erred { id, error });
                    }
                }
            }
            ToScheduler::Restart => {
                tracing::warn!("client {client} restarts every worker");
                for w in self.workers.values() {
                    let _ = w.tx.send(FromScheduler::Restart);
                }
            }
            ToScheduler::Info => {
                let info = self.info();
                if let Some(tx) = self.client_tx(client) {
                    let _ = tx.send(FromScheduler::Info(info));
                }
            }
            ToScheduler::Alive => {}
            ToScheduler::Name { id, name, value } => {
                let json = match value {
                    None => serde_json::json!({ "value": self.names.get(&name).map(|n| &n.1) }),
                    Some(_) if self.names.contains_key(&name) => {
                        serde_json::json!({ "error": format!("the name {name:?} is taken") })
                    }
                    Some(v) => {
                        self.names.insert(name, (client, v));
                        serde_json::json!({ "ok": true })
                    }
                };
                if let Some(tx) = self.client_tx(client) {
                    let json = json.to_string();
                    let _ = tx.send(FromScheduler::QueryReply { id, json });
                }
            }
            ToScheduler::Unname(name) => {
                if self.names.get(&name).is_some_and(|n| n.0 == client) {
                    self.names.remove(&name);
                }
            }
            ToScheduler::Query { id, path } if path == SYNC_PATH => self.start_sync(client, id),
            ToScheduler::Query { id, path } => {
                let json = match self.query(&path) {
                    Ok(("application/json", body)) => body,
                    Ok((_, body)) => serde_json::Value::from(body).to_string(),
                    Err((_, msg)) => serde_json::json!({ "error": msg }).to_string(),
                };
                if let Some(tx) = self.client_tx(client) {
                    let _ = tx.send(FromScheduler::QueryReply { id, json });
                }
            }
            other => tracing::warn!("client {client} sent a worker message: {other:?}"),
        }
    }

    /// Tasks a client submitted, into the core under interest `cid`.
    fn submit(&mut self, cid: ClientId, specs: Vec<TaskSpec>) {
        self.resubmit(cid, specs, &FxHashMap::default());
    }

    /// A resumed client's tasks: those whose value it sends, or whose
    /// result a rejoined worker holds, start finished.
    fn resubmit_held(&mut self, cid: ClientId, tasks: Vec<(TaskSpec, Option<Bytes>)>) {
        let mut held = FxHashMap::default();
        let mut values = Vec::new();
        let mut specs = Vec::with_capacity(tasks.len());
        for (spec, value) in tasks {
            let id = spec.id;
            let value = value.or_else(|| match self.orphans.remove(&id) {
                Some(Orphan::Value(v)) => Some(v),
                Some(Orphan::Held(w, size)) => {
                    held.insert(TaskId(id), (Location::Worker(WorkerId(w)), size));
                    None
                }
                None => None,
            });
            if let Some(v) = value {
                held.insert(TaskId(id), (Location::Inline, v.len() as u64));
                values.push((id, v));
            }
            specs.push(spec);
        }
        let kept = held.len();
        let n = specs.len();
        self.resubmit(cid, specs, &held);
        for (id, v) in values {
            self.set_value(id, &v);
        }
        tracing::info!(
            "client {} resumed: {kept} of its {n} tasks kept their results",
            cid.0
        );
    }

    fn resubmit(
        &mut self,
        cid: ClientId,
        specs: Vec<TaskSpec>,
        held: &FxHashMap<TaskId, (Location, u64)>,
    ) {
        let mut tasks = Vec::with_capacity(specs.len());
        for spec in specs {
            let next = self.groups.len() as u32;
            let group = *self.groups.entry_ref_or_insert(&spec.group, next);
            if group == next {
                self.group_names.push(spec.group.clone());
            }
            let mut deps: Vec<TaskId> = spec.deps.iter().map(|&d| TaskId(d)).collect();
            deps.sort_unstable();
            deps.dedup();

            // "CPU" is not a resource workers offer: it is threads.
            let mut threads = 1;
            let named: Vec<(String, f64)> = spec
                .resources
                .iter()
                .filter(|(r, amount)| {
                    let cpu = r == "CPU";
                    if cpu {
                        threads = amount.ceil().max(1.0) as u32;
                    }
                    !cpu
                })
                .cloned()
                .collect();
            let resources = self.resource_ids(&named);
            let nt = NewTask {
                id: TaskId(spec.id),
                deps,
                priority: spec.priority,
                retries: spec.retries,
                group,
                resources,
                threads,
                recompute: spec.recompute,
                max_kills: spec.crash_limit,
                time_request_us: spec.time_request_ms.saturating_mul(1000),
            };
            // (Dropped by the core if it knows the task already.)
            let rare = Rare {
                resources: spec.resources.into_boxed_slice(),
                time_limit_ms: spec.time_limit_ms,
                time_request_ms: spec.time_request_ms,
                retries: spec.retries,
            };
            let kept = Kept {
                // (No copy when the decoded buffer is its own.)
                args: Vec::from(spec.args).into_boxed_slice(),
                value: smallvec::SmallVec::new(),
                key: spec.key.map(String::into_boxed_str),
                func: self.funcs.intern(spec.func),
                kind: spec.kind,
                crash_limit: spec.crash_limit,
                recompute: spec.recompute,
                rare: (rare != Rare::default()).then(|| Box::new(rare)),
            };
            tasks.push((nt, kept));
        }
        self.core.handle_resubmit(cid, tasks, held);
    }

    /// A job of command tasks: checked whole (nothing is submitted if one
    /// task is wrong), then owned by the job's own interest. Its tasks form
    /// one task group, "job N: name".
    fn submit_job(
        &mut self,
        name: String,
        max_fails: u32,
        mut tasks: Vec<TaskSpec>,
    ) -> Result<u32, String> {
        if tasks.is_empty() {
            return Err("a job needs at least one task".into());
        }
        let mut ids = Vec::with_capacity(tasks.len());
        let mut seen = FxHashSet::default();
        for t in &tasks {
            if t.kind != shoal_proto::TaskKind::Command {
                return Err(format!("task {:x} of the job is not a command task", t.id));
            }
            let cmd: shoal_proto::CommandSpec = shoal_proto::decode(&t.args)
                .map_err(|e| format!("task {:x} of the job: {e}", t.id))?;
            if cmd.argv.is_empty() {
                return Err(format!("task {} of the job has no program", cmd.task));
            }
            if !seen.insert(cmd.task) {
                return Err(format!("task id {} appears twice in the job", cmd.task));
            }
            if self.core.state(TaskId(t.id)).is_some() {
                return Err(format!("task {:x} is already known", t.id));
            }
            ids.push((cmd.task, t.id));
        }
        let group = format!("job {}: {name}", self.jobs.next_id());
        for t in &mut tasks {
            t.group.clone_from(&group);
        }
        let now = crate::worker::now_us();
        if let Some(j) = &mut self.journal {
            j.append(&journal::Record::Job {
                id: self.jobs.next_id(),
                name: name.clone(),
                max_fails,
                submitted_us: now,
                ids: ids.clone(),
                tasks: tasks.clone(),
            });
        }
        let job = self.jobs.add(name, max_fails, &ids, now);
        tracing::info!("job {job}: {} tasks submitted", ids.len());
        self.submit(jobs::job_client(job), tasks);
        Ok(job)
    }

    /// Answers a client's request (a query, a job submission) with JSON.
    fn reply(&self, client: u32, id: u64, json: serde_json::Value) {
        if let Some(tx) = self.client_tx(client) {
            let json = json.to_string();
            let _ = tx.send(FromScheduler::QueryReply { id, json });
        }
    }

    /// A client left: what it wanted is released, its names go.
    fn client_gone(&mut self, id: u32) {
        self.names.retain(|_, n| n.0 != id);
        self.core.handle_client_gone(ClientId(id));
        self.process();
    }

    /// Messages sent to peers so far (queued: counted as they are sent).
    fn messages_out(&self) -> u64 {
        let live: u64 = self.clients.values().map(|c| c.tx.sent()).sum::<u64>()
            + self.workers.values().map(|w| w.tx.sent()).sum::<u64>();
        self.monitor.messages_out_gone + live
    }

    fn client_tx(&self, client: u32) -> Option<&Tx> {
        self.clients.get(&client).map(|c| &c.tx)
    }

    /// A client's `/api/sync` query: every worker sends what it has to
    /// report (profile samples, transfers) before the answer, so that what
    /// the client reads next is complete up to now.
    fn start_sync(&mut self, client: u32, query: u64) {
        self.next_sync += 1;
        let sid = self.next_sync;
        let waiting: FxHashSet<u32> = self.workers.keys().copied().collect();
        for w in self.workers.values() {
            let _ = w.tx.send(FromScheduler::Sync(sid));
        }
        self.syncs.insert(sid, (client, query, waiting));
        self.answer_sync(sid);
    }

    /// Worker `worker` answered sync `sid`.
    fn synced(&mut self, sid: u64, worker: u32) {
        if let Some((_, _, waiting)) = self.syncs.get_mut(&sid) {
            waiting.remove(&worker);
            self.answer_sync(sid);
        }
    }

    /// Answers sync `sid` once no worker is left to answer it.
    fn answer_sync(&mut self, sid: u64) {
        let Some((client, query, waiting)) = self.syncs.get(&sid) else {
            return;
        };
        if waiting.is_empty() {
            let (client, id) = (*client, *query);
            self.syncs.remove(&sid);
            if let Some(tx) = self.client_tx(client) {
                let json = serde_json::json!({ "synced": true }).to_string();
                let _ = tx.send(FromScheduler::QueryReply { id, json });
            }
        }
    }

    /// A worker left: no sync waits for it.
    fn synced_all(&mut self, worker: u32) {
        let sids: Vec<u64> = self.syncs.keys().copied().collect();
        for sid in sids {
            self.synced(sid, worker);
        }
    }

    fn worker_msg(&mut self, worker: u32, msg: ToScheduler) {
        let wid = WorkerId(worker);
        if matches!(
            msg,
            ToScheduler::Finished { .. } | ToScheduler::Failed { .. }
        ) {
            if let Some(w) = self.workers.get_mut(&worker) {
                w.reports += 1; // acknowledged at the next heartbeat
            }
        }
        match msg {
            ToScheduler::Finished { id, .. } | ToScheduler::Failed { id, .. }
                if self.restored.contains_key(&id) || self.adopted.contains_key(&id) =>
            {
                let (outcome, text) = match msg {
                    ToScheduler::Failed { text, .. } => (jobs::Outcome::Failed, Some(text)),
                    _ => (jobs::Outcome::Finished, None),
                };
                self.restored_ended(id, outcome, text);
            }
            ToScheduler::Rejoin {
                running,
                reports,
                held,
            } => {
                tracing::info!(
                    "worker {worker} rejoined: {} tasks running, {} reports sent again, {} \
                     results held",
                    running.len(),
                    reports.len(),
                    held.len()
                );
                // Its results (and what it finishes meanwhile) are kept for
                // clients that come back (see `held_back`).
                self.restored_until
                    .get_or_insert_with(|| tokio::time::Instant::now() + recovery_wait());
                self.orphans.extend(
                    held.into_iter()
                        .map(|(id, size)| (id, Orphan::Held(worker, size))),
                );
                for r in reports {
                    if matches!(r, ToScheduler::Finished { .. } | ToScheduler::Failed { .. }) {
                        self.worker_msg(worker, r);
                    }
                }
                for id in running {
                    if let Some((job, spec)) = self.restored.remove(&id) {
                        self.adopted.insert(id, (worker, job, spec));
                    }
                }
            }
            ToScheduler::Finished {
                id,
                size,
                value,
                timing,
            } => {
                let inline = value.is_some();
                if let Some(group) = self.core.handle_task_finished(
                    wid,
                    TaskId(id),
                    size,
                    inline,
                    timing.duration_us,
                ) {
                    self.monitor.task(id, group, worker, timing, true, size);
                    if let Some(v) = value {
                        self.set_value(id, &v);
                    }
                    // Scattered data never runs again: drop its bytes here.
                    if let Some(spec) = self.core.spec_mut(TaskId(id)).filter(|s| !s.recompute) {
                        spec.args = Box::default();
                    }
                } else if self.restored_until.is_some() && self.core.state(TaskId(id)).is_none() {
                    // A task of the lost scheduler's time, finished since:
                    // its client may come back for it.
                    let orphan = match value {
                        Some(v) => Orphan::Value(v),
                        None => Orphan::Held(worker, size),
                    };
                    self.orphans.insert(id, orphan);
                }
            }
            ToScheduler::Failed {
                id,
                error,
                text,
                timing,
            } => {
                let group = self.core.task_group(TaskId(id)).unwrap_or(u32::MAX);
                if let Some(erred) = self.core.handle_task_failed(wid, TaskId(id)) {
                    self.monitor.task(id, group, worker, timing, false, 0);
                    if erred {
                        self.errors.insert(id, error);
                        self.monitor.error_text.insert(id, text);
                    }
                }
            }
            ToScheduler::Telemetry(t) => {
                for a in &t.activity {
                    let group = self.core.task_group(TaskId(a.task)).unwrap_or(u32::MAX);
                    self.monitor.activity(worker, a, group);
                }
                self.monitor.profile(t.profile);
                if !t.logs.is_empty() {
                    self.monitor.logs(worker, t.logs);
                }
            }
            ToScheduler::Threads(n) => self.core.handle_worker_threads(wid, n),
            ToScheduler::RestartMe => {
                if let Some(w) = self.workers.get(&worker) {
                    tracing::warn!(
                        "worker {} restarts: a task it was told to stop does not stop",
                        w.name
                    );
                    let _ = w.tx.send(FromScheduler::Restart);
                }
                self.core.handle_worker_restarting(wid);
            }
            ToScheduler::RetireMe => {
                if let Some(w) = self.workers.get(&worker) {
                    tracing::info!("worker {} retires (SIGTERM)", w.name);
                }
                self.core.handle_retire(wid);
            }
            ToScheduler::Replicated { id, ok } => {
                self.core.handle_replicated(wid, TaskId(id), ok);
            }
            ToScheduler::Heartbeat(m) => {
                self.monitor.heartbeat(worker, crate::worker::now_us(), &m);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.metrics = m;
                }
            }
            ToScheduler::Missing { task, deps } => {
                let deps: Vec<TaskId> = deps.into_iter().map(TaskId).collect();
                tracing::warn!("worker {worker} could not fetch {deps:?}: recomputing them");
                self.core.handle_missing_data(wid, TaskId(task), &deps);
            }
            ToScheduler::Pinned(id) => self.core.handle_pinned(wid, TaskId(id)),
            ToScheduler::Paused(p) => {
                tracing::info!(
                    "worker {worker} {}",
                    if p { "paused (memory high)" } else { "resumed" }
                );
                self.core.handle_worker_paused(wid, p)
            }
            ToScheduler::Stolen(ids) => {
                for id in ids {
                    self.core.handle_steal_reply(wid, TaskId(id), true);
                }
            }
            ToScheduler::Synced(sid) => self.synced(sid, worker),
            ToScheduler::Started(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_tasks_started(wid, &ids);
            }
            ToScheduler::FetchFailed { task, deps } => {
                let deps: Vec<TaskId> = deps.into_iter().map(TaskId).collect();
                tracing::warn!("worker {worker} could not reach the holder of {deps:?}");
                self.core.handle_fetch_failed(wid, TaskId(task), &deps);
            }
            other => tracing::warn!("worker {worker} sent a client message: {other:?}"),
        }
    }

    /// Every second: pings clients and workers, and lets go of those not
    /// heard from for the heartbeat timeout (dead, hung or cut off) or with
    /// over [`PEER_BACKLOG`] queued for them two beats running. A lost
    /// worker's tasks run elsewhere, its results are recomputed.
    fn heartbeat(&mut self, now: tokio::time::Instant) {
        for c in self.clients.values() {
            let _ = c.tx.send(FromScheduler::Ping);
        }
        let (timeout, limit) = (self.heartbeat_timeout, self.peer_backlog);
        // Why a peer is let go: silent (frozen, dead, cut off), or reading
        // slower than the cluster talks to it, so that what is queued for
        // it would grow without bound.
        let why = |last_seen: tokio::time::Instant, tx: &Tx, behind: &mut bool| {
            if now.saturating_duration_since(last_seen) > timeout {
                Some(format!("sent nothing for {timeout:?}"))
            } else if fell_behind(tx, behind, limit) {
                Some(format!(
                    "reads too slowly (over {limit} bytes queued for it for a second)"
                ))
            } else {
                None
            }
        };
        // A client let go: its connection closes at once (what was queued
        // for it is dropped), and what it wanted is released (detached work
        // runs on).
        let gone: Vec<(u32, String)> = self
            .clients
            .iter_mut()
            .filter_map(|(&id, c)| Some((id, why(c.last_seen, &c.tx, &mut c.behind)?)))
            .collect();
        for (id, reason) in gone {
            tracing::warn!("client {id} {reason}: letting it go");
            if let Some(c) = self.clients.remove(&id) {
                self.monitor.messages_out_gone += c.tx.sent();
                c.tx.close();
            }
            self.client_gone(id);
        }
        let gone: Vec<(u32, String)> = self
            .workers
            .iter_mut()
            .filter_map(|(&id, w)| Some((id, why(w.last_seen, &w.tx, &mut w.behind)?)))
            .collect();
        for (id, reason) in gone {
            if let Some(w) = self.workers.remove(&id) {
                self.monitor.messages_out_gone += w.tx.sent();
                // Its connection closes: if it is alive after all, it sees
                // that and exits.
                tracing::warn!(
                    "worker {} (pid {}) {reason}: taking it as lost",
                    w.name,
                    w.pid
                );
                w.tx.close();
            }
            self.synced_all(id);
            self.adopted_lost(id);
            self.core.handle_worker_lost(WorkerId(id));
            self.process();
        }
        for w in self.workers.values_mut() {
            let _ = w.tx.send(FromScheduler::Ping);
            // What they reported is recorded (the journal was written
            // before this beat): they need not keep it for a rejoin.
            if w.reports > w.acked {
                w.acked = w.reports;
                let _ = w.tx.send(FromScheduler::Ack(w.reports));
            }
        }
    }

    /// The recovery wait is over: restored tasks no rejoined worker claimed
    /// go to the core to be placed.
    fn release_restored(&mut self) -> Vec<Item> {
        self.restored_until = None;
        let mut by_job: std::collections::BTreeMap<u32, Vec<TaskSpec>> = Default::default();
        for (_, (job, spec)) in self.restored.drain() {
            by_job.entry(job).or_default().push(spec);
        }
        let mut n = 0;
        for (job, mut specs) in by_job {
            specs.sort_by_key(|t| t.id);
            n += specs.len();
            self.submit(jobs::job_client(job), specs);
        }
        tracing::info!(
            "recovery: {n} restored tasks to run again, {} adopted from rejoined workers",
            self.adopted.len()
        );
        // Resumed clients claim what rejoined workers hold first; what is
        // left is dropped after.
        std::mem::take(&mut self.held_back)
            .into_iter()
            .flat_map(|(c, msgs)| msgs.into_iter().map(move |m| Item::Client(c, m)))
            .chain([Item::DropOrphans])
            .collect()
    }

    /// Results no resumed client claimed: their holders drop them.
    fn drop_orphans(&mut self) {
        let mut unclaimed: FxHashMap<u32, Vec<u64>> = FxHashMap::default();
        for (id, orphan) in self.orphans.drain() {
            if let Orphan::Held(w, _) = orphan {
                unclaimed.entry(w).or_default().push(id);
            }
        }
        for (w, ids) in unclaimed {
            if let Some(conn) = self.workers.get(&w) {
                tracing::info!(
                    "recovery: worker {} drops {} results no client claimed",
                    conn.name,
                    ids.len()
                );
                let _ = conn.tx.send(FromScheduler::Release(ids));
            }
        }
    }

    /// A restored job task's outcome arrived (a rejoined worker ran it):
    /// recorded without the core, which never had it. False if `id` is not
    /// such a task.
    fn restored_ended(&mut self, id: u64, outcome: jobs::Outcome, error: Option<String>) -> bool {
        let known = self.restored.remove(&id).is_some() || self.adopted.remove(&id).is_some();
        if known {
            self.job_task_ended(TaskId(id), outcome, error);
        }
        known
    }

    /// A worker left: restored tasks it ran are to run again.
    fn adopted_lost(&mut self, worker: u32) {
        let lost: Vec<u64> = self
            .adopted
            .iter()
            .filter(|(_, a)| a.0 == worker)
            .map(|(&t, _)| t)
            .collect();
        let mut by_job: std::collections::BTreeMap<u32, Vec<TaskSpec>> = Default::default();
        for t in lost {
            if let Some((_, job, spec)) = self.adopted.remove(&t) {
                if self.restored_until.is_some() {
                    self.restored.insert(t, (job, spec));
                } else {
                    by_job.entry(job).or_default().push(spec);
                }
            }
        }
        for (job, specs) in by_job {
            self.submit(jobs::job_client(job), specs);
        }
    }

    fn info(&self) -> ClusterInfo {
        let now = tokio::time::Instant::now();
        let mut workers: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(&id, w)| {
                let (processing, held) = self.core.worker_load(WorkerId(id)).unwrap_or((0, 0));
                WorkerInfo {
                    id,
                    name: w.name.clone(),
                    address: w.data_addr.clone(),
                    pid: w.pid,
                    nthreads: w.nthreads,
                    resources: w.resources.clone(),
                    processing: processing as u64,
                    held: held as u64,
                    metrics: w.metrics.clone(),
                    last_seen_ms: now.saturating_duration_since(w.last_seen).as_millis() as u64,
                    lifetime_end_us: w.lifetime_end_us,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let groups = self
            .core
            .group_counts()
            .filter(|(_, c)| c.submitted > 0)
            .map(|(g, c)| shoal_proto::GroupInfo {
                name: self
                    .group_names
                    .get(g as usize)
                    .cloned()
                    .unwrap_or_default(),
                waiting: c.waiting + c.ready,
                processing: c.processing,
                memory: c.memory,
                erred: c.erred,
                released: c.released,
                submitted: c.submitted,
                finished: c.finished,
                total_us: c.total_us,
            })
            .collect();
        ClusterInfo {
            address: self.address.clone(),
            clients: self.clients.len() as u32,
            tasks: self.core.n_tasks() as u64,
            workers,
            dashboard: self.dashboard.clone(),
            groups,
        }
    }

    fn resource_ids(&mut self, named: &[(String, f64)]) -> Vec<(u32, f64)> {
        named
            .iter()
            .map(|(r, amount)| {
                let next = self.resource_ids.len() as u32;
                (*self.resource_ids.entry_ref_or_insert(r, next), *amount)
            })
            .collect()
    }

    /// Why a task's resources cannot be had, in words.
    fn unsatisfiable(&self, id: u64) -> String {
        let need = self
            .core
            .spec(TaskId(id))
            .map(|s| s.rare().resources.to_vec())
            .unwrap_or_default();
        let fmt = |r: &[(String, f64)]| {
            if r.is_empty() {
                return "nothing".to_string();
            }
            r.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut offers: Vec<String> = self
            .workers
            .values()
            .map(|w| {
                let mut has = vec![("CPU".to_string(), w.nthreads as f64)];
                has.extend(w.resources.iter().cloned());
                format!("{}: {}", w.name, fmt(&has))
            })
            .collect();
        offers.sort();
        // CPU is threads of one worker (a task that runs parallel code of
        // its own): say how to get such a worker.
        let hint = if need.iter().any(|(k, _)| k == "CPU") {
            " (CPU counts threads of one worker process: start workers with that many, \
             Client(threads_per_worker=N) or `shoal worker --nthreads N`)"
        } else {
            ""
        };
        format!(
            "it needs {}; the workers have {}{hint}",
            fmt(&need),
            offers.join("; ")
        )
    }

    fn name(&self, id: u64) -> String {
        match self.core.spec(TaskId(id)) {
            Some(s) => task_name(s.key.as_deref(), self.group_of(id), id),
            None => task_name(None, "task", id),
        }
    }

    /// Turns the core's actions into messages. Payload maps are updated in
    /// action order, so a Forget never overtakes the Compute before it.
    fn process(&mut self) {
        // Debug builds check the whole state after every event (the tests
        // of the services run them); release builds trust the core's tests.
        #[cfg(debug_assertions)]
        self.core.check_invariants();
        self.core.drain_actions_into(&mut self.actions);
        let mut actions = std::mem::take(&mut self.actions);
        // Ended tasks of jobs: their outcome is recorded, the job's interest
        // in them dropped (and the rest cancelled past `max_fails`).
        let mut job_done: Vec<(ClientId, TaskId, Vec<TaskId>)> = Vec::new();
        for a in actions.drain(..) {
            match a {
                Action::Compute { worker, task } => self.send_compute(worker, task),
                Action::CancelCompute { worker, task, stop } => {
                    if let Some(w) = self.workers.get(&worker.0) {
                        let _ = w.tx.send(if stop {
                            FromScheduler::Stop(task.0)
                        } else {
                            FromScheduler::Cancel(task.0)
                        });
                    }
                }
                Action::Steal { worker, tasks } => {
                    if let Some(w) = self.workers.get(&worker.0) {
                        let _ = w.tx.send(FromScheduler::Steal(
                            tasks.into_iter().map(|t| t.0).collect(),
                        ));
                    }
                }
                Action::Replicate { task, from, to } => {
                    let from = self.workers.get(&from.0).map(|w| w.data_addr.clone());
                    match (from, self.workers.get(&to.0)) {
                        (Some(from), Some(w)) => {
                            let _ = w.tx.send(FromScheduler::Replicate { id: task.0, from });
                        }
                        _ => self.core.handle_replicated(to, task, false),
                    }
                }
                Action::Retired { worker } => {
                    self.retired.insert(worker.0);
                    if let Some(w) = self.workers.get(&worker.0) {
                        tracing::info!("worker {} handed its data over; stopping it", w.name);
                        let _ = w.tx.send(FromScheduler::Shutdown);
                    }
                }
                Action::ReleaseData { worker, task } => {
                    if let Some(k) = self.core.spec_mut(task) {
                        k.value = smallvec::SmallVec::new();
                    }
                    // Sent in order with Computes (a recomputed task may go to
                    // the same worker); the writer batches them anyway.
                    if let Some(w) = worker.and_then(|w| self.workers.get(&w.0)) {
                        let _ = w.tx.send(FromScheduler::Release(vec![task.0]));
                    }
                }
                Action::Forget { task } => {
                    self.monitor.error_text.remove(&task.0);
                    self.errors.remove(&task.0);
                }
                Action::TaskMemory { client, task } if jobs::job_of(client).is_some() => {
                    let cancel = self.job_task_ended(task, jobs::Outcome::Finished, None);
                    job_done.push((client, task, cancel));
                }
                Action::TaskErred {
                    client,
                    task,
                    cause,
                    kind,
                } if jobs::job_of(client).is_some() => {
                    let (outcome, text) = match kind {
                        ErrorKind::Cancelled => (jobs::Outcome::Cancelled, None),
                        _ => (jobs::Outcome::Failed, Some(self.error_words(cause, kind))),
                    };
                    let cancel = self.job_task_ended(task, outcome, text);
                    job_done.push((client, task, cancel));
                }
                Action::TaskMemory { client, task } => {
                    let Some(tx) = self.client_tx(client.0) else {
                        continue;
                    };
                    let (value, location) = match self.core.location(task) {
                        Some(Location::Inline) => {
                            (self.value(task.0).map(Bytes::copy_from_slice), None)
                        }
                        Some(Location::Worker(w)) => {
                            (None, self.workers.get(&w.0).map(|w| w.data_addr.clone()))
                        }
                        None => continue,
                    };
                    let _ = tx.send(FromScheduler::Memory {
                        id: task.0,
                        value,
                        location,
                    });
                }
                Action::TaskErred {
                    client,
                    task,
                    cause,
                    kind,
                } => {
                    let Some(tx) = self.client_tx(client.0) else {
                        continue;
                    };
                    let cause_name = self.name(cause.0);
                    let error = match kind {
                        ErrorKind::Exception => TaskError::Exception {
                            cause: cause_name,
                            error: self.errors.get(&cause.0).cloned().unwrap_or_default(),
                        },
                        ErrorKind::KilledWorker(kills) => TaskError::KilledWorker {
                            cause: cause_name,
                            kills,
                        },
                        ErrorKind::Cancelled => TaskError::Cancelled { cause: cause_name },
                        ErrorKind::MissingDependency(d) => {
                            TaskError::MissingDependency { dep: d.0 }
                        }
                        ErrorKind::Unsatisfiable => TaskError::Unsatisfiable {
                            cause: cause_name,
                            detail: self.unsatisfiable(cause.0),
                        },
                        ErrorKind::DataLost => TaskError::DataLost { cause: cause_name },
                        ErrorKind::Cycle => TaskError::Cycle { cause: cause_name },
                    };
                    let _ = tx.send(FromScheduler::Erred { id: task.0, error });
                }
            }
        }
        self.actions = actions;
        if !job_done.is_empty() {
            for (client, task, cancel) in job_done {
                if !cancel.is_empty() {
                    self.core.handle_cancel(client, &cancel);
                }
                self.core.handle_release(client, &[task]);
            }
            self.process();
        }
    }

    /// A job's task ended: recorded in the job (and the journal).
    fn job_task_ended(
        &mut self,
        task: TaskId,
        outcome: jobs::Outcome,
        error: Option<String>,
    ) -> Vec<TaskId> {
        let now = crate::worker::now_us();
        if let Some(j) = &mut self.journal {
            if self.jobs.job_of_task(task.0).is_some() {
                j.append(&journal::Record::Ended {
                    task: task.0,
                    outcome: jobs::outcome_code(outcome),
                    error: error.clone(),
                    at_us: now,
                });
            }
        }
        self.jobs.ended(task.0, outcome, error, now)
    }

    /// Writes what the journal queued; compacts it when it has grown.
    fn flush_journal(&mut self) {
        let Some(j) = &mut self.journal else {
            return;
        };
        j.flush();
        if j.wants_compaction() {
            let records: Vec<journal::Record> = self
                .jobs
                .snapshots(|t| self.full_spec(t))
                .into_iter()
                .map(journal::Record::Snapshot)
                .collect();
            if let Some(j) = &mut self.journal {
                if let Err(e) = j.rewrite(&records) {
                    tracing::error!("cannot compact the journal: {e}");
                }
            }
        }
    }

    /// Why a task failed, in words (a job keeps it after the task is gone).
    fn error_words(&self, cause: TaskId, kind: ErrorKind) -> String {
        let name = self.name(cause.0);
        match kind {
            ErrorKind::Exception => self
                .monitor
                .error_text
                .get(&cause.0)
                .cloned()
                .unwrap_or_else(|| format!("task {name} raised")),
            ErrorKind::KilledWorker(k) => {
                format!("task {name} was running on {k} workers that died (KilledWorker)")
            }
            ErrorKind::Cancelled => format!("task {name} was cancelled"),
            ErrorKind::MissingDependency(d) => format!("input {:x} is unknown", d.0),
            ErrorKind::Unsatisfiable => {
                format!("no worker can run {name}: {}", self.unsatisfiable(cause.0))
            }
            ErrorKind::DataLost => format!("the data of {name} was lost"),
            ErrorKind::Cycle => format!("{name} is part of a cycle"),
        }
    }

    /// One copy of each distinct function pickle among recent submissions.
    /// Keeps a task's small result (with its spec: one record per task).
    fn set_value(&mut self, id: u64, v: &[u8]) {
        if let Some(k) = self.core.spec_mut(TaskId(id)) {
            k.value = smallvec::SmallVec::from_slice(v);
        }
    }

    /// A task's small result, if the scheduler keeps it.
    fn value(&self, id: u64) -> Option<&[u8]> {
        Some(&self.core.spec(TaskId(id))?.value[..]).filter(|v| !v.is_empty())
    }

    /// The name of a task's group.
    fn group_of(&self, task: u64) -> &str {
        self.core
            .task_group(TaskId(task))
            .and_then(|g| self.group_names.get(g as usize))
            .map_or("", String::as_str)
    }

    /// A task's spec as submitted (group and inputs put back).
    fn full_spec(&self, task: u64) -> Option<TaskSpec> {
        let k = self.core.spec(TaskId(task))?;
        Some(TaskSpec {
            id: task,
            group: self.group_of(task).to_string(),
            key: k.key.as_deref().map(str::to_string),
            kind: k.kind,
            func: (*k.func).clone(),
            args: Bytes::copy_from_slice(&k.args),
            deps: self.core.deps(TaskId(task)).iter().map(|d| d.0).collect(),
            priority: self.core.priority(TaskId(task)).unwrap_or(0),
            retries: k.rare().retries,
            resources: k.rare().resources.to_vec(),
            recompute: k.recompute,
            time_limit_ms: k.rare().time_limit_ms,
            crash_limit: k.crash_limit,
            time_request_ms: k.rare().time_request_ms,
        })
    }

    fn send_compute(&mut self, worker: WorkerId, task: TaskId) {
        let (Some(w), Some(spec)) = (self.workers.get(&worker.0), self.core.spec(task)) else {
            return;
        };
        let deps = self
            .core
            .deps(task)
            .iter()
            .filter_map(|d| {
                let source = match self.core.location(*d)? {
                    Location::Inline => DepSource::Inline(Bytes::copy_from_slice(self.value(d.0)?)),
                    Location::Worker(h) => DepSource::Worker {
                        id: h.0,
                        addr: self.workers.get(&h.0)?.data_addr.clone(),
                    },
                };
                Some(Dep { id: d.0, source })
            })
            .collect();
        let group = self.group_of(task.0);
        let _ = w.tx.send(FromScheduler::Compute {
            id: task.0,
            name: shoal_proto::task_name(spec.key.as_deref(), group, task.0),
            group: group.to_string(),
            kind: spec.kind,
            func: (*spec.func).clone(),
            args: Bytes::copy_from_slice(&spec.args),
            deps,
            resources: spec.rare().resources.to_vec(),
            time_limit_ms: spec.rare().time_limit_ms,
            job: self.jobs.job_of_task(task.0).unwrap_or(0),
        });
    }
}

/// `HashMap::entry` without allocating a `String` when the key exists.
trait EntryRef {
    fn entry_ref_or_insert(&mut self, k: &str, v: u32) -> &mut u32;
}

impl EntryRef for FxHashMap<String, u32> {
    fn entry_ref_or_insert(&mut self, k: &str, v: u32) -> &mut u32 {
        if !self.contains_key(k) {
            self.insert(k.to_string(), v);
        }
        self.get_mut(k).expect("just ensured")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What a million-task graph costs the scheduler besides the core.
    #[test]
    fn a_task_record_with_its_spec_fits_in_216_bytes() {
        // A 224-byte allocation with the allocator's header.
        let n = Core::<Kept>::record_size();
        assert!(n <= 216, "{n}");
        assert!(size_of::<Rare>() <= 48, "{}", size_of::<Rare>());
    }

    #[test]
    fn a_function_pickle_is_kept_once_while_a_spec_uses_it() {
        let mut f = Funcs::default();
        let a = f.intern(Bytes::from_static(b"inc"));
        let again = f.intern(Bytes::copy_from_slice(b"inc"));
        assert!(Arc::ptr_eq(&a, &again), "one copy per pickle");
        drop(again);
        // Many distinct functions, each let go at once: swept as the table
        // grows, while one still used stays.
        for i in 0..1000u32 {
            drop(f.intern(Bytes::from(i.to_le_bytes().to_vec())));
        }
        assert!(f.table.len() < 200, "{} kept", f.table.len());
        assert!(Arc::ptr_eq(&f.intern(Bytes::from_static(b"inc")), &a));
    }

    /// A scheduler on a Unix socket in a fresh directory, and a client
    /// connected to it.
    async fn serving(name: &str) -> (std::path::PathBuf, SchedulerHandle, Secret, net::Conn) {
        let dir = std::env::temp_dir().join(format!("shoal-{name}-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = Secret::random();
        let h = start(&Address::Unix(dir.join("s.sock")), secret.clone(), None)
            .await
            .unwrap();
        let (conn, _) = net::handshake(&h.address, Role::Client, &secret)
            .await
            .unwrap();
        (dir, h, secret, conn)
    }

    /// A client that stops reading (but still beats) is let go once more
    /// than the backlog limit waits for it: its connection closes, what was
    /// queued is freed, and the scheduler serves others.
    #[tokio::test]
    async fn a_client_that_does_not_read_is_let_go_when_its_backlog_is_over_the_limit() {
        let (dir, h, secret, conn) = serving("backlog").await;
        h.events.send(Event::PeerBacklog(256 << 10)).unwrap();
        let (tx, mut rx) = net::split_batched::<ToScheduler>(conn);
        for i in 0..20_000 {
            let path = "/api/status".to_string();
            tx.send(ToScheduler::Query { id: i, path }).unwrap();
        }
        // Alive all along: only the backlog can get it dropped.
        let beating = tx.clone();
        let beat = tokio::spawn(async move {
            while beating.send(ToScheduler::Alive).is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let mut answers = 0;
            loop {
                match rx.next().await {
                    None | Some(Err(_)) => break answers,
                    Some(Ok(frame)) => {
                        answers += net::decode_batch::<FromScheduler>(Ok(frame)).unwrap().len()
                    }
                }
            }
        })
        .await
        .expect("the scheduler closed the connection");
        assert!(
            ended < 20_000,
            "all {ended} answers came: it was never behind"
        );
        beat.abort();
        // Others are served.
        let (conn, _) = net::handshake(&h.address, Role::Client, &secret)
            .await
            .unwrap();
        let (tx, mut rx) = net::split_batched::<ToScheduler>(conn);
        let path = "/api/status".to_string();
        tx.send(ToScheduler::Query { id: 1, path }).unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(frame) = rx.next().await {
                let msgs = net::decode_batch::<FromScheduler>(frame).unwrap();
                if msgs
                    .iter()
                    .any(|m| matches!(m, FromScheduler::QueryReply { .. }))
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(answered, Ok(true));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn big_messages_are_cut_into_pieces_in_order() {
        let mut queue = VecDeque::new();
        let ids: Vec<u64> = (0..10_000).collect();
        queue_pieces(&mut queue, ToScheduler::Release(ids), |m| {
            Item::Client(1, m)
        });
        queue_pieces(&mut queue, ToScheduler::Cancel(vec![7]), |m| {
            Item::Client(1, m)
        });
        let got: Vec<(usize, u64)> = queue
            .iter()
            .map(|i| match i {
                Item::Client(_, ToScheduler::Release(v) | ToScheduler::Cancel(v)) => {
                    (v.len(), v[0])
                }
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(got, vec![(4096, 0), (4096, 4096), (1808, 8192), (1, 7)]);
    }

    /// A client joining while the owner works through another's huge
    /// submission is served: its first messages are not taken for a
    /// stranger's because its join waits in the queue behind that work.
    #[tokio::test]
    async fn a_client_joining_behind_a_huge_submission_is_served() {
        let (dir, h, secret, conn) = serving("joinbehind").await;
        let (tx, _rx) = net::split_batched::<ToScheduler>(conn);
        let specs: Vec<TaskSpec> = (1..=2_000_000u64)
            .map(|i| TaskSpec {
                id: (1 << 40) + i,
                group: "g".into(),
                key: None,
                kind: shoal_proto::TaskKind::Call,
                func: Bytes::from_static(b"f"),
                args: Bytes::from_static(b"a"),
                deps: Vec::new(),
                priority: 0,
                retries: 0,
                resources: Vec::new(),
                recompute: true,
                time_limit_ms: 0,
                crash_limit: 0,
                time_request_ms: 0,
            })
            .collect();
        // One message: cut into pieces on arrival, they fill the owner's
        // queue at once; the second client joins while it works.
        // Small messages, decoded at once, fill the owner's queue faster
        // than it works through it; the second client joins meanwhile.
        for chunk in specs.chunks(PIECE) {
            tx.send(ToScheduler::Submit(chunk.to_vec())).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (conn, _) = net::handshake(&h.address, Role::Client, &secret)
            .await
            .unwrap();
        let (tx2, mut rx2) = net::split_batched::<ToScheduler>(conn);
        tx2.send(ToScheduler::Query {
            id: 7,
            path: "/api/status".into(),
        })
        .unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(frame) = rx2.next().await {
                let msgs = net::decode_batch::<FromScheduler>(frame).unwrap();
                if msgs
                    .iter()
                    .any(|m| matches!(m, FromScheduler::QueryReply { id: 7, .. }))
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(answered, Ok(true), "the second client got its answer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_panic_in_the_owner_stops_the_whole_scheduler_loudly() {
        let (dir, h, secret, conn) = serving("crash").await;
        let (_tx, mut from_scheduler) = net::split_batched::<ToScheduler>(conn);
        h.events.send(Event::Panic).unwrap();
        let why = tokio::time::timeout(Duration::from_secs(5), h.crashed())
            .await
            .expect("the crash is reported");
        assert!(why.contains("injected by a test"), "{why}");
        // Connected peers see their connection close (no silent zombie) ...
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match from_scheduler.next().await {
                    None | Some(Err(_)) => break,
                    Some(Ok(_)) => {} // a ping sent before the crash
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a client connection outlived the crash");
        // ... and nobody can connect to a scheduler that serves nothing.
        assert!(net::handshake(&h.address, Role::Client, &secret)
            .await
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A random dashboard query path: a real route, or not, with parameter
    /// strings made of escapes, multi-byte characters, huge numbers.
    fn random_path(rng: &mut fastrand::Rng) -> String {
        const ROUTES: [&str; 8] = [
            "/api/status",
            "/api/graph",
            "/api/profile",
            "/api/logs",
            "/api/report",
            "/metrics",
            "/api/task/",
            "/api/nope",
        ];
        const PIECES: [&str; 16] = [
            "since=",
            "merge=",
            "group=",
            "since_us=",
            "%",
            "%a",
            "%ff",
            "\u{e9}",
            "\u{1f41f}",
            "&",
            "=",
            "+",
            "18446744073709551616",
            "-1",
            "0x10",
            "\0",
        ];
        let mut p = ROUTES[rng.usize(..ROUTES.len())].to_string();
        if p.ends_with('/') && rng.bool() {
            p.push_str(&rng.u64(..).to_string());
        }
        if rng.bool() {
            p.push('?');
        }
        for _ in 0..rng.usize(0..8) {
            if rng.u8(0..4) == 0 {
                p.push(rng.char(..));
            } else {
                p.push_str(PIECES[rng.usize(..PIECES.len())]);
            }
        }
        p
    }

    /// Hostile input from authenticated peers: random dashboard queries
    /// (each answered, maybe with an error), then malformed, truncated and
    /// oversized frames on other connections (each closes only its own
    /// connection). The scheduler keeps serving the first client all along.
    /// `SHOAL_FUZZ_SECS` bounds the query part (default 2 s).
    #[tokio::test]
    async fn hostile_queries_and_frames_after_the_handshake_leave_the_scheduler_serving() {
        use futures::SinkExt;
        let secs: f64 = std::env::var("SHOAL_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0);
        let (dir, h, secret, conn) = serving("hostile").await;
        let (tx, mut rx) = net::split_batched::<ToScheduler>(conn);
        let mut rng = fastrand::Rng::with_seed(7);
        // The next `n` query answers, skipping pings.
        async fn answers(
            rx: &mut (impl futures::Stream<Item = io::Result<bytes::BytesMut>> + Unpin),
            n: usize,
        ) -> Vec<String> {
            let mut got = Vec::new();
            while got.len() < n {
                let frame = tokio::time::timeout(Duration::from_secs(10), rx.next())
                    .await
                    .expect("the scheduler answers")
                    .expect("the connection stays open");
                for m in net::decode_batch::<FromScheduler>(frame).unwrap() {
                    if let FromScheduler::QueryReply { json, .. } = m {
                        got.push(json);
                    }
                }
            }
            got
        }
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
        let (mut tried, mut errors) = (0usize, 0usize);
        while std::time::Instant::now() < deadline {
            for i in 0..64 {
                let path = random_path(&mut rng);
                tx.send(ToScheduler::Query { id: i, path }).unwrap();
            }
            for json in answers(&mut rx, 64).await {
                let v: serde_json::Value = serde_json::from_str(&json).expect("JSON answers");
                errors += v.get("error").is_some() as usize;
            }
            tried += 64;
        }
        assert!(errors > 0 && errors < tried, "{errors} of {tried}");
        // Frames no decoder accepts, each on its own authenticated connection.
        let mut bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff; 16],
            vec![
                0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            shoal_proto::encode(&vec![ToScheduler::Release(vec![1, 2, 3])])[..3].to_vec(),
        ];
        bad.extend((0..12).map(|_| (0..rng.usize(1..200)).map(|_| rng.u8(..)).collect()));
        for (i, body) in bad.into_iter().enumerate() {
            let (mut conn, _) = net::handshake(&h.address, Role::Client, &secret)
                .await
                .unwrap();
            let _ = conn.send(bytes::Bytes::from(body)).await;
            if i % 2 == 0 {
                // Truncated: a length prefix promising more than comes.
                let raw = conn.get_mut();
                let _ = tokio::io::AsyncWriteExt::write_all(raw, &[0, 0, 1, 0, 1, 2]).await;
            }
            drop(conn);
        }
        // Still serving: the first client's queries are answered.
        tx.send(ToScheduler::Query {
            id: 1,
            path: "/api/status".into(),
        })
        .unwrap();
        let json = answers(&mut rx, 1).await.pop().unwrap();
        assert!(json.contains("\"workers\""), "{json}");
        println!("hostile: {tried} random queries ({errors} refused), 16 bad frames");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
