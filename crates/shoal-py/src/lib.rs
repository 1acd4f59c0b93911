//! # shoal._core: the PyO3 bindings
//!
//! The only crate that knows Python. It wraps the runtime's scheduler, client
//! and worker in small classes used by the pure-Python API in
//! `python/shoal/`. Every call that may block releases the GIL and wakes up
//! every 100 ms to let Python handle signals, so Ctrl-C always works.

mod numpy_alloc;

use bytes::Bytes;
use pyo3::exceptions::{
    PyConnectionError, PyOSError, PyPermissionError, PyTimeoutError, PyTypeError, PyValueError,
};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{IntoPyDict, PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};
use shoal_proto::{
    Activity, ActivityKind, TaskError, TaskKind, TaskSpec, Timing, ToScheduler, WorkerMetrics,
};
use shoal_runtime::client::{self, ClientShared, Status, SubmitError, Watcher};
use shoal_runtime::local::{LocalCluster, WorkerCommand};
use shoal_runtime::net::{Address, Secret};
use shoal_runtime::runtime;
use shoal_runtime::scheduler::{self, SchedulerHandle};
use shoal_runtime::shm;
use shoal_runtime::transfer::Fetched;
use shoal_runtime::worker::{self, Batch, Done, Input, Stored, WorkerShared};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pyo3::create_exception!(
    _core,
    ShoalError,
    pyo3::exceptions::PyException,
    "Base class of Shoal's own errors."
);
pyo3::create_exception!(
    _core,
    SchedulerLostError,
    ShoalError,
    "The connection to the scheduler is gone."
);

const SLICE: Duration = Duration::from_millis(100);

fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => {
            Ok(Some(Instant::now() + Duration::from_secs_f64(t)))
        }
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, not {t}"
        ))),
    }
}

