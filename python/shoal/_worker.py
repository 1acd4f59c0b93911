"""Worker process main loop: ``python -m shoal._worker [--nthreads N] ADDRESS``.

The Rust runtime (network, result store, data server) runs on its own
thread; this loop pulls batches of tasks from it with the GIL released,
runs them, and hands back the pickled results with the next pull.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib
import math
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from time import perf_counter
from typing import Any

from . import _commands, _context, _core, _profile, _resources, _serialize, _store
from ._core import WorkerCore
from .errors import FutureCancelledError, TaskAbortedError, TaskTimeoutError


class _Stopped(BaseException):
    """Raised in a task's thread by the watchdog (never caught by a task's
    ``except Exception``)."""


class _Cancelled(_Stopped):
    """The task was cancelled while it ran."""


class _TimeUp(_Stopped):
    """The task ran past its time limit."""


# PyThreadState_SetAsyncExc(thread id, exception class or NULL to clear):
# the exception is raised in that thread at its next bytecode.
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)
_set_async_exc.restype = ctypes.c_int


def _importing(ident: int) -> bool:
    """Whether thread ``ident`` is inside an import (importlib's frames)."""
    f = sys._current_frames().get(ident)
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            return True
        f = f.f_back
    return False


def _dumps_error(
    exc: BaseException, name: str, tb: str | None = None, limit: float | None = None
) -> tuple[bytes, str]:
    """The pickled ``(exception, traceback text)`` and the text alone (for
    the dashboard's task detail)."""
    if tb is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, _TimeUp):
        exc = TaskTimeoutError(
            f"task {name!r} ran past its time limit of {limit or 0:g}s and was interrupted"
        )
    elif isinstance(exc, _Cancelled):
        exc = FutureCancelledError(f"task {name!r} was cancelled while it ran")
    elif not isinstance(exc, Exception):
        exc = TaskAbortedError(
            f"task {name!r} raised {type(exc).__name__}{exc.args!r}; the worker kept running"
        )
    return _serialize.dumps((_serialize.box_exception(exc), tb)), tb


def _run_batch(fn: Any, payload: Any) -> Any:
    """Runs a ``map`` batch: ``(elements, kwargs, star)``; ``star``: each
    element is an argument tuple (several iterables), else the one argument.
    A failing element fails alone; every element runs exactly once."""
    arglist, kwargs, star = payload
    kwargs = kwargs or {}
    values: list[Any] = []
    append = values.append
    errors: dict[int, tuple[BaseException, str]] = {}
    i = 0
    while i < len(arglist):
        try:  # one try per run of successes, not per element
            if star:
                for a in arglist[i:] if i else arglist:
                    append(fn(*a, **kwargs))
            elif kwargs:
                for a in arglist[i:] if i else arglist:
                    append(fn(a, **kwargs))
            else:
                for a in arglist[i:] if i else arglist:
                    append(fn(a))
            break
        except Exception as e:
            i = len(values)
            errors[i] = (e, traceback.format_exc())
            append(None)
            i += 1
    if errors:
        return _serialize.BatchResult(values, errors)
    return values


# A careful batch sends what it has done this often (seconds), when small.
_PROGRESS_EVERY = 0.05
_PROGRESS_MAX = 256 * 1024


def _run_careful_batch(core: Any, tid: int, fn: Any, payload: Any, resume: Any) -> Any:
    """Runs a ``map`` batch again after a worker died running it. Before
    each element it says which one runs (in the page its supervisor reads
    if this process dies too: only a death at the same element again counts
    against the batch), and every ``_PROGRESS_EVERY`` seconds it sends what
    it has done (while small), so a run after another death starts after it
    instead of from the start. ``resume``: what earlier runs sent."""
    arglist, kwargs, star = payload
    kwargs = kwargs or {}
    values: list[Any] = []
    errors: dict[int, tuple[BaseException, str]] = {}
    for part in resume or ():
        done = _serialize.loads(part)
        errors.update((len(values) + i, e) for i, e in done.errors.items())
        values.extend(done.values)
    append, lane, mark = values.append, task_local.lane, core.slot_item
    saving, saved = True, len(values)
    next_save = perf_counter() + _PROGRESS_EVERY
    for i in range(len(values), len(arglist)):
        mark(lane, i)
        a = arglist[i]
        try:
            append(fn(*a, **kwargs) if star else fn(a, **kwargs))
        except Exception as e:
            errors[i] = (e, traceback.format_exc())
            append(None)
        if saving and perf_counter() >= next_save:
            errs = {k - saved: v for k, v in errors.items() if k >= saved}
            try:
                blob = _serialize.dumps(_serialize.BatchResult(values[saved:], errs))
            except Exception:  # noqa: BLE001 - progress is only saved when it can be
                blob = None
            if blob is None or len(blob) > _PROGRESS_MAX:
                saving = False  # too big to travel with each later run
            else:
                core.batch_progress(tid, saved, len(values) - saved, blob)
                saved = len(values)
                next_save = perf_counter() + _PROGRESS_EVERY
    return _serialize.BatchResult(values, errors) if errors else values


