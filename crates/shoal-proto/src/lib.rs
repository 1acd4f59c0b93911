//! # shoal-proto: what travels between clients, the scheduler and workers
//!
//! Every connection starts with a [`Hello`] frame naming the protocol version
//! and the peer's role, answered by a [`Welcome::Challenge`] the peer answers
//! with a [`Proof`] (mutual challenge-response over the cluster's shared
//! secret, which never travels), then a [`Welcome`]; after that each frame holds
//! a *batch* of messages (`Vec<FromClient>`, `Vec<ToWorker>`, ...), so a
//! burst of ten thousand task submissions costs one write, not ten thousand.
//!
//! Frames are `u32` length-prefixed (the services use tokio-util's codec with
//! [`MAX_FRAME`]); bodies are postcard-encoded serde values. Payloads (pickled
//! functions, arguments, results) are opaque bytes here: this crate knows
//! nothing of Python, sockets or async runtimes.

#![warn(missing_docs, unreachable_pub)]

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bumped on every incompatible change (9: command tasks, jobs, time
/// limits); peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 13;
/// First field of every handshake, so a stray peer is recognised at once.
pub const MAGIC: u32 = 0x5348_4f4c; // "SHOL"
/// Largest frame accepted (a frame larger than this closes the connection).
pub const MAX_FRAME: usize = 1 << 30;
/// Results whose pickle is at most this many bytes travel inline with the
/// control message and are kept by the scheduler; larger ones stay on the
/// worker that made them and are fetched from it.
pub const INLINE_LIMIT: usize = 64 * 1024;

/// First frame on every connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// Must be [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Who is connecting.
    pub role: Role,
    /// Fresh random bytes: the server proves it knows the secret over them.
    pub nonce: [u8; 32],
}

/// The connecting peer's answer to [`Welcome::Challenge`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Proof {
    /// HMAC-SHA256 over the server's nonce, the peer's nonce and its hello.
    pub mac: [u8; 32],
}

/// The connecting peer's role.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Role {
    /// A client that submits tasks and reads results.
    Client,
    /// A worker process.
    Worker {
        /// Execution threads.
        nthreads: u32,
        /// Address of its data server, for peers and clients to fetch results.
        data_addr: String,
        /// Human-readable name.
        name: String,
        /// OS process id.
        pid: u32,
        /// Resources it offers to tasks, e.g. `[("GPU", 2.0)]`.
        resources: Vec<(String, f64)>,
        /// When it will retire (microseconds since the Unix epoch; 0: no
        /// limit), e.g. before its batch job's walltime.
        lifetime_end_us: u64,
        /// The supervisor that started it (random, nonzero), which reports
        /// its death with [`Role::Obituary`]; 0: none will.
        supervisor: u64,
    },
    /// A peer fetching results from a worker's data server.
    Data,
    /// A supervisor saying that one of its worker processes died, and which
    /// tasks its threads were running then (read from memory it shares with
    /// the worker): only those are to blame. Nothing follows the handshake.
    Obituary {
        /// The supervisor's [`Role::Worker::supervisor`].
        supervisor: u64,
        /// The dead worker's process id.
        pid: u32,
        /// Tasks it was running, each with the element of a batch that
        /// was running (when the worker was asked to say: see
        /// [`ToWorker::Compute::careful`]).
        running: Vec<(u64, Option<u32>)>,
    },
}

/// Answer to a [`Hello`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Welcome {
    /// First answer to a valid hello: prove you know the secret over
    /// `nonce`; `proof` is the server's own proof over the peer's nonce.
    Challenge {
        /// Fresh random bytes.
        nonce: [u8; 32],
        /// HMAC-SHA256 over the peer's nonce and `nonce`.
        proof: [u8; 32],
    },
    /// Accepted; `id` is the client or worker id assigned by the scheduler.
    Accepted {
        /// Assigned id.
        id: u32,
    },
    /// Refused, with the reason (then the connection closes).
    Rejected {
        /// What was wrong.
        reason: String,
    },
}