/// Runs `f` without the GIL in slices of at most 100 ms until it reports a
/// result, checking for signals (Ctrl-C) between slices.
fn blocking<T: Send>(
    py: Python<'_>,
    end: Option<Instant>,
    mut f: impl FnMut(Instant) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    loop {
        let now = Instant::now();
        let slice_end = match end {
            Some(e) if e <= now + SLICE => e,
            _ => now + SLICE,
        };
        if let Some(v) = py.detach(|| f(slice_end)) {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if end.is_some_and(|e| Instant::now() >= e) {
            return Ok(None);
        }
    }
}

/// An embedded cluster: a scheduler on this process's I/O thread, listening
/// on a Unix socket in a private directory, and supervised worker processes.
#[pyclass(module = "shoal._core")]
struct Cluster {
    scheduler: Option<SchedulerHandle>,
    workers: Option<LocalCluster>,
    dir: Option<PathBuf>,
    #[pyo3(get)]
    address: String,
    /// The cluster's token: workers and clients must know it to join.
    #[pyo3(get)]
    token: String,
    /// The dashboard's URL without its token (None: no dashboard).
    #[pyo3(get)]
    dashboard: Option<String>,
}

#[pymethods]
impl Cluster {
    /// Starts the scheduler and `n_workers` processes running
    /// `program args... ADDRESS`.
    #[new]
    #[pyo3(signature = (n_workers, program, args, env, dashboard=None))]
    fn new(
        py: Python<'_>,
        n_workers: usize,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dashboard: Option<String>,
    ) -> PyResult<Self> {
        py.detach(|| {
            let dir = shm::socket_dir()?;
            let addr = Address::Unix(dir.join("scheduler.sock"));
            // A fresh random token per cluster; workers get it in their
            // environment, never on a command line (visible to `ps`).
            let secret = Secret::random();
            let token = secret.token();
            let sched = runtime()
                .block_on(scheduler::start(&addr, secret, dashboard.as_deref()))
                .inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(&dir);
                })?;
            let address = sched.address.to_string();
            let dashboard = sched.dashboard.clone();
            let mut args = args;
            args.push(address.clone());
            let mut env = env;
            env.push(("SHOAL_TOKEN".into(), token.clone()));
            let cmd = WorkerCommand {
                program,
                args,
                env,
                reconnect: false,
                scheduler_elsewhere: false,
            };
            let workers = LocalCluster::start(cmd, n_workers)?;
            // A crashed scheduler closed every connection: stop replacing
            // the workers that exit because of it.
            let (crashed, stop_workers) = (sched.crashed(), workers.stopper());
            runtime().spawn(async move {
                crashed.await;
                stop_workers();
            });
            Ok::<_, std::io::Error>(Cluster {
                scheduler: Some(sched),
                workers: Some(workers),
                dir: Some(dir),
                address,
                token,
                dashboard,
            })
        })
        .map_err(|e| PyOSError::new_err(format!("cannot start the local cluster: {e}")))
    }

    /// Keeps `n` worker processes: starts more, or asks the newest to
    /// retire (see `LocalCluster::scale`); returns those asked.
    fn scale(&self, n: usize) -> Vec<u32> {
        self.workers.as_ref().map_or_else(Vec::new, |w| w.scale(n))
    }

    /// How many worker processes it keeps.
    fn target(&self) -> usize {
        self.workers.as_ref().map_or(0, LocalCluster::target)
    }

    /// Why it stopped starting workers, if it did.
    fn failure(&self) -> Option<String> {
        self.workers.as_ref().and_then(LocalCluster::failure)
    }

    /// Process ids of the live workers.
    fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .as_ref()
            .map_or_else(Vec::new, LocalCluster::pids)
    }

    /// Asks the workers to exit, waits briefly, kills stragglers, stops the
    /// scheduler and removes the socket directory. Idempotent.
    fn close(&mut self, py: Python<'_>) {
        if let Some(s) = &self.scheduler {
            s.shutdown_workers();
        }
        if let Some(mut w) = self.workers.take() {
            py.detach(|| w.close());
        }
        if let Some(s) = self.scheduler.take() {
            s.stop();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = &self.scheduler {
            s.shutdown_workers();
        }
        self.workers.take();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A client connection (see `shoal.Client`, which wraps it).
#[pyclass(module = "shoal._core", frozen)]
struct ClientCore {
    inner: Arc<ClientShared>,
}

fn lost(reason: String) -> PyErr {
    SchedulerLostError::new_err(format!("lost the connection to the scheduler: {reason}"))
}

fn submit_err(e: SubmitError) -> PyErr {
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
            Some(s) if s.is_finite() && s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(PyValueError::new_err(format!(
                    "reconnect must be a number of seconds above 0, not {s}"
                )))
            }
            None => client::reconnect_from_env(),
        };
        let addr = Address::parse(address).map_err(PyValueError::new_err)?;
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

    /// The outcome of a finished task as `(kind, a, b)`, kind an interned
    /// name: `("value", value_bytearray_or_mmap, None)`, `("raised", cause,
    /// error_bytes)`, `("killed", cause, kills)` (killed workers),
    /// `("cancelled", cause, None)`, `("missing", dep_id, None)` (unknown
    /// input), `("unsatisfiable", cause, detail)` (resources), `("lost",
    /// cause, None)` (scattered data lost), `("unreachable", address,
    /// error)` (its live holder could not be reached), `("cycle", cause,
    /// None)`, `("pending", None, None)` (pending or released). A large result is fetched from its worker
    /// (GIL released): a file on this host is mapped, not copied. The fetch
    /// gives up with `TimeoutError` after `timeout` seconds, and Ctrl-C
    /// (any Python signal handler that raises) interrupts it.
    #[pyo3(signature = (id, timeout=None))]
    fn outcome<'py>(
        &self,
        py: Python<'py>,
        id: u64,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let none = py.None();
        let t = match self.inner.status(id) {
            None | Some(Status::Pending) => (intern!(py, "pending"), none.clone_ref(py), none),
            Some(s @ (Status::Small { .. } | Status::Value(_))) => (
                intern!(py, "value"),
                // A bytearray: arrays unpickled from it are writable.
                PyByteArray::new(py, s.value().unwrap_or_default())
                    .into_any()
                    .unbind(),
                none,
            ),
            Some(Status::At(addr)) => {
                let addr = addr.to_string();
                let secret = &self.inner.secret;
                let deadline =
                    timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
                match fetch_interruptibly(py, &addr, id, secret, deadline)? {
                    Ok(v) => {
                        self.inner.fetch_ok(id);
                        (intern!(py, "value"), fetched_to_py(py, v)?, none)
                    }
                    Err(e) => {
                        let n = self.inner.fetch_failed(id);
                        if n >= client::FETCH_ATTEMPTS {
                            // Still held there, yet out of reach: say so.
                            let detail = e.to_string().into_pyobject(py)?.into_any().unbind();
                            (
                                intern!(py, "unreachable"),
                                addr.into_pyobject(py)?.into_any().unbind(),
                                detail,
                            )
                        } else {
                            // The holder died (the scheduler recomputes it)
                            // or the result moved: wait, and ask where it is.
                            let pause = Duration::from_millis(20 * n as u64);
                            py.detach(|| std::thread::sleep(pause));
                            self.inner.mark_pending(id);
                            (intern!(py, "pending"), none.clone_ref(py), none)
                        }
                    }
                }
            }
            Some(Status::Erred(e)) => match *e {
                TaskError::Exception { cause, error } => (
                    intern!(py, "raised"),
                    cause.into_pyobject(py)?.into_any().unbind(),
                    PyBytes::new(py, &error).into_any().unbind(),
                ),
                TaskError::KilledWorker { cause, kills } => (
                    intern!(py, "killed"),
                    cause.into_pyobject(py)?.into_any().unbind(),
                    kills.into_pyobject(py)?.into_any().unbind(),
                ),
                TaskError::Cancelled { cause } => (
                    intern!(py, "cancelled"),
                    cause.into_pyobject(py)?.into_any().unbind(),
                    none,
                ),
                TaskError::MissingDependency { dep } => (
                    intern!(py, "missing"),
                    dep.into_pyobject(py)?.into_any().unbind(),
                    none,
                ),
                TaskError::DataLost { cause } => (
                    intern!(py, "lost"),
                    cause.into_pyobject(py)?.into_any().unbind(),
                    none,
                ),
                TaskError::Cycle { cause } => (
                    intern!(py, "cycle"),
                    cause.into_pyobject(py)?.into_any().unbind(),
                    none,
                ),
                TaskError::Unsatisfiable { cause, detail } => (
                    intern!(py, "unsatisfiable"),
                    cause.into_pyobject(py)?.into_any().unbind(),
                    detail.into_pyobject(py)?.into_any().unbind(),
                ),
            },
        };
        PyTuple::new(py, [t.0.clone().into_any().unbind(), t.1, t.2])
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
        self.inner.send(ToScheduler::Retire(workers)).map_err(lost)
    }

    /// Asks the scheduler to restart every worker process.
    fn restart(&self) -> PyResult<()> {
        self.inner.send(ToScheduler::Restart).map_err(lost)
    }

    /// What the cluster looks like, as a dict (see `Client.scheduler_info`).
    fn cluster_info<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
        let inner = &self.inner;
        let t = Duration::from_secs_f64(timeout.max(0.0));
        let info = py.detach(|| inner.cluster_info(t)).map_err(lost)?;
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
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| inner.query(path, t)).map_err(lost)
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
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| inner.name(name, value, t)).map_err(lost)
    }

    /// Gives up one of this client's names.
    fn unname(&self, name: String) {
        self.inner.unname(name)
    }
}

