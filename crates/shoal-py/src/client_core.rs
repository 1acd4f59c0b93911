//! `ClientCore`: a client's connection (submit, results, waits that Ctrl-C
//! interrupts), and `Watcher`.

use super::*;
use bytes::Bytes;
use pyo3::exceptions::{PyConnectionError, PyTimeoutError, PyValueError};
use pyo3::intern;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{IntoPyDict, PyByteArray, PyBytes, PyDict, PyList, PyString};
use shoal_proto::{FromClient, TaskError, TaskKind, TaskSpec};
use shoal_runtime::client::{self, AskError, ClientShared, Status, SubmitError, Watcher};
use shoal_runtime::net::{Address, Secret};
use shoal_runtime::runtime;
use shoal_runtime::transfer::Fetched;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A client connection (see `shoal.Client`, which wraps it).
#[pyclass(module = "shoal._core", frozen)]
pub(crate) struct ClientCore {
    inner: Arc<ClientShared>,
}

/// How a task ended, as `ClientCore.outcome` tells it: one class per kind
/// (`Outcome.Value`, `Outcome.Raised`, ...), matched by `_results.py`.
#[pyclass(module = "shoal._core", frozen)]
pub(crate) enum Outcome {
    /// Not finished, released, or its result moved: wait and ask again.
    Pending {},
    /// Its pickled result: a bytearray, or a mapping of a file on this host.
    Value {
        /// The pickle (None: the client already has it unpickled).
        data: Py<PyAny>,
    },
    /// It raised.
    Raised {
        /// The task that raised (this one, or an input).
        cause: String,
        /// The pickled `(exception, traceback text)`.
        error: Py<PyBytes>,
    },
    /// It was running on workers that died, this many times.
    Killed {
        /// The task.
        cause: String,
        /// Deaths counted.
        kills: u8,
    },
    /// It, or an input (`cause`), was cancelled.
    Cancelled {
        /// The cancelled task.
        cause: String,
    },
    /// It takes a task the scheduler does not know.
    Missing {
        /// That task's id.
        dep: u64,
    },
    /// Scattered data it needs was lost with its worker.
    Lost {
        /// The lost task.
        cause: String,
    },
    /// Its inputs lead back to itself.
    Cycle {
        /// A task on the cycle.
        cause: String,
    },
    /// No worker can give it the resources it asks for.
    Unsatisfiable {
        /// The task.
        cause: String,
        /// What is missing.
        detail: String,
    },
    /// Its result is held by a worker this client cannot reach.
    Unreachable {
        /// The worker's data address.
        address: String,
        /// Why the fetch failed.
        detail: String,
    },
}

pub(crate) fn lost(reason: String) -> PyErr {
    SchedulerLostError::new_err(format!("lost the connection to the scheduler: {reason}"))
}

/// A question to the scheduler unanswered: lost (`SchedulerLostError`), or
/// a scheduler too busy to answer in time (`TimeoutError`, the connection
/// stays).
pub(crate) fn ask_err(e: AskError) -> PyErr {
    match e {
        AskError::Lost(reason) => lost(reason),
        e @ AskError::NoAnswer(_) => pyo3::exceptions::PyTimeoutError::new_err(e.to_string()),
    }
}

pub(crate) fn submit_err(e: SubmitError) -> PyErr {
    match e {
        SubmitError::Lost(reason) => lost(reason),
        SubmitError::TooLarge(msg) => PyValueError::new_err(msg),
    }
}

impl ClientCore {
    /// Sends submissions; waiting for room (the scheduler reads slower than
    /// this client submits) lets other Python threads run.
    fn send(&self, py: Python<'_>, specs: Vec<TaskSpec>) -> PyResult<()> {
        let inner = &self.inner;
        if inner.backlogged() {
            py.detach(|| inner.submit(specs))
        } else {
            inner.submit(specs)
        }
        .map_err(submit_err)
    }
}

