"""The client API: ``Client``, ``Future``, ``wait`` and ``as_completed``.

Names and behaviour follow ``distributed.Client`` where there is an
equivalent. Deviations, each for a reason:

* ``submit`` is not pure by default (``pure=False``): hashing every task's
  arguments costs more than running a tiny task. Pass ``pure=True`` (or a
  ``key``) to get distributed's deduplication of identical calls.
* ``map(..., batch_size=n)`` runs ``n`` elements per task (default: about
  four tasks per worker thread, like ``multiprocessing.Pool.map``), and still
  returns one future per element. In distributed, ``batch_size`` only batches
  submission; per-element tasks cost too much for large maps. ``batch_size=1``
  gives one task per element.
* ``map`` returns a ``FutureList``: a read-only sequence of futures whose
  elements are made when first touched, not a ``list``. Creating, gathering
  and freeing 100,000 Python futures costs more than the tasks; ``gather`` and
  ``wait`` read a ``FutureList`` batch by batch. ``list(fs)`` gives a list.
* A task raising ``KeyboardInterrupt``/``SystemExit`` fails with
  ``TaskAbortedError`` instead of re-raising those in the client.
* Arrays that come from another process on the same host (task inputs made
  by another worker, ``result()``) are read-only views of shared memory, as
  in Ray: copy them (``a.copy()``) to write. distributed copies them.
* ``scatter(..., broadcast=True)`` copies nothing in advance: on one host all
  workers map the one shared copy; across hosts workers fetch it on use.
  ``hash=`` is not taken: scattered data gets a fresh key unless a dict
  names the keys.
* ``get_worker_logs()`` returns ``{worker name: [line, ...]}`` (formatted
  lines, Python ``logging`` and Shoal's own), not ``(level, message)``
  pairs by address; ``profile()`` returns folded stacks with sample counts
  (the flame graph format), not distributed's nested dictionaries.
* The dashboard asks for a token (``dashboard_link`` carries it);
  ``dashboard_address`` is loopback by default, ``":8787"`` included.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import json
import os
import pickle
import threading
import time
import urllib.parse
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import _commands, _context, _core, _dask, _resources, _serialize, _store, deploy, diagnostics
from ._core import INLINE_LIMIT, ClientCore
from ._futures import Future, FutureList
from .deploy import ClusterBase, LocalCluster
from .errors import (
    ActorDiedError,
    DataLostError,
    ForeignFutureError,
    FutureCancelledError,
    KilledWorker,
    MissingDependencyError,
    SchedulerLostError,
    UnsatisfiableError,
)

__all__ = [
    "Client",
    "Future",
    "FutureList",
    "wait",
    "as_completed",
    "FIRST_COMPLETED",
    "ALL_COMPLETED",
]

FIRST_COMPLETED = "FIRST_COMPLETED"
ALL_COMPLETED = "ALL_COMPLETED"
DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])

_clients: weakref.WeakSet[Client] = weakref.WeakSet()

get_client = _context.get_client


def secede() -> None:
    """Inside a task: stop counting against the worker's threads (another
    task may start) until ``rejoin()``. Waiting on futures inside a task does
    this by itself."""
    ex, local = _context.current_executor(), _context.task_local
    if ex is None or not local.in_task:
        raise RuntimeError("secede() can only be called inside a task")
    if not local.seceded:
        local.seceded = True
        ex.secede()


def rejoin() -> None:
    """Inside a task, after ``secede()``: count against the worker's threads again."""
    ex, local = _context.current_executor(), _context.task_local
    if ex is not None and local.seceded:
        local.seceded = False
        ex.rejoin()


class _LendThread:
    """Around a blocking wait: inside a task that has not seceded, lend the
    task's thread for the wait (a task waiting on tasks must not hold the
    slot they need)."""

    __slots__ = ("lent",)

    def __enter__(self) -> None:
        local = _context.task_local
        self.lent = local.in_task and not local.seceded and _context.current_executor() is not None
        if self.lent:
            secede()

    def __exit__(self, *exc: Any) -> None:
        if self.lent:
            rejoin()


_started: list[Client] = []  # the client default_client() had to start


def default_client() -> Client:
    """``get_client()``, or else an embedded cluster started now and kept
    for later calls (what Ray-style calls and the joblib backend use)."""
    try:
        return get_client()
    except ValueError:
        pass
    with _start_lock:
        if not _started or _started[0]._closed:
            _started[:] = [Client()]
        return _started[0]


_start_lock = threading.Lock()