/// Collects task ids as they finish (for `as_completed`, `wait`, callbacks).
#[pyclass(module = "shoal._core", frozen, name = "Watcher")]
struct WatcherPy {
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
fn fetch_interruptibly(
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

/// The Rust half of a worker process (see `shoal._worker`).
#[pyclass(module = "shoal._core", frozen)]
struct WorkerCore {
    inner: Arc<WorkerShared>,
    /// Profiler ticks that fell due (see ``sampler_sleep``).
    ticks: AtomicU64,
}

#[pymethods]
impl WorkerCore {
    /// Connects to the scheduler and starts the data server.
    #[new]
    #[pyo3(signature = (address, nthreads, name, token, resources=Vec::new(), in_process=false))]
    fn new(
        py: Python<'_>,
        address: &str,
        nthreads: u32,
        name: &str,
        token: &str,
        resources: Vec<(String, f64)>,
        in_process: bool,
    ) -> PyResult<Self> {
        let addr = Address::parse(address).map_err(PyValueError::new_err)?;
        let secret = Secret::from_token(token).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let inner = py
            .detach(|| {
                worker::start(
                    runtime(),
                    &addr,
                    nthreads,
                    name,
                    resources,
                    secret,
                    in_process,
                )
            })
            .map_err(|e| {
                let msg = format!("worker cannot join the scheduler at {address}: {e}");
                match e.kind() {
                    std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                    _ => PyConnectionError::new_err(msg),
                }
            })?;
        Ok(WorkerCore {
            inner,
            ticks: AtomicU64::new(0),
        })
    }

    /// Id assigned by the scheduler.
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id()
    }

    /// Reports `done` (tuples `(id, ok, payload, start_us, duration_us,
    /// size)`, run on execution thread `lane`; payload None: a large result
    /// kept as the Python object; for a failure `(pickled error, text)`) and returns
    /// the next `(tasks, released_ids)`; or `"shutdown"` (the scheduler
    /// asked the worker to stop) or `"retire"` (a lent thread was taken
    /// back: this thread ends). Tasks are `(id, name, group, is_batch, func, args, deps, resources)` with deps
    /// `[(id, bytes or None)]`. Returns empty lists after `timeout` seconds.
    fn next_batch<'py>(
        &self,
        py: Python<'py>,
        done: Vec<DoneTuple<'py>>,
        max: usize,
        timeout: f64,
        lane: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let done: Vec<Done> = done
            .into_iter()
            .map(|d| to_done(d, lane))
            .collect::<PyResult<_>>()?;
        let inner = &self.inner;
        inner.report(done);
        if inner.backlogged() {
            py.detach(|| inner.wait_room());
        }
        // Work already queued is taken with the GIL held (no lock is held
        // while waiting, so this cannot block); only waiting releases it.
        let batch = match inner.try_next(max) {
            Some(b) => b,
            None => {
                let timeout = Duration::from_secs_f64(timeout.max(0.0));
                py.detach(move || inner.wait_next(max, timeout))
            }
        };
        let (tasks, released) = match batch {
            Batch::Shutdown => return Ok(intern!(py, "shutdown").clone().into_any()),
            Batch::Retire => return Ok(intern!(py, "retire").clone().into_any()),
            Batch::Work(t, r) => (t, r),
        };
        let list = PyList::empty(py);
        for t in tasks {
            let deps = PyList::empty(py);
            for (id, v) in t.deps {
                let v: Py<PyAny> = match v {
                    Input::Local => py.None(),
                    // A task's input from another host: a read-only view of
                    // the frame it came in (no copy; inputs are not for
                    // writing, as mapped ones from this host are not).
                    Input::Bytes(b) => Bound::new(py, Frame { bytes: b })?.into_any().unbind(),
                    Input::File(f) => fetched_to_py(py, Fetched::File(f))?,
                    // The task fails with it (a str: see `_execute`).
                    Input::Unavailable(why) => why.into_pyobject(py)?.into_any().unbind(),
                };
                deps.append((id, v))?;
            }
            let resources = (!t.resources.is_empty()).then_some(t.resources);
            let kind: u8 = match t.kind {
                TaskKind::Call => 0,
                TaskKind::Batch => 1,
                TaskKind::Command => 2,
            };
            // Seconds (None: no limit).
            let limit = (t.time_limit_ms > 0).then(|| t.time_limit_ms as f64 / 1000.0);
            list.append((
                t.id,
                t.name,
                t.group,
                kind,
                PyBytes::new(py, &t.func),
                PyBytes::new(py, &t.args),
                deps,
                resources,
                limit,
                t.job,
            ))?;
        }
        Ok((list, released).into_pyobject(py)?.into_any())
    }