/// How a task's function is applied.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// `func(*args, **kwargs)`.
    Call,
    /// `args` is a list of argument tuples; the result is the list of
    /// `func(*a)` (one task for many map elements).
    Batch,
    /// A program: `func` is empty, `args` is a postcard [`CommandSpec`].
    Command,
}

/// Where a command task's output goes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// Kept and returned with the result (Python's `submit_command`).
    Capture,
    /// Dropped (`/dev/null`).
    Null,
    /// A file; `%{JOB_ID}`, `%{TASK_ID}` and `%{CWD}` are replaced, missing
    /// directories are made, a relative path is taken from the task's cwd.
    File(String),
}

/// A program run as a task (a command task, one entry of a task array).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments (the program is looked up in `PATH`).
    pub argv: Vec<String>,
    /// Variables set on top of the worker's environment.
    pub env: Vec<(String, String)>,
    /// Working directory (None: the worker's).
    pub cwd: Option<String>,
    /// Standard output.
    pub stdout: OutputTarget,
    /// Standard error (its tail goes into the error of a failing task).
    pub stderr: OutputTarget,
    /// The task's id within its job (`SHOAL_TASK_ID`): the array index.
    pub task: u64,
    /// This task's entry of `--each-line`/`--from-json` (`SHOAL_ENTRY`).
    pub entry: Option<String>,
}

impl CommandSpec {
    /// The bytes that go in [`TaskSpec::args`].
    pub fn encode(&self) -> Bytes {
        Bytes::from(encode(self))
    }
}

/// A task as a client submits it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Client-allocated id (`client id << 40 | sequence`).
    pub id: u64,
    /// Group name, usually the function's name; also names the task.
    pub group: String,
    /// User-given key, if any (otherwise the name is `group-<id hex>`).
    pub key: Option<String>,
    /// Call or batch.
    pub kind: TaskKind,
    /// Pickled function.
    pub func: Bytes,
    /// Pickled `(args, kwargs)` (or list of args for a batch).
    pub args: Bytes,
    /// Tasks whose results are inputs.
    pub deps: Vec<u64>,
    /// Higher first.
    pub priority: i32,
    /// Re-runs allowed after an exception.
    pub retries: u32,
    /// Resources held while it runs, e.g. `[("GPU", 1.0)]`.
    pub resources: Vec<(String, f64)>,
    /// False for data put on the cluster (`scatter`, `put`): it cannot be
    /// recomputed, so losing its holder is an error for whoever needs it.
    pub recompute: bool,
    /// Milliseconds a run may take before the worker stops it and the task
    /// fails with a timeout (0: no limit).
    pub time_limit_ms: u64,
    /// Workers that may die while running it before it fails as
    /// KilledWorker (0: the scheduler's default, 3).
    pub crash_limit: u8,
    /// Milliseconds it expects to run (0: unknown): it is placed only on a
    /// worker whose lifetime has at least that long left.
    pub time_request_ms: u64,
}

impl TaskSpec {
    /// The name users see in errors and logs.
    pub fn name(&self) -> String {
        task_name(self.key.as_deref(), &self.group, self.id)
    }
}

/// `key` if given, else `group-<id in hex>`; the Python client derives the
/// same string for `Future.key`.
pub fn task_name(key: Option<&str>, group: &str, id: u64) -> String {
    match key {
        Some(k) => k.to_string(),
        None => format!("{group}-{id:x}"),
    }
}

/// Empties the `func` of each task whose function is the previous one's
/// (the sender's side of [`FromClient::Submit`]'s rule).
pub fn share_funcs(specs: &mut [TaskSpec]) {
    let mut last: Option<Bytes> = None;
    for s in specs {
        let same = last.as_ref().is_some_and(|l| {
            l.len() == s.func.len() && (l.as_ptr() == s.func.as_ptr() || *l == s.func)
        });
        if same {
            s.func = Bytes::new();
        } else {
            last = Some(s.func.clone());
        }
    }
}

/// Gives each task with an empty `func` the previous one's (the
/// receiver's side of [`FromClient::Submit`]'s rule; shared, not copied).
/// One with no previous task keeps its empty function (it fails when it
/// runs, saying its function cannot be unpickled).
pub fn fill_funcs(specs: &mut [TaskSpec]) {
    let mut last = Bytes::new();
    for s in specs {
        if s.func.is_empty() {
            s.func = last.clone();
        } else {
            last = s.func.clone();
        }
    }
}

