//! A client's connection to a scheduler.
//!
//! Submissions go out through the batching writer (a burst of `submit` calls
//! becomes one frame). Task states come back on the I/O thread and land in a
//! table guarded by a mutex; Python threads block on its condition variable
//! with the GIL released. [`Watcher`]s collect completions for `as_completed`,
//! `wait` and done callbacks without scanning every future.

use crate::net::{self, Address};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Condvar, Mutex, RwLock};
use rustc_hash::{FxHashMap, FxHashSet};
use shoal_proto::{ClusterInfo, FromClient, Role, TaskError, TaskSpec, ToClient};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// What the client knows of a task: 24 bytes (an error boxed), one per
/// live future, so a million held futures stay small.
#[derive(Clone, Debug)]
pub enum Status {
    /// Not finished.
    Pending,
    /// Finished; its pickled value came inline: up to 22 bytes in place (a
    /// number, a short string: no allocation)...
    Small {
        /// Bytes used.
        len: u8,
        /// The value, then zeros.
        bytes: [u8; 22],
    },
    /// ... longer ones boxed.
    Value(Box<[u8]>),
    /// Finished; held by the worker at this data address (one string per
    /// worker, shared by all its results).
    At(Arc<str>),
    /// Failed.
    Erred(Box<TaskError>),
}

impl Status {
    /// Finished with a value that came inline.
    pub fn finished_with(v: &[u8]) -> Status {
        match u8::try_from(v.len()) {
            Ok(len) if v.len() <= 22 => {
                let mut bytes = [0; 22];
                bytes[..v.len()].copy_from_slice(v);
                Status::Small { len, bytes }
            }
            _ => Status::Value(Box::from(v)),
        }
    }

    /// The inline value, if it finished with one.
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            Status::Small { len, bytes } => Some(&bytes[..*len as usize]),
            Status::Value(v) => Some(v),
            _ => None,
        }
    }

    /// Finished, successfully or not.
    pub fn is_done(&self) -> bool {
        !matches!(self, Status::Pending)
    }
}

/// Collects ids as they complete.
#[derive(Default)]
pub struct Watcher {
    inner: Mutex<WatchInner>,
    cv: Condvar,
}

#[derive(Default)]
struct WatchInner {
    pending: FxHashSet<u64>,
    done: Vec<u64>,
    /// Ids completed since watching started (taken by `next` or not).
    finished: usize,
}

/// Ids looked up per hold of the client's table (the I/O thread waits for
/// it to record results).
const WATCH_SLICE: usize = 4096;

impl Watcher {
    /// Completed ids since the last call, waiting until at least one is there
    /// or `deadline` passes. Empty when nothing is pending any more.
    pub fn next(&self, deadline: Option<Instant>) -> Vec<u64> {
        let mut w = self.inner.lock();
        loop {
            if !w.done.is_empty() {
                return std::mem::take(&mut w.done);
            }
            if w.pending.is_empty() {
                return Vec::new();
            }
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut w, d).timed_out() {
                        return std::mem::take(&mut w.done);
                    }
                }
                None => self.cv.wait(&mut w),
            }
        }
    }

    /// Waits until `need` watched ids have completed (or none is pending)
    /// or `deadline` passes; returns how many have.
    pub fn wait_finished(&self, need: usize, deadline: Instant) -> usize {
        let mut w = self.inner.lock();
        while w.finished < need && !w.pending.is_empty() {
            if self.cv.wait_until(&mut w, deadline).timed_out() {
                break;
            }
        }
        w.finished
    }

    /// Ids added and not completed yet.
    pub fn pending(&self) -> usize {
        self.inner.lock().pending.len()
    }

    fn complete(&self, id: u64) -> bool {
        let mut w = self.inner.lock();
        if w.pending.remove(&id) {
            w.done.push(id);
            w.finished += 1;
            true
        } else {
            false
        }
    }
}

struct State {
    status: FxHashMap<u64, Status>,
    /// With [`Reconnect`]: the specs of tasks not released, to resubmit.
    kept: Option<FxHashMap<u64, TaskSpec>>,
    watchers: Vec<Weak<Watcher>>,
    closed: Option<String>,
    /// The latest answer to an `Info` request.
    info: Option<ClusterInfo>,
    /// Answers to `Query` requests, by id, until taken.
    replies: FxHashMap<u64, String>,
    /// Failed fetches in a row, by task (reset by a success).
    fetch_failures: FxHashMap<u64, u32>,
    /// Workers' data addresses, each kept once (see [`Status::At`]).
    addresses: rustc_hash::FxHashSet<Arc<str>>,
}