    /// A task lends its thread while it waits on other tasks: start one
    /// more execution thread after this.
    fn lend_thread(&self) {
        self.inner.lend_thread()
    }

    /// The waiting task takes its thread back: one execution thread gets
    /// `"retire"` from its next ``next_batch``.
    fn reclaim_thread(&self) {
        self.inner.reclaim_thread()
    }

    /// Ids of held results that transfers wait for: `(to write to files,
    /// to frame for another host)`; both empty after `timeout`.
    fn pickle_requests(&self, py: Python<'_>, timeout: f64) -> (Vec<u64>, Vec<u64>) {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let inner = &self.inner;
        py.detach(move || inner.pickle_requests(timeout))
    }

    /// Frames of held results for transfers to another host, as their
    /// parts (`bytes` or byte memoryviews), or None when one could not be
    /// framed. The results stay held. A large part is not copied: it is
    /// sent from where it lies, its object kept alive until sent (and let
    /// go without the GIL: pyo3 defers that reference to the next holder
    /// of the GIL); the small ones (the pickle's header) are copied.
    fn put_frames(&self, items: Vec<(u64, Option<Vec<Bound<'_, PyAny>>>)>) -> PyResult<()> {
        let mut framed = Vec::with_capacity(items.len());
        for (id, parts) in items {
            let Some(parts) = parts else {
                framed.push((id, None));
                continue;
            };
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                let buf = pyo3::buffer::PyBuffer::<u8>::get(&part)?;
                if !buf.is_c_contiguous() {
                    return Err(PyValueError::new_err("a frame part is not contiguous"));
                }
                let (ptr, len) = (buf.buf_ptr().cast::<u8>().cast_const(), buf.len_bytes());
                if len < 64 * 1024 {
                    // SAFETY: a contiguous buffer of `len` readable bytes,
                    // held (with the GIL) while it is copied.
                    out.push(Bytes::copy_from_slice(unsafe {
                        std::slice::from_raw_parts(ptr, len)
                    }));
                } else {
                    out.push(Bytes::from_owner(HeldPart {
                        _obj: part.unbind(),
                        ptr,
                        len,
                    }));
                }
            }
            framed.push((id, Some(out)));
        }
        self.inner.put_frames(framed);
        Ok(())
    }

    /// Where a held result now is: `(path, length)` of the file with its
    /// pickle (shared memory, or spilled to disk), or None when it cannot
    /// be had (waiting transfers give up on it).
    fn put_stored(&self, id: u64, file: Option<(String, u64)>) {
        self.inner
            .put_stored(id, file.map(|(path, len)| Stored::File { path, len }))
    }

    /// `put_stored` for a batch: waiting transfers are woken once.
    fn put_stored_many(&self, items: Vec<(u64, Option<(String, u64)>)>) {
        let items = items
            .into_iter()
            .map(|(id, f)| (id, f.map(|(path, len)| Stored::File { path, len })))
            .collect();
        self.inner.put_stored_many(items)
    }

    /// A held result cannot be pickled (`why`): fetches of it, by peers
    /// and clients, fail with that reason.
    fn put_unpicklable(&self, id: u64, why: String) {
        self.inner.put_stored(id, Some(Stored::Unpicklable(why)))
    }