def _group_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)  # functools.partial
        name = getattr(inner, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


def _prepare_function(fn: Any, caller: str) -> tuple[str, bytes]:
    """Group name and (cached) pickle of a task function; clear errors."""
    if not callable(fn):
        raise TypeError(f"{caller} needs a callable as first argument, not {type(fn).__name__}")
    group = _group_name(fn)
    try:
        return group, _serialize.dumps_function(fn)
    except Exception as e:
        raise TypeError(f"could not pickle the function {group!r}: {e}") from e


class Client:
    """Connects to a Shoal cluster; with no address, starts one embedded.

    ``Client()`` starts a ``LocalCluster`` (``client.cluster``, closed
    with the client): a scheduler inside this process and ``n_workers``
    worker processes (default: one per core) with ``threads_per_worker``
    execution threads each (default 1); ``memory_limit`` (per worker,
    default its share of the host) and ``local_directory`` (where they
    spill) apply to them. ``processes=False`` runs the workers as threads
    of this process instead (default: one worker, a thread per core; see
    ``LocalCluster``); other keywords go to ``LocalCluster``.
    ``Client(cluster)`` connects to a cluster you made (``LocalCluster``,
    ``SLURMCluster``, ...), which closing the client leaves running.
    ``Client("tcp://host:port", token=...)`` or
    ``Client(scheduler_file="scheduler.json")`` connects to a running
    scheduler (``shoal scheduler``); the token proves this client belongs
    to the cluster (default: the scheduler file's token file, else the
    ``SHOAL_TOKEN`` environment variable). With no address and
    ``SHOAL_SCHEDULER_ADDRESS`` set (``shoal.mpi.initialize()`` and ``shoal
    run`` set it), it connects there instead of starting a cluster.
    The embedded scheduler serves a dashboard on ``dashboard_address``
    (loopback by default, another port if 8787 is taken, None for none; it
    always asks for the token that ``dashboard_link`` carries).
    Use it as a context manager, or call ``close()``; closing the embedded
    cluster (or this process exiting, or dying) leaves no worker behind.
    ``reconnect`` (seconds; default ``SHOAL_RECONNECT``, else off): a
    client that loses its scheduler keeps its futures and connects again
    for up to that long; against ``shoal scheduler --journal`` with
    ``--reconnect`` workers, its task graph survives the scheduler's
    crash (see docs/jobs.md). It keeps a copy of each live task's
    definition for that.
    The embedded cluster's workers import, in the background as soon as
    they start, the heavy libraries this process has already imported
    (NumPy, pandas, PyArrow, Dask's collections, SciPy, ...) and the
    modules named in ``preload``, so that the first computation does not
    wait for them (``preload=None``: nothing; ``shoal worker --preload``
    for other clusters).
    """

    def __init__(
        self,
        address: str | ClusterBase | None = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        timeout: float = 30.0,
        set_as_default: bool = True,
        resources: Mapping[str, float] | None = None,
        memory_limit: str | float | None = "auto",
        local_directory: str | None = None,
        token: str | None = None,
        scheduler_file: str | os.PathLike | None = None,
        dashboard_address: str | None = "127.0.0.1:8787",
        reconnect: float | None = None,
        preload: Iterable[str] | None = (),
        **cluster_kwargs: Any,
    ):
        if n_workers is not None and n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, not {n_workers}")
        if threads_per_worker is not None and threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be at least 1, not {threads_per_worker}")
        self._cluster: LocalCluster | None = None  # the one this client started
        self.cluster: ClusterBase | None = None
        self._undo_default: Callable[[], None] | None = None
        self._refs = _core.RefCounts(0)  # live futures per task (see _incref)
        self._refs_lock = threading.Lock()
        self._dropped: collections.deque[int] = collections.deque()  # see _decref
        self._keys: dict[Any, int] = {}  # user and Dask keys of live tasks
        self._key_of: dict[int, Any] = {}
        self._batch_cache: dict[int, Any] = {}
        self._cancelled: set[int] = set()
        self._actor_died: dict[int, str] = {}  # cancelled because their actor died
        self._on_close: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._callbacks: dict[int, list[tuple[Future, Callable]]] = {}
        self._cb_watcher = None
        self._cb_thread: threading.Thread | None = None
        self._closed = False
        self._put_files: list[str] = []  # scattered data not yet taken over
        if isinstance(address, ClusterBase):
            # Client(cluster), as in Dask: a LocalCluster, SLURMCluster, ...
            self.cluster = address
            address, cluster_token = address._connection()
            token = token or cluster_token
        elif address is not None and not isinstance(address, str):
            raise TypeError(f"Client() takes an address or a cluster, not {address!r}")
        if address is None and scheduler_file is None:
            # Set by `shoal.mpi.initialize()` and `shoal run` (as Dask's
            # DASK_SCHEDULER_ADDRESS): Client() joins that cluster.
            address = os.environ.get("SHOAL_SCHEDULER_ADDRESS") or None
        if address is None and scheduler_file is None:
            if processes:
                # Shoal's own default: single-threaded processes, one per
                # core unless told (Python code holds the GIL; Dask gives
                # bigger hosts, or fewer workers, more threads each).
                threads_per_worker = threads_per_worker or 1
                if n_workers is None:
                    n_workers = max(1, (os.cpu_count() or 1) // threads_per_worker)
            self._cluster = LocalCluster(
                n_workers,
                threads_per_worker,
                processes,
                memory_limit=memory_limit,
                dashboard_address=dashboard_address,
                resources=resources,
                local_directory=local_directory,
                preload=preload,
                **cluster_kwargs,
            )
            self.cluster = self._cluster
            address, token = self._cluster._connection()
            self._nthreads = self._cluster._worker_count() * self._cluster._threads_per_worker
        else:
            if cluster_kwargs:
                raise TypeError(
                    f"Client() got unexpected keyword arguments {sorted(cluster_kwargs)} "
                    "(they describe a cluster Client() would start; it connects to one here)"
                )
            if scheduler_file is not None:
                address, token = deploy.read_scheduler_file(scheduler_file, address, token)
            if address is None:
                raise ValueError("no scheduler address: give an address or a scheduler_file")
            # (No token at all: ClientCore says what to do.)
            token = (
                token
                or deploy.tokens.get(address)
                or os.environ.get("SHOAL_TOKEN")
                or _registered_token(address)
            )
            if resources:
                raise ValueError(
                    "resources= describes the workers Client() starts; "
                    "give them to `shoal worker --resources` instead"
                )
            if preload:
                raise ValueError(
                    "preload= names modules for the workers Client() starts; "
                    "give them to `shoal worker --preload` instead"
                )
            self._nthreads = (n_workers or os.cpu_count() or 1) * (threads_per_worker or 1)
        self.scheduler_address: str = address
        self._token: str | None = token
        if reconnect is not None and not reconnect > 0:
            raise ValueError(f"reconnect must be a number of seconds above 0, not {reconnect!r}")
        self._core: ClientCore | None = ClientCore(address, token, reconnect)
        # Keyed by this client's id: its own tasks' counts are 4 bytes each.
        self._refs = _core.RefCounts(self._core.id)
        _clients.add(self)
        _context.register_client(self)
        self._undo_default = _dask._set_default(self.get) if set_as_default else None

    # ----------------------------------------------------------- refcounts

    def _adopt(self, task_id: int, group: str, key: Any, index: int | None) -> Future:
        """A future of a task another client submitted, found in a result
        (``_serialize.adopt``): this client claims the task."""
        core = self._check()
        with self._refs_lock:
            known = task_id in self._refs
        f = Future(self, task_id, group, key, index)
        if not known:
            core.adopt([task_id])
        return f

    def _hold(self, by: int, task_ids: list[int]) -> None:
        """Worker side: the result of task ``by`` holds these futures."""
        if self._core is not None:
            self._core.hold(by, task_ids)

    def _incref(self, task_id: int, n: int) -> None:
        with self._refs_lock:
            self._refs.incref(task_id, n)
        if self._dropped:
            self._drain_dropped()

    def _incref_many(self, task_ids: Iterable[int]) -> None:
        ids = task_ids if isinstance(task_ids, list) else list(task_ids)
        with self._refs_lock:
            self._refs.incref_many(ids)
        if self._dropped:
            self._drain_dropped()

    def _decref(self, task_id: int) -> None:
        """Drops one hold on a task. Called from ``__del__``, which the
        garbage collector may run in any thread, even inside a locked
        section of this one: the drop is queued (an atomic append) and
        applied by whoever holds the lock next, never lost or raced."""
        self._dropped.append(task_id)
        self._drain_dropped()

    def _drain_dropped(self) -> None:
        # Re-checked after each release: a drop queued while another thread
        # held the lock is applied by that thread's last pass or by ours.
        while self._dropped:
            if not self._refs_lock.acquire(blocking=False):
                return  # the holder drains after it releases
            released = []
            try:
                refs, dropped = self._refs, self._dropped
                while dropped:
                    task_id = dropped.popleft()
                    if not refs.decref(task_id):
                        continue
                    if self._key_of:
                        key = self._key_of.pop(task_id, None)
                        if key is not None and self._keys.get(key) == task_id:
                            del self._keys[key]
                    self._batch_cache.pop(task_id, None)
                    self._cancelled.discard(task_id)
                    self._actor_died.pop(task_id, None)
                    released.append(task_id)
            finally:
                self._refs_lock.release()
            core = self._core
            if released and core is not None:
                core.release(released)

    def _name(self, key: Any, task_id: int) -> None:
        """Lets ``key`` find the task while it lives (held by a future)."""
        self._keys[key] = task_id
        self._key_of[task_id] = key

    # ----------------------------------------------------------- submitting

    def _check(self) -> ClientCore:
        core = self._core
        if core is None:
            raise RuntimeError("this Client is closed; create a new one")
        return core

    def submit(
        self,
        fn: Callable,
        /,
        *args: Any,
        key: str | None = None,
        priority: int = 0,
        retries: int = 0,
        pure: bool = False,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        time_request: float | str | None = None,
        **kwargs: Any,
    ) -> Future:
        """Runs ``fn(*args, **kwargs)`` on the cluster; returns its Future.

        Futures among the arguments (at any depth) are replaced by their
        values on the worker, after their tasks finish. ``priority``: higher
        runs first. ``retries``: re-runs after an exception. ``key``: a name
        for the task; submitting an existing key returns its future.
        ``resources``: amounts the task holds while it runs, e.g.
        ``{"GPU": 1}``; it runs only where they are free (GPU tasks get
        ``CUDA_VISIBLE_DEVICES`` set to their devices). ``"CPU": n`` takes
        ``n`` of a worker's threads (for a task that runs parallel code).
        ``time_limit``: seconds or a duration (``"10m"``) a run may take; a
        task past it is interrupted and fails with ``TaskTimeoutError`` (a
        task stuck in C code is stopped by restarting its worker process
        after ``SHOAL_STOP_GRACE`` seconds, default 5). ``time_request``: how
        long it expects to run (a hint): it goes only to a worker whose
        lifetime (``shoal worker --lifetime``, a batch job's end) has that
        long left.
        """
        return self._submit(
            fn, args, kwargs, key, priority, retries, pure, resources, time_limit, time_request
        )

    def _submit(
        self,
        fn: Callable,
        args: tuple,
        kwargs: dict[str, Any],
        key: str | None = None,
        priority: int = 0,
        retries: int = 0,
        pure: bool = False,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        time_request: float | str | None = None,
        crash_limit: int = 0,
    ) -> Future:
        """``submit`` with the call's arguments apart from the task's options
        (``Executor.submit`` passes every keyword to ``fn``). ``crash_limit``:
        workers that may die running it before it fails (0: the scheduler's
        default)."""
        core = self._check()
        needs = _resources.normalize(resources, "submit")
        limit = _commands.limit_ms(time_limit)
        request = _commands.limit_ms(time_request, "time_request")
        group, func = _prepare_function(fn, "submit")
        payload, deps, puts = self._pack_args((args, kwargs or None), f"the arguments of {group}")
        if pure and key is None:
            key = f"{group}-{hashlib.sha1(func + (payload or repr(deps).encode())).hexdigest()}"
        if key is not None:
            existing = self._keys.get(key)
            if existing is not None and existing in self._refs:
                return Future(self, existing, group, key)
        tid = core.submit(
            group,
            key,
            False,
            func,
            payload,
            deps,
            priority,
            retries,
            needs,
            True,
            limit,
            request,
            crash_limit,
        )
        del puts  # the task holds them now
        f = Future(self, tid, group, key)
        if key is not None:
            self._name(key, tid)
        return f

    def submit_command(
        self,
        args: Iterable[str | os.PathLike],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stdout: Any = None,
        stderr: Any = None,
        key: str | None = None,
        priority: int = 0,
        retries: int = 0,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        time_request: float | str | None = None,
    ) -> Future:
        """Runs a program on a worker; returns its Future.

        The program runs in its own process group with ``SHOAL_TASK_ID``
        (and ``SHOAL_JOB_ID``, ``SHOAL_CPUS``) in its environment, plus
        ``env``. Exit status 0: the future's result is a
        ``subprocess.CompletedProcess`` (``stdout``/``stderr`` hold the
        output when captured). Anything else raises ``CommandError``
        (status, signal, and the tail of its standard error).
        ``stdout``/``stderr``: ``subprocess.PIPE`` (the default: captured),
        ``subprocess.DEVNULL``, or a file path on the worker's host
        (``%{TASK_ID}``, ``%{JOB_ID}``, ``%{CWD}`` expand). ``time_limit``:
        at the limit its process group gets SIGTERM, then SIGKILL after the
        grace period, and the task fails with ``TaskTimeoutError``.
        ``Future.cancel()`` stops it the same way. ``resources`` as in
        ``submit`` (``{"CPU": 4}`` holds four threads: ``SHOAL_CPUS=4``).
        """
        core = self._check()
        if isinstance(args, str | bytes | os.PathLike):
            raise TypeError(
                "submit_command takes a list of arguments, e.g. ['ls', '-l'], not one "
                "string (no shell is involved; run ['sh', '-c', line] for one)"
            )
        argv = [os.fspath(a) for a in args]
        if not argv:
            raise ValueError("submit_command needs a program: ['program', 'arg', ...]")
        if not all(isinstance(a, str) for a in argv):
            raise TypeError(f"command arguments must be strings or paths, not {argv!r}")
        needs = _resources.normalize(resources, "submit_command")
        variables = [(str(k), str(v)) for k, v in (env or {}).items()]
        tid = core.submit_command(
            os.path.basename(argv[0]) or "command",
            key,
            argv,
            variables,
            None if cwd is None else os.fspath(cwd),
            _commands.output_target(stdout, "stdout"),
            _commands.output_target(stderr, "stderr"),
            [],
            priority,
            retries,
            needs,
            _commands.limit_ms(time_limit),
            _commands.limit_ms(time_request, "time_request"),
        )
        f = Future(self, tid, os.path.basename(argv[0]), key)
        if key is not None:
            self._name(key, tid)
        return f

    def scatter(self, data: Any, broadcast: bool = False) -> Any:
        """Puts data on the cluster once; returns futures to pass to tasks.

        A list, tuple or set gives a list of futures, a dict a dict of
        futures (its keys become the tasks' keys), anything else one future.
        On this host (the embedded cluster, or a ``unix://`` scheduler) the
        data is written once to shared memory and the worker takes the file
        over: every worker process then maps that one copy, so
        ``broadcast`` changes nothing here. Otherwise the pickle travels
        through the scheduler to one worker, and other workers fetch it
        directly from that one when a task needs it (``broadcast=True`` does
        not copy it to every worker in advance).

        Scattered data is not computed, so it cannot be recomputed: if the
        worker holding it dies, futures that need it raise
        ``DataLostError``.
        """
        del broadcast  # see above: one copy per host serves every worker
        if isinstance(data, dict):
            return {k: self._put(v, k) for k, v in data.items()}
        if isinstance(data, list | tuple | set | frozenset):
            return [self._put(v, None) for v in data]
        return self._put(data, None)

    def _pack_args(
        self, args: Any, what: str, strided: bool = False
    ) -> tuple[bytes, list[int], list[Future]]:
        """Pickles task arguments (as ``_serialize.dumps_args``), putting
        their large buffers on the cluster beside the task instead of in it
        (see ``_serialize.LARGE_BUFFER``): no task message grows with the
        data it carries, and on one host the data is written once to shared
        memory and mapped by the task. Returns the payload, its
        dependencies, and the puts' futures, to hold until the task is
        submitted (it depends on them from then on). ``strided``: the
        arguments hold large non-contiguous arrays (a caller's cheap scan
        says so), which pickle would copy in band: each is put on its own,
        written once straight into shared memory (pickling is slower then:
        a Python hook sees every object)."""
        if (
            type(args) is tuple
            and len(args) == 2
            and args[1] is None
            and type(args[0]) is tuple
            and len(args[0]) == 1
            and type(args[0][0]) is Future
            and args[0][0]._client is self
            and args[0][0]._index is None
        ):
            # One argument, another task's result (a chain, a map over
            # futures): no pickle at all; the worker passes its one input
            # (62 bytes less per task to keep, on a million-task graph).
            return b"", [args[0][0]._id], []
        large: list[pickle.PickleBuffer] = []
        hooked: list[Future] = []
        hook = None
        if strided:

            def hook(o: Any) -> Any:
                if not _serialize.is_large_strided(o):
                    return NotImplemented
                f = self._put(o, None)
                hooked.append(f)
                return f.__reduce__()  # a dependency of the task

        payload, deps = _serialize.dumps_args(args, what, self, large, hook)
        if not large and len(payload) <= _serialize.LARGE_ARGS:
            return payload, deps, hooked
        header: bytes | None = payload
        if not large:
            header, large = None, [pickle.PickleBuffer(payload)]
        puts = [self._put(b, None) for b in large]
        packed, more = _serialize.dumps_args(_serialize.Packed(header, puts), what, self)
        return packed, deps + more, puts + hooked

    def _put(self, obj: Any, key: Any) -> Future:
        if key is not None:
            existing = self._keys.get(key)
            if existing is not None and existing in self._refs:
                return Future(self, existing, "scatter", key)
        return Future(self, self._put_id(obj, key), "scatter", key)

    def _put_id(self, obj: Any, key: Any = None) -> int:
        """Puts ``obj`` on the cluster; returns its task id, whose interest
        the caller owns (a ``Future`` takes it, or the caller releases it)."""
        core = self._check()
        same_host = self._cluster is not None or self.scheduler_address.startswith("unix://")
        strided = _serialize.strided_parts(obj) if same_host else None
        parts, length = strided or _serialize.frame_parts(obj)[:2]
        if same_host and length > INLINE_LIMIT:
            path = os.path.join(_store.segment_dir(), f"put-{os.urandom(8).hex()}")
            _serialize.write_file(path, parts)
            if len(self._put_files) >= 1024:  # forget those taken over
                self._put_files = [p for p in self._put_files if os.path.exists(p)]
            self._put_files.append(path)
            arg: tuple = ("file", path, length)
        else:
            arg = ("bytes", parts[0] if len(parts) == 1 else b"".join(parts))
        func = _serialize.dumps_function(_store.put_task)
        payload, _ = _serialize.dumps_args(((arg,), None), "scattered data", self)
        k = None if key is None else str(key)
        # Highest priority: data is cheap to place and others wait on it.
        tid = core.submit("scatter", k, False, func, payload, [], 2**30, 0, [], False)
        if key is not None:
            self._name(key, tid)
        return tid

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        batch_size: int | None = None,
        priority: int = 0,
        retries: int = 0,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        **kwargs: Any,
    ) -> FutureList:
        """``[submit(fn, *args, **kwargs) for args in zip(*iterables)]``, with
        ``batch_size`` elements per task (see the module notes).
        ``time_limit`` applies to each task (a batch of elements)."""
        core = self._check()
        group, func = _prepare_function(fn, "map")
        needs = _resources.normalize(resources, "map")
        limit = _commands.limit_ms(time_limit)
        if not iterables:
            raise TypeError("map needs at least one iterable")
        star = len(iterables) > 1
        items = list(zip(*iterables, strict=False)) if star else list(iterables[0])
        n = len(items)
        if n == 0:
            return FutureList(self, [], group, 0, 0)
        if batch_size is None:
            batch_size = max(1, min(-(-n // (4 * self._nthreads)), 10_000))
        elif batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        kw = kwargs or None
        puts: list[Future] = []  # held until the tasks are submitted

        def pack(args: Any, what: str) -> tuple[bytes, list[int]]:
            payload, deps, p = self._pack_args(args, what)
            puts.extend(p)
            return payload, deps

        if batch_size == 1:
            payloads = [
                pack((a if star else (a,), kw), f"the arguments of {group} (element {i})")
                for i, a in enumerate(items)
            ]
            ids = core.submit_many(group, False, func, payloads, priority, retries, needs, limit)
            return FutureList(self, ids, group, 0, n)
        payloads = [
            pack((items[i : i + batch_size], kw, star), f"the arguments of {group} (batch {j})")
            for j, i in enumerate(range(0, n, batch_size))
        ]
        ids = core.submit_many(group, True, func, payloads, priority, retries, needs, limit)
        return FutureList(self, ids, group, batch_size, n)

    # ----------------------------------------------------------- Dask

    asynchronous = False  # Dask asks before using a client as scheduler

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Dask's scheduler interface: computes ``keys`` of the Dask graph
        ``dsk`` on the cluster (``dask.compute(x, scheduler=client.get)``;
        the default for ``x.compute()`` while a client made with
        ``set_as_default=True`` is open)."""
        return _dask.get(self, dsk, keys, **kwargs)

    def compute(self, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
        """Starts computing Dask collections; returns a future per collection
        (a list for a list) without waiting."""
        return _dask.compute(self, collections, optimize_graph, **kwargs)

    def persist(self, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
        """Starts computing Dask collections; returns the same collections
        backed by futures of their chunks, held on the cluster."""
        return _dask.persist(self, collections, optimize_graph, **kwargs)

    # ----------------------------------------------------------- results

    def _outcome(self, task_id: int, key: str, timeout: float | None) -> tuple[str, Any, Any]:
        core = self._check()
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if task_id in self._cancelled:
                died = self._actor_died.get(task_id)
                if died is not None:
                    raise ActorDiedError(died)
                raise FutureCancelledError(f"{key} was cancelled")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if core.status(task_id) == "pending":
                with _LendThread():
                    got = core.wait([task_id], 1, left)
            else:
                got = 1
            if got < 1:
                raise TimeoutError(f"{key} did not finish within {timeout} seconds")
            # A large result is fetched from its worker: within what is left
            # of the timeout, and Ctrl-C stops it.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            kind, a, b = core.outcome(task_id, left)
            if kind != "pending":
                return kind, a, b
            if core.status(task_id) == "released":
                raise RuntimeError(f"{key} was released; its result is gone")
            # Its holder died before we fetched it: recomputing; wait again.

    def _value(self, f: Future, kind: str, a: Any, b: Any) -> Any:
        if kind == "value":
            if f._index is None:
                return _serialize.loads(a)
            batch = self._batch_cache.get(f._id)
            if batch is None:
                batch = _serialize.loads(a)
                self._batch_cache[f._id] = batch
            if isinstance(batch, list):
                return batch[f._index]
            err = batch.errors.get(f._index)
            if err is not None:
                raise _with_traceback(err[0], err[1], f.key)
            return batch.values[f._index]
        if kind == "raised":
            exc, tb = pickle.loads(b)
            raise _with_traceback(exc, tb, a)
        if kind == "killed" and f._group == "_call" and f._id not in self._actor_died:
            raise ActorDiedError(
                f"the actor's process died while running {f.key}; as in Ray, the call is "
                "not run again"
            )
        if kind == "killed":
            died = self._actor_died.get(f._id)
            if died is not None:
                raise ActorDiedError(died)
            raise KilledWorker(
                f"task {a!r} was running on {b} workers that died, so it failed; "
                "it probably crashes its worker (segfault, os._exit, memory exhaustion)"
            )
        if kind == "cancelled":
            died = self._actor_died.get(f._id)
            if died is not None:
                raise ActorDiedError(died)
            why = "" if a == f.key else f" (its input {a!r} was cancelled)"
            raise FutureCancelledError(f"{f.key} was cancelled{why}")
        if kind == "unsatisfiable":
            raise UnsatisfiableError(f"no worker can run {a}: {b}")
        if kind == "lost":
            what = (
                f"{f.key} was" if a == f.key else f"{f.key} cannot be computed: its input {a!r} was"
            )
            raise DataLostError(
                f"{what} data put on the cluster (scatter/put) and lost with the worker that "
                "held it; such data cannot be recomputed: scatter it again"
            )
        if kind == "unreachable":
            raise ConnectionError(
                f"could not fetch the result of {f.key} from the worker at {a} ({b}); it "
                "still holds it, but this client cannot reach it: clients must reach the "
                "workers' data addresses (see scheduler_info()) as well as the scheduler"
            )
        if kind == "cycle":
            raise ValueError(
                f"{f.key} can never run: its inputs lead back to {a!r} (the graph has a cycle); "
                "a task graph must be acyclic"
            )
        if kind == "missing" and a == f._id:
            raise MissingDependencyError(
                f"{f.key} came as a reference inside another task's result, but the "
                "scheduler no longer knows it: the result that held it was released or lost "
                "before this client claimed it"
            )
        if kind == "missing":
            raise MissingDependencyError(
                f"{f.key} takes a future the scheduler does not know (task id {a:x}): "
                "it was released or belongs to another cluster; keep input futures alive"
            )
        raise AssertionError(f"unknown outcome {kind!r}")

    def _own(self, futures: Iterable[Future | FutureList]) -> None:
        """Refuses futures of other clients: their ids name tasks of another
        client (or cluster), and would read as whatever this one has there."""
        for f in futures:
            owner = f._client
            if owner is not self and owner is not None:
                raise ForeignFutureError(
                    f"{f!r} belongs to another client ({owner!r}); gather it there, or "
                    "call its .result()"
                )

    def _result(self, f: Future, timeout: float | None) -> Any:
        if f._index is not None and f._id in self._batch_cache:
            return self._value(f, "value", None, None)
        kind, a, b = self._outcome(f._id, f.key, timeout)
        return self._value(f, kind, a, b)

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """Values of (nested lists, tuples, dicts of) futures, same shape.
        ``errors="skip"`` leaves out failed ones (lists only)."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        if isinstance(futures, Future):
            self._own([futures])
            return self._result(futures, None)
        if isinstance(futures, FutureList):
            self._own([futures])
            return self._gather_list(futures, errors == "skip")
        flat: list[Future] = []
        _collect(futures, flat)
        self._own(flat)
        core = self._check()
        ids = list(dict.fromkeys(f._id for f in flat))
        if core.wait(ids, len(ids), 0) < len(ids):
            with _LendThread():
                core.wait(ids, len(ids), None)
        outcomes: dict[int, tuple[int, Any, Any]] = {}
        values: list[Any] = []
        cache = self._batch_cache
        for f in flat:
            tid = f._id
            try:
                if f._index is not None and tid in cache:
                    batch = cache[tid]
                    if type(batch) is list:
                        values.append(batch[f._index])
                        continue
                o = outcomes.get(tid)
                if o is None:
                    o = outcomes[tid] = self._outcome(tid, f.key, None)
                values.append(self._value(f, *o))
            except Exception:
                if errors == "raise":
                    raise
                values.append(_SKIP)
        if type(futures) is list and len(values) == len(futures):
            if errors == "skip":
                return [v for v in values if v is not _SKIP]
            return values
        return _rebuild(futures, iter(values))

    def _gather_list(self, fl: FutureList, skip: bool) -> list[Any]:
        """``gather`` of a whole ``map``: one outcome per task, no element futures."""
        core = self._check()
        ids = fl._ids
        if core.wait(ids, len(ids), 0) < len(ids):
            with _LendThread():
                core.wait(ids, len(ids), None)
        out: list[Any] = []
        size = fl._batch
        for j, tid in enumerate(ids):
            batch = self._batch_cache.get(tid) if size else None
            if batch is None:
                kind, a, b = self._outcome(tid, f"{fl._group}-{tid:x}", None)
                if kind != "value":
                    if skip:
                        continue
                    # Raise as the first element of the failed task would.
                    self._value(fl[j * size if size else j], kind, a, b)
                batch = _serialize.loads(a)
                if not size:
                    out.append(batch)
                    continue
            if type(batch) is list:
                out += batch
                continue
            for k, value in enumerate(batch.values):
                err = batch.errors.get(k)
                if err is None:
                    out.append(value)
                elif not skip:
                    raise _with_traceback(err[0], err[1], fl[j * size + k].key)
        return out

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancels unfinished tasks; their futures raise ``FutureCancelledError``."""
        futures = [futures] if isinstance(futures, Future) else list(futures)
        ids = [f._id for f in futures]
        self._cancelled.update(ids)
        self._check().cancel(ids)

    def _cancel_queued(self, futures: Iterable[Future] | FutureList) -> None:
        """Cancels these tasks unless a worker has started them (started ones
        run to their end): ``concurrent.futures``' cancellation."""
        if isinstance(futures, FutureList):
            ids = list(futures._ids)
        else:
            ids = [f._id for f in futures]
        if ids:
            self._check().cancel_queued(ids)

    # ----------------------------------------------------------- callbacks

    def _add_callback(self, f: Future, fn: Callable[[Future], Any]) -> None:
        core = self._check()
        if f.done():
            fn(f)
            return
        with self._lock:
            if self._cb_watcher is None:
                self._cb_watcher = core.watcher()
                self._cb_thread = threading.Thread(
                    target=self._run_callbacks, name="shoal-callbacks", daemon=True
                )
                self._cb_thread.start()
            self._callbacks.setdefault(f._id, []).append((f, fn))
            self._cb_watcher.add([f._id])

    def _run_callbacks(self) -> None:
        watcher = self._cb_watcher
        while not self._closed:
            try:
                ids = watcher.next(0.2)
            except SchedulerLostError:
                return
            for tid in ids:
                with self._lock:
                    cbs = self._callbacks.pop(tid, [])
                for f, fn in cbs:
                    try:
                        fn(f)
                    except Exception:  # noqa: BLE001
                        import traceback

                        traceback.print_exc()

    # ----------------------------------------------------------- lifecycle

    def scheduler_info(self, timeout: float = 10.0) -> dict[str, Any]:
        """What the cluster looks like now: ``{"address", "clients", "tasks",
        "workers": {address: {"name", "pid", "nthreads", "resources",
        "processing", "held", "memory", "managed", "spilled", "memory_limit",
        "paused", "last_seen", "lifetime_end"}}}`` (bytes and seconds;
        ``lifetime_end``: Unix time it retires at, or None; memory figures are
        from each worker's last heartbeat, at most a second old)."""
        info = self._check().cluster_info(timeout)
        info["workers"] = {w.pop("address"): w for w in info["workers"]}
        return info

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> None:
        """Blocks until at least ``n_workers`` workers have joined (as Dask's
        ``Client.wait_for_workers``). Raises ``TimeoutError`` after
        ``timeout`` seconds (None: wait for ever)."""
        if n_workers < 0:
            raise ValueError(f"n_workers must be 0 or more, not {n_workers}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while (have := len(self.scheduler_info()["workers"])) < n_workers:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"only {have} of {n_workers} workers joined within {timeout} s: "
                    "are the worker processes started, with this cluster's address and token?"
                )
            time.sleep(0.05)

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL with its access token (None: no dashboard)."""
        if self._cluster is not None:
            return self._cluster.dashboard_link
        url = self._check().cluster_info(10.0)["dashboard"] or None
        return deploy.dashboard_link(url, self._token)

    def query(self, path: str, timeout: float = 10.0) -> Any:
        """The scheduler's answer to a dashboard API path (``/api/status``,
        ``/api/profile?group=inc``, ``/metrics``, ...), decoded from JSON.
        Unknown paths raise ``ValueError``."""
        answer = json.loads(self._check().query(path, timeout))
        if isinstance(answer, dict) and set(answer) == {"error"}:
            raise ValueError(answer["error"])
        return answer

    def _sync(self) -> None:
        """Makes every worker send what it has to report (profile samples,
        log lines, transfers) before this returns: tens of milliseconds."""
        self.query("/api/sync")

    def story(self, *futures: Future) -> list[dict[str, Any]]:
        """The scheduler's recent transitions of these tasks, oldest first:
        ``{"task", "from", "to", "worker", "stimulus", "time_us"}`` each,
        where ``stimulus`` names the event that caused it (``submit``,
        ``task-finished``, ``worker-lost``, ``cancel``, ...). The scheduler
        keeps its last 100,000 transitions."""
        out: list[dict[str, Any]] = []
        for f in futures:
            if not isinstance(f, Future):
                raise TypeError(f"story() takes futures, not {type(f).__name__}")
            self._own([f])
            for step in self.query(f"/api/task/{f._id}")["story"]:
                out.append({"task": f.key, **step})
        out.sort(key=lambda s: s["time_us"])
        return out

    def profile(self, group: str | None = None) -> dict[str, int]:
        """The profiler's samples since the cluster started, as folded
        stacks (``"f (file:line);g (file:line)"`` -> count): all task groups
        together, or only ``group``. Workers sample the stacks of running
        tasks every ``SHOAL_PROFILE_INTERVAL`` (default 20 ms; 0: off).
        Workers hand over their latest samples first."""
        self._sync()
        q = "/api/profile" + (f"?group={urllib.parse.quote(group)}" if group else "")
        return dict(self.query(q)["stacks"])

    def get_worker_logs(self, n: int | None = None) -> dict[str, list[str]]:
        """Recent log lines of each worker (its ``logging`` records and
        Shoal's own, filtered by ``SHOAL_LOG``), by worker name; the last
        ``n`` of each if given. Workers hand over their latest lines first."""
        self._sync()
        out: dict[str, list[str]] = {}
        for w in self.query("/api/logs")["workers"]:
            lines = w["lines"]
            out[w["name"] or str(w["id"])] = lines[-n:] if n else lines
        return out

    def trace(self, filename: str | os.PathLike) -> str:
        """Writes the task stream (tasks, transfers, spills the scheduler
        still remembers: the last 100,000) as a Chrome trace / Perfetto JSON
        file; open it in ``chrome://tracing`` or ui.perfetto.dev. Returns the
        path."""
        return diagnostics.write_trace(self.query("/api/report?since_us=0&merge=0"), filename)

    def retire_workers(
        self,
        workers: Iterable[str] | None = None,
        n: int | None = None,
        timeout: float = 60.0,
    ) -> list[str]:
        """Removes workers gracefully: they get no new work, the results
        they hold that are still needed move to other workers, then they
        stop (an embedded cluster does not replace them). ``workers``:
        addresses, names or pids (``scheduler_info()``); or ``n``: that many.
        Returns the addresses retired, once they are gone; ``TimeoutError``
        after ``timeout`` seconds."""
        info = self.scheduler_info()["workers"]
        if workers is None:
            if n is None:
                raise ValueError("give the workers to retire, or n=")
            chosen = sorted(info, key=lambda a: info[a]["id"])[-n:] if n > 0 else []
        else:
            wanted = {str(w) for w in workers}

            def ids(a: str) -> set[str]:
                return {a, info[a]["name"], str(info[a]["pid"])}

            chosen = [a for a in info if ids(a) & wanted]
            unknown = wanted - set().union(*(ids(a) for a in chosen))
            if unknown:
                raise ValueError(f"no such workers: {sorted(unknown)}; see scheduler_info()")
        if not chosen:
            return []
        self._check().retire(chosen)
        deadline = time.monotonic() + timeout
        while set(chosen) & set(self.scheduler_info()["workers"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {chosen} did not retire within {timeout} s")
            time.sleep(0.05)
        return chosen

    def restart(self, timeout: float = 60.0) -> None:
        """Restarts every worker process (their nannies: the embedded
        cluster, ``shoal worker``, start fresh ones) and cancels this
        client's futures, as distributed does. Waits until as many workers
        as before are back."""
        core = self._check()
        if isinstance(self.cluster, LocalCluster) and not self.cluster.processes:
            raise RuntimeError(
                "restart() needs worker processes: workers running as threads of this "
                "process cannot be restarted (use LocalCluster(processes=True))"
            )
        deadline = time.monotonic() + timeout
        expected = len(self.worker_pids)  # embedded: the processes started
        while True:
            before = {w["pid"] for w in self.scheduler_info()["workers"].values()}
            if len(before) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # still joining
        with self._lock:
            live = self._refs.ids()
        for tid in live:
            self._cancelled.add(tid)
        core.cancel(live)
        core.restart()
        while True:
            now = {w["pid"] for w in self.scheduler_info()["workers"].values()}
            if len(now) >= len(before) and not (now & before):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not come back within {timeout} s")
            time.sleep(0.05)

    def nthreads(self) -> dict[str, int]:
        """Execution threads per worker, by address (as Dask's)."""
        return {a: w["nthreads"] for a, w in self.scheduler_info()["workers"].items()}

    ncores = nthreads

    @property
    def status(self) -> str:
        """``"running"`` or ``"closed"``."""
        return "closed" if self._closed else "running"

    @property
    def id(self) -> str:
        """This client's id on its scheduler."""
        return f"Client-{self._check().id:x}"

    asynchronous = False  # Shoal's client is synchronous

    def shutdown(self) -> None:
        """Closes this client and its cluster (workers and scheduler) when
        it has one (``Client()``, ``Client(cluster)``); a scheduler started
        elsewhere is left running (stop ``shoal scheduler`` there)."""
        cluster = self.cluster
        self.close()
        if cluster is not None:
            cluster.close()

    def __getattr__(self, name: str) -> Any:
        why = _DISTRIBUTED_ONLY.get(name)
        if why is None:
            raise AttributeError(f"'Client' object has no attribute {name!r}")
        raise AttributeError(f"Client.{name} is not provided by Shoal: {why}")

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the embedded cluster's workers (empty when remote)."""
        cluster = self.cluster
        return cluster.worker_pids if isinstance(cluster, LocalCluster) else []

    def close(self) -> None:
        """Disconnects; an embedded cluster's workers exit. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fn in self._on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 - closing goes on
                pass
        if self._undo_default is not None:
            self._undo_default()
            self._undo_default = None
        for path in self._put_files:  # not taken over by a worker
            with contextlib.suppress(OSError):
                os.unlink(path)
        # The callback thread waits in Rust (0.2 s at a time): let it see
        # the close and end, rather than be stopped inside that wait by the
        # interpreter's exit (which aborts the process).
        cb = self._cb_thread
        if cb is not None and cb is not threading.current_thread():
            cb.join(2.0)
        if self._core is not None:
            self._core.close()  # before its cluster: not reconnecting to it
        self._core = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        _clients.discard(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def _repr_html_(self) -> str:
        """Jupyter: the scheduler, its workers and a dashboard link."""
        import html as _html

        kind = "embedded" if self._cluster is not None else "remote"
        rows = [("scheduler", f"{kind}: {self.scheduler_address}")]
        if self._closed:
            rows.append(("state", "closed"))
        else:
            info = self.scheduler_info()
            workers = info["workers"].values()
            threads = sum(w["nthreads"] for w in workers)
            memory = sum(w["memory_limit"] for w in workers)
            rows.append(("workers", f"{len(workers)} ({threads} threads)"))
            if memory:
                rows.append(("memory limit", f"{memory / 2**30:.1f} GiB in all"))
            link = self.dashboard_link
            if link:
                esc = _html.escape(link, quote=True)
                rows.append(("dashboard", f'<a href="{esc}" target="_blank">{esc}</a>'))
        cells = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>"
            f"{v if k == 'dashboard' else _html.escape(v)}</td></tr>"
            for k, v in rows
        )
        return f"<div><strong>shoal.Client</strong><table>{cells}</table></div>"

    def __repr__(self) -> str:
        kind = "embedded" if self._cluster is not None else "remote"
        state = "closed" if self._closed else self.scheduler_address
        return f"<shoal.Client {kind}: {state}>"


_SKIP = object()

# distributed.Client's methods that Shoal does another way (an attribute
# error names it; docs/coming-from-dask.md has the table).
_DISTRIBUTED_ONLY = {
    "run": "submit tasks; for set-up on every worker, preload= (Client, LocalCluster, "
    "`shoal worker --preload`)",
    "run_on_scheduler": "the scheduler is Rust code; ask it with client.query('/api/status')",
    "upload_file": "put the module where the workers import from (PYTHONPATH; an "
    "embedded cluster's workers inherit this process's sys.path)",
    "register_plugin": "preload= imports a module on every worker as it starts",
    "register_worker_plugin": "preload= imports a module on every worker as it starts",
    "register_scheduler_plugin": "the scheduler is Rust code and takes no plugins",
    "who_has": "data moves on demand; client.story(future) shows where a task ran",
    "has_what": "client.scheduler_info()['workers'] gives each worker's held results",
    "processing": "client.scheduler_info()['workers'] gives each worker's processing count",
    "rebalance": "data moves on demand; scatter(..., broadcast=True) shares one copy per host",
    "replicate": "data moves on demand; scatter(..., broadcast=True) shares one copy per host",
    "publish_dataset": "hold the futures (or use a named actor) and pass them on",
    "get_dataset": "hold the futures (or use a named actor) and pass them on",
    "list_datasets": "hold the futures (or use a named actor) and pass them on",
    "unpublish_dataset": "hold the futures (or use a named actor) and pass them on",
    "datasets": "hold the futures (or use a named actor) and pass them on",
    "get_task_stream": "client.trace('trace.json') writes it; the dashboard shows it live",
    "call_stack": "client.profile() or the dashboard's flame graph",
    "forward_logging": "client.get_worker_logs(), or the dashboard's log panel",
    "get_scheduler_logs": "the scheduler logs to its stderr (SHOAL_LOG=info)",
    "get_events": "client.story(*futures) and client.get_worker_logs()",
    "log_event": "logging in the task: client.get_worker_logs() collects it",
    "set_metadata": "keep it in a named actor",
    "get_metadata": "keep it in a named actor",
    "write_scheduler_file": "`shoal scheduler --scheduler-file FILE`",
    "dump_cluster_state": "client.story(*futures), client.scheduler_info(), client.trace(path)",
    "benchmark_hardware": "python benches/bench_data.py measures this host",
    "get_versions": "shoal.__version__ and `shoal info`",
    "get_executor": "shoal.Executor(client)",
    "amm": "data moves on demand; retire_workers() hands a worker's data over",
    "loop": "Shoal's client is synchronous; it has no event loop",
}


def _registered_token(address: str) -> str | None:
    """The token of the cluster at ``address`` as `shoal scheduler` noted it
    for this user (``~/.shoal/clusters/``): a bare ``Client("HOST:PORT")``
    joins as in Dask. The host may be a name or an address of the same
    machine."""
    import glob
    import socket

    def split(a: str) -> tuple[str, str]:
        hp = a.split("://", 1)[-1]
        host, _, port = hp.rpartition(":")
        return host.strip("[]"), port

    def ips(host: str) -> set[str]:
        try:
            return {i[4][0] for i in socket.getaddrinfo(host, None)}
        except OSError:
            return set()

    host, port = split(address)
    if not port:
        return None
    entries = glob.glob(os.path.join(os.path.expanduser("~"), ".shoal", "clusters", "*.json"))
    # Newest first: a note left by a scheduler that was killed is older
    # than the one of the scheduler now on that port.
    entries.sort(key=lambda p: os.stat(p).st_mtime if os.path.exists(p) else 0, reverse=True)
    for path in entries:
        try:
            with open(path) as fh:
                entry = json.load(fh)
            h, p = split(entry["address"])
            if p != port or entry["address"].startswith("tls://") != address.startswith("tls://"):
                continue
            if h != host and h not in ("0.0.0.0", "::") and not (ips(h) & ips(host)):
                continue
            with open(entry["token_file"]) as fh:
                return fh.read().strip() or None
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _with_traceback(exc: BaseException, tb: str, name: str) -> BaseException:
    # No traceback (a command task's error says it all): no note.
    if tb and not getattr(exc, "_shoal_noted", False):
        try:
            exc.add_note(f"\nTraceback of task {name!r} on its worker:\n{tb.rstrip()}")
            exc._shoal_noted = True  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - exceptions with __slots__
            pass
    return exc


def _collect(obj: Any, out: list[Future]) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, list | tuple | set | frozenset | FutureList):
        for x in obj:
            _collect(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, out)


def _rebuild(obj: Any, values: Iterator[Any]) -> Any:
    """Rebuilds ``obj`` with its futures replaced by ``values`` (in ``_collect`` order)."""
    if isinstance(obj, Future):
        return next(values)
    if isinstance(obj, list | FutureList):
        return [v for v in (_rebuild(x, values) for x in obj) if v is not _SKIP]
    if isinstance(obj, tuple | set | frozenset):
        return type(obj)(_rebuild(x, values) for x in obj)
    if isinstance(obj, dict):
        return {k: _rebuild(v, values) for k, v in obj.items()}
    return obj


def _by_client(futures: Iterable[Future]) -> dict[Client, list[Future]]:
    out: dict[Client, list[Future]] = {}
    for f in futures:
        if not isinstance(f, Future):
            raise TypeError(f"expected shoal Futures, got {type(f).__name__}")
        out.setdefault(f._client, []).append(f)
    return out


def fire_and_forget(obj: Any) -> None:
    """Runs these tasks to their end even if every future of them is
    released (Dask's ``fire_and_forget``): ``obj`` is a future, a ``map``'s
    futures, or lists, tuples, sets and dicts of them. Their results are
    dropped once they finish, unless a future still holds them. Ray-style
    ``.remote()`` calls always run this way."""
    ids: dict[Client, set[int]] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Future):
            ids.setdefault(o._client, set()).add(o._id)
        elif isinstance(o, FutureList):
            ids.setdefault(o._client, set()).update(o._ids)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        else:
            raise TypeError(f"fire_and_forget takes futures, not {type(o).__name__}")
    for client, group in ids.items():
        client._check().detach(sorted(group))


def wait(
    fs: Iterable[Future] | Future,
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
    *,
    num_returns: int | None = None,
) -> Any:
    """Waits for futures; returns ``(done, not_done)`` sets. ``TimeoutError``
    if ``ALL_COMPLETED`` is not reached within ``timeout`` seconds.

    With ``num_returns`` it is Ray's ``wait``: it returns ``(ready,
    not_ready)`` lists in input order once ``num_returns`` futures are done
    or ``timeout`` has passed, and never raises ``TimeoutError``."""
    futures = [fs] if isinstance(fs, Future) else list(fs)
    if num_returns is not None:
        return _wait_ray(futures, num_returns, timeout)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError(f"return_when must be ALL_COMPLETED or FIRST_COMPLETED, not {return_when}")
    for client, group in _by_client(futures).items():
        ids = list({f._id for f in group})
        need = len(ids) if return_when == ALL_COMPLETED else 1
        with _LendThread():
            got = client._check().wait(ids, need, timeout)
        if got < need and return_when == ALL_COMPLETED:
            raise TimeoutError(f"{len(ids) - got} of {len(ids)} tasks unfinished after {timeout}s")
        if return_when == FIRST_COMPLETED and got >= 1:
            break
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, set(futures) - done)


def _wait_ray(
    futures: list[Future], num_returns: int, timeout: float | None
) -> tuple[list[Future], list[Future]]:
    if not 1 <= num_returns <= len(futures):
        raise ValueError(
            f"num_returns must be between 1 and the number of futures ({len(futures)}), "
            f"not {num_returns}"
        )
    if len(set(futures)) != len(futures):
        raise ValueError("wait() got the same future twice")
    deadline = None if timeout is None else time.monotonic() + timeout
    groups = _by_client(futures)
    while True:
        ready = [f for f in futures if f.done()]
        if len(ready) >= num_returns:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if len(groups) == 1:
            ((client, group),) = groups.items()
            ids = list({f._id for f in group})
            done_ids = {f._id for f in ready}
            client._check().wait(ids, len(done_ids) + 1, left)
        else:
            time.sleep(0.005 if left is None else min(0.005, left))
    ready = ready[:num_returns]
    taken = set(ready)
    return ready, [f for f in futures if f not in taken]


class as_completed:  # noqa: N801 - named like distributed.as_completed
    """Iterates over futures as they finish (``with_results=True`` yields
    ``(future, result)`` pairs). More futures can be ``add``-ed while iterating."""

    def __init__(
        self,
        futures: Iterable[Future] = (),
        with_results: bool = False,
        raise_errors: bool = True,
        timeout: float | None = None,
    ):
        self._with_results = with_results
        self._raise_errors = raise_errors
        self._timeout = timeout
        self._pending: dict[int, list[Future]] = {}
        self._ready: list[Future] = []
        self._watchers: dict[Client, Any] = {}
        for f in futures:
            self.add(f)

    def add(self, future: Future) -> None:
        client = future._client
        w = self._watchers.get(client)
        if w is None:
            w = self._watchers[client] = client._check().watcher()
        first = future._id not in self._pending
        self._pending.setdefault(future._id, []).append(future)
        if first:
            w.add([future._id])

    def count(self) -> int:
        return sum(len(v) for v in self._pending.values()) + len(self._ready)

    def is_empty(self) -> bool:
        return self.count() == 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        while not self._ready:
            if not self._pending:
                raise StopIteration
            progressed = False
            for w in list(self._watchers.values()):
                per = 0.05 if len(self._watchers) > 1 else self._timeout
                for tid in w.next(per):
                    self._ready.extend(self._pending.pop(tid, []))
                    progressed = True
            if not progressed and self._timeout is not None and len(self._watchers) == 1:
                raise TimeoutError(f"no future finished within {self._timeout} seconds")
        f = self._ready.pop(0)
        if not self._with_results:
            return f
        try:
            return f, f.result()
        except Exception as e:
            if self._raise_errors:
                raise
            return f, e


_inherited: list[Any] = []  # a forked child's copies of its parent's handles


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing, joblib) inherits its parent's clients,
    whose connections live on threads the child does not have. They become
    closed here; their handles are kept, never dropped (dropping an
    embedded cluster would stop the parent's workers). A new Client works."""
    for c in list(_clients):
        _inherited.append((c._core, c._cluster, c._cb_watcher))
        c._core = c._cluster = c._cb_watcher = None
        c._cb_thread = None
        c._lock = threading.Lock()  # may have been held by a thread not copied
        c._closed = True
        if c._undo_default is not None:
            c._undo_default()
            c._undo_default = None
    _clients.clear()
    _context.recent_clients.clear()
    _started.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    for c in list(_clients):
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass


_context.client_class = Client
