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
import json
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _commands, _context, _core, _dask, _resources, deploy
from ._client_info import ClusterQueries
from ._core import ClientCore
from ._futures import Future, FutureList
from ._session import Session, prepare_function
from ._waiting import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    as_completed,
    wait,
)
from .deploy import ClusterBase, LocalCluster, check_count

__all__ = [
    "Client",
    "Future",
    "FutureList",
    "wait",
    "as_completed",
    "FIRST_COMPLETED",
    "ALL_COMPLETED",
]


_clients: weakref.WeakSet[Client] = weakref.WeakSet()

get_client = _context.get_client


_started: list[Client] = []  # the client default_client() had to start


def default_client() -> Client:
    """``get_client()``, or else an embedded cluster started now and kept
    for later calls (what Ray-style calls and the joblib backend use)."""
    try:
        return get_client()
    except ValueError:
        pass
    with _start_lock:
        if not _started or _started[0]._session.closed:
            _started[:] = [Client()]
        return _started[0]


_start_lock = threading.Lock()


def close_default_client() -> None:
    """Closes the client ``default_client()`` started, if any (Ray-style
    ``shutdown()``)."""
    with _start_lock:
        started, _started[:] = list(_started), []
    for c in started:
        c.close()


def _dask_placement(what: str, workers: Any, actor: bool) -> None:
    """Refuses Dask's placement keywords that Shoal has no equivalent of,
    saying what to do instead (a Dask user's ``workers=`` must not reach the
    function as one of its own keywords)."""
    if workers is not None:
        raise ValueError(
            f"{what}(workers=...) is not supported: Shoal places tasks itself. To "
            "keep tasks to some workers, give those workers a resource "
            "(LocalCluster(resources=...), shoal worker --resources) and ask for "
            "it with resources="
        )
    if actor:
        raise ValueError(
            f"{what}(actor=True) is not supported: make the class an actor with "
            "@shoal.remote and start it with Class.remote(...)"
        )