/// Messages from a client to the scheduler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum FromClient {
    /// New tasks. A task's `func` may be empty: the function is
    /// the previous task's in the same message (a `map` sends its pickle
    /// once, not once per task; see [`fill_funcs`]).
    Submit(Vec<TaskSpec>),
    /// Futures dropped.
    Release(Vec<u64>),
    /// Cancel unfinished tasks.
    Cancel(Vec<u64>),
    /// Run these tasks to their end even if it releases them.
    Detach(Vec<u64>),
    /// Alive (every second; a client silent for the heartbeat
    /// timeout is taken as gone, like a worker).
    Alive,
    /// No worker will offer this resource again (an actor is gone).
    Withdraw(String),
    /// A worker offering one of this resource is starting (an actor).
    Expect(String),
    /// What the cluster looks like (answered by [`ToClient::Info`]).
    Info,
    /// Retire these workers (data addresses or names) gracefully.
    Retire(Vec<String>),
    /// Restart every worker process (their nannies start new ones).
    Restart,
    /// Say again where these finished tasks are (a fetch failed);
    /// answered with `Memory`/`Erred` for those done, later for the rest.
    Where(Vec<u64>),
    /// A dashboard query (the same paths as the HTTP API, e.g.
    /// `/api/status`); answered by [`ToClient::QueryReply`].
    Query {
        /// Chosen by the client, echoed in the reply.
        id: u64,
        /// Path and query string.
        path: String,
    },
    /// Cancel these tasks unless a worker has started them (as
    /// reported so far); started ones run to their end.
    CancelQueued(Vec<u64>),
    /// Claims a cluster-wide name for `value` (Some; refused if
    /// the name is held), or looks it up (None). Answered by
    /// [`ToClient::QueryReply`]: `{"ok": true}`, `{"error": ...}` or
    /// `{"value": ...}`. A client's names go with it.
    Name {
        /// Chosen by the client, echoed in the reply.
        id: u64,
        /// The name.
        name: String,
        /// What it names (JSON text), or None to look it up.
        value: Option<String>,
    },
    /// Gives up one of its names.
    Unname(String),
    /// A job of command tasks (`shoal submit`): the scheduler owns
    /// them (they run on after the client leaves) and keeps each one's
    /// outcome. Answered by [`ToClient::QueryReply`]: `{"job": N}` or
    /// `{"error": ...}`.
    SubmitJob {
        /// Chosen by the client, echoed in the reply.
        query: u64,
        /// Shown in `shoal job list` and as the dashboard's task group.
        name: String,
        /// Cancel what is left once this many tasks failed (0: never).
        max_fails: u32,
        /// The tasks; each [`CommandSpec::task`] is unique within the job.
        tasks: Vec<TaskSpec>,
        /// More of the job's tasks follow, in further `SubmitJob`s with the
        /// same `query` (a big job travels in pieces: frames stay small and
        /// the client's heartbeats get through between them).
        more: bool,
    },
    /// Cancel the unfinished tasks of a job (running ones are
    /// stopped). Answered like a query: `{"cancelled": n}` or `{"error": ...}`.
    CancelJob {
        /// Chosen by the client, echoed in the reply.
        query: u64,
        /// The job.
        job: u32,
    },
    /// First on a connection made again after the scheduler was
    /// lost: the id it had (its task ids are `id << 40 | n`, and it goes
    /// on making them so).
    Resume(u32),
    /// After `Resume`: the tasks it still holds, in submission
    /// order, each with its value when the client has it inline. Those
    /// whose results a rejoined worker (or the value) still has start
    /// finished; the rest run again.
    Resubmit(Vec<(TaskSpec, Option<Bytes>)>),
    /// Client (a worker's, inside a task): the result of task `by` holds
    /// futures of these tasks (the task returns futures it made). They stay
    /// alive as long as that result does, so whoever gets it can claim them
    /// (`Adopt`). Sent before the client can release them.
    Hold {
        /// The task whose result holds the references.
        by: u64,
        /// The tasks referred to.
        tasks: Vec<u64>,
    },
    /// Claims tasks it did not submit, whose futures it found in a
    /// result; answered like a submission (`Memory`/`Erred` when they end),
    /// and with `Erred` (`MissingDependency` naming the task itself) for
    /// those the scheduler no longer knows.
    Adopt(Vec<u64>),
}

