//! # shoal-core: the scheduler state machine
//!
//! This crate owns the task graph and the cluster state and decides placement.
//! It never does I/O, never reads a clock, and knows nothing of sockets, tokio or
//! Python (`cargo tree -p shoal-core` shows its only dependency is a hasher).
//! The services feed it events through the `handle_*` methods and drain the
//! resulting [`Action`]s with [`Core::take_actions`]; tests do the same, which is
//! how the whole scheduling policy is tested deterministically.
//!
//! ## Task lifecycle
//!
//! ```text
//!              deps done               placed              finished
//!  Waiting ──────────────> Ready ─────────────> Processing ──────────> Memory
//!     ^                      ^                    │  │                   │
//!     │ a dep was lost       └── worker lost ─────┘  │ failed            │ not needed
//!     │                          (kills < max)       v                   v
//!     └──────────────── recompute ────────────── Erred            Released
//! ```
//!
//! A task's record lives while a client wants it or while any dependent record
//! lives (lineage: a lost result is recomputed from its dependencies, which may
//! have to be recomputed in turn). Its *data* lives while a client wants it or a
//! dependent still has to run.
//!
//! Payloads (pickled functions, arguments, results, errors) never enter the core:
//! the service keeps them keyed by [`TaskId`].
//!
//! The worker's own bookkeeping (orders queued, fetching and running; cancels
//! and steals crossing them on the wire) is the second state machine here:
//! [`worker::WorkerState`].

#![warn(missing_docs, unreachable_pub)]

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::fmt;

pub mod worker;

/// Identifies a task. Clients allocate them (`client id << 40 | sequence`) so
/// that submitting needs no round trip; ids grow in submission order.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

/// Identifies a worker for the lifetime of its connection.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct WorkerId(pub u32);

/// Identifies a connected client.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ClientId(pub u32);

/// The interest that keeps detached work wanted until it ends (see
/// [`Core::handle_detach`]); never a connected client.
pub const DETACHED: ClientId = ClientId(u32::MAX);

/// The interest that keeps a task wanted while a live result holds a
/// reference to it (a task returned futures it made; see
/// [`Core::handle_hold`]); never a connected client.
pub const HELD: ClientId = ClientId(u32::MAX - 1);

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{:x}", self.0)
    }
}

/// Why a task ended in error.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum ErrorKind {
    /// The task's function raised; the service holds the pickled exception.
    Exception,
    /// The task was running on this many workers when they died.
    KilledWorker(u8),
    /// A client cancelled it (or a dependency of it).
    Cancelled,
    /// It depends on a task the scheduler does not know (released or never submitted).
    MissingDependency(TaskId),
    /// It needs more of a resource than any connected worker has.
    Unsatisfiable,
    /// Data put on the cluster (not computed) was lost with its worker.
    DataLost,
    /// Its inputs lead back to itself (a cycle in the submitted graph), or
    /// it depends on such a task.
    Cycle,
}

/// A task as submitted by a client.
#[derive(Clone, Debug)]
pub struct NewTask {
    /// Client-allocated id.
    pub id: TaskId,
    /// Tasks whose results this one takes as inputs.
    pub deps: Vec<TaskId>,
    /// Higher runs first.
    pub priority: i32,
    /// How many times a raising task is re-run before it errs.
    pub retries: u32,
    /// Task group (usually one per function); duration estimates are per group.
    pub group: u32,
    /// Resources it holds while it runs: `(resource id, amount)`; a worker
    /// runs it only with that much free, and never queues it.
    pub resources: Vec<(u32, f64)>,
    /// Worker threads it occupies while it runs (at least 1; more for a
    /// task that runs its own parallel code). Above 1, it is never queued.
    pub threads: u32,
    /// False for data put on the cluster (`scatter`): once it has run, it
    /// cannot run again, and losing its result is [`ErrorKind::DataLost`].
    pub recompute: bool,
    /// Workers that may die while running it before it fails with
    /// [`ErrorKind::KilledWorker`] (0: [`Config::max_kills`]).
    pub max_kills: u8,
    /// How long it expects to run (microseconds; 0: unknown): it is placed
    /// only on a worker that will live at least that long (see
    /// [`Core::handle_worker_expires`]).
    pub time_request_us: u64,
}

/// What the core asks the services to do.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Action {
    /// Send the task to the worker. Its inputs are where [`Core::location`] says.
    Compute {
        /// Target worker.
        worker: WorkerId,
        /// Task to run.
        task: TaskId,
    },
    /// The worker should drop the task if it has not started it; a result that
    /// still arrives is ignored.
    CancelCompute {
        /// Worker that was sent the task.
        worker: WorkerId,
        /// Task to drop.
        task: TaskId,
        /// Stop it if it runs (a client cancelled it); else a running task
        /// runs to its end (its result is merely not needed any more).
        stop: bool,
    },
    /// Ask the worker to give these queued tasks back if it has not started
    /// them; it answers each with [`Core::handle_steal_reply`].
    Steal {
        /// Worker that holds them.
        worker: WorkerId,
        /// Tasks to take back.
        tasks: Vec<TaskId>,
    },
    /// The task's result is no longer needed: drop it from the worker (if any)
    /// and from the scheduler's inline store.
    ReleaseData {
        /// Worker holding it, if one does.
        worker: Option<WorkerId>,
        /// Task whose data to drop.
        task: TaskId,
    },
    /// The record is gone: the service drops everything it keeps for the task.
    Forget {
        /// Forgotten task.
        task: TaskId,
    },
    /// Tell the client the result is available.
    TaskMemory {
        /// Client to notify.
        client: ClientId,
        /// Finished task.
        task: TaskId,
    },
    /// Tell the client the task failed.
    TaskErred {
        /// Client to notify.
        client: ClientId,
        /// Failed task.
        task: TaskId,
        /// The task whose failure this is (itself, or a dependency).
        cause: TaskId,
        /// Why.
        kind: ErrorKind,
    },
    /// Copy a result from a retiring worker to another one (answer:
    /// [`Core::handle_replicated`]).
    Replicate {
        /// The result.
        task: TaskId,
        /// Retiring holder.
        from: WorkerId,
        /// New holder.
        to: WorkerId,
    },
    /// A retiring worker runs nothing and holds nothing still needed: it
    /// may exit.
    Retired {
        /// The worker.
        worker: WorkerId,
    },
}

/// Where a task's result lives.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum Location {
    /// Small result kept by the scheduler itself.
    Inline,
    /// On this worker.
    Worker(WorkerId),
}

/// A task's state; data per variant.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum TaskState {
    /// Some inputs are not in memory yet.
    Waiting,
    /// All inputs are in memory; queued for placement.
    Ready,
    /// Sent to a worker.
    Processing(WorkerId),
    /// Finished; the result is at `location`, `size` bytes pickled.
    Memory {
        /// Where the result is.
        location: Location,
        /// Pickled size in bytes.
        size: u64,
    },
    /// Failed; `cause` is the task whose failure this is.
    Erred {
        /// Root failing task.
        cause: TaskId,
        /// Why.
        kind: ErrorKind,
    },
    /// Finished once, result dropped; recomputable from lineage.
    Released,
}

impl TaskState {
    fn is_pending(self) -> bool {
        matches!(
            self,
            TaskState::Waiting | TaskState::Ready | TaskState::Processing(_)
        )
    }
}

/// Tunables. Defaults suit microsecond tasks and second-long tasks alike.
#[derive(Clone, Debug)]
pub struct Config {
    /// A task running on this many workers that died fails with [`ErrorKind::KilledWorker`].
    pub max_kills: u8,
    /// Microseconds of estimated work queued per worker thread beyond the one
    /// running task. Hides the round trip for tiny tasks; tasks of unknown
    /// duration are never queued beyond one per thread, so long tasks stay balanced.
    pub pipeline_budget_us: u64,
    /// Upper bound on tasks queued per worker thread.
    pub max_queue_per_thread: u32,
    /// Transitions kept for [`Core::story`] (0 disables the log).
    pub log_capacity: usize,
    /// A worker with tasks queued behind its running ones that has finished
    /// nothing for this long is stalled (a task far slower than its group's
    /// estimate): it gets no more queued work, and its queued tasks are
    /// taken back for workers with free threads. Needs [`Core::handle_tick`].
    pub steal_after_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_kills: 3,
            pipeline_budget_us: 2_000,
            max_queue_per_thread: 512,
            log_capacity: 0,
            steal_after_us: 200_000,
        }
    }
}

#[derive(Debug)]
struct Task<S> {
    state: TaskState,
    // Inline up to two (chains, trees, one client): no allocation each.
    deps: SmallVec<[TaskId; 2]>,
    dependents: SmallVec<[TaskId; 2]>,
    wanted_by: SmallVec<[ClientId; 2]>,
    /// Deps not in memory (meaningful while Waiting).
    waiting_on: u32,
    /// Dependents in a pending state: while > 0 the result must be kept.
    pending_dependents: u32,
    priority: i32,
    depth: u32,
    group: u32,
    /// Duration estimate charged to the worker while processing.
    est_us: u32,
    kills: u8,
    /// Times a worker could not fetch its inputs from their holder.
    fetch_fails: u8,
    /// Cannot run again (see [`NewTask::recompute`]): set once it has run.
    once: bool,
    ran: bool,
    /// What few tasks ask for (boxed only then: a million plain tasks
    /// keep 32 bytes less each).
    rare: Option<Box<TaskRare>>,
    /// What the service keeps of the task (its spec), in the same record:
    /// one allocation and one table slot per task, not two.
    spec: S,
}

/// The parts of a task most leave at their defaults.
#[derive(Debug, Default, PartialEq)]
struct TaskRare {
    retries_left: u32,
    /// Its own crash limit (0: the config's).
    max_kills: u8,
    /// See [`NewTask::time_request_us`].
    time_request_us: u64,
    /// Threads beyond one.
    threads: u32,
    resources: Box<[(u32, f64)]>,
}

impl<S> Task<S> {
    fn threads(&self) -> u32 {
        self.rare.as_ref().map_or(1, |r| r.threads.max(1))
    }