class Client(ClusterQueries):
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
    The embedded cluster's workers import the modules named in
    ``preload`` as soon as they start, before any task, and the heavy
    libraries this process has already imported (NumPy, pandas, PyArrow,
    Dask's collections, SciPy, ...) whenever no task waits (a worker of
    one thread; with more, before any task too), so that a computation
    started later does not wait for them and the first one waits only for
    what its own tasks import (``preload=None``: nothing; ``shoal worker
    --preload`` and ``--idle-imports`` for other clusters).
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
        if n_workers is not None:
            check_count("n_workers", n_workers, 1)
        if threads_per_worker is not None:
            check_count("threads_per_worker", threads_per_worker, 1)
        if isinstance(timeout, str):
            _core.parse_duration(timeout)  # raises ValueError saying why
        elif isinstance(timeout, bool) or not (
            isinstance(timeout, int | float) and math.isfinite(timeout) and timeout >= 0
        ):
            raise ValueError(f"timeout must be a number of seconds, 0 or more, not {timeout!r}")
        # A Ctrl-C that a finalizer swallows still stops this client's waits.
        _core.guard_interrupts()
        _core.check_settings()  # a bad settings file is an error, not ignored
        self._cluster: LocalCluster | None = None  # the one this client started
        self.cluster: ClusterBase | None = None
        self._undo_default: Callable[[], None] | None = None
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
            address = _core.setting("SHOAL_SCHEDULER_ADDRESS") or None
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
            nthreads = self._cluster._worker_count() * self._cluster._threads_per_worker
        else:
            if cluster_kwargs:
                raise TypeError(
                    f"Client() got unexpected keyword arguments {sorted(cluster_kwargs)} "
                    "(they describe a cluster Client() would start; it connects to one here)"
                )
            if scheduler_file is not None:
                address, token = deploy.read_scheduler_file(scheduler_file, address, token, timeout)
            if address is None:
                raise ValueError("no scheduler address: give an address or a scheduler_file")
            # (No token at all: ClientCore says what to do.)
            token = (
                token
                or deploy.tokens.get(address)
                or _core.setting("SHOAL_TOKEN")
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
            nthreads = (n_workers or os.cpu_count() or 1) * (threads_per_worker or 1)
        self.scheduler_address: str = address
        if reconnect is not None and not reconnect > 0:
            raise ValueError(f"reconnect must be a number of seconds above 0, not {reconnect!r}")
        same_host = self._cluster is not None or address.startswith("unix://")
        self._session = Session(
            self, ClientCore(address, token, reconnect), token, nthreads, same_host
        )
        _clients.add(self)
        _context.register_client(self)
        self._undo_default = _dask._set_default(self.get) if set_as_default else None

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
        workers: Any = None,
        allow_other_workers: bool = False,
        fifo_timeout: Any = None,
        actor: bool = False,
        actors: bool = False,
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
        long left. Dask's ``fifo_timeout`` and ``allow_other_workers`` are
        accepted and change nothing; its ``workers`` and ``actor`` are
        refused (``_dask_placement``), never passed on to ``fn``.
        """
        if workers is not None or actor or actors:  # (per task: no call otherwise)
            _dask_placement("submit", workers, actor or actors)
        return self._session.submit(
            fn, args, kwargs, key, priority, retries, pure, resources, time_limit, time_request
        )

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
        core = self._session.check()
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
            self._session.name(key, tid)
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
            return {k: self._session.put(v, k) for k, v in data.items()}
        if isinstance(data, list | tuple | set | frozenset):
            return [self._session.put(v, None) for v in data]
        return self._session.put(data, None)

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        batch_size: int | None = None,
        priority: int = 0,
        retries: int = 0,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        key: Any = None,
        pure: bool = True,
        workers: Any = None,
        allow_other_workers: bool = False,
        fifo_timeout: Any = None,
        actor: bool = False,
        actors: bool = False,
        **kwargs: Any,
    ) -> FutureList:
        """``[submit(fn, *args, **kwargs) for args in zip(*iterables)]``, with
        ``batch_size`` elements per task (see the module notes).
        ``time_limit`` applies to each task (a batch of elements). Dask's
        ``pure``, ``fifo_timeout`` and ``allow_other_workers`` are accepted
        and change nothing (each element runs once per call); its ``key``,
        ``workers`` and ``actor`` are refused, never passed on to ``fn``."""
        if key is not None:
            raise ValueError(
                "map(key=...) is not supported: map names its tasks after the "
                "function; for tasks of your own names, submit(fn, ..., key=name)"
            )
        _dask_placement("map", workers, actor or actors)
        session = self._session
        core = session.check()
        group, func = prepare_function(fn, "map")
        needs = _resources.normalize(resources, "map")
        limit = _commands.limit_ms(time_limit)
        if not iterables:
            raise TypeError("map needs at least one iterable")
        star = len(iterables) > 1
        if star:
            items: Any = list(zip(*iterables, strict=False))
        elif isinstance(iterables[0], range):
            items = iterables[0]  # its slices are ranges: a batch pickles in a few bytes
        else:
            items = list(iterables[0])
        n = len(items)
        if n == 0:
            return FutureList(self, [], group, 0, 0)
        if batch_size is None:
            batch_size = max(1, min(-(-n // (4 * session.nthreads)), 10_000))
        elif batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        kw = kwargs or None
        puts: list[Future] = []  # held until the tasks are submitted

        def pack(args: Any, what: str) -> tuple[bytes, list[int]]:
            payload, deps, p = session.pack_args(args, what)
            puts.extend(p)
            return payload, deps

        if batch_size == 1:
            payloads = [
                pack((a if star else (a,), kw), f"the arguments of {group} (element {i})")
                for i, a in enumerate(items)
            ]
            ids = core.submit_many(group, False, func, payloads, priority, retries, needs, limit)
            return FutureList(self, ids, group, 0, n)
        starts = range(0, n, batch_size)
        # The first batches go out before the rest are packed, so that the
        # workers start while this thread packs (as Pool.map's feeder does).
        first = max(1, session.nthreads)
        ids: list[int] = []
        for piece in (starts[:first], starts[first:]):
            payloads = [
                pack(
                    (items[i : i + batch_size], kw, star),
                    f"the arguments of {group} (batch {i // batch_size})",
                )
                for i in piece
            ]
            if payloads:
                ids += core.submit_many(
                    group, True, func, payloads, priority, retries, needs, limit
                )
        return FutureList(self, ids, group, batch_size, n)

    # ----------------------------------------------------------- Dask

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

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """Values of (nested lists, tuples, dicts of) futures, same shape.
        ``errors="skip"`` leaves out failed ones (lists only)."""
        return self._session.gather(futures, errors)

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancels unfinished tasks; their futures raise ``FutureCancelledError``."""
        futures = [futures] if isinstance(futures, Future) else list(futures)
        self._session.cancel([f._id for f in futures])

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Disconnects; an embedded cluster's workers exit. Idempotent."""
        session = getattr(self, "_session", None)  # None: __init__ failed
        if session is not None:
            if session.closed:
                return
            session.close()
        if self._undo_default is not None:
            self._undo_default()
            self._undo_default = None
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


_inherited: list[Any] = []  # a forked child's copies of its parent's handles


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing, joblib) inherits its parent's clients,
    whose connections live on threads the child does not have. They become
    closed here; their handles are kept, never dropped (dropping an
    embedded cluster would stop the parent's workers). A new Client works."""
    for c in list(_clients):
        _inherited.append((c._session.forked(), c._cluster))
        c._cluster = None
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