    /// Tells the scheduler the worker's memory is above (True) or back below
    /// (False) its pause fraction: no new work while paused.
    fn set_paused(&self, paused: bool) {
        self.inner.set_paused(paused)
    }

    /// Asks the scheduler to retire this worker gracefully (SIGTERM).
    fn retire(&self) {
        self.inner.retire()
    }

    /// Task `id`'s result cannot be pickled: what takes it runs here.
    fn pin(&self, id: u64) {
        self.inner.pin(id)
    }

    /// Runs command task `id` (its `args`: the encoded command) with the GIL
    /// released. Returns `(ending, code, stdout, stderr, stderr_tail,
    /// killed, argv)`: ending is "exited" (code: its status), "signaled" (code:
    /// the signal), "timeout" or "stopped"; stdout/stderr are bytes when
    /// captured. Raises OSError when it cannot start.
    #[pyo3(signature = (id, args, job, cpus, extra_env, time_limit=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn run_command<'py>(
        &self,
        py: Python<'py>,
        id: u64,
        args: &[u8],
        job: u32,
        cpus: u32,
        extra_env: Vec<(String, String)>,
        time_limit: Option<f64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let spec: shoal_proto::CommandSpec = shoal_proto::decode(args)
            .map_err(|e| PyValueError::new_err(format!("not a command task: {e}")))?;
        let limit = time_limit
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(Duration::from_secs_f64);
        let inner = &self.inner;
        let out = py
            .detach(|| inner.run_command(id, &spec, job, cpus, &extra_env, limit))
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        use shoal_runtime::command::Ending;
        let (ending, code) = match out.ending {
            Ending::Exited(c) => ("exited", c),
            Ending::Signaled(sig) => ("signaled", sig),
            Ending::TimedOut => ("timeout", 0),
            Ending::Stopped => ("stopped", 0),
        };
        let bytes = |b: Option<Vec<u8>>| b.map(|b| PyBytes::new(py, &b));
        (
            ending,
            code,
            bytes(out.stdout),
            bytes(out.stderr),
            out.stderr_tail,
            out.killed,
            spec.argv,
        )
            .into_pyobject(py)
    }

    /// Kills the process groups of running command tasks (as the worker
    /// exits).
    fn kill_commands(&self) {
        self.inner.kill_commands()
    }

    /// Running tasks the scheduler asked to stop (cancelled); waits up to
    /// `timeout` seconds with the GIL released (empty on timeout).
    fn stop_requests(&self, py: Python<'_>, timeout: f64) -> Vec<u64> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let inner = &self.inner;
        py.detach(move || inner.stop_requests(timeout))
    }

    /// A task told to stop did not stop within the grace period: reports
    /// its failure (a `next_batch` done tuple), then asks the scheduler to
    /// restart this process.
    fn report_stuck(&self, done: DoneTuple<'_>, lane: u32) -> PyResult<()> {
        self.inner.report_stuck(to_done(done, lane)?);
        Ok(())
    }

    /// Seconds between a stop (or a time limit) and the kill or restart
    /// that follows when the task does not end (`SHOAL_STOP_GRACE`).
    #[getter]
    fn stop_grace(&self) -> f64 {
        self.inner.stop_grace.as_secs_f64()
    }

    /// Name of a signal number (`9` -> "SIGKILL").
    #[staticmethod]
    fn signal_name(sig: i32) -> String {
        shoal_runtime::command::signal_name(sig)
    }

    /// `(path, length)` of the file holding result `id`, if it is kept as
    /// one here (copied from a retiring worker).
    fn stored_file(&self, id: u64) -> Option<(String, u64)> {
        self.inner.stored_file(id)
    }

    /// The memory manager's figures, sent to the scheduler with the next
    /// heartbeat (bytes; limit 0: none).
    #[pyo3(signature = (memory, managed, spilled, limit, paused, spilled_total=0))]
    fn set_metrics(
        &self,
        memory: u64,
        managed: u64,
        spilled: u64,
        limit: u64,
        paused: bool,
        spilled_total: u64,
    ) {
        self.inner.set_metrics(WorkerMetrics {
            memory,
            managed,
            spilled,
            limit,
            paused,
            spilled_total,
            ..WorkerMetrics::default()
        })
    }

    /// A spill (`"spill"`) or transfer for the task stream.
    fn record_activity(
        &self,
        kind: &str,
        task: u64,
        bytes: u64,
        start_us: u64,
        duration_us: u64,
    ) -> PyResult<()> {
        let kind = match kind {
            "spill" => ActivityKind::Spill,
            "transfer" => ActivityKind::Transfer,
            other => {
                return Err(PyValueError::new_err(format!(
                    "activity kinds are spill and transfer, not {other:?}"
                )))
            }
        };
        self.inner.record_activity(Activity {
            kind,
            task,
            bytes,
            start_us,
            duration_us,
        });
        Ok(())
    }

    /// Profile samples `[(task group, folded stack, count)]` (sent to the
    /// scheduler with the next heartbeat).
    fn add_profile(&self, samples: Vec<(String, String, u32)>) {
        self.inner.add_profile(samples);
    }

    /// A profiler thread runs (True): the scheduler's syncs wait for it.
    fn set_sampler(&self, on: bool) {
        self.inner.set_sampler(on);
    }

    /// Changes when the scheduler asks for a sync: hand over the samples
    /// (``add_profile``), then call ``synced``.
    fn sync_epoch(&self) -> u64 {
        self.inner.sync_epoch()
    }

    /// Answers the scheduler's pending syncs (after ``add_profile``).
    fn synced(&self) {
        self.inner.synced();
    }

    /// The profiler's sleep: `secs` without the GIL, then a tick falls due
    /// before the GIL is asked for again. A task shorter than the GIL's
    /// switch interval ends before the sampler gets the GIL; seeing a tick
    /// that fell due while it ran, it leaves itself for the sampler to
    /// count, so short tasks are not missing from profiles.
    fn sampler_sleep(&self, py: Python<'_>, secs: f64) {
        py.detach(|| {
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)));
            // Before the GIL is asked for again.
            self.ticks.fetch_add(1, Ordering::SeqCst);
        });
    }

    /// Ticks due so far.
    fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::SeqCst)
    }
}