    fn resources(&self) -> &[(u32, f64)] {
        self.rare.as_ref().map_or(&[], |r| &r.resources)
    }

    fn time_request_us(&self) -> u64 {
        self.rare.as_ref().map_or(0, |r| r.time_request_us)
    }

    fn max_kills(&self) -> u8 {
        self.rare.as_ref().map_or(0, |r| r.max_kills)
    }
}

#[derive(Debug)]
struct Worker {
    nthreads: u32,
    /// Join order (placement's tie-break).
    seq: u64,
    /// Its key in [`Core::by_load`] (`None`: paused, not in it).
    load_key: Option<u64>,
    assigned: FxHashSet<TaskId>,
    has: FxHashSet<TaskId>,
    queued_est_us: u64,
    /// Clock (see `handle_tick`) of the last finish, or of becoming busy.
    progress_us: u64,
    /// No progress for `steal_after_us` with tasks queued: gets no queue.
    stalled: bool,
    /// Its memory is high: gets no work at all, its queue is taken back.
    paused: bool,
    /// Leaving: gets no work; its needed results move to other workers
    /// (task -> target), then it is told to exit.
    retiring: Option<FxHashMap<TaskId, WorkerId>>,
    /// Results that failed to move off this retiring worker, and how often:
    /// after `max_kills` tries one is left to be recomputed once it leaves
    /// (it may not be movable at all: an object that cannot be pickled).
    move_failures: FxHashMap<TaskId, u8>,
    /// Retired: told to exit. Never gets work or results again.
    retired: bool,
    /// Assigned tasks asked back, answer pending.
    stealing: FxHashSet<TaskId>,
    /// Resources it has, and the amounts its assigned tasks hold.
    resources: Vec<(u32, f64)>,
    resources_used: Vec<(u32, f64)>,
    /// Threads its assigned tasks occupy (queued ones included).
    threads_used: u32,
    /// Assigned tasks it reported started: only these count against
    /// `max_kills` when it dies.
    running: FxHashSet<TaskId>,
    /// Tasks still running there that are no longer its (cancelled or
    /// released meanwhile), with their threads: busy until they report.
    zombies: FxHashMap<TaskId, u32>,
    zombie_threads: u32,
    /// When it will leave (core clock; a batch job's walltime): tasks with
    /// a longer time request go elsewhere.
    expires_us: Option<u64>,
}

impl Worker {
    /// Threads taken: by assigned tasks (running or queued) and zombies.
    fn busy(&self) -> u32 {
        self.threads_used + self.zombie_threads
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct GroupStats {
    /// Exponential moving average of durations, None until one finished.
    mean_us: Option<f64>,
    counts: GroupCounts,
}

/// A task group's live tasks by state, and its totals (for dashboards;
/// kept up to date by every transition, so reading it is free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounts {
    /// Waiting for inputs.
    pub waiting: u64,
    /// Inputs ready, not yet placed.
    pub ready: u64,
    /// Sent to a worker.
    pub processing: u64,
    /// Result held.
    pub memory: u64,
    /// Failed.
    pub erred: u64,
    /// Result dropped (or not started).
    pub released: u64,
    /// Tasks submitted, in all.
    pub submitted: u64,
    /// Runs finished, in all.
    pub finished: u64,
    /// Their summed execution time.
    pub total_us: u64,
}

impl GroupCounts {
    /// Live tasks by state name: waiting, ready, processing, memory, erred,
    /// released.
    pub fn by_state(&self) -> [(&'static str, u64); 6] {
        [
            ("waiting", self.waiting),
            ("ready", self.ready),
            ("processing", self.processing),
            ("memory", self.memory),
            ("erred", self.erred),
            ("released", self.released),
        ]
    }

    fn slot(&mut self, s: TaskState) -> &mut u64 {
        match s {
            TaskState::Waiting => &mut self.waiting,
            TaskState::Ready => &mut self.ready,
            TaskState::Processing(_) => &mut self.processing,
            TaskState::Memory { .. } => &mut self.memory,
            TaskState::Erred { .. } => &mut self.erred,
            TaskState::Released => &mut self.released,
        }
    }
}

#[derive(PartialEq, Eq)]
struct ReadyEntry {
    priority: i32,
    depth: u32,
    id: TaskId,
}

impl Ord for ReadyEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher priority, then deeper (finish what was started, so
        // memory stays low), then older.
        self.priority
            .cmp(&other.priority)
            .then(self.depth.cmp(&other.depth))
            .then(other.id.cmp(&self.id))
    }
}
impl PartialOrd for ReadyEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One entry of the transition log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Task.
    pub task: TaskId,
    /// State before.
    pub from: Option<TaskState>,
    /// State after (None: forgotten).
    pub to: Option<TaskState>,
    /// The event that caused it (the handler's name, e.g. `task-finished`).
    pub stimulus: &'static str,
    /// The clock of the last [`Core::handle_tick`] (microseconds).
    pub at_us: u64,
}

/// The scheduler state machine.
pub struct Core<S = ()> {
    config: Config,
    /// Boxed: growing the table past a million tasks moves 16-byte slots,
    /// not whole tasks (a resize is one step the event loop waits for).
    tasks: FxHashMap<TaskId, Box<Task<S>>>,
    workers: FxHashMap<WorkerId, Worker>,
    /// Workers in id order, for deterministic placement.
    worker_order: Vec<WorkerId>,
    /// Workers that may get work (not paused), by load then join order:
    /// placement looks at the inputs' holders and the first few of these,
    /// so it does not grow with the number of workers.
    by_load: BTreeSet<(u64, u64, WorkerId)>,
    next_worker_seq: u64,
    /// Workers retiring now.
    retiring: usize,
    ready: BinaryHeap<ReadyEntry>,
    /// Ready tasks that need resources (placed first, never pipelined).
    ready_constrained: BinaryHeap<ReadyEntry>,
    /// Every distinct set of resources a worker has offered: a task that
    /// fits one waits for such a worker (one may be restarting).
    offers_seen: Vec<Vec<(u32, f64)>>,
    /// The most threads any worker has had.
    max_threads_seen: u32,
    groups: Vec<GroupStats>,
    actions: Vec<Action>,
    log: VecDeque<Transition>,
    transitions: u64,
    /// Detached tasks that finished or failed: their detached interest is
    /// dropped by the next `schedule`.
    detached_done: Vec<TaskId>,
    /// Results that hold references to other tasks: holder -> the held.
    holds: FxHashMap<TaskId, SmallVec<[TaskId; 2]>>,
    /// How many holders' results hold each held task (each one counted
    /// here is wanted by [`HELD`]).
    held: FxHashMap<TaskId, u32>,
    /// Held tasks whose last holder went: their held interest is dropped
    /// by the next `schedule` (iteratively: references can nest deeply).
    unheld: Vec<TaskId>,
    /// Results that cannot leave the worker that made them (they cannot be
    /// pickled: a generator, a lock): their dependents run there. Valid
    /// while the task is in memory on that worker.
    pinned: FxHashMap<TaskId, WorkerId>,
    /// Tasks to cancel if their worker gives them back (not started) in
    /// answer to the steal [`Core::handle_cancel_queued`] sent.
    cancel_when_given: FxHashSet<TaskId>,
    /// The event being handled, for the transition log.
    stimulus: &'static str,
    /// Last time given by `handle_tick` (microseconds, any origin).
    now_us: u64,
}

impl Default for Core {
    fn default() -> Self {
        Core::new(Config::default())
    }
}

impl Core {
    /// A core with no workers and no tasks.
    pub fn new(config: Config) -> Self {
        Core::with_specs(config)
    }
}

impl<S> Core<S> {
    /// A core whose tasks each keep a spec of type `S` for the service
    /// ([`Core::handle_submit_specs`], [`Core::spec`]).
    pub fn with_specs(config: Config) -> Self {
        Core {
            config,
            tasks: FxHashMap::default(),
            workers: FxHashMap::default(),
            worker_order: Vec::new(),
            by_load: BTreeSet::new(),
            next_worker_seq: 0,
            retiring: 0,
            ready: BinaryHeap::new(),
            ready_constrained: BinaryHeap::new(),
            offers_seen: Vec::new(),
            max_threads_seen: 0,
            groups: Vec::new(),
            actions: Vec::new(),
            log: VecDeque::new(),
            transitions: 0,
            detached_done: Vec::new(),
            holds: FxHashMap::default(),
            held: FxHashMap::default(),
            unheld: Vec::new(),
            pinned: FxHashMap::default(),
            cancel_when_given: FxHashSet::default(),
            stimulus: "",
            now_us: 0,
        }
    }

    // ---------------------------------------------------------------- getters