impl State {
    fn address(&mut self, addr: String) -> Arc<str> {
        if let Some(a) = self.addresses.get(addr.as_str()) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(addr);
        self.addresses.insert(a.clone());
        a
    }
}

/// Fetches of one result that may fail in a row before the client gives
/// up: a live holder the client cannot reach (a firewall between the client
/// and the workers' data ports) would otherwise be asked forever.
pub const FETCH_ATTEMPTS: u32 = 10;

/// Bytes of task definitions per `Submit` message: big submissions go as
/// several messages, each well under the frame limit.
pub const SUBMIT_CHUNK: usize = 1 << 20;

/// Bytes of submissions that may wait to be written to the scheduler
/// before `submit` waits for it to read.
pub const SUBMIT_BACKLOG: usize = 256 << 20;

/// Why tasks could not be submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The connection to the scheduler is gone (the reason).
    #[error("{0}")]
    Lost(String),
    /// A task is too large to send (what to do instead).
    #[error("{0}")]
    TooLarge(String),
}

/// Why a message or a question to the scheduler got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// The connection to the scheduler is gone (the reason).
    #[error("{0}")]
    Lost(String),
    /// The connection is open, but no answer came in time.
    #[error("the scheduler did not answer within {0:?}")]
    NoAnswer(std::time::Duration),
}

impl From<AskError> for String {
    fn from(e: AskError) -> String {
        e.to_string()
    }
}

type Stream = futures::stream::SplitStream<net::Conn>;

/// A connected client.
pub struct ClientShared {
    /// Id assigned by the scheduler (top bits of every task id).
    pub id: u32,
    next: AtomicU64,
    /// Replaced when the client connects again (see [`Reconnect`]); sends
    /// happen under the read lock, so none is lost in the swap.
    out: RwLock<net::Outbox<FromClient>>,
    state: Mutex<State>,
    reconnect: Option<Reconnect>,
    /// Closed by its owner: a lost connection is not made again.
    closing: std::sync::atomic::AtomicBool,
    cv: Condvar,
    /// The cluster's secret (fetching results from workers proves it too).
    pub secret: net::Secret,
}

/// How a client reaches its scheduler again after losing it
/// (`SHOAL_RECONNECT` seconds): its futures wait meanwhile, what it sends
/// is queued, and on the new connection it resumes its id and resubmits
/// the tasks it holds (a journaled scheduler and rejoined workers keep
/// the results they still have).
struct Reconnect {
    addr: Address,
    give_up: std::time::Duration,
}

/// Connects to the scheduler (connecting again when it is lost for
/// `SHOAL_RECONNECT` seconds). Call from outside the runtime.
pub fn connect(
    rt: &tokio::runtime::Runtime,
    addr: &Address,
    secret: &net::Secret,
) -> io::Result<Arc<ClientShared>> {
    connect_with(rt, addr, secret, reconnect_from_env())
}

/// `SHOAL_RECONNECT` seconds, if set.
pub fn reconnect_from_env() -> Option<std::time::Duration> {
    crate::worker::reconnect_for()
}