#[pymethods]
impl ClientCore {
    /// Connects to the scheduler at `address`, proving `token`; with
    /// `reconnect` (seconds; default `SHOAL_RECONNECT`), connects again
    /// when the scheduler is lost.
    #[new]
    #[pyo3(signature = (address, token, reconnect=None))]
    fn new(
        py: Python<'_>,
        address: &str,
        token: Option<&str>,
        reconnect: Option<f64>,
    ) -> PyResult<Self> {
        let reconnect = match reconnect {
            Some(s) if s.is_finite() && s > 0.0 => Some(shoal_runtime::duration::wait(s)),
            Some(s) => {
                return Err(PyValueError::new_err(format!(
                    "reconnect must be a number of seconds above 0, not {s}"
                )))
            }
            None => client::reconnect_from_env(),
        };
        let addr = Address::parse(address).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let token = token.ok_or_else(|| {
            PyValueError::new_err(format!(
                "connecting to {address} needs the cluster's token: pass token= or \
                 scheduler_file= (whose token file it reads), or set SHOAL_TOKEN. \
                 `shoal scheduler` prints its token file (\"token file: PATH\") and \
                 notes it in ~/.shoal/clusters/ for its user, where a client on a host \
                 sharing that home finds it"
            ))
        })?;
        let secret = Secret::from_token(token).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let inner = py
            .detach(|| client::connect_with(runtime(), &addr, &secret, reconnect))
            .map_err(|e| {
                PyConnectionError::new_err(format!(
                    "cannot connect to the scheduler at {address}: {e}"
                ))
            })?;
        Ok(ClientCore { inner })
    }