    /// Drains the actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Moves the pending actions into `out` (reuses its allocation).
    pub fn drain_actions_into(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    /// State of a task, None if the core does not know it.
    pub fn state(&self, task: TaskId) -> Option<TaskState> {
        self.tasks.get(&task).map(|t| t.state)
    }

    /// Inputs of a task.
    pub fn deps(&self, task: TaskId) -> &[TaskId] {
        self.tasks.get(&task).map(|t| &*t.deps).unwrap_or(&[])
    }

    /// Where a task's result lives, if it is in memory.
    pub fn location(&self, task: TaskId) -> Option<Location> {
        match self.tasks.get(&task)?.state {
            TaskState::Memory { location, .. } => Some(location),
            _ => None,
        }
    }

    /// Number of task records.
    pub fn n_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// A task's group.
    pub fn task_group(&self, task: TaskId) -> Option<u32> {
        self.tasks.get(&task).map(|t| t.group)
    }

    /// Every task group seen (by group id): live tasks by state, and totals.
    pub fn group_counts(&self) -> impl Iterator<Item = (u32, &GroupCounts)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, g)| (i as u32, &g.counts))
    }

    /// A worker's tasks assigned (running or queued) and results held.
    pub fn worker_load(&self, worker: WorkerId) -> Option<(usize, usize)> {
        self.workers
            .get(&worker)
            .map(|w| (w.assigned.len(), w.has.len()))
    }

    /// Number of workers.
    pub fn n_workers(&self) -> usize {
        self.workers.len()
    }

    /// Tasks currently assigned to a worker.
    pub fn n_assigned(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |w| w.assigned.len())
    }

    /// Total state transitions so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// Logged transitions of one task, oldest first (needs `log_capacity > 0`).
    pub fn story(&self, task: TaskId) -> Vec<Transition> {
        self.log
            .iter()
            .filter(|t| t.task == task)
            .cloned()
            .collect()
    }

    // ----------------------------------------------------------------- inputs

    /// A worker joined with `nthreads` execution slots.
    pub fn handle_worker_added(&mut self, worker: WorkerId, nthreads: u32) {
        self.handle_worker_added_with(worker, nthreads, Vec::new());
    }

    /// A worker joined with these resources (`(resource id, amount)`).
    pub fn handle_worker_added_with(
        &mut self,
        worker: WorkerId,
        nthreads: u32,
        resources: Vec<(u32, f64)>,
    ) {
        self.stimulus = "worker-added";
        self.next_worker_seq += 1;
        let w = Worker {
            seq: self.next_worker_seq,
            load_key: None,
            nthreads: nthreads.max(1),
            assigned: FxHashSet::default(),
            has: FxHashSet::default(),
            queued_est_us: 0,
            progress_us: self.now_us,
            stalled: false,
            paused: false,
            retiring: None,
            move_failures: FxHashMap::default(),
            retired: false,
            stealing: FxHashSet::default(),
            resources_used: resources.iter().map(|&(r, _)| (r, 0.0)).collect(),
            resources,
            threads_used: 0,
            running: FxHashSet::default(),
            zombies: FxHashMap::default(),
            zombie_threads: 0,
            expires_us: None,
        };
        self.max_threads_seen = self.max_threads_seen.max(w.nthreads);
        if !w.resources.is_empty() && !self.offers_seen.contains(&w.resources) {
            self.offers_seen.push(w.resources.clone());
        }
        if let Some(old) = self.workers.insert(worker, w) {
            if let Some(k) = old.load_key {
                self.by_load.remove(&(k, old.seq, worker));
            }
        } else {
            self.worker_order.push(worker);
        }
        self.reindex(worker);
        self.schedule();
    }

    /// A worker offering one unit of this resource is on its way (an actor's
    /// process is starting): tasks that need it wait instead of failing.
    pub fn handle_resource_expected(&mut self, resource: u32) {
        self.stimulus = "resource-expected";
        let offer = vec![(resource, 1.0)];
        if !self.offers_seen.contains(&offer) {
            self.offers_seen.push(offer);
        }
    }

    /// The worker will leave at `at_us` (the core's clock: see
    /// [`Core::handle_tick`]), e.g. at its batch job's end: a task whose
    /// time request reaches past that is not placed there.
    pub fn handle_worker_expires(&mut self, worker: WorkerId, at_us: u64) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.expires_us = Some(at_us);
        }
    }

    /// No worker will offer this resource again (an actor is gone for good):
    /// tasks that need it, now or later, fail as unsatisfiable instead of
    /// waiting for a replacement.
    pub fn handle_resource_withdrawn(&mut self, resource: u32) {
        self.stimulus = "resource-withdrawn";
        self.offers_seen
            .retain(|o| !o.iter().any(|&(r, a)| r == resource && a > 0.0));
        let stuck: Vec<TaskId> = self
            .ready_constrained
            .iter()
            .map(|e| e.id)
            // The heap keeps stale entries (tasks forgotten or no longer
            // Ready since they were pushed): look them up, never index.
            .filter(|id| {
                self.tasks.get(id).is_some_and(|t| {
                    t.state == TaskState::Ready && t.resources().iter().any(|&(r, _)| r == resource)
                })
            })
            .collect();
        if !self
            .workers
            .values()
            .any(|w| w.resources.iter().any(|&(r, a)| r == resource && a > 0.0))
        {
            for id in stuck {
                self.set_erred(id, id, ErrorKind::Unsatisfiable);
            }
        }
        self.schedule();
    }

    /// `worker` could not fetch `deps` (inputs of `task`) from the worker
    /// the core thinks holds them: that worker does not have them. They are
    /// recomputed (scattered data is lost), and `task` waits for them again.
    pub fn handle_missing_data(&mut self, worker: WorkerId, task: TaskId, deps: &[TaskId]) {
        self.stimulus = "missing-data";
        for &d in deps {
            let Some(t) = self.tasks.get(&d) else {
                continue;
            };
            let TaskState::Memory {
                location: Location::Worker(h),
                ..
            } = t.state
            else {
                continue;
            };
            if h == worker || !t.dependents.contains(&task) {
                continue;
            }
            let needed = !t.wanted_by.is_empty() || t.pending_dependents > 0;
            let lost = t.once && needed;
            // Leaving memory sends `task` (and any other dependent being
            // fetched) back to Waiting.
            self.set_state(d, TaskState::Released);
            self.actions.push(Action::ReleaseData {
                worker: Some(h),
                task: d,
            });
            if lost {
                self.set_erred(d, d, ErrorKind::DataLost);
            } else if needed {
                self.recompute(d);
            } else {
                self.maybe_forget(d);
            }
        }
        // The worker dropped the task: if no input left memory above (a
        // stale report), it is placed again.
        if self.is_processing_on(task, worker) {
            self.set_state(task, TaskState::Ready);
        }
        self.schedule();
    }

    /// A client asks again about tasks it holds (its fetch of a result
    /// failed): those in memory or erred are reported again, the others
    /// will be when they get there.
    pub fn handle_where(&mut self, client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "where";
        for &id in tasks {
            if self
                .tasks
                .get(&id)
                .is_some_and(|t| t.wanted_by.contains(&client))
            {
                self.notify_one(client, id);
            }
        }
    }

    /// Retires a worker gracefully: it gets no more work, its queued tasks
    /// go elsewhere, the results it holds that are still needed are copied
    /// to other workers ([`Action::Replicate`]); then [`Action::Retired`].
    /// With no other worker to take them, the results are left to be
    /// recomputed when it goes.
    pub fn handle_retire(&mut self, worker: WorkerId) {
        self.stimulus = "retire";
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.retiring.is_none() && !w.retired {
                w.retiring = Some(FxHashMap::default());
                w.paused = true;
                self.retiring += 1;
                self.reindex(worker);
                self.steal();
                self.schedule();
            }
        }
    }

    /// Worker `to` copied `task`'s result (`ok`) or could not (then another
    /// copy is tried).
    pub fn handle_replicated(&mut self, to: WorkerId, task: TaskId, ok: bool) {
        self.stimulus = "replicated";
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        let TaskState::Memory {
            location: Location::Worker(from),
            size,
        } = t.state
        else {
            return;
        };
        let Some(moving) = self
            .workers
            .get_mut(&from)
            .and_then(|w| w.retiring.as_mut())
        else {
            return;
        };
        if moving.get(&task) != Some(&to) {
            return;
        }
        moving.remove(&task);
        if ok && self.workers.contains_key(&to) {
            // Same data, new holder: no dependent changes state.
            self.workers
                .get_mut(&from)
                .expect("retiring")
                .move_failures
                .remove(&task);
            self.tasks.get_mut(&task).expect("known").state = TaskState::Memory {
                location: Location::Worker(to),
                size,
            };
            self.workers
                .get_mut(&from)
                .expect("retiring")
                .has
                .remove(&task);
            self.workers.get_mut(&to).expect("checked").has.insert(task);
            self.actions.push(Action::ReleaseData {
                worker: Some(from),
                task,
            });
            // Clients holding it learn where it is now.
            for i in 0..self.tasks[&task].wanted_by.len() {
                let client = self.tasks[&task].wanted_by[i];
                self.notify_one(client, task);
            }
        } else if let Some(w) = self.workers.get_mut(&from) {
            *w.move_failures.entry(task).or_default() += 1;
        }
        self.schedule();
    }

    /// Moves needed results off retiring workers and lets go of those that
    /// are done (part of every `schedule`).
    fn retire_step(&mut self) {
        let retiring: Vec<WorkerId> = self
            .worker_order
            .iter()
            .copied()
            .filter(|w| self.workers[w].retiring.is_some())
            .collect();
        for wid in retiring {
            // Moves of results released meanwhile, or to workers gone, are off.
            let w = self.workers.get_mut(&wid).expect("listed");
            let has = &w.has;
            let alive: FxHashSet<WorkerId> = self.worker_order.iter().copied().collect();
            w.retiring
                .as_mut()
                .expect("retiring")
                .retain(|t, to| has.contains(t) && alive.contains(to));
            let w = &self.workers[&wid];
            let mut needed: Vec<TaskId> = w
                .has
                .iter()
                .copied()
                .filter(|id| {
                    let t = &self.tasks[id];
                    !t.wanted_by.is_empty() || t.pending_dependents > 0
                })
                .collect();
            needed.sort();
            let moving = w.retiring.as_ref().expect("retiring");
            let idle = w.assigned.is_empty();
            let max_tries = self.config.max_kills;
            let pending: Vec<TaskId> = needed
                .into_iter()
                .filter(|id| !moving.contains_key(id))
                .filter(|id| w.move_failures.get(id).copied().unwrap_or(0) < max_tries)
                .collect();
            // Targets: workers staying, fewest results held first.
            let mut targets: Vec<(usize, WorkerId)> = self
                .workers
                .iter()
                .filter(|(id, o)| **id != wid && o.retiring.is_none() && !o.retired)
                .map(|(id, o)| (o.has.len(), *id))
                .collect();
            targets.sort();
            if targets.is_empty() {
                // Nowhere to go: the results are recomputed after it leaves.
                if idle {
                    self.finish_retire(wid);
                }
                continue;
            }
            for (i, task) in pending.into_iter().enumerate() {
                let to = targets[i % targets.len()].1;
                let w = self.workers.get_mut(&wid).expect("retiring");
                w.retiring.as_mut().expect("retiring").insert(task, to);
                self.actions.push(Action::Replicate {
                    task,
                    from: wid,
                    to,
                });
            }
            let w = &self.workers[&wid];
            if idle && w.retiring.as_ref().is_some_and(|m| m.is_empty()) {
                self.finish_retire(wid);
            }
        }
    }

    fn finish_retire(&mut self, wid: WorkerId) {
        if let Some(w) = self.workers.get_mut(&wid) {
            if w.retiring.take().is_some() {
                self.retiring -= 1;
                w.retired = true;
                self.actions.push(Action::Retired { worker: wid });
            }
        }
    }

    /// A worker's memory crossed its pause fraction: while paused it gets no
    /// work, and its queued tasks are asked back (as from a stalled worker).
    pub fn handle_worker_paused(&mut self, worker: WorkerId, paused: bool) {
        self.stimulus = "worker-paused";
        if let Some(w) = self.workers.get_mut(&worker) {
            w.paused = paused || w.retiring.is_some() || w.retired;
            self.reindex(worker);
            if paused {
                self.steal();
            }
            self.schedule();
        }
    }

    /// A worker's number of execution threads changed: a task waiting on
    /// other tasks (`secede`) lends its thread, and takes it back after.
    pub fn handle_worker_threads(&mut self, worker: WorkerId, nthreads: u32) {
        self.stimulus = "worker-threads";
        if let Some(w) = self.workers.get_mut(&worker) {
            w.nthreads = nthreads.max(1);
            self.reindex(worker);
            self.schedule();
        }
    }

    /// A worker is gone (connection lost, process died). Its running tasks run
    /// again elsewhere; results only it held and still needed are recomputed.
    pub fn handle_worker_lost(&mut self, worker: WorkerId) {
        self.stimulus = "worker-lost";
        self.remove_worker(worker, true);
    }

    /// A worker restarts on purpose (a task it was told to stop did not
    /// stop): as [`Core::handle_worker_lost`], but its other running tasks
    /// are not suspects (no kill is counted against them).
    pub fn handle_worker_restarting(&mut self, worker: WorkerId) {
        self.stimulus = "worker-restarting";
        self.remove_worker(worker, false);
    }

    fn remove_worker(&mut self, worker: WorkerId, blame: bool) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.worker_order.retain(|&x| x != worker);
        if let Some(k) = w.load_key {
            self.by_load.remove(&(k, w.seq, worker));
        }
        if w.retiring.is_some() {
            self.retiring -= 1;
        }
        let mut assigned: Vec<TaskId> = w.assigned.into_iter().collect();
        assigned.sort();
        let mut held: Vec<TaskId> = w.has.into_iter().collect();
        held.sort();
        // Only what ran there may have killed it. With no start report
        // (it died at once, before the report left), every assigned task
        // is a suspect: a task that kills its worker instantly still ends
        // as KilledWorker.
        let unknown = w.running.is_empty();
        for id in assigned {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            if blame && (unknown || w.running.contains(&id)) {
                t.kills = t.kills.saturating_add(1);
            }
            if t.once {
                self.set_erred(id, id, ErrorKind::DataLost);
            } else if t.kills
                >= match t.max_kills() {
                    0 => self.config.max_kills,
                    own => own,
                }
            {
                let kills = t.kills;
                self.set_erred(id, id, ErrorKind::KilledWorker(kills));
            } else {
                self.set_state(id, TaskState::Ready);
            }
        }
        for id in held {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if !matches!(t.state, TaskState::Memory { location: Location::Worker(h), .. } if h == worker)
            {
                continue;
            }
            let needed = !t.wanted_by.is_empty() || t.pending_dependents > 0;
            let lost = t.once && needed;
            self.set_state(id, TaskState::Released);
            if lost {
                self.set_erred(id, id, ErrorKind::DataLost);
            } else if needed {
                self.recompute(id);
            } else {
                self.maybe_forget(id);
            }
        }
        self.schedule();
    }

    /// A client submitted tasks (in dependency order or not: a batch is taken
    /// whole). Every task of the batch is wanted by the client. A task whose id
    /// is already known just gains the client's interest.
    pub fn handle_submit(&mut self, client: ClientId, tasks: Vec<NewTask>)
    where
        S: Default,
    {
        let tasks = tasks.into_iter().map(|t| (t, S::default())).collect();
        self.handle_resubmit(client, tasks, &FxHashMap::default());
    }

    /// [`Core::handle_submit`] with each task's spec (dropped if the task
    /// is known already).
    pub fn handle_submit_specs(&mut self, client: ClientId, tasks: Vec<(NewTask, S)>) {
        self.handle_resubmit(client, tasks, &FxHashMap::default());
    }

    /// Bytes of one task's record (with its spec), for tests that keep a
    /// million-task graph small.
    pub fn record_size() -> usize {
        std::mem::size_of::<Task<S>>()
    }

    /// A task's priority (as submitted).
    pub fn priority(&self, task: TaskId) -> Option<i32> {
        self.tasks.get(&task).map(|t| t.priority)
    }

    /// Every task the core knows, in no order.
    pub fn task_ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.keys().copied()
    }

    /// The spec a task was submitted with.
    pub fn spec(&self, id: TaskId) -> Option<&S> {
        self.tasks.get(&id).map(|t| &t.spec)
    }

    /// The spec a task was submitted with, to change.
    pub fn spec_mut(&mut self, id: TaskId) -> Option<&mut S> {
        self.tasks.get_mut(&id).map(|t| &mut t.spec)
    }

    /// A client's tasks submitted again after the scheduler restarted under
    /// it. Those in `held` had finished before: their results are at the
    /// given place (a worker that rejoined, or inline) with the given size,
    /// and they start in memory instead of running again. A held place on
    /// a worker the core does not know is ignored (the task runs again).
    pub fn handle_resubmit(
        &mut self,
        client: ClientId,
        tasks: Vec<(NewTask, S)>,
        held: &FxHashMap<TaskId, (Location, u64)>,
    ) {
        self.stimulus = "submit";
        let mut fresh = Vec::with_capacity(tasks.len());
        // First pass: records, so deps inside the batch resolve in any order.
        for (nt, spec) in tasks {
            if let Some(t) = self.tasks.get_mut(&nt.id) {
                if !t.wanted_by.contains(&client) {
                    t.wanted_by.push(client);
                }
                // Kept only as an input's record (its result let go): wanted
                // again, it runs again.
                if t.state == TaskState::Released {
                    self.recompute(nt.id);
                }
                self.notify_one(client, nt.id);
                continue;
            }
            let g = nt.group as usize;
            if self.groups.len() <= g {
                self.groups.resize(g + 1, GroupStats::default());
            }
            self.groups[g].counts.released += 1;
            self.groups[g].counts.submitted += 1;
            self.tasks.insert(
                nt.id,
                Box::new(Task {
                    state: TaskState::Released,
                    deps: SmallVec::from_vec(nt.deps),
                    dependents: SmallVec::new(),
                    wanted_by: smallvec::smallvec![client],
                    waiting_on: 0,
                    pending_dependents: 0,
                    priority: nt.priority,
                    depth: 0,
                    group: nt.group,
                    est_us: 0,
                    kills: 0,
                    fetch_fails: 0,
                    once: !nt.recompute,
                    ran: false,
                    rare: {
                        let rare = TaskRare {
                            retries_left: nt.retries,
                            max_kills: nt.max_kills,
                            time_request_us: nt.time_request_us,
                            threads: if nt.threads > 1 { nt.threads } else { 0 },
                            resources: nt.resources.into_boxed_slice(),
                        };
                        (rare != TaskRare::default()).then(|| Box::new(rare))
                    },
                    spec,
                }),
            );
            fresh.push(nt.id);
        }
        // Second pass: link to dependencies, then start. Fresh records not
        // linked yet have depth UNLINKED: a dependency on one (a later task of
        // the batch, or itself) is the only way a cycle can form, since
        // known tasks never depend on fresh ones.
        const UNLINKED: u32 = u32::MAX;
        for &id in &fresh {
            self.tasks.get_mut(&id).expect("just inserted").depth = UNLINKED;
        }
        let mut out_of_order = false;
        for &id in &fresh {
            let deps = self.tasks[&id].deps.clone();
            let mut depth = 0;
            let mut missing = None;
            for &d in deps.iter() {
                match self.tasks.get_mut(&d) {
                    Some(dt) => {
                        dt.dependents.push(id);
                        if dt.depth == UNLINKED {
                            out_of_order = true;
                        } else {
                            depth = depth.max(dt.depth + 1);
                        }
                    }
                    None => missing = Some(d),
                }
            }
            self.tasks.get_mut(&id).expect("just inserted").depth = depth;
            if let Some(d) = missing {
                // Erred for good: it keeps only the links that exist.
                let linked = deps.iter().copied().filter(|x| self.tasks.contains_key(x));
                self.tasks.get_mut(&id).expect("just inserted").deps = linked.collect();
                self.set_erred(id, id, ErrorKind::MissingDependency(d));
            }
        }
        if out_of_order {
            for id in self.cyclic(&fresh) {
                if self.tasks[&id].state == TaskState::Released {
                    self.set_erred(id, id, ErrorKind::Cycle);
                }
            }
        }
        for &id in &fresh {
            let Some(&(location, size)) = held.get(&id) else {
                continue;
            };
            let usable = match location {
                Location::Inline => true,
                Location::Worker(w) => self.workers.get(&w).is_some_and(|w| !w.retired),
            };
            if usable && self.tasks[&id].state == TaskState::Released {
                self.tasks.get_mut(&id).expect("just inserted").ran = true;
                self.set_state(id, TaskState::Memory { location, size });
            }
        }
        for id in fresh {
            if self.tasks[&id].state == TaskState::Released {
                self.recompute(id);
            }
        }
        self.schedule();
    }

    /// The tasks of `fresh` on a cycle of dependencies among them, or
    /// downstream of one (Kahn's algorithm: what never becomes free).
    fn cyclic(&self, fresh: &[TaskId]) -> Vec<TaskId> {
        let mut indeg: FxHashMap<TaskId, usize> = fresh.iter().map(|&id| (id, 0)).collect();
        for &id in fresh {
            let n = self.tasks[&id]
                .deps
                .iter()
                .filter(|d| indeg.contains_key(d))
                .count();
            indeg.insert(id, n);
        }
        let mut free: Vec<TaskId> = fresh.iter().copied().filter(|id| indeg[id] == 0).collect();
        while let Some(id) = free.pop() {
            for dep in self.tasks[&id].dependents.iter() {
                if let Some(n) = indeg.get_mut(dep) {
                    if *n > 0 {
                        *n -= 1;
                        if *n == 0 {
                            free.push(*dep);
                        }
                    }
                }
            }
        }
        fresh.iter().copied().filter(|id| indeg[id] > 0).collect()
    }

    /// The client no longer holds these tasks' futures.
    pub fn handle_release(&mut self, client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "release";
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.wanted_by.retain(|c| *c != client);
            if t.wanted_by.is_empty() {
                self.maybe_release(id);
                self.maybe_forget(id);
            }
        }
        self.schedule();
    }

    /// The client cancels these tasks: unfinished ones (and their unfinished
    /// dependents) end as cancelled. Finished ones are unaffected.
    pub fn handle_cancel(&mut self, client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "cancel";
        let _ = client;
        self.cancel(tasks);
    }

    fn cancel(&mut self, tasks: &[TaskId]) {
        for &id in tasks {
            match self.tasks.get(&id).map(|t| t.state) {
                Some(s) if s.is_pending() || s == TaskState::Released => {
                    self.set_erred(id, id, ErrorKind::Cancelled)
                }
                _ => {}
            }
        }
        self.schedule();
    }

    /// Cancels these tasks, as [`Core::handle_cancel`], except those a
    /// worker has started, which run to their end (`concurrent.futures`'
    /// `shutdown(cancel_futures=True)`). Only the worker knows whether a
    /// task sent to it has started: it is asked for those back (a steal),
    /// and each it gives back is cancelled.
    pub fn handle_cancel_queued(&mut self, _client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "cancel-queued";
        let mut now = Vec::new();
        let mut ask: FxHashMap<WorkerId, Vec<TaskId>> = FxHashMap::default();
        for &id in tasks {
            match self.tasks.get(&id).map(|t| t.state) {
                Some(TaskState::Processing(w)) => {
                    // A client's message leads here: no panic, even if the
                    // invariant (its worker is known) were broken.
                    let Some(wk) = self.workers.get_mut(&w) else {
                        now.push(id);
                        continue;
                    };
                    if wk.running.contains(&id) {
                        continue; // reported started: runs on
                    }
                    self.cancel_when_given.insert(id);
                    if wk.stealing.insert(id) {
                        ask.entry(w).or_default().push(id);
                    }
                }
                Some(_) => now.push(id),
                None => {}
            }
        }
        self.cancel(&now);
        let mut ask: Vec<(WorkerId, Vec<TaskId>)> = ask.into_iter().collect();
        ask.sort();
        for (worker, tasks) in ask {
            self.actions.push(Action::Steal { worker, tasks });
        }
        self.schedule();
    }

    /// The client wants these tasks run whether or not it keeps them (Ray's
    /// semantics for every call, Dask's `fire_and_forget`): they stay
    /// wanted until they finish or fail, then only the client's own
    /// interest keeps their results. Tasks that already ended are unaffected.
    pub fn handle_detach(&mut self, client: ClientId, tasks: &[TaskId]) {
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            if t.state.is_pending()
                && t.wanted_by.contains(&client)
                && !t.wanted_by.contains(&DETACHED)
            {
                t.wanted_by.push(DETACHED);
            }
        }
    }

    /// The result of `by` holds references to `tasks` (the task returned
    /// futures it made, and its worker's client pickled them): they stay
    /// wanted as long as that result lives, so that whoever gets the
    /// result can claim them ([`Core::handle_adopt`]) even after the
    /// client that made them let them go. Sent by that client before it
    /// can release them, so it arrives first. Ignored for a result that is
    /// gone or will not come.
    pub fn handle_hold(&mut self, by: TaskId, tasks: &[TaskId]) {
        self.stimulus = "hold";
        match self.tasks.get(&by).map(|t| t.state) {
            None | Some(TaskState::Released | TaskState::Erred { .. }) => return,
            Some(_) => {}
        }
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            let list = self.holds.entry(by).or_default();
            if id == by || list.contains(&id) {
                continue;
            }
            list.push(id);
            let n = self.held.entry(id).or_insert(0);
            *n += 1;
            if *n == 1 {
                t.wanted_by.push(HELD);
                if t.state == TaskState::Released {
                    self.recompute(id);
                }
            }
        }
        self.schedule();
    }

    /// The worker running `task` cannot hand its result to anyone (it
    /// cannot be pickled): tasks that take it are placed on that worker,
    /// and not stolen from it (distributed keeps such results in worker
    /// memory the same way). Sent before the task's report.
    pub fn handle_pinned(&mut self, worker: WorkerId, task: TaskId) {
        if self.tasks.contains_key(&task) {
            self.pinned.insert(task, worker);
        }
    }

    /// The worker holding a pinned input of `t`, if any.
    fn pinned_holder(&self, t: &Task<S>) -> Option<WorkerId> {
        if self.pinned.is_empty() {
            return None;
        }
        t.deps.iter().find_map(|d| match self.tasks[d].state {
            TaskState::Memory {
                location: Location::Worker(h),
                ..
            } if self.pinned.get(d) == Some(&h) => Some(h),
            _ => None,
        })
    }

    /// The client claims tasks it did not submit, whose futures it found
    /// in a result ([`Core::handle_hold`]): it is told their state as if
    /// it had submitted them. Returns those the core does not know (let
    /// go before the claim); the caller tells the client.
    pub fn handle_adopt(&mut self, client: ClientId, tasks: &[TaskId]) -> Vec<TaskId> {
        self.stimulus = "adopt";
        let mut unknown = Vec::new();
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                unknown.push(id);
                continue;
            };
            if !t.wanted_by.contains(&client) {
                t.wanted_by.push(client);
            }
            if t.state == TaskState::Released {
                self.recompute(id);
            }
            self.notify_one(client, id);
        }
        self.schedule();
        unknown
    }

    /// The result of `by` is gone or will not come (it is released or
    /// erred): what it held is held by one fewer.
    fn drop_holds(&mut self, by: TaskId) {
        let Some(list) = self.holds.remove(&by) else {
            return;
        };
        for id in list {
            if let Some(n) = self.held.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&id);
                    self.unheld.push(id);
                }
            }
        }
    }

    /// Held tasks no result holds any more are no longer wanted for that.
    fn settle_unheld(&mut self) {
        while let Some(id) = self.unheld.pop() {
            if self.held.contains_key(&id) {
                continue; // held again meanwhile
            }
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.wanted_by.retain(|c| *c != HELD);
            if t.wanted_by.is_empty() {
                self.maybe_release(id);
                self.maybe_forget(id);
            }
        }
    }

    /// A client disconnected: everything it wanted is released.
    pub fn handle_client_gone(&mut self, client: ClientId) {
        self.stimulus = "client-gone";
        let mut ids: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.wanted_by.contains(&client))
            .map(|(&id, _)| id)
            .collect();
        ids.sort();
        self.handle_release(client, &ids);
    }

    /// A worker finished a task. `inline`: the result travelled with the
    /// message and the scheduler keeps it. Stale reports (the task was
    /// cancelled or moved meanwhile) are ignored: None; else the task's
    /// group (for the caller's records, without another lookup).
    pub fn handle_task_finished(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        size: u64,
        inline: bool,
        duration_us: u64,
    ) -> Option<u32> {
        self.stimulus = "task-finished";
        self.stopped_running(worker, task);
        if !self.is_processing_on(task, worker) {
            return None;
        }
        self.progress(worker);
        let t = self.tasks.get_mut(&task).expect("processing");
        t.ran = true;
        let group = t.group;
        let g = &mut self.groups[group as usize];
        let d = duration_us as f64;
        g.mean_us = Some(g.mean_us.map_or(d, |m| 0.8 * m + 0.2 * d));
        g.counts.finished += 1;
        g.counts.total_us += duration_us;
        let location = if inline {
            Location::Inline
        } else {
            Location::Worker(worker)
        };
        self.set_state(task, TaskState::Memory { location, size });
        self.maybe_release(task);
        self.schedule();
        Some(group)
    }

    /// A worker reports that a task raised. Returns whether the report was
    /// taken (false: stale) and the task is now erred (true) or will retry.
    pub fn handle_task_failed(&mut self, worker: WorkerId, task: TaskId) -> Option<bool> {
        self.stimulus = "task-failed";
        self.stopped_running(worker, task);
        if !self.is_processing_on(task, worker) {
            return None;
        }
        self.progress(worker);
        let t = self.tasks.get_mut(&task).expect("processing");
        let erred = if let Some(r) = t.rare.as_mut().filter(|r| r.retries_left > 0) {
            r.retries_left -= 1;
            self.set_state(task, TaskState::Ready);
            false
        } else {
            self.set_erred(task, task, ErrorKind::Exception);
            true
        };
        self.schedule();
        Some(erred)
    }

    /// Time passes (microseconds; called a few times a second). Finds
    /// stalled workers and takes their queued tasks back for idle ones.
    pub fn handle_tick(&mut self, now_us: u64) {
        self.stimulus = "tick";
        self.now_us = self.now_us.max(now_us);
        let steal_after = self.config.steal_after_us;
        let mut newly_stalled = false;
        for w in self.workers.values_mut() {
            let queued = w.busy() > w.nthreads;
            if !w.stalled && queued && self.now_us.saturating_sub(w.progress_us) >= steal_after {
                w.stalled = true;
                newly_stalled = true;
            }
        }
        if newly_stalled || self.workers.values().any(|w| w.stalled || w.paused) {
            self.steal();
        }
    }

    /// A worker answers a steal request: `ok` means it had not started the
    /// task and dropped it, so the task can go elsewhere.
    pub fn handle_steal_reply(&mut self, worker: WorkerId, task: TaskId, ok: bool) {
        self.stimulus = "steal-reply";
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let cancel = self.cancel_when_given.remove(&task);
        if !w.stealing.remove(&task) || !ok || !self.is_processing_on(task, worker) {
            return;
        }
        // Given back: it had not started.
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running.remove(&task);
        }
        self.set_state(task, TaskState::Ready);
        if cancel {
            self.set_erred(task, task, ErrorKind::Cancelled);
        }
        self.schedule();
    }

    /// A worker's execution threads took these tasks. Only started tasks
    /// count against `max_kills` when the worker dies; a task no longer
    /// the worker's (cancelled while the order travelled) runs anyway and
    /// keeps its threads busy until it reports.
    pub fn handle_tasks_started(&mut self, worker: WorkerId, tasks: &[TaskId]) {
        self.stimulus = "tasks-started";
        for &id in tasks {
            let mine = self.is_processing_on(id, worker);
            let threads = self.tasks.get(&id).map_or(1, |t| t.threads());
            let Some(w) = self.workers.get_mut(&worker) else {
                return;
            };
            if mine {
                w.running.insert(id);
            } else if w.zombies.insert(id, threads).is_none() {
                w.zombie_threads += threads;
            }
        }
    }

    /// `worker` could not reach the holder of `deps` (inputs of `task`) and
    /// dropped the task: it is placed again. After `max_kills` such
    /// failures the inputs are taken as lost and recomputed (a dead holder
    /// is normally found sooner, by its silence).
    pub fn handle_fetch_failed(&mut self, worker: WorkerId, task: TaskId, deps: &[TaskId]) {
        self.stimulus = "fetch-failed";
        if !self.is_processing_on(task, worker) {
            return;
        }
        let t = self.tasks.get_mut(&task).expect("processing");
        t.fetch_fails = t.fetch_fails.saturating_add(1);
        if t.fetch_fails >= self.config.max_kills {
            t.fetch_fails = 0;
            self.handle_missing_data(worker, task, deps);
            return;
        }
        self.set_state(task, TaskState::Ready);
        self.schedule();
    }

    // -------------------------------------------------------------- internals

    /// A report came for `task` from `worker`: it no longer runs there. A
    /// zombie's threads are free again.
    fn stopped_running(&mut self, worker: WorkerId, task: TaskId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.running.remove(&task);
        if let Some(n) = w.zombies.remove(&task) {
            w.zombie_threads -= n;
            self.schedule();
        }
    }

    fn progress(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.progress_us = self.now_us;
            w.stalled = false;
        }
    }

    /// Asks stalled workers for their queued tasks when another worker has
    /// free threads. Which assigned tasks are still queued only the worker
    /// knows: it is asked for all but the oldest `nthreads` and gives back
    /// those it has not started.
    fn steal(&mut self) {
        let free: usize = self
            .workers
            .values()
            .filter(|w| !w.stalled && !w.paused)
            .map(|w| w.nthreads.saturating_sub(w.busy()) as usize)
            .sum();
        if free == 0 {
            return;
        }
        for &wid in &self.worker_order {
            let w = &self.workers[&wid];
            if !(w.stalled || w.paused) || w.busy() <= w.nthreads {
                continue;
            }
            let mut ids: Vec<TaskId> = w
                .assigned
                .iter()
                .copied()
                .filter(|id| !w.running.contains(id))
                .collect();
            // Task ids grow with submission: of those not reported started,
            // the oldest are likely starting now (threads not known busy).
            ids.sort();
            let known = w.zombie_threads as usize + w.running.len();
            let ids: Vec<TaskId> = ids
                .into_iter()
                .skip((w.nthreads as usize).saturating_sub(known))
                .filter(|id| !w.stealing.contains(id))
                // One taking an input that cannot leave this worker stays.
                .filter(|id| self.pinned_holder(&self.tasks[id]) != Some(wid))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let w = self.workers.get_mut(&wid).expect("listed");
            w.stealing.extend(ids.iter().copied());
            self.actions.push(Action::Steal {
                worker: wid,
                tasks: ids,
            });
        }
    }

    /// Detached tasks that ended are no longer wanted for their own sake.
    fn settle_detached(&mut self) {
        while let Some(id) = self.detached_done.pop() {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            if t.state.is_pending() {
                continue; // running again (its result was lost)
            }
            t.wanted_by.retain(|c| *c != DETACHED);
            if t.wanted_by.is_empty() {
                self.maybe_release(id);
                self.maybe_forget(id);
            }
        }
    }

    fn is_processing_on(&self, task: TaskId, worker: WorkerId) -> bool {
        matches!(self.tasks.get(&task), Some(t) if t.state == TaskState::Processing(worker))
    }

    fn notify_one(&mut self, client: ClientId, id: TaskId) {
        if client == HELD {
            return;
        }
        if client == DETACHED {
            if matches!(
                self.tasks[&id].state,
                TaskState::Memory { .. } | TaskState::Erred { .. }
            ) {
                self.detached_done.push(id);
            }
            return;
        }
        match self.tasks[&id].state {
            TaskState::Memory { .. } => self.actions.push(Action::TaskMemory { client, task: id }),
            TaskState::Erred { cause, kind } => self.actions.push(Action::TaskErred {
                client,
                task: id,
                cause,
                kind,
            }),
            _ => {}
        }
    }

    /// Bring a Released task (and any Released inputs) back to Waiting/Ready.
    /// Iterative: lineage chains can be arbitrarily long.
    fn recompute(&mut self, root: TaskId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let t = &self.tasks[&id];
            if t.state != TaskState::Released {
                continue;
            }
            if t.once && t.ran {
                self.set_erred(id, id, ErrorKind::DataLost);
                continue;
            }
            let mut erred = None;
            let mut waiting = 0;
            for d in t.deps.iter() {
                match self.tasks[d].state {
                    TaskState::Memory { .. } => {}
                    TaskState::Erred { cause, kind } => erred = Some((cause, kind)),
                    TaskState::Released => {
                        waiting += 1;
                        stack.push(*d);
                    }
                    _ => waiting += 1,
                }
            }
            if let Some((cause, kind)) = erred {
                self.set_erred(id, cause, kind);
                continue;
            }
            self.tasks.get_mut(&id).expect("known").waiting_on = waiting;
            let to = if waiting == 0 {
                TaskState::Ready
            } else {
                TaskState::Waiting
            };
            self.set_state(id, to);
        }
    }

    fn log_transition(&mut self, task: TaskId, from: Option<TaskState>, to: Option<TaskState>) {
        self.transitions += 1;
        if self.config.log_capacity == 0 {
            return;
        }
        if self.log.len() == self.config.log_capacity {
            self.log.pop_front();
        } else if self.log.len() == self.log.capacity() {
            // Doubling, but never past the bound (a deque would round
            // 100,000 up to 131,072 slots: 2.5 MB for nothing).
            let want = (2 * self.log.len()).clamp(64, self.config.log_capacity);
            self.log.reserve_exact(want - self.log.len());
        }
        self.log.push_back(Transition {
            task,
            from,
            to,
            stimulus: self.stimulus,
            at_us: self.now_us,
        });
    }

    /// The single place where a task changes state: keeps worker bookkeeping,
    /// dependency counters, the ready queue and client notifications in step.
    fn set_state(&mut self, id: TaskId, to: TaskState) {
        let from = self.tasks.get(&id).expect("known task").state;
        if from == to {
            return;
        }
        self.log_transition(id, Some(from), Some(to));
        if matches!(from, TaskState::Processing(_)) {
            self.cancel_when_given.remove(&id); // it ran or moved meanwhile
        }
        if matches!(to, TaskState::Released | TaskState::Erred { .. }) {
            // Its result is gone (or will not come): it holds nothing.
            self.drop_holds(id);
        }
        if matches!(from, TaskState::Memory { .. })
            || matches!(to, TaskState::Released | TaskState::Erred { .. })
        {
            self.pinned.remove(&id);
        }
        let t = self.tasks.get_mut(&id).expect("known task");
        t.state = to;
        let counts = &mut self.groups[t.group as usize].counts;
        *counts.slot(from) -= 1;
        *counts.slot(to) += 1;
        // Leave `from`.
        match from {
            TaskState::Processing(wid) => {
                let est = t.est_us as u64;
                if let Some(w) = self.workers.get_mut(&wid) {
                    w.assigned.remove(&id);
                    w.threads_used -= t.threads();
                    // Still started there (no report came first): it runs
                    // on, holding its threads, though no longer wanted.
                    if w.running.remove(&id) && w.zombies.insert(id, t.threads()).is_none() {
                        w.zombie_threads += t.threads();
                    }
                    w.stealing.remove(&id);
                    w.queued_est_us = w.queued_est_us.saturating_sub(est);
                    for &(r, amount) in t.resources().iter() {
                        if let Some(u) = w.resources_used.iter_mut().find(|u| u.0 == r) {
                            u.1 -= amount;
                        }
                    }
                    reindex(&mut self.by_load, wid, w);
                }
            }
            TaskState::Memory {
                location: Location::Worker(w),
                ..
            } => {
                if let Some(w) = self.workers.get_mut(&w) {
                    w.has.remove(&id);
                }
            }
            _ => {}
        }
        // Enter `to`.
        match to {
            TaskState::Ready => {
                let entry = ReadyEntry {
                    priority: t.priority,
                    depth: t.depth,
                    id,
                };
                if t.resources().is_empty() && t.threads() == 1 && t.time_request_us() == 0 {
                    self.ready.push(entry)
                } else {
                    self.ready_constrained.push(entry)
                }
            }
            TaskState::Memory {
                location: Location::Worker(w),
                ..
            } => {
                if let Some(w) = self.workers.get_mut(&w) {
                    w.has.insert(id);
                }
            }
            _ => {}
        }
        let t = &self.tasks[&id];
        let deps_changed = from.is_pending() != to.is_pending();
        let in_memory = matches!(to, TaskState::Memory { .. });
        let left_memory = matches!(from, TaskState::Memory { .. });
        if in_memory || matches!(to, TaskState::Erred { .. }) {
            for i in 0..t.wanted_by.len() {
                let client = self.tasks[&id].wanted_by[i];
                self.notify_one(client, id);
            }
        }
        if deps_changed {
            let deps = self.tasks[&id].deps.clone();
            for d in deps.iter() {
                let dt = self.tasks.get_mut(d).expect("deps outlive dependents");
                if to.is_pending() {
                    dt.pending_dependents += 1;
                } else {
                    dt.pending_dependents -= 1;
                    self.maybe_release(*d);
                }
            }
        }
        if in_memory || left_memory {
            let dependents = self.tasks[&id].dependents.clone();
            for dep in dependents {
                let dt = self.tasks.get_mut(&dep).expect("linked");
                match dt.state {
                    TaskState::Waiting if in_memory => {
                        dt.waiting_on -= 1;
                        if dt.waiting_on == 0 {
                            self.set_state(dep, TaskState::Ready);
                        }
                    }
                    TaskState::Waiting => dt.waiting_on += 1,
                    TaskState::Ready if left_memory => {
                        dt.waiting_on = 1;
                        self.set_state(dep, TaskState::Waiting);
                    }
                    TaskState::Processing(w) if left_memory => {
                        // Its input vanished before or while it was fetched.
                        self.actions.push(Action::CancelCompute {
                            worker: w,
                            task: dep,
                            stop: false,
                        });
                        dt.waiting_on = 1;
                        self.set_state(dep, TaskState::Waiting);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Fail `id` and every unfinished task downstream of it.
    fn set_erred(&mut self, id: TaskId, cause: TaskId, kind: ErrorKind) {
        let mut stack = vec![id];
        while let Some(x) = stack.pop() {
            let t = &self.tasks[&x];
            match t.state {
                TaskState::Memory { .. } | TaskState::Erred { .. } => continue,
                TaskState::Processing(w) if x != id || kind == ErrorKind::Cancelled => {
                    self.actions.push(Action::CancelCompute {
                        worker: w,
                        task: x,
                        stop: kind == ErrorKind::Cancelled,
                    })
                }
                _ => {}
            }
            stack.extend(self.tasks[&x].dependents.iter().copied());
            self.set_state(x, TaskState::Erred { cause, kind });
        }
    }

    fn maybe_release(&mut self, id: TaskId) {
        let t = &self.tasks[&id];
        if let TaskState::Memory { location, .. } = t.state {
            if t.wanted_by.is_empty() && t.pending_dependents == 0 {
                let worker = match location {
                    Location::Worker(w) => Some(w),
                    Location::Inline => None,
                };
                self.set_state(id, TaskState::Released);
                self.actions.push(Action::ReleaseData { worker, task: id });
                self.maybe_forget(id);
            }
        }
    }

    /// Drop records nobody can reach any more: not wanted, no dependents.
    /// Unfinished tasks dropped this way are cancelled.
    fn maybe_forget(&mut self, root: TaskId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if !t.wanted_by.is_empty() || !t.dependents.is_empty() {
                continue;
            }
            match t.state {
                TaskState::Processing(w) => self.actions.push(Action::CancelCompute {
                    worker: w,
                    task: id,
                    stop: false,
                }),
                TaskState::Memory { location, .. } => {
                    let worker = match location {
                        Location::Worker(w) => Some(w),
                        Location::Inline => None,
                    };
                    self.actions.push(Action::ReleaseData { worker, task: id });
                }
                _ => {}
            }
            // Leaving the pending set adjusts the inputs' counters.
            self.set_state(id, TaskState::Released);
            let t = self.tasks.remove(&id).expect("present");
            self.groups[t.group as usize].counts.released -= 1;
            self.log_transition(id, Some(TaskState::Released), None);
            self.actions.push(Action::Forget { task: id });
            for d in t.deps.iter() {
                if let Some(dt) = self.tasks.get_mut(d) {
                    if let Some(pos) = dt.dependents.iter().position(|&x| x == id) {
                        dt.dependents.swap_remove(pos);
                    }
                    stack.push(*d);
                }
            }
        }
    }

    fn est_us(&self, group: u32) -> Option<u64> {
        self.groups
            .get(group as usize)
            .and_then(|g| g.mean_us)
            .map(|m| m.ceil() as u64)
    }

    /// Whether worker `w` can take a task now: a free thread, or room in its
    /// queue. `fetches`: the task needs inputs held by other workers.
    fn can_take(&self, w: &Worker, est: Option<u64>, fetches: bool) -> bool {
        let n = w.busy() as u64;
        let threads = w.nthreads as u64;
        if w.paused {
            return false;
        }
        if n < threads {
            return true;
        }
        if w.stalled {
            return false;
        }
        // One such task per thread may wait behind the running ones, whatever
        // its duration: its inputs then arrive while they run instead of
        // after (a 64 MiB input takes milliseconds even mapped).
        if fetches && n < 2 * threads {
            return true;
        }
        match est {
            Some(e) => {
                n < threads * self.config.max_queue_per_thread as u64
                    && w.queued_est_us + e <= threads * self.config.pipeline_budget_us
            }
            None => false,
        }
    }

    fn reindex(&mut self, wid: WorkerId) {
        if let Some(w) = self.workers.get_mut(&wid) {
            reindex(&mut self.by_load, wid, w);
        }
    }

    /// Place ready tasks, highest priority first, while some worker can take
    /// the next one. Prefers the worker holding most bytes of the inputs, then
    /// the least loaded.
    fn schedule(&mut self) {
        self.settle_detached();
        self.settle_unheld();
        if self.retiring > 0 {
            self.retire_step();
        }
        self.schedule_constrained();
        while let Some(id) = first_ready(&mut self.ready, &self.tasks) {
            let t = &self.tasks[&id];
            let est = self.est_us(t.group);
            // Bytes of its inputs on each worker holding some.
            let mut holders: Vec<(WorkerId, u64)> = Vec::new();
            for d in t.deps.iter() {
                if let TaskState::Memory {
                    location: Location::Worker(h),
                    size,
                } = self.tasks[d].state
                {
                    match holders.iter_mut().find(|(w, _)| *w == h) {
                        Some(e) => e.1 += size,
                        None => holders.push((h, size)),
                    }
                }
            }
            // An input that cannot leave its worker: only there, even if
            // that worker is busy (it queues there). Not if it is leaving:
            // then placed as any task, it fails saying why.
            if let Some(h) = self.pinned_holder(t) {
                if self
                    .workers
                    .get(&h)
                    .is_some_and(|w| w.retiring.is_none() && !w.retired)
                {
                    self.ready.pop();
                    self.place(id, h, est);
                    continue;
                }
            }
            // Most input bytes local, then least loaded, then joined first:
            // among the holders, and the least loaded others that can take it.
            let mut best: Option<(u64, u64, u64, WorkerId)> = None;
            let mut consider = |local: u64, load: u64, seq: u64, wid: WorkerId| {
                let better = match best {
                    None => true,
                    Some((bl, bload, bseq, _)) => {
                        local > bl || (local == bl && (load, seq) < (bload, bseq))
                    }
                };
                if better {
                    best = Some((local, load, seq, wid));
                }
            };
            for &(wid, local) in &holders {
                let Some(w) = self.workers.get(&wid) else {
                    continue;
                };
                let fetches = holders.iter().any(|&(h, _)| h != wid);
                if self.can_take(w, est, fetches) {
                    consider(local, load_of(w), w.seq, wid);
                }
            }
            let fetches = !holders.is_empty();
            for &(load, seq, wid) in self
                .by_load
                .iter()
                .filter(|(_, _, wid)| !holders.iter().any(|(h, _)| h == wid))
                .take(LOAD_SCAN)
            {
                if self.can_take(&self.workers[&wid], est, fetches) {
                    consider(0, load, seq, wid);
                    break;
                }
            }
            let Some((_, _, _, wid)) = best else {
                break;
            };
            self.ready.pop();
            self.place(id, wid, est);
        }
        // Tasks that erred just now (unsatisfiable) may be detached ones,
        // and letting go of those may let go of what they held.
        while !self.detached_done.is_empty() || !self.unheld.is_empty() {
            self.settle_detached();
            self.settle_unheld();
        }
    }

    /// Sends ready task `id` (just taken off the ready queue) to `wid`.
    fn place(&mut self, id: TaskId, wid: WorkerId, est: Option<u64>) {
        let est = est.unwrap_or(0);
        let t = self.tasks.get_mut(&id).expect("ready");
        t.est_us = est.min(u32::MAX as u64) as u32;
        let now = self.now_us;
        let w = self.workers.get_mut(&wid).expect("chosen");
        if w.assigned.is_empty() {
            w.progress_us = now;
        }
        w.assigned.insert(id);
        w.threads_used += 1;
        w.queued_est_us += est;
        reindex(&mut self.by_load, wid, w);
        self.set_state(id, TaskState::Processing(wid));
        self.actions.push(Action::Compute {
            worker: wid,
            task: id,
        });
    }

    /// Places ready tasks that need resources, highest priority first, each
    /// on a worker with a free thread and the resources free; stops at the
    /// first that must wait. One that no worker ever offered enough for
    /// fails at once (with no workers at all, it waits for some; one whose
    /// worker left waits for a replacement).
    fn schedule_constrained(&mut self) {
        while let Some(id) = first_ready(&mut self.ready_constrained, &self.tasks) {
            let t = &self.tasks[&id];
            let need = t.resources();
            let amount_in =
                |list: &[(u32, f64)], r: u32| list.iter().find(|x| x.0 == r).map_or(0.0, |x| x.1);
            let covers =
                |offer: &[(u32, f64)]| need.iter().all(|&(r, a)| amount_in(offer, r) >= a - 1e-9);
            // Whether `w` has `need` free now.
            let fits = |w: &Worker| {
                need.iter().all(|&(r, a)| {
                    amount_in(&w.resources, r) - amount_in(&w.resources_used, r) >= a - 1e-9
                })
            };
            let threads = t.threads();
            // A worker that leaves before the task's time request is up
            // is no place for it (it waits for one that lives longer).
            let until = (t.time_request_us() > 0).then(|| self.now_us + t.time_request_us());
            let lives = |w: &Worker| match (until, w.expires_us) {
                (Some(u), Some(e)) => e >= u,
                _ => true,
            };
            // Unsatisfiable: workers are there, and no worker ever offered
            // enough (resources, or threads).
            let never = (!need.is_empty() && !self.offers_seen.iter().any(|o| covers(o)))
                || threads > self.max_threads_seen;
            if !self.workers.is_empty() && never {
                self.ready_constrained.pop();
                self.set_erred(id, id, ErrorKind::Unsatisfiable);
                continue;
            }
            let mut best: Option<(usize, WorkerId)> = None;
            for &wid in &self.worker_order {
                let w = &self.workers[&wid];
                if w.paused || w.busy() + threads > w.nthreads || !fits(w) || !lives(w) {
                    continue;
                }
                if best.is_none_or(|(n, _)| w.assigned.len() < n) {
                    best = Some((w.assigned.len(), wid));
                }
            }
            let Some((_, wid)) = best else {
                break;
            };
            self.ready_constrained.pop();
            let need: Box<[(u32, f64)]> = self.tasks[&id].resources().into();
            let w = self.workers.get_mut(&wid).expect("chosen");
            for (r, amount) in need.iter() {
                if let Some(u) = w.resources_used.iter_mut().find(|u| u.0 == *r) {
                    u.1 += amount;
                }
            }
            if w.assigned.is_empty() {
                w.progress_us = self.now_us;
            }
            w.assigned.insert(id);
            w.threads_used += threads;
            reindex(&mut self.by_load, wid, w);
            self.tasks.get_mut(&id).expect("ready").est_us = 0;
            self.set_state(id, TaskState::Processing(wid));
            self.actions.push(Action::Compute {
                worker: wid,
                task: id,
            });
        }
    }

    /// Checks every invariant of the state; panics with a description of the
    /// first violation. Run after every event in tests.
    pub fn check_invariants(&self) {
        // The load index holds exactly the workers not paused, at their load.
        let want: BTreeSet<(u64, u64, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.paused)
            .map(|(&id, w)| (load_of(w), w.seq, id))
            .collect();
        assert_eq!(self.by_load, want, "load index drifted");
        for by in self.holds.keys() {
            assert!(
                self.tasks.contains_key(by),
                "{by:?}: forgotten, still holds"
            );
        }
        for id in self.pinned.keys() {
            assert!(
                self.tasks.contains_key(id),
                "{id:?}: forgotten, still pinned"
            );
        }
        let retiring = self
            .workers
            .values()
            .filter(|w| w.retiring.is_some())
            .count();
        assert_eq!(self.retiring, retiring, "retiring count drifted");
        // The per-group counters match a recount.
        let mut recount = vec![GroupCounts::default(); self.groups.len()];
        for t in self.tasks.values() {
            *recount[t.group as usize].slot(t.state) += 1;
        }
        for (g, (stats, want)) in self.groups.iter().zip(recount).enumerate() {
            let live = stats.counts.by_state();
            assert_eq!(live, want.by_state(), "group {g}: counters drifted");
        }
        for (&id, t) in &self.tasks {
            assert!(
                !(t.once && t.ran)
                    || matches!(
                        t.state,
                        TaskState::Memory { .. } | TaskState::Released | TaskState::Erred { .. }
                    ),
                "{id:?}: scattered data that ran is {:?} (it can never run again)",
                t.state
            );
            let mut not_in_memory = 0;
            let mut pending_count = 0;
            for d in t.deps.iter() {
                let dt = self
                    .tasks
                    .get(d)
                    .unwrap_or_else(|| panic!("{id:?}: dep {d:?} missing"));
                assert!(
                    dt.dependents.contains(&id),
                    "{id:?} not in dependents of {d:?}"
                );
                if !matches!(dt.state, TaskState::Memory { .. }) {
                    not_in_memory += 1;
                }
            }
            for dep in &t.dependents {
                let dt = self
                    .tasks
                    .get(dep)
                    .unwrap_or_else(|| panic!("{id:?}: dependent {dep:?} missing"));
                assert!(dt.deps.contains(&id), "{dep:?} lacks dep {id:?}");
                if dt.state.is_pending() {
                    pending_count += 1;
                }
            }
            assert_eq!(
                t.pending_dependents, pending_count,
                "{id:?}: pending_dependents"
            );
            assert!(
                !t.wanted_by.is_empty() || !t.dependents.is_empty(),
                "{id:?} should have been forgotten"
            );
            assert!(
                t.wanted_by.contains(&HELD) == self.held.contains_key(&id)
                    || self.unheld.contains(&id),
                "{id:?}: held interest without a holder, or the reverse"
            );
            assert!(
                !t.wanted_by.contains(&DETACHED)
                    || t.state.is_pending()
                    || self.detached_done.contains(&id),
                "{id:?}: detached interest outlives the run ({:?})",
                t.state
            );
            match t.state {
                TaskState::Waiting => {
                    assert!(not_in_memory > 0, "{id:?} waiting with all deps in memory");
                    assert_eq!(t.waiting_on, not_in_memory, "{id:?}: waiting_on");
                }
                TaskState::Ready => assert_eq!(not_in_memory, 0, "{id:?} ready too early"),
                TaskState::Processing(w) => {
                    assert_eq!(not_in_memory, 0, "{id:?} processing without inputs");
                    let w = self.workers.get(&w).expect("processing on unknown worker");
                    assert!(w.assigned.contains(&id), "{id:?} not assigned");
                }
                TaskState::Memory { location, .. } => {
                    if let Location::Worker(w) = location {
                        let w = self.workers.get(&w).expect("memory on unknown worker");
                        assert!(w.has.contains(&id), "{id:?} not in has");
                    }
                    assert!(
                        !t.wanted_by.is_empty() || t.pending_dependents > 0,
                        "{id:?} in memory but unneeded"
                    );
                }
                TaskState::Erred { .. } | TaskState::Released => {}
            }
        }
        for id in &self.cancel_when_given {
            let asked = match self.tasks.get(id).map(|t| t.state) {
                Some(TaskState::Processing(w)) => self.workers[&w].stealing.contains(id),
                _ => false,
            };
            assert!(
                asked,
                "{id:?}: to cancel when given back, but not asked for"
            );
        }
        for (wid, w) in &self.workers {
            assert!(
                !w.retired || (w.paused && w.assigned.is_empty() && w.retiring.is_none()),
                "{wid:?}: retired but gets work"
            );
            for id in &w.assigned {
                assert_eq!(self.tasks[id].state, TaskState::Processing(*wid));
            }
            for id in &w.stealing {
                assert!(
                    w.assigned.contains(id),
                    "{id:?} asked back but not assigned"
                );
            }
            for id in &w.has {
                assert!(matches!(
                    self.tasks[id].state,
                    TaskState::Memory { location: Location::Worker(h), .. } if h == *wid
                ));
            }
            let threads: u32 = w.assigned.iter().map(|id| self.tasks[id].threads()).sum();
            assert_eq!(threads, w.threads_used, "{wid:?} thread count");
            for id in &w.running {
                assert!(w.assigned.contains(id), "{id:?} running but not assigned");
            }
            let zombie: u32 = w.zombies.values().sum();
            assert_eq!(zombie, w.zombie_threads, "{wid:?} zombie threads");
            for &(r, used) in &w.resources_used {
                let held: f64 = w
                    .assigned
                    .iter()
                    .flat_map(|id| self.tasks[id].resources().iter())
                    .filter(|x| x.0 == r)
                    .map(|x| x.1)
                    .sum();
                assert!(
                    (held - used).abs() < 1e-6,
                    "{wid:?} resource {r}: {used} != {held}"
                );
                let total = w.resources.iter().find(|x| x.0 == r).map_or(0.0, |x| x.1);
                assert!(used <= total + 1e-6, "{wid:?} resource {r} overcommitted");
            }
        }
        let queued: FxHashSet<TaskId> = self
            .ready
            .iter()
            .chain(self.ready_constrained.iter())
            .map(|e| e.id)
            .collect();
        for (&id, t) in &self.tasks {
            if t.state == TaskState::Ready {
                assert!(queued.contains(&id), "{id:?} ready but not queued");
            }
        }
    }
}

/// Load as a fraction of threads, scaled to compare integers.
fn load_of(w: &Worker) -> u64 {
    (w.assigned.len() as u64 * 1024) / w.nthreads as u64
}

/// Puts `w` at its place in `by_load` (out of it while paused).
fn reindex(by_load: &mut BTreeSet<(u64, u64, WorkerId)>, wid: WorkerId, w: &mut Worker) {
    let key = (!w.paused).then(|| load_of(w));
    if key != w.load_key {
        if let Some(k) = w.load_key {
            by_load.remove(&(k, w.seq, wid));
        }
        if let Some(k) = key {
            by_load.insert((k, w.seq, wid));
        }
        w.load_key = key;
    }
}

/// Workers looked at in load order for a task, besides its inputs' holders:
/// the least loaded that can take it is almost always the first.
const LOAD_SCAN: usize = 8;

/// The id of the heap's first entry still Ready, dropping stale entries
/// (tasks that left Ready, or were forgotten, after they were pushed).
fn first_ready<S>(
    heap: &mut BinaryHeap<ReadyEntry>,
    tasks: &FxHashMap<TaskId, Box<Task<S>>>,
) -> Option<TaskId> {
    while let Some(top) = heap.peek() {
        if tasks
            .get(&top.id)
            .is_some_and(|t| t.state == TaskState::Ready)
        {
            return Some(top.id);
        }
        heap.pop();
    }
    None
}

#[cfg(test)]
mod tests;