task_local = _context.task_local
actors = _context.actors


class ActorFailed:
    """An actor whose constructor raised: every call raises that error."""

    def __init__(self, error: BaseException):
        self.error = error


def _start_actor(spec: str) -> None:
    """``--actor ID=PATH``: builds the instance from the pickled
    ``(cls, args, kwargs)`` at PATH before the worker joins."""
    import cloudpickle

    actor_id, _, path = spec.partition("=")
    with open(path, "rb") as fh:
        cls, args, kwargs = cloudpickle.load(fh)
    try:
        actors[actor_id] = cls(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported by every call
        tb = traceback.format_exc()
        try:
            e.add_note(f"\nActor constructor traceback:\n{tb.rstrip()}")
        except Exception:  # noqa: BLE001
            pass
        actors[actor_id] = ActorFailed(e)


def _preload(modules: list[str]) -> None:
    """Thread: imports modules tasks will need (``--preload``), so that the
    first task does not pay for them. A module that fails to import is
    reported and skipped: the task that needs it will raise there."""
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - a preload never kills its worker
            print(f"shoal worker: --preload {name}: {type(e).__name__}: {e}", file=sys.stderr)


def _exit_with_parent(pid: int) -> None:
    """An actor's process goes when the client that started it does."""
    while True:
        time.sleep(0.5)
        if os.getppid() != pid:
            os._exit(0)


class _Executor:
    def __init__(
        self,
        core: WorkerCore,
        address: str,
        token: str,
        nthreads: int,
        gpus: list[str],
        store: _store.Store,
    ):
        self.core = core
        self.store = store
        self.name = ""
        self.nthreads = nthreads
        self.gpu_users = dict.fromkeys(gpus, 0)  # device -> tasks using it
        self.address = address
        self.token = token
        self.lock = threading.Lock()
        self.client: Any = None  # get_client() inside tasks
        self.stopped = threading.Event()
        self.funcs: dict[bytes, Any] = {}
        self.lanes: set[int] = set()  # task stream lanes of live threads
        # Thread id -> group of the task it runs, for the profiler (None
        # while it is off: nothing to keep up to date per task).
        self.running_groups: dict[int, str] | None = None
        self.sampler: Any = None  # the profiler (told when tasks end)
        # Stopping Python tasks (cancel, time limit): the rules are
        # `_core.Watchdog`'s (shoal_core::worker::interrupts); `watchdog`
        # carries them out.
        self.running: dict[int, int] = {}  # task -> thread ident
        self.rules = _core.Watchdog(core.stop_grace)
        self.limited_names: dict[int, str] = {}  # tasks with a time limit
        self.fetched = _Fetched(_Fetched.budget_for(store.limit))
        # Modules later tasks will likely need (the heavy libraries the
        # client imported), imported by lane 0 while no task waits.
        self.idle_imports: list[str] = []

    def run(self) -> None:
        # One task per call: tasks not started stay in the Rust queue, where
        # the scheduler can take them back (work stealing) and where inputs
        # arrive. Reports are buffered there and travel together. A call
        # that finds work queued does not release the GIL (about a
        # microsecond).
        core, store = self.core, self.store
        with self.lock:  # the lowest free lane: lanes stay few across secede/rejoin
            lane = min(set(range(len(self.lanes) + 1)) - self.lanes)
            self.lanes.add(lane)
        done: list[tuple[int, bool, Any, int, int, int]] = []
        ident = threading.get_ident()
        task_local.executor = self
        task_local.lane = lane
        trims = not store.in_process  # a worker process's heap, not a client's
        ran = False  # tasks ran since this thread last trimmed the heap
        while True:
            # One module at a time, while no task waits and none runs (one
            # thread imports at a time: see start()).
            importing = self.idle_imports and lane == 0 and not self.running
            r = core.next_batch(done, 1, 0.0 if importing else 1.0, lane)
            if r == "shutdown":
                self.stopped.set()
                return
            if r == "retire":  # a lent thread was taken back: this one ends
                with self.lock:
                    self.lanes.discard(lane)
                return
            tasks, released = r
            if not tasks and not released:
                if importing:
                    _preload([self.idle_imports.pop(0)])
                    done = []
                    continue
                self.fetched.clear()  # idle a second: fetched inputs go
                if ran:  # and, once, the heap memory tasks freed
                    ran = False
                    _core.malloc_trim()
            elif tasks:
                ran = trims
            if released:
                store.release(released)
            done = []
            for t in tasks:
                try:
                    done.append(self.execute(ident, *t))
                except _Stopped as e:
                    # An interrupt that came after its task's own end (at
                    # most one a task): the task was stopped all the same.
                    self._ended(t[0], ident)
                    error = _dumps_error(e, t[1], None, t[8])
                    done.append((t[0], False, error, int(time.time() * 1e6), 0, 0))
            # Not held while waiting for the next task: its inputs (a frame
            # received from another host, say) are freed now, not then.
            r = tasks = t = None

    def execute(
        self,
        ident,
        tid,
        name,
        group,
        kind,
        func,
        args,
        deps,
        resources=None,
        limit=None,
        job=0,
        resume=None,
    ):
        if kind == 2:
            run, task = self._command, (tid, name, args, resources, limit, job)
        elif not resources:  # the common case, straight on
            return self._execute(ident, tid, name, group, kind, func, args, deps, limit, resume)
        else:
            run = self._execute
            task = (ident, tid, name, group, kind, func, args, deps, limit, resume)
        if resources:
            gpus = sum(v for k, v in resources if k == "GPU")
            if gpus and self.gpu_users:
                return self._with_gpus(gpus, run, *task)
        return run(*task)

    def _ended(self, tid: int, ident: int) -> None:
        self.running.pop(tid, None)
        if self.limited_names:
            self.limited_names.pop(tid, None)
        # Under the lock the watchdog raises under, after `running` lost the
        # task: an interrupt meant for it is either not raised or cleared.
        with self.lock:
            if self.rules.ended(tid, ident):
                _set_async_exc(ident, None)

    def watchdog(self) -> None:
        """Thread: stops Python tasks that are cancelled while they run or
        that pass their time limit, by raising an exception in their thread
        (where Python allows it: between bytecodes). A task that does not
        end within the grace period (stuck in C code) fails, and this
        process asks to be restarted. When is `_core.Watchdog`'s rule; this
        loop has the facts (which thread runs what, which is importing)
        and acts."""
        core, rules = self.core, self.rules
        while not self.stopped.is_set():
            try:
                stops = core.stop_requests(0.05 if rules.watching else 0.25)
                with self.lock:
                    raise_, stuck = rules.tick(time.monotonic(), stops, dict(self.running))
                    for ident, tid, why in raise_:
                        # An import cut short leaves its modules half made
                        # for every later task: tried again at the next tick.
                        importing = _importing(ident)
                        if importing or self.running.get(tid) != ident:
                            rules.not_raised(ident, importing)
                            continue
                        _set_async_exc(ident, id(_TimeUp if why == "time-up" else _Cancelled))
                if stuck is not None:
                    self._stuck(*stuck)
            except Exception:  # noqa: BLE001 - the watchdog must outlive a bug
                traceback.print_exc()
                time.sleep(0.5)

    def _stuck(self, tid: int, why: str, waited: float, limit: float) -> None:
        cls = _TimeUp if why == "time-up" else _Cancelled
        name = self.limited_names.get(tid, f"{tid:x}")
        reason = f"its time limit of {limit:g}s" if cls is _TimeUp else "it was cancelled"
        msg = (
            f"task {name!r} did not stop {waited:.1f}s after {reason} (it is stuck outside "
            "Python code, e.g. in C): its worker process restarts"
        )
        print(f"shoal worker {os.getpid()}: {msg}", file=sys.stderr, flush=True)
        exc = TaskTimeoutError(msg) if cls is _TimeUp else FutureCancelledError(msg)
        now_us = int(time.time() * 1e6)
        self.core.report_stuck((tid, False, _dumps_error(exc, name, msg), now_us, 0, 0), 0)

    def _command(self, tid, name, args, resources, limit, job):
        """A command task: the program runs under the Rust runtime (which
        also stops it on a cancel or at its time limit)."""
        start_us = int(time.time() * 1e6)
        t0 = perf_counter()
        try:
            result = _commands.run(self.core, tid, name, args, job, resources, limit)
        except Exception as e:  # noqa: BLE001 - the task's failure
            duration = int((perf_counter() - t0) * 1e6)
            # The message says it all: no worker traceback for the client,
            # the message alone for the dashboard and job errors.
            text = f"{type(e).__name__}: {e}"
            error = _serialize.dumps((_serialize.box_exception(e), ""))
            return (tid, False, (error, text), start_us, duration, 0)
        duration = int((perf_counter() - t0) * 1e6)
        payload, size = self.store.finish(tid, result, None, name)
        return (tid, True, payload, start_us, duration, size)

    def _with_gpus(self, gpus: float, run: Any, *task: Any) -> Any:
        """Runs a GPU task with ``CUDA_VISIBLE_DEVICES`` set to the devices it
        was given: the least used ones, ``ceil(gpus)`` of them. The variable
        is process-wide: with several threads per worker, GPU tasks should
        each have a worker process (``threads_per_worker=1``, the default)."""
        with self.lock:
            n = min(len(self.gpu_users), max(1, math.ceil(gpus - 1e-9)))
            devices = sorted(self.gpu_users, key=lambda d: (self.gpu_users[d], d))[:n]
            for d in devices:
                self.gpu_users[d] += 1
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        try:
            return run(*task)
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
            with self.lock:
                for d in devices:
                    self.gpu_users[d] -= 1

    def _execute(
        self, ident, tid, name, group, is_batch, func, args, deps, limit=None, resume=None
    ):
        # Registered for the watchdog (cancel, time limit): the thread
        # registers, then looks for a stop asked before it ran.
        running = self.running
        running[tid] = ident
        rules = self.rules
        if limit is not None:
            self.limited_names[tid] = name
            rules.limit(tid, time.monotonic(), limit)
        start_us = int(time.time() * 1e6)
        t0 = perf_counter()
        task_local.in_task = True
        groups = self.running_groups
        if groups is not None:
            ident = threading.get_ident()
            groups[ident] = group
            ticks = self.core.ticks()
        fn = None
        try:
            if rules.asked_before(tid):
                raise _Cancelled
            fn = self.funcs.get(func)
            if fn is None:
                fn = pickle.loads(func)
                if len(self.funcs) > 1024:
                    self.funcs.clear()
                self.funcs[func] = fn
            if deps:
                inputs = {}
                for d, b in deps:
                    # b: bytearray, a copy-on-write mapping of a peer's file on
                    # this host; None for a result of this worker; a str:
                    # why its holder could not send it.
                    if type(b) is str:
                        raise TypeError(b)
                    inputs[d] = self.store.get(d) if b is None else self.fetched.load(d, b)
                if not args:  # its one input is its one argument (Session.pack_args)
                    payload = ((inputs[deps[0][0]],), None)
                else:
                    _serialize.set_inputs(inputs)
                    try:
                        payload = pickle.loads(args)
                    finally:
                        _serialize.set_inputs(None)
            else:
                payload = pickle.loads(args)
            if not task_local.numpy and self.store.numpy_allocator:
                # NumPy's memory handler is per thread: set once NumPy is
                # loaded (often by unpickling this very task).
                if "numpy" in sys.modules:
                    task_local.numpy = True
                    self.store.use_numpy_allocator()
            if is_batch == 3:  # run again after its worker died
                result = _run_careful_batch(self.core, tid, fn, payload, resume)
            elif is_batch:
                result = _run_batch(fn, payload)
            else:
                pos, kw = payload
                result = fn(*pos, **kw) if kw else fn(*pos)
            running.pop(tid, None)
            if rules.watching:
                self._ended(tid, ident)
        except BaseException as e:  # noqa: BLE001 - a task must never kill its worker
            running.pop(tid, None)
            if rules.watching:
                self._ended(tid, ident)
            duration = int((perf_counter() - t0) * 1e6)
            return (tid, False, _dumps_error(e, name, None, limit), start_us, duration, 0)
        finally:
            task_local.in_task = False
            if groups is not None:
                groups.pop(ident, None)
                if self.sampler is not None:
                    self.sampler.task_ended(group, fn or name, ticks)
        duration = int((perf_counter() - t0) * 1e6)
        try:
            payload, size = self.store.finish(tid, result, _buffer_size(result), name)
        except BaseException as e:  # noqa: BLE001
            err = TypeError(
                f"the result of task {name!r} ({type(result).__name__}) could not be "
                f"pickled or stored: {e}"
            )
            return (tid, False, _dumps_error(err, name), start_us, duration, 0)
        if payload is None and tid in self.store.unpicklable:
            self.core.pin(tid)  # its consumers run here (before the report)
        return (tid, True, payload, start_us, duration, size)

    def finish(self) -> None:
        """After ``stopped``: no program outlives its worker, and its
        segments and spilled data go."""
        self.core.kill_commands()
        self.store.close()
        if self.sampler is not None:
            self.sampler.stopped.set()

    def secede(self) -> None:
        """The calling task waits on other tasks: lend its thread (another
        execution thread starts, and the scheduler counts one more)."""
        self.core.lend_thread()
        threading.Thread(target=self.run, name="shoal-exec", daemon=True).start()

    def rejoin(self) -> None:
        """The waiting is over: take the thread back (one thread retires
        at its next take of work)."""
        self.core.reclaim_thread()

    def get_client(self) -> Any:
        with self.lock:
            if self.client is None or self.client._session.closed:
                self.client = _context.client_class(
                    self.address, token=self.token, set_as_default=False
                )
            return self.client

    def export_held(self) -> None:
        """Thread: writes held results to shared memory when a peer or client
        on this host fetches them, and frames them in memory for one on
        another host (waiting in Rust with the GIL released); each batch is
        answered at once, so a fetch of thousands wakes its transfer once."""
        core, store = self.core, self.store
        replaced: list[Any] = []  # objects swapped for views: dropped after answering

        def unpicklable(tid: int) -> bool:
            why = store.unpicklable.get(tid)
            if why is not None:
                core.put_unpicklable(tid, why)
            return why is not None

        def exported(tid: int) -> tuple[str, int] | None:
            try:
                return store.export(tid, replaced)
            except Exception:  # noqa: BLE001 - the fetcher gets "not available"
                traceback.print_exc()
                return None

        while not self.stopped.is_set():
            files, frames = core.pickle_requests(1.0)
            done = [(tid, exported(tid)) for tid in files if not unpicklable(tid)]
            framed: list[tuple[int, list[Any] | None]] = []
            for tid in frames:
                if unpicklable(tid):
                    continue
                try:
                    parts = store.frame(tid)
                    if parts is None:  # in a shared-memory block (or gone)
                        done.append((tid, exported(tid)))
                except Exception:  # noqa: BLE001 - the fetcher gets "not available"
                    traceback.print_exc()
                    parts = None
                framed.append((tid, parts))
            if done:  # first: a transfer given no frame looks at the store
                core.put_stored_many(done)
            if framed:
                core.put_frames(framed)
            replaced.clear()
            # Not held while waiting for more requests: the frames' buffers
            # keep their results alive (released ones too) until sent.
            done = framed = parts = None  # type: ignore[assignment]


class _Fetched:
    """Inputs fetched from peers whose unpickling was slow (200 us or more:
    DataFrames and containers of them, not arrays, which map in
    microseconds), kept for the next tasks here that read them too, least
    recently used first out. A shuffle's split tasks each read one piece of
    a peer's 16-partition dict: unpickling the whole dict again for each
    (16 DataFrames, their indexes) took a third of its workers' time.
    Shared as a peer's own process would share its result between its
    tasks, and as Dask's threads and workers do. Bounded in bytes (a peer's
    released file stays mapped while kept), and let go when the worker is
    idle."""

    SLOW_S = 200e-6

    def __init__(self, budget: int):
        self.budget = budget
        self.held = 0
        self.entries: collections.OrderedDict[int, tuple[Any, int]] = collections.OrderedDict()
        self.lock = threading.Lock()  # a worker's task threads share it

    @staticmethod
    def budget_for(memory_limit: int | None) -> int:
        """A 32nd of the memory limit, at most 64 MiB."""
        cap = 64 << 20
        return min(cap, memory_limit // 32) if memory_limit else cap

    def load(self, tid: int, data: Any) -> Any:
        """``tid``'s value from ``data`` (its frame, mapped or received),
        unpickled once while kept."""
        entries = self.entries
        with self.lock:
            hit = entries.get(tid)
            if hit is not None:
                entries.move_to_end(tid)
                return hit[0]
        t0 = perf_counter()
        value = _serialize.loads(data)
        if perf_counter() - t0 < self.SLOW_S:
            return value  # cheaper to unpickle again than to keep
        size = memoryview(data).nbytes
        if size <= self.budget:
            with self.lock:
                if tid not in entries:  # another thread's load may have won
                    entries[tid] = (value, size)
                    self.held += size
                while self.held > self.budget:
                    _, (_, n) = entries.popitem(last=False)
                    self.held -= n
        return value

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.held = 0


# Libraries whose array-likes are known to pickle whenever their data does.
_DEFERRED = frozenset({"numpy", "pandas", "pyarrow"})


def _buffer_size(obj: Any) -> int | None:
    """Size of an array-like result that can wait to be pickled (NumPy,
    pandas, Arrow, memoryview: ``nbytes``; a DataFrame; a dict, tuple or
    list of these: ``_container_size``); None for anything else, which
    is pickled at once so that a failure is the task's error (any class
    with an ``nbytes`` may hold what does not pickle). Object arrays are
    pickled at once too: their elements may not pickle."""
    nbytes = getattr(obj, "nbytes", None)
    if type(nbytes) is not int:
        cls = type(obj)
        if (
            cls is dict
            or cls is tuple
            or cls is list
            or (isinstance(obj, dict) and _plain_dict(obj))
        ):
            return _container_size(obj)
        return _frame_size(obj)
    cls = type(obj)
    if cls is not memoryview and cls.__module__.partition(".")[0] not in _DEFERRED:
        return None
    dtype = getattr(obj, "dtype", None)
    if dtype is not None and getattr(dtype, "hasobject", True):
        return None
    return nbytes


# Items of a container whose sizes are added up; a larger one is pickled at once.
_CONTAINER_MAX = 256

# Packages whose dict subclasses pickle as their items do (Dask's shuffle
# groups are a ``ShuffleGroupResult``).
_DICT_PACKAGES = frozenset({"dask"})


def _plain_dict(obj: dict) -> bool:
    """Whether the dict subclass ``obj`` comes from a package in
    ``_DICT_PACKAGES`` and has no state of its own (nothing beside its
    items to pickle)."""
    package = type(obj).__module__.partition(".")[0]
    return package in _DICT_PACKAGES and not getattr(obj, "__dict__", None)


def _container_size(obj: dict | tuple | list) -> int | None:
    """The bytes of a dict (or a ``_plain_dict``), tuple or list of
    array-likes (the groups of a Dask shuffle: a frame's pieces keyed by
    output partition, in a ``ShuffleGroupResult``), so that it waits to be
    pickled as they do: its consumers here pick their pieces from the
    object (pickled and copied whole when made, the tasks shuffle's ``get``
    took 0.403 s, not 0.339). None if it is small, large in items, keyed
    by anything but ints and strings, or holds anything else (which may
    not pickle)."""
    if not 0 < len(obj) <= _CONTAINER_MAX:
        return None
    total = 0
    # Item by item, so that the first that does not qualify ends it.
    for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
        if type(k) is not int and type(k) is not str:
            return None
        cls = type(v)
        if isinstance(v, (dict, tuple, list)):  # one level only
            return None
        size = _frame_size(v, small=True) if cls.__name__ == "DataFrame" else _buffer_size(v)
        if size is None:
            return None
        total += size
    return total if total > _core.INLINE_LIMIT else None


def _frame_size(obj: Any, small: bool = False) -> int | None:
    """A pandas DataFrame's bytes (it has no ``nbytes``), so that it waits
    to be pickled like an array: its consumers here take the object itself
    (pickling and mapping back a frame of a few MiB cost more than many of
    the tasks that pass them on). None if a column or the index holds
    Python objects, which may not pickle. A frame too small to matter is
    told by its shape alone (it is pickled inline at once either way),
    unless ``small`` (an item of a container, which may be large in all)."""
    cls = type(obj)
    if cls.__name__ != "DataFrame" or cls.__module__.partition(".")[0] != "pandas":
        return None
    try:
        rows, cols = obj.shape
        if not small and rows * (cols + 1) * 8 <= _core.INLINE_LIMIT:
            return None
        index = obj.index
        if getattr(index.dtype, "hasobject", False):
            return None
        # Its column blocks, as `memory_usage(deep=False)` adds them up, in
        # 2-30 us against 1.2 ms (which builds a Series, as `dtypes` does).
        size = index.nbytes
        for block in obj._mgr.blocks:
            if getattr(block.dtype, "hasobject", False):
                return None
            size += block.values.nbytes
        return int(size)
    except Exception:  # noqa: BLE001 - an odd frame (or other pandas internals)
        return _frame_size_slowly(obj)


def _frame_size_slowly(obj: Any) -> int | None:
    """``_frame_size`` by pandas' public API only."""
    try:
        if any(getattr(dt, "hasobject", False) for dt in (obj.index.dtype, *obj.dtypes)):
            return None
        return int(obj.memory_usage(index=True, deep=False).sum())
    except Exception:  # noqa: BLE001 - an odd frame: pickled at once
        return None


def _ignore(signum: int, frame: Any) -> None:
    """SIGINT: nothing (see ``main``)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: retire gracefully (results still needed move to other
    workers, then the scheduler stops this one). Repeats change nothing (a
    nanny and a batch system may both send one); SIGKILL stops it now."""
    ex = _context.executor
    if ex is None:
        os._exit(1)
    if not getattr(_on_sigterm, "asked", False):
        _on_sigterm.asked = True  # type: ignore[attr-defined]
        ex.core.retire()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shoal._worker", description=__doc__)
    parser.add_argument("address", help="scheduler address (unix:///path or tcp://host:port)")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--name", default="worker-{pid}", help="'{pid}': the process id")
    parser.add_argument("--actor", help="ID=PATH: this process hosts that actor")
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    parser.add_argument(
        "--memory-limit",
        default="auto",
        help="spill, pause and restart by fractions of this: bytes, '4GB', a fraction "
        "of the host's memory (0.5), 'auto' (the host's memory times nthreads/cores), "
        "or 'none'",
    )
    parser.add_argument(
        "--token-file", help="file with the cluster's token (default: $SHOAL_TOKEN)"
    )
    parser.add_argument(
        "--local-directory", help="where to spill results to disk (default: the temp dir)"
    )
    parser.add_argument(
        "--resources",
        default="",
        help="what tasks may hold, e.g. 'GPU=2,ssd=1' (GPUs are detected if not given)",
    )
    parser.add_argument(
        "--preload",
        default="",
        help="modules to import right after start, before any task, e.g. 'numpy,pandas'",
    )
    parser.add_argument(
        "--idle-imports",
        default="",
        help="modules to import while no task waits (tasks first), e.g. 'pandas'",
    )
    return parser


def _checked(ns: argparse.Namespace) -> tuple[Any, str | None]:
    """The parsed resources, and what is wrong with the values (None: nothing)."""
    try:
        _store.parse_memory(ns.memory_limit)
        return _resources.parse(ns.resources), None
    except (ValueError, TypeError) as e:
        return None, str(e)


def check_args(argv: list[str]) -> str | None:
    """What is wrong with a worker's arguments (None: nothing): `shoal
    worker` asks before it starts its processes, so that a bad value is one
    clear error, not a crash of every process it starts."""
    return _checked(_parser().parse_args(argv))[1]


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    ns = parser.parse_args(argv)
    resources, wrong = _checked(ns)
    if wrong is not None:
        parser.error(wrong)
    if ns.parent:
        threading.Thread(target=_exit_with_parent, args=(ns.parent,), daemon=True).start()
    if ns.actor:
        _start_actor(ns.actor)
    # Ctrl-C in the terminal reaches the whole process group: the client
    # handles it; a worker must not die of it. A handler, not SIG_IGN: an
    # ignored signal stays ignored in the programs command tasks run.
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _on_sigterm)
    token = _core.setting("SHOAL_TOKEN")
    if ns.token_file:
        with open(ns.token_file) as fh:
            token = fh.read().strip()
    if not token:
        parser.error("the cluster's token is needed: --token-file FILE or SHOAL_TOKEN")
    name = ns.name.replace("{pid}", str(os.getpid()))
    try:
        executor = start(
            ns.address,
            token,
            nthreads=ns.nthreads,
            name=name,
            resources=resources,
            memory_limit=ns.memory_limit,
            local_directory=ns.local_directory,
            preload=[m for m in ns.preload.split(",") if m.strip()],
            idle_imports=[m for m in ns.idle_imports.split(",") if m.strip()],
        )
    except PermissionError as e:  # wrong token: another try cannot help
        print(f"shoal worker: {e}", file=sys.stderr, flush=True)
        os._exit(_core.EXIT_REFUSED)
    except ConnectionError as e:  # nothing there: said once, the supervisor decides
        print(f"shoal worker: {e}", file=sys.stderr, flush=True)
        os._exit(_core.EXIT_SCHEDULER_SILENT)
    executor.stopped.wait()
    executor.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    # Told to stop: skip interpreter finalization, which can abort in C++
    # extension threads still running (pyarrow's) and has nothing to save.
    # EXIT_STOPPED, not 0: a task calling os._exit(0) must read as a crash.
    os._exit(_core.EXIT_STOPPED)


def start(
    address: str,
    token: str,
    *,
    nthreads: int = 1,
    name: str,
    resources: dict[str, float] | None = None,
    memory_limit: str | int | float | None = "auto",
    local_directory: str | None = None,
    preload: list[str] | None = None,
    idle_imports: list[str] | None = None,
    in_process: bool = False,
) -> _Executor:
    """Joins the scheduler at ``address`` and starts running tasks on
    ``nthreads`` threads; returns the executor (``stopped`` is set when the
    scheduler says stop, then call ``finish``). ``in_process``: a worker
    in a client's own process (``LocalCluster(processes=False)``), which
    never ends the process and leaves its logging alone."""
    resources = dict(resources or {})
    gpus = _resources.detect_gpus()
    if "GPU" not in resources and gpus:
        resources["GPU"] = float(len(gpus))
    elif "GPU" in resources and not gpus:  # declared, not detected: trust it
        gpus = [str(i) for i in range(math.ceil(resources["GPU"]))]
    share = min(1.0, nthreads / (os.cpu_count() or 1))
    limit = _store.parse_memory(memory_limit, share)
    _core.sweep(local_directory)  # leftovers of crashed processes
    core = WorkerCore(address, nthreads, name, token, sorted(resources.items()), in_process)
    if not in_process:
        # Read (the page of task slots is mapped, its descriptor closed):
        # not for the processes its tasks start.
        os.environ.pop("SHOAL_SLOT_FD", None)
        os.environ.pop("SHOAL_SUPERVISOR", None)
    store = _store.Store(core, limit, local_directory, in_process)
    executor = _Executor(core, address, token, nthreads, gpus, store)
    executor.name = name  # get_worker()
    if not in_process:
        _context.executor = executor  # the process's (signals, get_client)
    threading.Thread(target=executor.export_held, name="shoal-pickler", daemon=True).start()
    threading.Thread(target=store.monitor, name="shoal-memory", daemon=True).start()
    threading.Thread(target=executor.watchdog, name="shoal-watchdog", daemon=True).start()
    try:
        interval = _profile.interval_from_env()
    except ValueError as e:  # a worker runs on without its profiler
        print(f"shoal worker: {e}; the profiler is off", file=sys.stderr, flush=True)
        interval = 0.0
    if interval:
        executor.running_groups = {}
        stop = _Executor._execute.__code__  # frames from here up are Shoal's
        sampler = executor.sampler = _profile.Sampler(core, executor.running_groups, interval, stop)
        threading.Thread(target=sampler.run, name="shoal-profiler", daemon=True).start()
    if not in_process:
        _profile.capture_logging()

    # Execution threads come and go (secede/rejoin); the worker lives until
    # the scheduler says stop.
    def start_executing() -> None:
        for i in range(nthreads):
            threading.Thread(target=executor.run, name=f"shoal-exec-{i}", daemon=True).start()

    # Modules to import while no task waits: a task's own imports (as it
    # is unpickled) go first, and the rest wait for idle time (a fresh
    # cluster's first tasks need NumPy and Dask's arrays, 0.5 s to import
    # here, not the client's pandas too, 1.0 s). Only a worker of one
    # execution thread: two threads importing at once can meet a package
    # half-initialized, so with more they go before any task.
    if nthreads == 1:
        executor.idle_imports = list(idle_imports or [])
    else:
        preload = [*(preload or []), *(idle_imports or [])]
    if preload:
        # Tasks start once the preload is done: a task importing a package
        # while this thread imports it can meet it half-initialized (NumPy:
        # "partially initialized module"); its first task would wait for
        # these imports anyway. A user's preload may set up what tasks need.
        def load_then_execute() -> None:
            _preload(preload)
            start_executing()

        threading.Thread(target=load_then_execute, name="shoal-preload", daemon=True).start()
    else:
        start_executing()
    return executor


if __name__ == "__main__":
    # Run as `python -m shoal._worker`: this file is then `__main__`. Run the
    # copy imported as `shoal._worker`, the one the rest of the package sees.
    from shoal._worker import main as package_main

    package_main()