    /// Id assigned by the scheduler.
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id
    }

    /// Submits one task; returns its id.
    #[pyo3(signature = (group, key, batch, func, args, deps, priority, retries, resources=Vec::new(), recompute=true, time_limit_ms=0, time_request_ms=0, crash_limit=0))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        group: String,
        key: Option<String>,
        batch: bool,
        func: &[u8],
        args: &[u8],
        deps: Vec<u64>,
        priority: i32,
        retries: u32,
        resources: Vec<(String, f64)>,
        recompute: bool,
        time_limit_ms: u64,
        time_request_ms: u64,
        crash_limit: u8,
    ) -> PyResult<u64> {
        let id = self.inner.new_id();
        let spec = TaskSpec {
            id,
            group,
            key,
            kind: if batch {
                TaskKind::Batch
            } else {
                TaskKind::Call
            },
            func: Bytes::copy_from_slice(func),
            args: Bytes::copy_from_slice(args),
            deps,
            priority,
            retries,
            resources,
            recompute,
            time_limit_ms,
            crash_limit,
            time_request_ms,
        };
        self.send(py, vec![spec])?;
        Ok(id)
    }

    /// Submits a command task; returns its id. `stdout`/`stderr`: `(0,
    /// "")` capture, `(1, "")` drop, `(2, path template)` a file.
    #[pyo3(signature = (group, key, argv, env, cwd, stdout, stderr, deps, priority, retries, resources, time_limit_ms, time_request_ms=0))]
    #[allow(clippy::too_many_arguments)]
    fn submit_command(
        &self,
        py: Python<'_>,
        group: String,
        key: Option<String>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdout: (u8, String),
        stderr: (u8, String),
        deps: Vec<u64>,
        priority: i32,
        retries: u32,
        resources: Vec<(String, f64)>,
        time_limit_ms: u64,
        time_request_ms: u64,
    ) -> PyResult<u64> {
        if argv.is_empty() {
            return Err(PyValueError::new_err(
                "a command needs a program: submit_command(['program', 'arg', ...])",
            ));
        }
        let target = |(kind, path): (u8, String)| match kind {
            0 => Ok(shoal_proto::OutputTarget::Capture),
            1 => Ok(shoal_proto::OutputTarget::Null),
            2 => Ok(shoal_proto::OutputTarget::File(path)),
            k => Err(PyValueError::new_err(format!("unknown output kind {k}"))),
        };
        let id = self.inner.new_id();
        let cmd = shoal_proto::CommandSpec {
            argv,
            env,
            cwd,
            stdout: target(stdout)?,
            stderr: target(stderr)?,
            task: id,
            entry: None,
        };
        let spec = TaskSpec {
            id,
            group,
            key,
            kind: TaskKind::Command,
            func: Bytes::new(),
            args: cmd.encode(),
            deps,
            priority,
            retries,
            resources,
            recompute: true,
            time_limit_ms,
            crash_limit: 0,
            time_request_ms,
        };
        self.send(py, vec![spec])?;
        Ok(id)
    }

    /// Submits many tasks of one function in one message; `items` are
    /// `(args, deps)`. Returns their ids.
    #[pyo3(signature = (group, batch, func, items, priority, retries, resources=Vec::new(), time_limit_ms=0))]
    #[allow(clippy::too_many_arguments)]
    fn submit_many(
        &self,
        py: Python<'_>,
        group: String,
        batch: bool,
        func: &[u8],
        items: Vec<(PyBackedBytes, Vec<u64>)>,
        priority: i32,
        retries: u32,
        resources: Vec<(String, f64)>,
        time_limit_ms: u64,
    ) -> PyResult<Vec<u64>> {
        let func = Bytes::copy_from_slice(func);
        let mut ids = Vec::with_capacity(items.len());
        let specs = items
            .into_iter()
            .map(|(args, deps)| {
                let id = self.inner.new_id();
                ids.push(id);
                TaskSpec {
                    id,
                    group: group.clone(),
                    key: None,
                    kind: if batch {
                        TaskKind::Batch
                    } else {
                        TaskKind::Call
                    },
                    func: func.clone(),
                    args: Bytes::copy_from_slice(&args),
                    deps,
                    priority,
                    retries,
                    resources: resources.clone(),
                    recompute: true,
                    time_limit_ms,
                    crash_limit: 0,
                    time_request_ms: 0,
                }
            })
            .collect();
        self.send(py, specs)?;
        Ok(ids)
    }

    /// `n` fresh task ids, consecutive: returns the first. For graphs whose
    /// tasks must name their inputs' ids before submission.
    fn new_ids(&self, n: u64) -> u64 {
        self.inner.new_ids(n)
    }

    /// Submits a task graph of one function in one message; `items` are
    /// `(id from new_ids, group, key, args, deps, priority, own_func)`,
    /// each task after its inputs; `own_func`: the task's pickled function
    /// instead of `func` (None: `func`).
    #[pyo3(signature = (func, items, retries, resources=Vec::new()))]
    #[allow(clippy::type_complexity)]
    fn submit_graph(
        &self,
        py: Python<'_>,
        func: &[u8],
        items: Vec<(
            u64,
            String,
            Option<String>,
            PyBackedBytes,
            Vec<u64>,
            i32,
            Option<PyBackedBytes>,
        )>,
        retries: u32,
        resources: Vec<(String, f64)>,
    ) -> PyResult<()> {
        let func = Bytes::copy_from_slice(func);
        let specs = items
            .into_iter()
            .map(|(id, group, key, args, deps, priority, own)| TaskSpec {
                id,
                group,
                key,
                kind: TaskKind::Call,
                func: own.map_or_else(|| func.clone(), |f| Bytes::copy_from_slice(&f)),
                args: Bytes::copy_from_slice(&args),
                deps,
                priority,
                retries,
                resources: resources.clone(),
                recompute: true,
                time_limit_ms: 0,
                crash_limit: 0,
                time_request_ms: 0,
            })
            .collect();
        self.send(py, specs)
    }

    /// Drops the client's interest in these tasks.
    fn release(&self, ids: Vec<u64>) {
        self.inner.release(ids);
    }

    /// Cancels unfinished tasks.
    fn cancel(&self, ids: Vec<u64>) {
        self.inner.cancel(ids);
    }

    /// Cancels these tasks unless a worker has started them (as reported
    /// so far): started ones run to their end.
    fn cancel_queued(&self, ids: Vec<u64>) {
        self.inner.cancel_queued(ids);
    }

    /// Claims tasks of other clients whose futures came inside a result.
    fn adopt(&self, ids: Vec<u64>) {
        self.inner.adopt(ids);
    }

    /// The result of task `by` holds futures of `tasks` (kept while it lives).
    fn hold(&self, by: u64, tasks: Vec<u64>) {
        self.inner.hold(by, tasks);
    }

    /// These tasks run to their end even if their futures are released.
    fn detach(&self, ids: Vec<u64>) {
        self.inner.detach(ids);
    }

    /// A worker offering one of this resource is starting: tasks wait for it.
    fn expect(&self, resource: String) {
        self.inner.expect(resource);
    }

    /// No worker will offer this resource again: tasks needing it fail.
    fn withdraw(&self, resource: String) {
        self.inner.withdraw(resource);
    }

    /// `"pending"`, `"finished"`, `"error"`, or `"released"` (unknown to
    /// this client), as interned strings.
    fn status<'py>(&self, py: Python<'py>, id: u64) -> &Bound<'py, PyString> {
        match self.inner.status(id) {
            None => intern!(py, "released"),
            Some(Status::Pending) => intern!(py, "pending"),
            Some(Status::Small { .. } | Status::Value(_) | Status::At(_)) => {
                intern!(py, "finished")
            }
            Some(Status::Erred(_)) => intern!(py, "error"),
        }
    }

    /// Waits until `count` of `ids` (distinct) are done; returns how many
    /// are. Raises if the scheduler is lost.
    #[pyo3(signature = (ids, count, timeout=None))]
    fn wait(
        &self,
        py: Python<'_>,
        ids: Vec<u64>,
        count: usize,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let end = deadline(timeout)?;
        let inner = &self.inner;
        let w = py.detach(|| inner.waiter(&ids));
        let want = count.min(ids.len());
        let mut done = 0;
        let r = blocking(py, end, |until| {
            done = w.wait_finished(want, until);
            if done >= want {
                return Some(Ok(done));
            }
            inner.closed_reason().map(Err)
        })?;
        match r {
            Some(Ok(n)) => Ok(n),
            Some(Err(e)) => Err(lost(e)),
            None => Ok(done),
        }
    }

    /// The outcome of task `id` (an [`Outcome`]: `Pending` while it is
    /// pending, released, or its result moved). A large result is fetched
    /// from its worker (GIL released): a file on this host is mapped, not
    /// copied. The fetch gives up with `TimeoutError` after `timeout`
    /// seconds, and Ctrl-C (any Python signal handler that raises)
    /// interrupts it.
    #[pyo3(signature = (id, timeout=None))]
    fn outcome(&self, py: Python<'_>, id: u64, timeout: Option<f64>) -> PyResult<Outcome> {
        Ok(match self.inner.status(id) {
            None | Some(Status::Pending) => Outcome::Pending {},
            Some(s @ (Status::Small { .. } | Status::Value(_))) => Outcome::Value {
                // A bytearray: arrays unpickled from it are writable.
                data: PyByteArray::new(py, s.value().unwrap_or_default())
                    .into_any()
                    .unbind(),
            },
            Some(Status::At(addr)) => {
                let addr = addr.to_string();
                let secret = &self.inner.secret;
                let deadline = timeout.map(|t| Instant::now() + shoal_runtime::duration::wait(t));
                match fetch_interruptibly(py, &addr, id, secret, deadline)? {
                    Ok(v) => {
                        self.inner.fetch_ok(id);
                        Outcome::Value {
                            data: fetched_to_py(py, v)?,
                        }
                    }
                    Err(e) => {
                        let n = self.inner.fetch_failed(id);
                        if n >= client::FETCH_ATTEMPTS {
                            // Still held there, yet out of reach: say so.
                            Outcome::Unreachable {
                                address: addr,
                                detail: e.to_string(),
                            }
                        } else {
                            // The holder died (the scheduler recomputes it)
                            // or the result moved: wait, and ask where it is.
                            let pause = Duration::from_millis(20 * n as u64);
                            py.detach(|| std::thread::sleep(pause));
                            self.inner.mark_pending(id);
                            Outcome::Pending {}
                        }
                    }
                }
            }
            Some(Status::Erred(e)) => match *e {
                TaskError::Exception { cause, error } => Outcome::Raised {
                    cause,
                    error: PyBytes::new(py, &error).unbind(),
                },
                TaskError::KilledWorker { cause, kills } => Outcome::Killed { cause, kills },
                TaskError::Cancelled { cause } => Outcome::Cancelled { cause },
                TaskError::MissingDependency { dep } => Outcome::Missing { dep },
                TaskError::DataLost { cause } => Outcome::Lost { cause },
                TaskError::Cycle { cause } => Outcome::Cycle { cause },
                TaskError::Unsatisfiable { cause, detail } => {
                    Outcome::Unsatisfiable { cause, detail }
                }
            },
        })
    }

    /// A new completion watcher.
    fn watcher(&self) -> WatcherPy {
        WatcherPy {
            client: self.inner.clone(),
            inner: self.inner.watcher(),
        }
    }

    /// The client is closing: a lost connection is not made again (with
    /// `reconnect`); the connection itself closes when this goes.
    fn close(&self) {
        self.inner.close();
    }

    /// Why the connection closed, or None while it is open.
    fn closed_reason(&self) -> Option<String> {
        self.inner.closed_reason()
    }

    /// Asks the scheduler to retire these workers (data addresses, names or
    /// pids) gracefully.
    fn retire(&self, workers: Vec<String>) -> PyResult<()> {
        self.inner
            .send(FromClient::Retire(workers))
            .map_err(ask_err)
    }

    /// Asks the scheduler to restart every worker process.
    fn restart(&self) -> PyResult<()> {
        self.inner.send(FromClient::Restart).map_err(ask_err)
    }

    /// What the cluster looks like, as a dict (see `Client.scheduler_info`).
    fn cluster_info<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
        let inner = &self.inner;
        let t = shoal_runtime::duration::wait(timeout);
        let info = py.detach(|| inner.cluster_info(t)).map_err(ask_err)?;
        let d = PyDict::new(py);
        d.set_item("address", info.address)?;
        d.set_item("clients", info.clients)?;
        d.set_item("tasks", info.tasks)?;
        let workers = PyList::empty(py);
        for w in info.workers {
            let wd = PyDict::new(py);
            wd.set_item("id", w.id)?;
            wd.set_item("name", w.name)?;
            wd.set_item("address", w.address)?;
            wd.set_item("pid", w.pid)?;
            wd.set_item("nthreads", w.nthreads)?;
            wd.set_item(
                "resources",
                w.resources
                    .into_iter()
                    .collect::<Vec<_>>()
                    .into_py_dict(py)?,
            )?;
            wd.set_item("processing", w.processing)?;
            wd.set_item("held", w.held)?;
            wd.set_item("memory", w.metrics.memory)?;
            wd.set_item("managed", w.metrics.managed)?;
            wd.set_item("spilled", w.metrics.spilled)?;
            wd.set_item("memory_limit", w.metrics.limit)?;
            wd.set_item("paused", w.metrics.paused)?;
            wd.set_item("last_seen", w.last_seen_ms as f64 / 1000.0)?;
            // When it retires (Unix seconds), or None.
            let end = (w.lifetime_end_us > 0).then(|| w.lifetime_end_us as f64 / 1e6);
            wd.set_item("lifetime_end", end)?;
            wd.set_item("cpu", w.metrics.cpu)?;
            wd.set_item("bytes_in", w.metrics.bytes_in)?;
            wd.set_item("bytes_out", w.metrics.bytes_out)?;
            workers.append(wd)?;
        }
        d.set_item("workers", workers)?;
        d.set_item("dashboard", info.dashboard)?;
        let groups = PyList::empty(py);
        for g in info.groups {
            let gd = PyDict::new(py);
            gd.set_item("name", g.name)?;
            gd.set_item("waiting", g.waiting)?;
            gd.set_item("processing", g.processing)?;
            gd.set_item("memory", g.memory)?;
            gd.set_item("erred", g.erred)?;
            gd.set_item("released", g.released)?;
            gd.set_item("submitted", g.submitted)?;
            gd.set_item("finished", g.finished)?;
            gd.set_item("total", g.total_us as f64 / 1e6)?;
            groups.append(gd)?;
        }
        d.set_item("groups", groups)?;
        Ok(d)
    }

    /// A dashboard query (`/api/status`, `/api/profile?group=...`, ...)
    /// answered by the scheduler: its JSON text.
    fn query(&self, py: Python<'_>, path: &str, timeout: f64) -> PyResult<String> {
        let inner = &self.inner;
        let t = shoal_runtime::duration::wait(timeout);
        py.detach(|| inner.query(path, t)).map_err(ask_err)
    }

    /// Claims the cluster-wide `name` for `value` (JSON text), or looks it
    /// up (`value` None): the scheduler's JSON answer, `{"ok": true}`,
    /// `{"error": ...}` or `{"value": ...}`. A client's names go with it.
    #[pyo3(signature = (name, value=None, timeout=10.0))]
    fn name(
        &self,
        py: Python<'_>,
        name: String,
        value: Option<String>,
        timeout: f64,
    ) -> PyResult<String> {
        let inner = &self.inner;
        let t = shoal_runtime::duration::wait(timeout);
        py.detach(|| inner.name(name, value, t)).map_err(ask_err)
    }

    /// Gives up one of this client's names.
    fn unname(&self, name: String) {
        self.inner.unname(name)
    }
}