/// Messages from a worker to the scheduler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// A task finished. `value` is the pickled result if small enough
    /// to travel inline; otherwise the worker keeps it.
    Finished {
        /// Task.
        id: u64,
        /// Pickled size in bytes.
        size: u64,
        /// Inline result.
        value: Option<Bytes>,
        /// When and where it ran.
        timing: Timing,
    },
    /// A task raised (or its inputs or result could not be moved).
    Failed {
        /// Task.
        id: u64,
        /// Pickled `(exception, traceback text)`.
        error: Bytes,
        /// The exception and traceback as text (for dashboards).
        text: String,
        /// When and where it ran.
        timing: Timing,
    },
    /// These tasks asked back by `Steal` were not started and are dropped.
    Stolen(Vec<u64>),
    /// Its execution threads took these tasks (sent before their
    /// results): only started tasks are suspects when the worker dies.
    Started(Vec<u64>),
    /// Everything it had to report up to the `Sync` with this id
    /// (profile samples, transfers, results) is sent.
    Synced(u64),
    /// The holder of these inputs of `task` could not be reached;
    /// the task was dropped (the scheduler places it again).
    FetchFailed {
        /// The task whose inputs could not be fetched.
        task: u64,
        /// The inputs.
        deps: Vec<u64>,
    },
    /// Its number of execution threads is now this (a task waiting
    /// on other tasks lends its thread).
    Threads(u32),
    /// The holder of these inputs of `task` answered that it does
    /// not have them; the task was dropped and waits for them to be
    /// recomputed.
    Missing {
        /// The task whose inputs could not be fetched.
        task: u64,
        /// The inputs the holder lacks.
        deps: Vec<u64>,
    },
    /// Alive, and how its memory stands (every second; a worker
    /// silent for the heartbeat timeout is taken as lost).
    Heartbeat(WorkerMetrics),
    /// Retire me gracefully (it got SIGTERM).
    RetireMe,
    /// The copy asked by `Replicate` is done (`ok`) or failed.
    Replicated {
        /// The result.
        id: u64,
        /// Whether this worker now holds it.
        ok: bool,
    },
    /// Its memory is above the pause fraction (true: give it no
    /// more work, take back what it has queued) or back below (false).
    Paused(bool),
    /// What happened since the last one (sent with heartbeats when
    /// there is anything): transfers and spills, profile samples, log lines.
    Telemetry(Telemetry),
    /// A task it was told to stop does not stop (stuck in C code):
    /// restart me. Its other tasks are not to blame (sent after the stuck
    /// task's failure; answered with [`ToWorker::Restart`]).
    RestartMe,
    /// First message on a connection made again after it lost its
    /// scheduler (`shoal worker --reconnect`): the tasks it still runs, and
    /// its `Finished`/`Failed` reports the lost scheduler had not
    /// acknowledged ([`ToWorker::Ack`]), which count as the first
    /// reports of this connection. A scheduler restored from its journal
    /// adopts those tasks instead of running them again.
    Rejoin {
        /// Tasks its threads run now.
        running: Vec<u64>,
        /// Reports not acknowledged, in the order they were first sent.
        reports: Vec<FromWorker>,
        /// Results it still holds, with their sizes: a client that comes
        /// back resubmits their tasks, which then do not run again.
        held: Vec<(u64, u64)>,
    },
    /// Before the task's report: its result cannot be pickled, so
    /// it cannot leave this worker; tasks that take it are to run here.
    Pinned(u64),
    /// Elements `from..` of a careful batch (see
    /// [`ToWorker::Compute::careful`]) are done; `values` is their
    /// pickled outcome. The scheduler keeps it, and a later run of the
    /// batch (its worker died) resumes after them
    /// ([`ToWorker::Compute::resume`]).
    Progress {
        /// The batch task.
        id: u64,
        /// Its first element in `values`.
        from: u32,
        /// How many elements `values` has.
        count: u32,
        /// Pickled outcomes of the elements.
        values: Bytes,
    },
    /// Its recent steps of a task, answering
    /// [`ToWorker::Story`] `query`.
    Story {
        /// The question's id.
        query: u64,
        /// Oldest first.
        steps: Vec<WorkerStep>,
    },
}

