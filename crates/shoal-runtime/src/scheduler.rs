//! The scheduler service: one task owns the [`Core`] and all payloads; each
//! connection has a reader task that forwards decoded batches to it and a
//! writer task that batches what it sends back. The owner drains every event
//! available before writing, so bursts become a few large frames.

mod api;
mod clients;
mod conn;
mod dispatch;
mod http;
mod info;
mod intake;
mod jobs;
mod journal;
mod monitor;
mod recovery;
mod stories;
mod workers;

use conn::{accept_loop, fell_behind, PEER_BACKLOG};
use recovery::{recover, recovery_wait};

pub use http::{APP_CSS, APP_JS, INDEX_HTML};

use crate::net::{self, Address, Listener, Secret};
use bytes::Bytes;
use futures::StreamExt;
use rustc_hash::{FxHashMap, FxHashSet};
use shoal_core::{
    Action, ClientId, Core, ErrorKind, Location, NewTask, TaskId, TaskState, WorkerId,
};
use shoal_proto::{
    task_name, ClusterInfo, Dep, DepSource, FromClient, FromWorker, Role, TaskError, TaskSpec,
    ToClient, ToWorker, Welcome, WorkerInfo, WorkerMetrics,
};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// What the scheduler sends a client, and a worker, through.
type ClientTx = net::Outbox<ToClient>;
type WorkerTx = net::Outbox<ToWorker>;

/// A client query that makes every worker send its telemetry first.
pub const SYNC_PATH: &str = "/api/sync";

/// Transitions the core keeps for task stories (about 80 bytes each).
const STORY_LOG: usize = 100_000;

/// The least time between two ticks: a deadline that a tick failed to
/// clear (a bug) costs a wake-up a millisecond, not a spinning thread.
const MIN_TICK_GAP: std::time::Duration = std::time::Duration::from_millis(1);

/// How long the owner works through queued messages before it lets the
/// rest of the I/O thread run (readers, writers, heartbeats, the dashboard).
const SLICE: std::time::Duration = std::time::Duration::from_millis(2);

/// Tasks (or ids) per piece a big `Submit` (`Release`, `Cancel`, ...) is
/// cut into, so that no one message holds the owner for long.
const PIECE: usize = 4096;

/// Frames at least this big are decoded off the I/O thread.
const BIG_FRAME: usize = 4 << 20;

