//! `WorkerCore`: the Rust half of a worker process, and the reports its
//! execution threads hand over.

use super::*;
use bytes::Bytes;
use pyo3::exceptions::{PyConnectionError, PyOSError, PyPermissionError, PyValueError};
use pyo3::intern;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use shoal_proto::{Activity, ActivityKind, TaskKind, Timing, WorkerMetrics};
use shoal_runtime::net::{Address, Secret};
use shoal_runtime::runtime;
use shoal_runtime::transfer::Fetched;
use shoal_runtime::worker::{self, Batch, Done, Input, Stored, WorkerShared};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The Rust half of a worker process (see `shoal._worker`).
#[pyclass(module = "shoal._core", frozen)]
pub(crate) struct WorkerCore {
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
        let addr = Address::parse(address).map_err(|e| PyValueError::new_err(e.to_string()))?;
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
    /// back: this thread ends). Tasks are `(id, name, group, kind, func, args, deps, resources)` (kind: 0 a call, 1 a
    /// batch, 2 a command, 3 a batch that says which element runs) with deps
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
        // This thread runs nothing now: a death from here on is no task's.
        if let Some(s) = &inner.slots {
            s.clear(lane);
        }
        // Work already queued is taken with the GIL held (no lock is held
        // while waiting, so this cannot block); only waiting releases it.
        let taken = if inner.backlogged() {
            inner.report(done);
            py.detach(|| inner.wait_room());
            inner.try_next(max)
        } else {
            inner.report_and_take(done, max)
        };
        let batch = match taken {
            Some(b) => b,
            None => {
                let timeout = shoal_runtime::duration::wait(timeout);
                py.detach(move || inner.wait_next(max, timeout))
            }
        };
        let (tasks, released) = match batch {
            Batch::Shutdown => return Ok(intern!(py, "shutdown").clone().into_any()),
            Batch::Retire => return Ok(intern!(py, "retire").clone().into_any()),
            Batch::Work(t, r) => (t, r),
        };
        // Before the task is handed over: if the process dies from here
        // until the next call, its supervisor blames this task (and only it).
        if let Some(s) = &inner.slots {
            match tasks.as_slice() {
                [] => {}
                [t] => s.set(lane, t.id),
                _ => s.set_unknown(lane),
            }
        }
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
                TaskKind::Batch if t.careful => 3,
                TaskKind::Batch => 1,
                TaskKind::Command => 2,
            };
            // Seconds (None: no limit).
            let limit = (t.time_limit_ms > 0).then(|| t.time_limit_ms as f64 / 1000.0);
            let resume: Option<Vec<Bound<'py, PyBytes>>> = (!t.resume.is_empty())
                .then(|| t.resume.iter().map(|b| PyBytes::new(py, b)).collect());
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
                resume,
            ))?;
        }
        Ok((list, released).into_pyobject(py)?.into_any())
    }

    /// Execution thread `lane`'s batch runs its element `item` from now
    /// (only for a batch run again after its worker died: see
    /// `shoal_runtime::slots`).
    fn slot_item(&self, lane: u32, item: u32) {
        if let Some(s) = &self.inner.slots {
            s.set_item(lane, item);
        }
    }

    /// Elements `start..start + count` of careful batch `id` are done
    /// (`values`: their pickled outcomes), for a later run to resume after.
    fn batch_progress(&self, id: u64, start: u32, count: u32, values: Vec<u8>) {
        self.inner.progress(id, start, count, values.into());
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
        let timeout = shoal_runtime::duration::wait(timeout);
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
            .map(shoal_runtime::duration::wait);
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
        let timeout = shoal_runtime::duration::wait(timeout);
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
            std::thread::sleep(shoal_runtime::duration::wait(secs));
            // Before the GIL is asked for again.
            self.ticks.fetch_add(1, Ordering::SeqCst);
        });
    }

    /// Ticks due so far.
    fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::SeqCst)
    }
}

/// `(id, ok, payload, start_us, duration_us, size)` as the worker loop
/// reports it: payload is the pickle (bytes), the path of the file holding
/// it (str), or None for a large result the Python side keeps; for a
/// failure, `(pickled error, error text)`.
pub(crate) type DoneTuple<'py> = (u64, bool, Option<Bound<'py, PyAny>>, u64, u64, u64);

pub(crate) fn to_done(
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
pub(crate) struct HeldPart {
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