/// One step in a task's life on a worker (its order machine's log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStep {
    /// The order it concerns (0: none).
    pub attempt: u64,
    /// What happened (`compute`, `fetch`, `fetched`, `start`, `done`,
    /// `cancel`, `stolen`, `missing`, `unreachable`, ...).
    pub event: String,
    /// Where the order stands after it (`fetching`, `ready`, `running`;
    /// None: gone from the worker).
    pub phase: Option<String>,
    /// When (Unix microseconds, the worker's clock).
    pub at_us: u64,
}

/// When and on which thread a task ran (the worker's clock).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Start, microseconds since the Unix epoch.
    pub start_us: u64,
    /// Execution time.
    pub duration_us: u64,
    /// The worker's execution thread (0..): a lane in the task stream.
    pub thread: u32,
}

/// Something a worker did besides running tasks.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityKind {
    /// Fetched an input from a peer.
    Transfer,
    /// Wrote results to disk.
    Spill,
}

/// One transfer or spill, for the task stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// What.
    pub kind: ActivityKind,
    /// The task whose data moved (0: several or unknown).
    pub task: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Start, microseconds since the Unix epoch.
    pub start_us: u64,
    /// How long it took.
    pub duration_us: u64,
}

/// A worker's news since its last heartbeat.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Telemetry {
    /// Transfers and spills.
    pub activity: Vec<Activity>,
    /// Profile samples: `(task group, folded stack "f;g;h", count)`.
    pub profile: Vec<(String, String, u32)>,
    /// Log lines.
    pub logs: Vec<String>,
}

/// A worker's memory, as its memory manager sees it.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct WorkerMetrics {
    /// Process memory: private resident memory plus its shared segments.
    pub memory: u64,
    /// Bytes of results it holds in memory.
    pub managed: u64,
    /// Bytes of results it holds spilled to disk.
    pub spilled: u64,
    /// Its memory limit (0: none).
    pub limit: u64,
    /// Paused for memory.
    pub paused: bool,
    /// CPU use since the last heartbeat, percent of one core.
    pub cpu: f32,
    /// Bytes this worker fetched from peers, in all.
    pub bytes_in: u64,
    /// Bytes its data server sent, in all.
    pub bytes_out: u64,
    /// Bytes it wrote to disk spilling, in all.
    pub spilled_total: u64,
}

/// One worker in [`ClusterInfo`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// Scheduler-assigned id.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its data server's address.
    pub address: String,
    /// Its OS process id.
    pub pid: u32,
    /// Execution threads.
    pub nthreads: u32,
    /// Resources it offers.
    pub resources: Vec<(String, f64)>,
    /// Tasks assigned to it (running or queued).
    pub processing: u64,
    /// Results it holds.
    pub held: u64,
    /// Its last heartbeat's figures.
    pub metrics: WorkerMetrics,
    /// Milliseconds since it was last heard from.
    pub last_seen_ms: u64,
    /// When it retires (microseconds since the Unix epoch; 0: no limit).
    pub lifetime_end_us: u64,
}

/// The answer to [`FromClient::Info`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ClusterInfo {
    /// Scheduler address.
    pub address: String,
    /// Connected clients.
    pub clients: u32,
    /// Tasks the scheduler knows.
    pub tasks: u64,
    /// Workers, by id.
    pub workers: Vec<WorkerInfo>,
    /// The dashboard's URL (without the token), empty if there is none.
    pub dashboard: String,
    /// Task groups with tasks, by first submission.
    pub groups: Vec<GroupInfo>,
}