/// Connects to the scheduler; with `reconnect`, connects again for up to
/// that long when it is lost (see [`ClientShared::connect_again`]).
pub fn connect_with(
    rt: &tokio::runtime::Runtime,
    addr: &Address,
    secret: &net::Secret,
    reconnect: Option<std::time::Duration>,
) -> io::Result<Arc<ClientShared>> {
    rt.block_on(async {
        let (conn, id) = net::handshake(addr, Role::Client, secret).await?;
        let (out, mut stream) = net::split_batched::<FromClient>(conn);
        let reconnect = reconnect.map(|give_up| Reconnect {
            addr: addr.clone(),
            give_up,
        });
        let shared = Arc::new(ClientShared {
            id,
            next: AtomicU64::new(((id as u64) << 40) + 1),
            out: RwLock::new(out),
            state: Mutex::new(State {
                kept: reconnect.as_ref().map(|_| FxHashMap::default()),
                status: FxHashMap::default(),
                watchers: Vec::new(),
                closed: None,
                info: None,
                replies: FxHashMap::default(),
                fetch_failures: FxHashMap::default(),
                addresses: Default::default(),
            }),
            cv: Condvar::new(),
            secret: secret.clone(),
            reconnect,
            closing: Default::default(),
        });
        let weak = Arc::downgrade(&shared);
        let beat = Arc::downgrade(&shared);
        tokio::spawn(async move {
            // Heartbeats from the I/O thread: a client busy in Python (GIL
            // held) still beats; a frozen process does not, and the
            // scheduler lets go of it and of what it queued for it.
            let mut tick = tokio::time::interval(net::heartbeat_interval());
            loop {
                tick.tick().await;
                let Some(sh) = beat.upgrade() else { return };
                if sh.out.read().send(FromClient::Alive).is_err() {
                    return;
                }
            }
        });
        let timeout = net::heartbeat_timeout();
        let secret = secret.clone();
        tokio::spawn(async move {
            let reason = loop {
                // The scheduler pings every second: silence means it hung,
                // died without closing, or the network is cut.
                let lost = match tokio::time::timeout(timeout, stream.next()).await {
                    Err(_) => format!("the scheduler sent nothing for {timeout:?}"),
                    Ok(None) => "the scheduler closed the connection".to_string(),
                    Ok(Some(frame)) => match net::decode_batch::<ToClient>(frame) {
                        Ok(msgs) => match weak.upgrade() {
                            Some(sh) => {
                                sh.apply(msgs);
                                continue;
                            }
                            None => return,
                        },
                        Err(e) => format!("bad frame from the scheduler: {e}"),
                    },
                };
                let Some(sh) = weak.upgrade() else { return };
                match sh.connect_again(&lost, &secret).await {
                    Ok(s) => stream = s,
                    Err(why) => break why,
                }
            };
            if let Some(sh) = weak.upgrade() {
                sh.state.lock().closed = Some(reason);
                sh.cv.notify_all();
                for w in sh.state.lock().watchers.iter().filter_map(Weak::upgrade) {
                    w.cv.notify_all();
                }
            }
        });
        Ok(shared)
    })
}