/// The dashboard's access token for a cluster token (what `?token=` takes).
#[pyfunction]
fn dashboard_token(token: &str) -> PyResult<String> {
    let secret = Secret::from_token(token).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(secret.dashboard_token())
}

/// Seconds in a duration a person typed (`"90"`, `"2.5"`, `"10m"`,
/// `"1h30m"`): the CLI's parser, so both take the same spellings.
#[pyfunction]
fn parse_duration(text: &str) -> PyResult<f64> {
    shoal_runtime::duration::parse(text)
        .map(|d| d.as_secs_f64())
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// One of the dashboard's embedded files: `index.html`, `app.js`, `app.css`
/// (a performance report inlines them).
#[pyfunction]
fn dashboard_asset(name: &str) -> PyResult<&'static str> {
    match name {
        "index.html" => Ok(scheduler::INDEX_HTML),
        "app.js" => Ok(scheduler::APP_JS),
        "app.css" => Ok(scheduler::APP_CSS),
        other => Err(PyValueError::new_err(format!(
            "the dashboard has index.html, app.js and app.css, not {other:?}"
        ))),
    }
}

/// Appends a line to this process's log ring (what `get_worker_logs`
/// returns; Python's `logging` records come here).
#[pyfunction]
fn log_line(line: String) {
    shoal_runtime::logs::push(line);
}

/// Runs the `shoal` command line; returns the exit code.
#[pyfunction]
#[pyo3(signature = (argv, python=None, package_path=None, executable=None))]
fn cli_main(
    py: Python<'_>,
    argv: Vec<String>,
    python: Option<String>,
    package_path: Option<String>,
    executable: Option<String>,
) -> i32 {
    py.detach(|| {
        shoal_cli::run(
            argv,
            shoal_cli::HostInfo {
                python,
                package_path,
                executable,
            },
        )
    })
}

/// `(id, ok, payload, start_us, duration_us, size)` as the worker loop
/// reports it: payload is the pickle (bytes), the path of the file holding
/// it (str), or None for a large result the Python side keeps; for a
/// failure, `(pickled error, error text)`.
type DoneTuple<'py> = (u64, bool, Option<Bound<'py, PyAny>>, u64, u64, u64);

fn to_done(
    (id, ok, payload, start_us, duration_us, size): DoneTuple<'_>,
    lane: u32,
) -> PyResult<Done> {
    let timing = Timing {
        start_us,
        duration_us,
        thread: lane,
    };
    if !ok {
        let (error, text): (PyBackedBytes, String) = payload
            .ok_or_else(|| PyValueError::new_err("a failure report needs its error"))?
            .extract()?;
        return Ok(Done::Err {
            id,
            error: Bytes::copy_from_slice(&error),
            text,
            timing,
        });
    }
    let Some(p) = payload else {
        return Ok(Done::Held { id, size, timing });
    };
    if let Ok(path) = p.cast::<PyString>() {
        return Ok(Done::File {
            id,
            path: path.to_str()?.to_owned(),
            size,
            timing,
        });
    }
    let value = Bytes::copy_from_slice(p.cast::<PyBytes>()?.as_bytes());
    Ok(Done::Ok { id, value, timing })
}