/// One task group in [`ClusterInfo`]: tasks by state, and totals.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct GroupInfo {
    /// Its name (usually the function's).
    pub name: String,
    /// Tasks waiting for inputs or a thread.
    pub waiting: u64,
    /// Tasks sent to workers.
    pub processing: u64,
    /// Results held.
    pub memory: u64,
    /// Failed tasks.
    pub erred: u64,
    /// Finished, result dropped.
    pub released: u64,
    /// Tasks submitted, in all.
    pub submitted: u64,
    /// Runs that finished, in all.
    pub finished: u64,
    /// Summed execution time of those runs, microseconds.
    pub total_us: u64,
}

/// Where a task input is to be found.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum DepSource {
    /// The pickled value itself.
    Inline(Bytes),
    /// On a worker (possibly the receiving one).
    Worker {
        /// Holder's id.
        id: u32,
        /// Holder's data address.
        addr: String,
    },
}

/// An input of a task sent to a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Dep {
    /// Input task.
    pub id: u64,
    /// Where its value is.
    pub source: DepSource,
}

/// Why a task failed, as a client is told.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum TaskError {
    /// The task (or the named cause) raised; pickled `(exception, traceback)`.
    Exception {
        /// Name of the task that raised.
        cause: String,
        /// Pickled exception and traceback text.
        error: Bytes,
    },
    /// The named task was running on `kills` workers that died.
    KilledWorker {
        /// Task name.
        cause: String,
        /// Workers lost while running it.
        kills: u8,
    },
    /// Cancelled (itself or the named input).
    Cancelled {
        /// Cancelled task name.
        cause: String,
    },
    /// An input is not known to the scheduler.
    MissingDependency {
        /// Input's id.
        dep: u64,
    },
    /// No connected worker has the resources the named task needs.
    Unsatisfiable {
        /// Task name.
        cause: String,
        /// What it needs and what the workers have, in words.
        detail: String,
    },
    /// The named task's data was put on the cluster (not computed) and its
    /// worker was lost: it cannot be recomputed.
    DataLost {
        /// Task name.
        cause: String,
    },
    /// The named task's inputs lead back to itself (the submitted graph
    /// has a cycle): it, and whatever depends on it, can never run.
    Cycle {
        /// Task name.
        cause: String,
    },
}

/// Messages from the scheduler to a client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ToClient {
    /// Result available (inline, or at a worker's data address).
    Memory {
        /// Task.
        id: u64,
        /// Inline pickled value.
        value: Option<Bytes>,
        /// Data address of the holder when not inline.
        location: Option<String>,
    },
    /// Task failed.
    Erred {
        /// Task.
        id: u64,
        /// Why.
        error: TaskError,
    },
    /// The scheduler is alive (every second; a peer
    /// that hears nothing for the heartbeat timeout gives up on it).
    Ping,
    /// The answer to [`FromClient::Info`].
    Info(ClusterInfo),
    /// The answer to [`FromClient::Query`], JSON.
    QueryReply {
        /// The query's id.
        id: u64,
        /// The answer (or `{"error": ...}`).
        json: String,
    },
}