enum Event {
    ClientJoined(u32, ClientTx),
    WorkerJoined {
        id: u32,
        pid: u32,
        nthreads: u32,
        data_addr: String,
        name: String,
        resources: Vec<(String, f64)>,
        lifetime_end_us: u64,
        supervisor: u64,
        tx: WorkerTx,
    },
    /// A supervisor says its worker process `pid` died running `running`.
    Obituary {
        supervisor: u64,
        pid: u32,
        running: Vec<(u64, Option<u32>)>,
    },
    FromClient(u32, Vec<FromClient>),
    FromWorker(u32, Vec<FromWorker>),
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

/// What a journal gave back at start.
struct Recovery {
    journal: journal::Journal,
    jobs: jobs::Jobs,
    /// Pending tasks of each job, to submit again.
    pending: Vec<(u32, Vec<TaskSpec>)>,
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

struct WorkerConn {
    tx: WorkerTx,
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
    /// The supervisor that reports its death (0: none).
    supervisor: u64,
}

/// A worker whose connection closed, whose supervisor's word on what it
/// was running is awaited (until `until`; then it is judged without).
struct Dying {
    supervisor: u64,
    pid: u32,
    until: tokio::time::Instant,
}

/// A careful batch's progress: its elements `..next` are done, pickled in
/// `parts` (`bytes` in all).
#[derive(Default)]
struct Partial {
    next: u32,
    bytes: usize,
    parts: Vec<Bytes>,
}

/// The most progress kept for one batch: it travels with each of the
/// batch's later runs, through the scheduler (small outcomes only).
const PARTIAL_LIMIT: usize = 1 << 20;

/// How long the scheduler waits for a supervisor's [`Event::Obituary`]
/// after a worker's connection closed. The supervisor sees the death within
/// tens of milliseconds; this only bounds the wait when it is gone too.
const OBITUARY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A connected client.
struct ClientConn {
    tx: ClientTx,
    /// When it was last heard from (it beats every second).
    last_seen: tokio::time::Instant,
    /// Its queue was over [`PEER_BACKLOG`] at the last beat.
    behind: bool,
}

struct State {
    address: String,
    /// Syncs in progress: id -> (client, its query id, workers yet to answer).
    syncs: FxHashMap<u64, (u32, u64, FxHashSet<u32>)>,
    /// Task details waiting for their workers' steps, by question id
    /// (numbered with the syncs).
    stories: FxHashMap<u64, stories::StoryWait>,
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
    /// Workers whose connection closed, waiting for their supervisor's word.
    dying: FxHashMap<u32, Dying>,
    /// Batches that were running on a worker that died: run again saying
    /// which element runs. Dropped when the task ends or is forgotten.
    careful: FxHashSet<u64>,
    /// What careful batches reported done (`Progress`), for their next run.
    partials: FxHashMap<u64, Partial>,
    /// Jobs being taken in a slice at a time (see `intake.rs`).
    intake: VecDeque<intake::Intake>,
    /// Cancels of big jobs, a step at a time (see `intake.rs`).
    cancels: VecDeque<(ClientId, Vec<TaskId>)>,
    /// Jobs whose pieces are arriving, by (client, query).
    job_pieces: FxHashMap<(u32, u64), Vec<Vec<TaskSpec>>>,
    /// Jobs of command tasks (`shoal submit`).
    jobs: jobs::Jobs,
    /// `--journal`: jobs and their tasks' ends are written to it.
    journal: Option<journal::Journal>,
    /// After a restart: restored tasks, rejoined workers' results and
    /// resumed clients' messages, held for the recovery wait
    /// ([`shoal_core::recovery`]; its clock is [`State::clock_us`]).
    recovery: shoal_core::recovery::Recovery<TaskSpec, Bytes, FromClient>,
    /// Where the recovery's clock starts.
    epoch: tokio::time::Instant,
    /// Connection ids given out (a resumed client's old one is taken too).
    ids: Arc<AtomicU32>,
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
        recovery: shoal_core::recovery::Recovery::new(recovery_wait().as_micros() as u64),
        epoch: tokio::time::Instant::now(),
        address,
        dashboard,
        group_names: Vec::new(),
        monitor: monitor::Monitor::default(),
        heartbeat_timeout: net::heartbeat_timeout(),
        peer_backlog: PEER_BACKLOG,
        names: FxHashMap::default(),
        core: Core::with_specs(shoal_core::Config {
            log_capacity: STORY_LOG,
            place_partners: !crate::settings::is_off("SHOAL_PLACE_PARTNERS"),
            ..Default::default()
        }),
        started_us: crate::clock::now_us(),
        syncs: FxHashMap::default(),
        stories: FxHashMap::default(),
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
        dying: Default::default(),
        careful: Default::default(),
        partials: Default::default(),
        intake: VecDeque::new(),
        job_pieces: Default::default(),
        cancels: VecDeque::new(),
        jobs: Default::default(),
        journal: None,
    };
    if let Some(r) = recovery {
        st.jobs = r.jobs;
        st.journal = Some(r.journal);
        for (job, specs) in r.pending {
            st.recovery
                .restore(job, specs.into_iter().map(|t| (t.id, t)));
        }
        // Always: workers and clients that come back are waited for.
        st.recovery.begin_wait(st.clock_us());
    }
    let mut batch = Vec::with_capacity(64);
    // Messages received and not yet handled, in arrival order: worked
    // through SLICE at a time, so that a million-task submission (or
    // release, or cancel) never holds the I/O thread for more than a few
    // milliseconds at once.
    let mut queue = VecDeque::new();
    // Time reaches the core as ticks, when it asks for one (its
    // `poll_timeout`: a worker that would stall, a steal to retry) or when
    // a deadline of the service's own is due (obituaries, stories, the
    // recovery wait), and once a heartbeat for the pings and the
    // journal's fsync. An idle scheduler, or one whose workers are busy
    // with long tasks, sleeps between events.
    let start = st.epoch;
    let mut next_ping = start;
    let mut wake = start;
    let beat = net::heartbeat_interval();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            n = rx.recv_many(&mut batch, 1024) => {
                if n == 0 { break; }
                for ev in batch.drain(..) {
                    st.arrived(ev, &mut queue);
                }
                st.work(&mut queue).await;
                wake = st.next_wake(next_ping);
            }
            _ = std::future::ready(()), if !queue.is_empty() || st.busy() => {
                st.work(&mut queue).await;
                wake = st.next_wake(next_ping);
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = wake;
                // How late this tick runs: the event loop's lag.
                let lag = tokio::time::Instant::now().saturating_duration_since(now).as_micros() as u64;
                st.monitor.lag_us = lag;
                st.monitor.lag_max_us = st.monitor.lag_max_us.max(lag);
                st.core.handle_tick(st.clock_us());
                st.obituaries_overdue(now);
                st.stories_overdue(now);
                if st.recovery.due(st.clock_us()) {
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
                wake = st.next_wake(next_ping).max(tokio::time::Instant::now() + MIN_TICK_GAP);
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

/// One unit of the owner's queue: a peer's message, or any other event.
enum Item {
    Client(u32, FromClient),
    Worker(u32, FromWorker),
    Event(Event),
    /// The end of a recovery wait, after resumed clients' messages.
    DropOrphans,
}

/// Queues a peer's message as `item`s: one carrying many tasks or ids is
/// cut into pieces of [`PIECE`], in order (each element moved once); any
/// other goes as it is (no allocation on the per-message path).
fn queue_pieces(queue: &mut VecDeque<Item>, msg: FromClient, item: impl Fn(FromClient) -> Item) {
    fn cut<T>(
        queue: &mut VecDeque<Item>,
        mut v: Vec<T>,
        wrap: fn(Vec<T>) -> FromClient,
        item: impl Fn(FromClient) -> Item,
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
        FromClient::Submit(mut v) => {
            // Before cutting: a piece's first task may share its function.
            shoal_proto::fill_funcs(&mut v);
            if v.len() > PIECE {
                cut(queue, v, FromClient::Submit, item)
            } else {
                queue.push_back(item(FromClient::Submit(v)))
            }
        }
        FromClient::Release(v) if v.len() > PIECE => cut(queue, v, FromClient::Release, item),
        FromClient::Cancel(v) if v.len() > PIECE => cut(queue, v, FromClient::Cancel, item),
        FromClient::Detach(v) if v.len() > PIECE => cut(queue, v, FromClient::Detach, item),
        FromClient::Where(v) if v.len() > PIECE => cut(queue, v, FromClient::Where, item),
        FromClient::Adopt(v) if v.len() > PIECE => cut(queue, v, FromClient::Adopt, item),
        FromClient::Resubmit(v) if v.len() > PIECE => cut(queue, v, FromClient::Resubmit, item),
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
                queue.extend(msgs.into_iter().map(|m| Item::Worker(w, m)));
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
        // What the core stamps in this batch (a worker's progress) is exact
        // however long ago it last ticked.
        self.core.set_clock(self.clock_us());
        // A job being taken in moves on each turn, however busy the queue;
        // when nothing else waits, it takes the rest of the slice.
        self.intake_step();
        loop {
            let Some(item) = queue.pop_front() else {
                if begun.elapsed() < SLICE && self.intake_step() {
                    continue;
                }
                break;
            };
            match item {
                Item::Event(ev) => self.handle(ev),
                Item::DropOrphans => self.drop_orphans(),
                Item::Client(c, m) => {
                    let resumes = matches!(m, FromClient::Resume(_));
                    // None: held back until the recovery wait ends.
                    let m = self.recovery.from_client(c, m, resumes);
                    if let Some(m) = m.filter(|_| self.clients.contains_key(&c)) {
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
        if !queue.is_empty() || self.busy() {
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
                supervisor,
                tx,
            } => {
                if self.closing {
                    // Joined after the shutdown request: send it away too.
                    let _ = tx.send(ToWorker::Shutdown);
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
                        supervisor,
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
                    } else if w.supervisor != 0 {
                        // Its supervisor will say what it was running.
                        tracing::info!("worker {} left: {reason}", w.name);
                        self.dying.insert(
                            id,
                            Dying {
                                supervisor: w.supervisor,
                                pid: w.pid,
                                until: tokio::time::Instant::now() + OBITUARY_WAIT,
                            },
                        );
                        self.core.handle_worker_dying(WorkerId(id));
                        self.process();
                        return;
                    } else {
                        tracing::warn!("worker {} left: {reason}", w.name);
                    }
                }
                self.worker_gone(id, None);
            }
            Event::Obituary {
                supervisor,
                pid,
                running,
            } => self.obituary(supervisor, pid, running),
            Event::Query(path, reply) => self.ask(&path, stories::Asker::Http(reply)),
            #[cfg(test)]
            Event::Panic => panic!("injected by a test"),
            #[cfg(test)]
            Event::PeerBacklog(bytes) => self.peer_backlog = bytes,
            Event::ShutdownWorkers => {
                self.closing = true;
                for w in self.workers.values() {
                    let _ = w.tx.send(ToWorker::Shutdown);
                }
            }
            // Split into items by `arrived`.
            Event::FromClient(..) | Event::FromWorker(..) => {}
        }
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
mod tests;