impl ClientShared {
    /// After losing the scheduler (`lost` says how): without [`Reconnect`],
    /// `Err(lost)`; with it, connects again (every second, for up to its
    /// give-up time) and returns the new connection's read half. Meanwhile
    /// what is sent waits; on the new connection `Resume`, then `Resubmit`
    /// (every task not released, inputs first), then what waited.
    async fn connect_again(&self, lost: &str, secret: &net::Secret) -> Result<Stream, String> {
        let Some(rc) = self.reconnect.as_ref().filter(|_| !self.is_closing()) else {
            return Err(lost.to_string());
        };
        tracing::warn!(
            "lost the scheduler ({lost}); connecting again for up to {:?}",
            rc.give_up
        );
        let (parked, mut waiting) = net::parked();
        std::mem::replace(&mut *self.out.write(), parked).close();
        let deadline = Instant::now() + rc.give_up;
        let conn = loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if self.is_closing() {
                return Err(lost.to_string());
            }
            match net::handshake(&rc.addr, Role::Client, secret).await {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(format!("{lost}; connecting again was refused: {e}"));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{lost}, and it could not be reached again within {:?}: {e}",
                        rc.give_up
                    ));
                }
                Err(_) => {}
            }
        };
        let (out, stream) = net::split_batched::<FromClient>(conn);
        let mut slot = self.out.write();
        let tasks = self.resubmission();
        tracing::warn!(
            "connected to the scheduler again: resubmitting {} tasks",
            tasks.len()
        );
        let _ = out.send(FromClient::Resume(self.id));
        let _ = out.send(FromClient::Resubmit(tasks));
        while let Ok((q, _)) = waiting.try_recv() {
            for m in q {
                let _ = out.send(m);
            }
        }
        *slot = out;
        Ok(stream)
    }

    /// Its owner is done with it: once lost, the connection is not made
    /// again (it closes when the last handle goes, after what is queued is
    /// written).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Every kept task, each after its kept inputs, with its value when it
    /// came back inline.
    fn resubmission(&self) -> Vec<(TaskSpec, Option<Bytes>)> {
        let st = self.state.lock();
        let Some(kept) = &st.kept else {
            return Vec::new();
        };
        let mut ids: Vec<u64> = kept.keys().copied().collect();
        ids.sort_unstable();
        let mut done: FxHashSet<u64> = FxHashSet::default();
        // Expanded, not emitted yet: a cycle (refused by the scheduler
        // anyway) must not loop here.
        let mut open: FxHashSet<u64> = FxHashSet::default();
        let mut out = Vec::with_capacity(ids.len());
        // Depth-first with an explicit stack (chains can be long): a task
        // is emitted once all its kept inputs are.
        let mut stack: Vec<(u64, bool)> = Vec::new();
        for id in ids {
            stack.push((id, false));
            while let Some((id, expanded)) = stack.pop() {
                if done.contains(&id) {
                    continue;
                }
                let spec = &kept[&id];
                if expanded {
                    done.insert(id);
                    let value = match st.status.get(&id) {
                        Some(s) => s.value().map(Bytes::copy_from_slice),
                        None => None,
                    };
                    out.push((spec.clone(), value));
                } else if open.insert(id) {
                    stack.push((id, true));
                    for d in &spec.deps {
                        if kept.contains_key(d) && !done.contains(d) && !open.contains(d) {
                            stack.push((*d, false));
                        }
                    }
                }
            }
        }
        out
    }

    fn apply(&self, msgs: Vec<ToClient>) {
        let mut st = self.state.lock();
        let mut completed = Vec::with_capacity(msgs.len());
        for m in msgs {
            let (id, status) = match m {
                ToClient::Memory {
                    id,
                    value,
                    location,
                } => match value {
                    Some(v) => (id, Status::finished_with(&v)),
                    None => (id, Status::At(st.address(location.unwrap_or_default()))),
                },
                ToClient::Erred { id, error } => (id, Status::Erred(Box::new(error))),
                ToClient::Ping => continue,
                ToClient::Info(info) => {
                    st.info = Some(info);
                    self.cv.notify_all();
                    continue;
                }
                ToClient::QueryReply { id, json } => {
                    st.replies.insert(id, json);
                    self.cv.notify_all();
                    continue;
                }
            };
            // Ignore news of tasks already released by this client.
            if let Some(s) = st.status.get_mut(&id) {
                *s = status;
                completed.push(id);
            }
        }
        if !st.watchers.is_empty() && !completed.is_empty() {
            st.watchers.retain(|w| w.strong_count() > 0);
            for w in st.watchers.iter().filter_map(Weak::upgrade) {
                let mut any = false;
                for &id in &completed {
                    any |= w.complete(id);
                }
                if any {
                    w.cv.notify_all();
                }
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    /// A fresh task id.
    pub fn new_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// `n` consecutive fresh task ids; returns the first.
    pub fn new_ids(&self, n: u64) -> u64 {
        self.next.fetch_add(n, Ordering::Relaxed)
    }

    /// Error if the connection is gone.
    pub fn check_open(&self) -> Result<(), AskError> {
        match &self.state.lock().closed {
            Some(r) => Err(AskError::Lost(r.clone())),
            None => Ok(()),
        }
    }

    /// Submits tasks; each starts pending. Ids already known keep their
    /// state. Sent in messages of at most [`SUBMIT_CHUNK`] bytes, in order
    /// (so tasks still come after their inputs); a task that could never
    /// fit in one message is refused before anything is sent.
    pub fn submit(&self, specs: Vec<TaskSpec>) -> Result<(), SubmitError> {
        // An upper bound of the encoded size: the bytes, plus the most
        // each varint, tag and float can take.
        let size = |s: &TaskSpec| {
            s.func.len()
                + s.args.len()
                + s.group.len()
                + s.key.as_ref().map_or(0, String::len)
                + 10 * s.deps.len()
                + s.resources.iter().map(|(n, _)| n.len() + 13).sum::<usize>()
                + 64
        };
        if let Some(s) = specs.iter().find(|s| size(s) > net::max_message()) {
            return Err(SubmitError::TooLarge(format!(
                "task {} is {} bytes pickled (function and arguments), over the limit of {} \
                 bytes per message: put large data on the cluster first (client.scatter, \
                 shoal.put) and pass the future instead",
                s.name(),
                size(s),
                net::max_message()
            )));
        }
        // In slices: the I/O thread takes this lock for every result.
        for slice in specs.chunks(WATCH_SLICE) {
            let mut st = self.state.lock();
            if let Some(r) = &st.closed {
                return Err(SubmitError::Lost(r.clone()));
            }
            for s in slice {
                st.status.entry(s.id).or_insert(Status::Pending);
            }
            if let Some(kept) = &mut st.kept {
                for s in slice {
                    kept.entry(s.id).or_insert_with(|| s.clone());
                }
            }
        }
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut specs = specs.into_iter().peekable();
        while let Some(s) = specs.next() {
            bytes += size(&s);
            chunk.push(s);
            let full = specs.peek().is_some_and(|n| bytes + size(n) > SUBMIT_CHUNK);
            if full || specs.peek().is_none() {
                bytes = 0;
                shoal_proto::share_funcs(&mut chunk);
                // A scheduler that reads slower than the client submits
                // makes the submitter wait, not the queue grow.
                let out = self.out.read().clone();
                if !out.wait_room(SUBMIT_BACKLOG, || self.state.lock().closed.is_some()) {
                    let st = self.state.lock();
                    let why = st
                        .closed
                        .clone()
                        .unwrap_or_else(|| "the connection is closed".into());
                    return Err(SubmitError::Lost(why));
                }
                self.out
                    .read()
                    .send(FromClient::Submit(std::mem::take(&mut chunk)))
                    .map_err(|_| SubmitError::Lost("the connection is closed".into()))?;
            }
        }
        Ok(())
    }

    /// Whether submissions wait to be written beyond [`SUBMIT_BACKLOG`]
    /// (the next `submit` will wait for room).
    pub fn backlogged(&self) -> bool {
        self.out.read().queued_bytes() > SUBMIT_BACKLOG
    }

    /// The client drops these tasks.
    pub fn release(&self, ids: Vec<u64>) {
        for slice in ids.chunks(WATCH_SLICE) {
            let mut st = self.state.lock();
            for id in slice {
                st.status.remove(id);
            }
            if let Some(kept) = &mut st.kept {
                for id in slice {
                    kept.remove(id);
                }
            }
        }
        let _ = self.out.read().send(FromClient::Release(ids));
    }

    /// Sends any message to the scheduler; `Err` with the reason once the
    /// connection is closed.
    pub fn send(&self, msg: FromClient) -> Result<(), AskError> {
        if let Some(reason) = self.closed_reason() {
            return Err(AskError::Lost(reason));
        }
        self.out.read().send(msg).map_err(|_| closed())
    }

    /// Claims tasks this client did not submit, whose futures came inside
    /// a result: each starts pending, and the scheduler tells their state
    /// as for a submission. Not resubmitted after a reconnect (the client
    /// has no spec to send): those fail then.
    pub fn adopt(&self, ids: Vec<u64>) {
        {
            let mut st = self.state.lock();
            for id in &ids {
                st.status.entry(*id).or_insert(Status::Pending);
            }
        }
        let _ = self.out.read().send(FromClient::Adopt(ids));
    }

    /// The result of task `by` holds futures of `tasks`: the scheduler
    /// keeps them while it lives. Sent before this client can release them.
    pub fn hold(&self, by: u64, tasks: Vec<u64>) {
        let _ = self.out.read().send(FromClient::Hold { by, tasks });
    }

    /// Cancels unfinished tasks.
    pub fn cancel(&self, ids: Vec<u64>) {
        let _ = self.out.read().send(FromClient::Cancel(ids));
    }

    /// Cancels these tasks unless a worker has started them.
    pub fn cancel_queued(&self, ids: Vec<u64>) {
        let _ = self.out.read().send(FromClient::CancelQueued(ids));
    }

    /// Asks for these tasks to run even if their futures are released.
    pub fn detach(&self, ids: Vec<u64>) {
        let _ = self.out.read().send(FromClient::Detach(ids));
    }

    /// Tells the scheduler a worker offering one `resource` is starting.
    pub fn expect(&self, resource: String) {
        let _ = self.out.read().send(FromClient::Expect(resource));
    }

    /// Tells the scheduler no worker will offer `resource` again.
    pub fn withdraw(&self, resource: String) {
        let _ = self.out.read().send(FromClient::Withdraw(resource));
    }

    /// Current status (None: unknown or released).
    pub fn status(&self, id: u64) -> Option<Status> {
        self.state.lock().status.get(&id).cloned()
    }

    /// Counts one more failed fetch of `id` in a row; returns the count.
    pub fn fetch_failed(&self, id: u64) -> u32 {
        let mut st = self.state.lock();
        let n = st.fetch_failures.entry(id).or_default();
        *n += 1;
        let n = *n;
        if n >= FETCH_ATTEMPTS {
            st.fetch_failures.remove(&id);
        }
        n
    }

    /// A fetch of `id` worked: forget its failures.
    pub fn fetch_ok(&self, id: u64) {
        self.state.lock().fetch_failures.remove(&id);
    }

    /// Marks a finished task pending again (its holder vanished before we
    /// fetched it: the scheduler is recomputing it).
    pub fn mark_pending(&self, id: u64) {
        if let Some(s) = self.state.lock().status.get_mut(&id) {
            *s = Status::Pending;
        }
        // If its holder died, the scheduler recomputes it and says so; if
        // it moved or the fetch failed otherwise, this asks where it is now.
        let _ = self.out.read().send(FromClient::Where(vec![id]));
    }

    /// A watcher over `ids` for waiting on many of them: each completion
    /// costs the waiter O(1), where rescanning every id on each wake-up
    /// made waiting on a million futures hold the table (and with it the
    /// I/O thread, which needs it to record results) for seconds.
    pub fn waiter(&self, ids: &[u64]) -> Arc<Watcher> {
        let w = self.watcher();
        self.watch(&w, ids);
        w
    }

    /// A watcher over `ids`; those already done are reported at once.
    pub fn watcher(&self) -> Arc<Watcher> {
        let w = Arc::new(Watcher::default());
        self.state.lock().watchers.push(Arc::downgrade(&w));
        w
    }

    /// Adds ids to a watcher (done ones complete at once).
    /// Taken in slices, the table's lock is never held for long: the I/O
    /// thread takes it to record every result.
    pub fn watch(&self, w: &Watcher, ids: &[u64]) {
        for slice in ids.chunks(WATCH_SLICE) {
            let st = self.state.lock();
            let mut inner = w.inner.lock();
            for &id in slice {
                if st.status.get(&id).is_none_or(Status::is_done) {
                    inner.done.push(id);
                    inner.finished += 1;
                } else {
                    inner.pending.insert(id);
                }
            }
            drop(inner);
            drop(st);
            w.cv.notify_all();
        }
    }

    /// Asks the scheduler what the cluster looks like; waits up to
    /// `timeout` for the answer. Call with the GIL released.
    pub fn cluster_info(&self, timeout: std::time::Duration) -> Result<ClusterInfo, AskError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock();
        st.info = None;
        self.out
            .read()
            .send(FromClient::Info)
            .map_err(|_| closed())?;
        loop {
            if let Some(info) = st.info.take() {
                return Ok(info);
            }
            if let Some(reason) = &st.closed {
                return Err(AskError::Lost(reason.clone()));
            }
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return Err(AskError::NoAnswer(timeout));
            }
        }
    }

    /// Asks the scheduler a dashboard query (`/api/status`, `/api/profile`,
    /// ...) and waits up to `timeout` for its JSON answer. Call with the GIL
    /// released.
    pub fn query(&self, path: &str, timeout: std::time::Duration) -> Result<String, AskError> {
        let path = path.to_string();
        self.ask(|id| FromClient::Query { id, path }, timeout)
    }

    /// Claims the cluster-wide `name` for `value`, or looks it up (`value`
    /// None); the scheduler's JSON answer (see [`FromClient::Name`]).
    pub fn name(
        &self,
        name: String,
        value: Option<String>,
        timeout: std::time::Duration,
    ) -> Result<String, AskError> {
        self.ask(|id| FromClient::Name { id, name, value }, timeout)
    }

    /// Submits a job of command tasks, in pieces of [`JOB_PIECE`] tasks
    /// (the scheduler owns them from then
    /// on); the scheduler's JSON answer: `{"job": N}` or `{"error": ...}`.
    pub fn submit_job(
        &self,
        name: String,
        max_fails: u32,
        tasks: Vec<TaskSpec>,
        timeout: std::time::Duration,
    ) -> Result<String, AskError> {
        self.ask(
            |query| {
                // All but the last piece go now; `ask` sends the last.
                let mut tasks = tasks.into_iter();
                let mut piece: Vec<TaskSpec> = tasks.by_ref().take(JOB_PIECE).collect();
                loop {
                    let next: Vec<TaskSpec> = tasks.by_ref().take(JOB_PIECE).collect();
                    if next.is_empty() {
                        break;
                    }
                    let _ = self.out.read().send(FromClient::SubmitJob {
                        query,
                        name: name.clone(),
                        max_fails,
                        tasks: std::mem::replace(&mut piece, next),
                        more: true,
                    });
                }
                FromClient::SubmitJob {
                    query,
                    name,
                    max_fails,
                    tasks: piece,
                    more: false,
                }
            },
            timeout,
        )
    }

    /// Cancels a job's unfinished tasks (running ones are stopped); the
    /// scheduler's JSON answer: `{"cancelled": n}` or `{"error": ...}`.
    pub fn cancel_job(&self, job: u32, timeout: std::time::Duration) -> Result<String, AskError> {
        self.ask(|query| FromClient::CancelJob { query, job }, timeout)
    }

    /// Gives up one of this client's names.
    pub fn unname(&self, name: String) {
        let _ = self.out.read().send(FromClient::Unname(name));
    }

    /// Sends a request carrying a fresh id and waits up to `timeout` for the
    /// scheduler's `QueryReply` to it. Call with the GIL released.
    fn ask(
        &self,
        request: impl FnOnce(u64) -> FromClient,
        timeout: std::time::Duration,
    ) -> Result<String, AskError> {
        let deadline = std::time::Instant::now() + timeout;
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut st = self.state.lock();
        self.out.read().send(request(id)).map_err(|_| closed())?;
        loop {
            if let Some(json) = st.replies.remove(&id) {
                return Ok(json);
            }
            if let Some(reason) = &st.closed {
                return Err(AskError::Lost(reason.clone()));
            }
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return Err(AskError::NoAnswer(timeout));
            }
        }
    }

    /// Why the scheduler connection closed, or None while it is open.
    #[must_use]
    pub fn closed_reason(&self) -> Option<String> {
        self.state.lock().closed.clone()
    }
}