/// Messages from the scheduler to a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ToWorker {
    /// Run a task.
    Compute {
        /// Task.
        id: u64,
        /// Name, for errors and logs.
        name: String,
        /// Task group (for the profiler).
        group: String,
        /// Call or batch.
        kind: TaskKind,
        /// Pickled function.
        func: Bytes,
        /// Pickled arguments.
        args: Bytes,
        /// Inputs.
        deps: Vec<Dep>,
        /// Resources it holds while running (the worker pins GPUs).
        resources: Vec<(String, f64)>,
        /// Milliseconds it may run (0: no limit).
        time_limit_ms: u64,
        /// The job it belongs to (`SHOAL_JOB_ID`; 0: none).
        job: u32,
        /// A batch that was running on a worker that died: say which of its
        /// elements runs (so a death is held against it only when it comes
        /// at the same element again), and report progress as it goes
        /// ([`FromWorker::Progress`]).
        careful: bool,
        /// What earlier runs of a careful batch reported done, in order:
        /// this run starts after it.
        resume: Vec<Bytes>,
    },
    /// Drop the task if not started.
    Cancel(u64),
    /// Drop the task if not started, stop it if it runs
    /// (cancelled: its result is not wanted).
    Stop(u64),
    /// Drop these results.
    Release(Vec<u64>),
    /// Give back these tasks if not started (answer: `Stolen`).
    Steal(Vec<u64>),
    /// Finish and exit.
    Shutdown,
    /// The scheduler is alive (every second; a peer
    /// that hears nothing for the heartbeat timeout gives up on it).
    Ping,
    /// Copy this result from the (retiring) worker at `from`
    /// and keep it (answer: `Replicated`).
    Replicate {
        /// The result.
        id: u64,
        /// The holder's data address.
        from: String,
    },
    /// Exit so that your nanny starts a fresh process.
    Restart,
    /// Send what you have to report now, profile samples
    /// included, then `Synced` with this id.
    Sync(u64),
    /// The first `n` `Finished`/`Failed` reports it sent on
    /// this connection are recorded (journaled, where there is a journal):
    /// it need not send them again after a reconnect.
    Ack(u64),
    /// Send your recent steps of `task` (`FromWorker::Story`).
    Story {
        /// The question's id.
        query: u64,
        /// The task.
        task: u64,
    },
}

/// A data request to a worker's data server.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DataRequest {
    /// Results wanted.
    pub ids: Vec<u64>,
    /// The requester's host key (see `host_key` in the runtime): a holder on
    /// the same host answers with file paths instead of bytes.
    pub host: String,
}

/// A result as a data server hands it over.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Payload {
    /// The pickled bytes.
    Bytes(Bytes),
    /// A file on the requester's host (in shared memory, or spilled to
    /// disk) holding the pickle: map it, do not copy it.
    File {
        /// Absolute path.
        path: String,
        /// Its length.
        len: u64,
    },
    /// The holder keeps it as an object that cannot be pickled (a
    /// generator): usable only where it was made. Why, for the error.
    Unpicklable(String),
    /// The pickled bytes, this many, come in a frame of their own after
    /// the reply (in item order): a large result is written to the socket
    /// from where it lies and received into its own buffer, never copied
    /// into or out of an encoded message.
    Follows(u64),
}

/// Answer to a [`DataRequest`]; `None` where the worker does not hold it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DataReply {
    /// In request order.
    pub items: Vec<(u64, Option<Payload>)>,
}

/// A frame body could not be decoded.
#[derive(Debug)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}
impl std::error::Error for DecodeError {}

/// Encodes one frame body.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("serializing protocol types cannot fail")
}

/// Appends `value`'s encoding to `buf` (frames built message by message).
pub fn encode_into<T: Serialize>(value: &T, buf: Vec<u8>) -> Vec<u8> {
    postcard::to_extend(value, buf).expect("serializing protocol types cannot fail")
}

/// Decodes one frame body; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let (v, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError(format!("{} trailing bytes", rest.len())));
    }
    Ok(v)
}

impl Hello {
    /// A hello for this build's protocol.
    pub fn new(role: Role, nonce: [u8; 32]) -> Self {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role,
            nonce,
        }
    }

    /// Checks magic and version; the error says what to do.
    pub fn validate(&self) -> Result<(), HelloError> {
        if self.magic != MAGIC {
            return Err(HelloError::NotShoal);
        }
        if self.version != PROTOCOL_VERSION {
            return Err(HelloError::Version {
                theirs: self.version,
            });
        }
        Ok(())
    }
}