/// Collects task ids as they finish (for `as_completed`, `wait`, callbacks).
#[pyclass(module = "shoal._core", frozen, name = "Watcher")]
pub(crate) struct WatcherPy {
    client: Arc<ClientShared>,
    inner: Arc<Watcher>,
}

#[pymethods]
impl WatcherPy {
    /// Starts watching `ids`; finished ones are reported by the next `next`.
    fn add(&self, ids: Vec<u64>) {
        self.client.watch(&self.inner, &ids);
    }

    /// Ids finished since the last call; waits for at least one up to
    /// `timeout` (None: forever). Empty when nothing is pending or on timeout.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<u64>> {
        let end = deadline(timeout)?;
        let (w, c) = (&self.inner, &self.client);
        let r = blocking(py, end, |until| {
            let got = w.next(Some(until));
            if !got.is_empty() || w.pending() == 0 {
                return Some(Ok(got));
            }
            c.closed_reason().map(Err)
        })?;
        match r {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(lost(e)),
            None => Ok(Vec::new()),
        }
    }

    /// Number of watched ids not finished yet.
    fn pending(&self) -> usize {
        self.inner.pending()
    }
}

/// Fetches result `id` from the worker at `addr` on the I/O thread while
/// this thread waits with the GIL released, looking every 100 ms for a
/// pending signal (Ctrl-C raises here) and for the deadline; either aborts
/// the fetch.
pub(crate) fn fetch_interruptibly(
    py: Python<'_>,
    addr: &str,
    id: u64,
    secret: &Secret,
    deadline: Option<Instant>,
) -> PyResult<std::io::Result<Fetched>> {
    let mut pending = client::start_fetch(runtime(), addr, id, secret);
    loop {
        let step = Duration::from_millis(100);
        let wait = deadline.map_or(step, |d| {
            step.min(d.saturating_duration_since(Instant::now()))
        });
        if let Some(got) = py.detach(|| pending.wait(wait)) {
            return Ok(got);
        }
        // Dropping `pending` on the way out aborts the fetch.
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(PyTimeoutError::new_err(format!(
                "fetching the result of task {id:x} from {addr} did not finish in time"
            )));
        }
    }
}
