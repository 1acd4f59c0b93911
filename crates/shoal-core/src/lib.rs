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
//! [`worker::WorkerState`]. A restarted scheduler's recovery (restored tasks,
//! rejoined workers' results, resumed clients) is the third:
//! [`recovery::Recovery`].

#![warn(missing_docs, unreachable_pub)]

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::fmt;

// The scheduler's rules, by concern (each an `impl Core` of its own).
mod clients;
mod invariants;
mod lifecycle;
pub mod memory;
mod placement;
pub mod recovery;
mod reports;
pub mod worker;
mod worker_pool;

use placement::{load_of, reindex};

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
    /// While a stalled or paused worker has queued tasks and another has a
    /// free thread, taking them back is tried again this often (a steal
    /// the worker refused, a task that cannot leave yet).
    pub steal_retry_us: u64,
    /// A task with no inputs on workers (a root) is placed beside the other
    /// inputs of its consumers, when they have few: a transpose's chunk
    /// beside its partner, a join's two partitions together.
    pub place_partners: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_kills: 3,
            pipeline_budget_us: 2_000,
            max_queue_per_thread: 512,
            log_capacity: 0,
            steal_after_us: 200_000,
            steal_retry_us: 50_000,
            place_partners: true,
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
    /// A batch's element that was running when its worker last died: its
    /// kills count only while they happen at the same element.
    kill_item: Option<u32>,
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
    /// Moving average of what fetching a MiB of one of its results took
    /// (pickling a frame on its holder included), None until one moved.
    move_us_per_mib: Option<f64>,
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
    /// Last time given by `set_clock` or `handle_tick` (microseconds, any
    /// origin).
    now_us: u64,
    /// When `handle_tick` last ran (for [`Core::poll_timeout`]).
    ticked_us: u64,
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
            ticked_us: 0,
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

    /// A worker fetched `bytes` of `task`'s result in `duration_us`: what
    /// moving its group's results costs, for placement (a task waits for
    /// the worker holding its inputs when moving them would take longer).
    /// Transfers under a MiB say more about latency than about bytes.
    pub fn handle_transfer(&mut self, task: TaskId, bytes: u64, duration_us: u64) {
        if bytes < 1 << 20 {
            return;
        }
        let Some(group) = self.tasks.get(&task).map(|t| t.group) else {
            return;
        };
        let g = &mut self.groups[group as usize];
        let r = duration_us as f64 * (1u64 << 20) as f64 / bytes as f64;
        g.move_us_per_mib = Some(g.move_us_per_mib.map_or(r, |m| 0.8 * m + 0.2 * r));
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
}

#[cfg(test)]
mod tests;