/// A large part of a held result's frame, sent from where it lies: a
/// `bytes` or a memoryview (which keeps its exporter's buffer in place
/// while it lives), kept alive by this reference.
struct HeldPart {
    _obj: Py<PyAny>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the bytes are only read; the object (a `Py`, itself Send and
// Sync) keeps them where they are for as long as this lives.
unsafe impl Send for HeldPart {}
unsafe impl Sync for HeldPart {}

impl AsRef<[u8]> for HeldPart {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `ptr`, kept alive by `_obj`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A client's count of live futures per task (`Client._refs`): 4 bytes a
/// task for its own (sequential) ids, where a dict entry costs 42.
#[pyclass(module = "shoal._core")]
struct RefCounts(shoal_runtime::refcounts::RefCounts);

#[pymethods]
impl RefCounts {
    #[new]
    fn new(client_id: u64) -> Self {
        RefCounts(shoal_runtime::refcounts::RefCounts::new(client_id))
    }

    /// `n` more futures of task `id`.
    fn incref(&mut self, id: u64, n: u32) {
        self.0.incref(id, n)
    }

    /// One more future of each task in `ids`.
    fn incref_many(&mut self, ids: Vec<u64>) {
        self.0.incref_many(ids)
    }

    /// One future fewer; True when it was the task's last.
    fn decref(&mut self, id: u64) -> bool {
        self.0.decref(id)
    }

    /// (Anything that is not a task id is not in it.)
    fn __contains__(&self, id: &Bound<'_, PyAny>) -> bool {
        id.extract::<u64>().is_ok_and(|id| self.0.contains(id))
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// Tasks with live futures, in no order.
    fn ids(&self) -> Vec<u64> {
        self.0.ids()
    }

    /// Iterates over a snapshot of [`RefCounts::ids`].
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyIterator>> {
        PyList::new(py, self.0.ids())?.try_iter()
    }
}

/// Received bytes lent to Python as a read-only buffer: arrays unpickled
/// from it are views of the frame, which lives as long as they do.
#[pyclass(frozen)]
struct Frame {
    bytes: Bytes,
}

/// Fills `view` for `len` bytes at `ptr` lent by `owner`: read-only unless
/// `writable` (a request to write a read-only one is a `BufferError`
/// saying `what` is read-only).
///
/// # Safety
/// `ptr..ptr + len` must stay valid (and, if `writable`, writable) as long
/// as `owner` lives; the view keeps `owner` alive.
unsafe fn lend_buffer(
    owner: &Bound<'_, PyAny>,
    view: *mut pyo3::ffi::Py_buffer,
    flags: std::os::raw::c_int,
    (ptr, len, writable): (*const u8, usize, bool),
    what: &str,
) -> PyResult<()> {
    if flags & pyo3::ffi::PyBUF_WRITABLE != 0 && !writable {
        return Err(pyo3::exceptions::PyBufferError::new_err(format!(
            "{what} is read-only"
        )));
    }
    // SAFETY: the caller's contract; the exporter is `owner`.
    let rc = unsafe {
        pyo3::ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            ptr as *mut std::os::raw::c_void,
            len as pyo3::ffi::Py_ssize_t,
            i32::from(!writable),
            flags,
        )
    };
    if rc == -1 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

#[pymethods]
impl Frame {
    /// # Safety
    /// Fills `view` for the frame's bytes, which are never written and
    /// live as long as this object (Python keeps it alive while the view
    /// is held).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let b = &slf.get().bytes;
        let lent = (b.as_ptr(), b.len(), false);
        // SAFETY: the frame's bytes live as long as `slf`.
        unsafe { lend_buffer(slf.as_any(), view, flags, lent, "a received frame") }
    }

    fn __len__(&self) -> usize {
        self.bytes.len()
    }
}

/// A file on this host mapped for `_serialize.loads`: copy-on-write
/// (`writable`: arrays unpickled from it are views of the shared pages,
/// writable as NumPy users expect, and a page written is copied for this
/// process alone, never changing the file others map) or read-only. Mapped
/// 2 MiB-aligned, so that a file of huge pages is mapped by huge entries
/// (see `shoal_runtime::hugeshm::map_aligned`); unmapped when the last
/// view of it goes.
#[pyclass(frozen)]
struct Mapped {
    map: shoal_runtime::hugeshm::Mapping,
    writable: bool,
}

impl Mapped {
    fn new(fd: i32, writable: bool) -> std::io::Result<Mapped> {
        // SAFETY: fstat fills the zeroed struct for the caller's fd.
        let len = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            usize::try_from(st.st_size).unwrap_or(0)
        };
        let (prot, flags) = if writable {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE)
        } else {
            (libc::PROT_READ, libc::MAP_SHARED)
        };
        let map = shoal_runtime::hugeshm::map_aligned(fd, len, prot, flags)?;
        Ok(Mapped { map, writable })
    }
}

#[pymethods]
impl Mapped {
    /// # Safety
    /// Fills `view` for the mapping, which lives as long as this object
    /// (Python keeps it alive while the view is held).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let m = slf.get();
        let lent = (m.map.as_ptr().cast_const(), m.map.len(), m.writable);
        // SAFETY: the mapping lives as long as `slf`; a writable one is
        // private (copy-on-write).
        unsafe { lend_buffer(slf.as_any(), view, flags, lent, "this mapping") }
    }