/// Why a peer's [`Hello`] is refused (its text goes back to the peer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first bytes are not a Shoal hello.
    #[error("not a Shoal peer (bad magic)")]
    NotShoal,
    /// Another release of Shoal.
    #[error(
        "protocol version {theirs} but this scheduler speaks {PROTOCOL_VERSION}: install the same Shoal version everywhere"
    )]
    Version {
        /// The peer's protocol version.
        theirs: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submit_sends_each_function_once_in_a_row_and_gets_it_back() {
        let spec = |id: u64, func: &Bytes| TaskSpec {
            id,
            group: "g".into(),
            key: None,
            kind: TaskKind::Call,
            func: func.clone(),
            args: Bytes::new(),
            deps: vec![],
            priority: 0,
            retries: 0,
            resources: vec![],
            recompute: true,
            time_limit_ms: 0,
            crash_limit: 0,
            time_request_ms: 0,
        };
        let (f, g) = (Bytes::from_static(b"inc"), Bytes::from(b"add".to_vec()));
        let g2 = Bytes::from(b"add".to_vec()); // equal, not the same buffer
        let orig = vec![
            spec(1, &f),
            spec(2, &f),
            spec(3, &g),
            spec(4, &g2),
            spec(5, &f),
        ];
        let mut sent = orig.clone();
        share_funcs(&mut sent);
        let funcs: Vec<&[u8]> = sent.iter().map(|s| &s.func[..]).collect();
        assert_eq!(funcs, [&b"inc"[..], b"", b"add", b"", b"inc"]);
        let mut got: Vec<TaskSpec> = decode(&encode(&sent)).unwrap();
        fill_funcs(&mut got);
        assert_eq!(got, orig);
        // A first task with no function keeps none (it fails when run).
        let mut lone = vec![spec(6, &Bytes::new())];
        fill_funcs(&mut lone);
        assert!(lone[0].func.is_empty());
    }

    #[test]
    fn batches_round_trip() {
        let msgs = vec![
            FromClient::Submit(vec![TaskSpec {
                id: 1 << 40 | 7,
                group: "inc".into(),
                key: None,
                kind: TaskKind::Call,
                func: Bytes::from_static(b"f"),
                args: Bytes::from_static(b"a"),
                deps: vec![3],
                priority: -1,
                retries: 2,
                resources: vec![("GPU".into(), 1.0)],
                recompute: false,
                time_limit_ms: 0,
                crash_limit: 0,
                time_request_ms: 0,
            }]),
            FromClient::Release(vec![1, 2]),
        ];
        let back: Vec<FromClient> = decode(&encode(&msgs)).unwrap();
        assert_eq!(back, msgs);
        let msgs = vec![
            FromWorker::Finished {
                id: 9,
                size: 3,
                value: Some(Bytes::from_static(b"xyz")),
                timing: Timing {
                    start_us: 1,
                    duration_us: 12,
                    thread: 3,
                },
            },
            FromWorker::Paused(true),
        ];
        let back: Vec<FromWorker> = decode(&encode(&msgs)).unwrap();
        assert_eq!(back, msgs);
        let reply = DataReply {
            items: vec![
                (1, Some(Payload::Bytes(Bytes::from_static(b"p")))),
                (
                    2,
                    Some(Payload::File {
                        path: "/dev/shm/shoal-0-1/2".into(),
                        len: 64,
                    }),
                ),
                (3, None),
            ],
        };
        assert_eq!(decode::<DataReply>(&encode(&reply)).unwrap(), reply);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [&b""[..], b"\xff\xff\xff\xff\xff", b"\x00\x01\x02"] {
            // Either undecodable or decodable but refused by validation.
            assert!(decode::<Hello>(body).map_or(true, |h| h.validate().is_err()));
            let _ = decode::<Vec<ToWorker>>(body); // must not panic
            let _ = decode::<Vec<ToClient>>(body);
        }
        let mut ok = encode(&Hello::new(Role::Client, [7; 32]));
        ok.push(0);
        assert!(decode::<Hello>(&ok).is_err(), "trailing bytes are refused");
    }

    #[test]
    fn version_mismatch_says_what_to_do() {
        let mut h = Hello::new(Role::Data, [7; 32]);
        assert!(h.validate().is_ok());
        h.version += 1;
        let e = h.validate().unwrap_err();
        assert_eq!(e, HelloError::Version { theirs: h.version });
        assert!(e.to_string().contains("same Shoal version"), "{e}");
        h.magic = 0;
        assert_eq!(h.validate(), Err(HelloError::NotShoal));
    }

    #[test]
    fn names_match_the_python_client() {
        assert_eq!(task_name(None, "inc", 0x0100_0000_002a), "inc-1000000002a");
        assert_eq!(task_name(Some("mine"), "inc", 1), "mine");
    }
}