fn closed() -> AskError {
    AskError::Lost("the connection is closed".to_string())
}

/// Tasks in one piece of a job (a few hundred KiB of commands).
pub const JOB_PIECE: usize = 4096;

/// A fetch of one result running on the I/O thread (see [`start_fetch`]);
/// dropping it aborts the fetch.
pub struct PendingFetch {
    task: tokio::task::JoinHandle<()>,
    /// The outcome, sent once by the task. Waited on with the OS's timed
    /// wait, not a runtime timer, so a busy I/O thread cannot delay the
    /// caller's next look at its signals.
    done: std::sync::mpsc::Receiver<io::Result<crate::transfer::Fetched>>,
}

impl PendingFetch {
    /// Waits up to `wait` (call from outside the runtime): the outcome, or
    /// None if it is still running (the caller may look for signals and
    /// its deadline, then wait again).
    pub fn wait(
        &mut self,
        wait: std::time::Duration,
    ) -> Option<io::Result<crate::transfer::Fetched>> {
        use std::sync::mpsc::RecvTimeoutError;
        match self.done.recv_timeout(wait) {
            Ok(got) => Some(got),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(Err(io::Error::other("the fetch ended without an outcome")))
            }
        }
    }
}

impl Drop for PendingFetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts fetching one result from the worker holding it (a file on this
/// host is opened, not read).
pub fn start_fetch(
    rt: &'static tokio::runtime::Runtime,
    addr: &str,
    id: u64,
    secret: &net::Secret,
) -> PendingFetch {
    let (addr, secret) = (addr.to_string(), secret.clone());
    let (tx, done) = std::sync::mpsc::sync_channel(1);
    let task = rt.spawn(async move {
        let got = match crate::transfer::fetch(&addr, vec![id], &secret).await {
            Ok(items) => items
                .into_iter()
                .next()
                .map(|(_, v)| v)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "empty reply")),
            Err(e) => Err(e),
        };
        let _ = tx.send(got); // the waiter may have given up
    });
    PendingFetch { task, done }
}

#[cfg(test)]
mod tests {
    use super::Status;

    /// A client holds one per live future: a million of them stay small.
    #[test]
    fn a_status_is_24_bytes_and_small_values_need_no_allocation() {
        assert_eq!(std::mem::size_of::<Status>(), 24);
        let v: Vec<u8> = (0..40).collect();
        for n in [0, 1, 22, 23, 40] {
            let s = Status::finished_with(&v[..n]);
            assert_eq!(s.value(), Some(&v[..n]));
            assert_eq!(matches!(s, Status::Small { .. }), n <= 22, "{n}");
        }
        assert_eq!(Status::Pending.value(), None);
    }
}