    fn __len__(&self) -> usize {
        self.map.len()
    }
}

/// Maps the file `fd` (it may be closed afterwards): copy-on-write if
/// `writable`, else read-only. See `Mapped`.
#[pyfunction]
fn map_file(fd: i32, writable: bool) -> PyResult<Mapped> {
    Ok(Mapped::new(fd, writable)?)
}

/// A fetched result for `_serialize.loads`: bytes as a `bytearray` (arrays
/// unpickled from it out of band are writable views of it), a file on this
/// host as a copy-on-write [`Mapped`]. A result its holder cannot pickle is
/// a `TypeError` saying why.
fn fetched_to_py(py: Python<'_>, v: Fetched) -> PyResult<Py<PyAny>> {
    use std::os::fd::AsRawFd;
    match v {
        Fetched::Bytes(b) => Ok(PyByteArray::new(py, &b).into_any().unbind()),
        // The mapping outlives the descriptor, which closes when `f` drops.
        Fetched::File(f) => Ok(Py::new(py, Mapped::new(f.as_raw_fd(), true)?)?.into_any()),
        Fetched::Unpicklable(why) => Err(PyTypeError::new_err(why)),
    }
}

/// This process's shared-memory segment directory, created (emptied if a
/// dead process with the same pid left one).
#[pyfunction]
fn segment_dir() -> PyResult<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Emptied once per process (a stale one of a dead process with our
    // pid); later calls must not delete what this process put there.
    static FRESH_FOR: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let d = shm::segment_dir(pid);
    if FRESH_FOR.swap(pid, Ordering::SeqCst) != pid {
        shm::create_own(&d)?;
    } else {
        std::fs::create_dir_all(&d)?;
    }
    Ok(d.to_string_lossy().into_owned())
}

/// This process's spill directory under `local` (default: the temporary
/// directory), created.
#[pyfunction]
#[pyo3(signature = (local=None))]
fn spill_dir(local: Option<PathBuf>) -> PyResult<String> {
    let d = shm::spill_dir(local.as_deref(), std::process::id());
    shm::create_own(&d)?;
    Ok(d.to_string_lossy().into_owned())
}

/// Removes the segment and spill directories of process `pid` (it exited).
#[pyfunction]
fn remove_process_dirs(pid: u32) {
    shm::remove_process(pid)
}

/// Removes the directories of this user's processes that no longer exist
/// (under `local` for spill directories); returns how many.
#[pyfunction]
#[pyo3(signature = (local=None))]
fn sweep(local: Option<PathBuf>) -> usize {
    shm::sweep(local.as_deref())
}

/// Uses these PEM files for `tls://` connections of this process (the
/// site's CA, this process's certificate and key). Once per process.
#[pyfunction]
fn configure_tls(ca: PathBuf, cert: PathBuf, key: PathBuf) -> PyResult<()> {
    shoal_runtime::net::configure_tls(&ca, &cert, &key)
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    shoal_runtime::init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", shoal_proto::PROTOCOL_VERSION)?;
    m.add("INLINE_LIMIT", shoal_proto::INLINE_LIMIT)?;
    m.add("EXIT_STOPPED", shoal_runtime::local::EXIT_STOPPED)?;
    m.add("EXIT_REFUSED", shoal_runtime::local::EXIT_REFUSED)?;
    m.add(
        "EXIT_SCHEDULER_SILENT",
        shoal_runtime::local::EXIT_SCHEDULER_SILENT,
    )?;
    m.add("ShoalError", m.py().get_type::<ShoalError>())?;
    m.add(
        "SchedulerLostError",
        m.py().get_type::<SchedulerLostError>(),
    )?;
    m.add_class::<Cluster>()?;
    m.add_class::<ClientCore>()?;
    m.add_class::<WatcherPy>()?;
    m.add_class::<RefCounts>()?;
    m.add_class::<WorkerCore>()?;
    m.add_class::<Frame>()?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(segment_dir, m)?)?;
    m.add_function(wrap_pyfunction!(spill_dir, m)?)?;
    m.add_function(wrap_pyfunction!(remove_process_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(sweep, m)?)?;
    m.add_function(wrap_pyfunction!(configure_tls, m)?)?;
    m.add_function(wrap_pyfunction!(dashboard_token, m)?)?;
    m.add_function(wrap_pyfunction!(parse_duration, m)?)?;
    m.add("MAX_DURATION", shoal_runtime::duration::MAX.as_secs_f64())?;
    m.add_function(wrap_pyfunction!(dashboard_asset, m)?)?;
    m.add_function(wrap_pyfunction!(log_line, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_install, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_use, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_locate, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_forked, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_publish, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_reserve, m)?)?;
    m.add_function(wrap_pyfunction!(map_file, m)?)?;
    m.add_class::<Mapped>()?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_stats, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_trim, m)?)?;
    Ok(())
}
