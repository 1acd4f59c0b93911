"""Clusters: ``LocalCluster`` (this host), and what every cluster shares.

Names and defaults follow ``distributed.LocalCluster``, so Dask's own
documentation runs with only its import changed::

    from shoal import Client, LocalCluster

    cluster = LocalCluster(n_workers=4, threads_per_worker=1, memory_limit="2GB")
    client = Client(cluster)
    cluster.scale(8)                       # or cluster.adapt(minimum=1, maximum=8)

``processes=True`` (the default) runs each worker in a process of its own,
supervised (one that dies is replaced). ``processes=False`` runs the
workers as threads of this very process, as Dask does: nothing to start,
results are not copied out of another process, but Python code in tasks
holds the GIL, so only code that releases it (NumPy, pandas, I/O) runs in
parallel, and a worker cannot be restarted (a task stuck in C code, a
memory limit passed: it pauses instead).

``SLURMCluster`` and ``PBSCluster`` (``shoal.jobqueue``) share
``ClusterBase``: ``scale``, ``adapt``, ``workers``, ``scheduler_info``,
``dashboard_link``, ``wait_for_workers``, ``close`` and the context manager.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _commands, _context, _core, _resources, _store, _zygote

__all__ = ["ClusterBase", "LocalCluster", "WorkerInfo"]

# Tokens of the clusters this process started, by address: a client of this
# process given only the address joins as in Dask.
tokens: dict[str, str] = {}


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as the scheduler sees it (``cluster.workers``,
    ``cluster.scheduler.workers``)."""

    name: str
    address: str
    pid: int
    nthreads: int
    memory_limit: int

    @property
    def id(self) -> str:
        return self.name


class SchedulerView:
    """``cluster.scheduler``: the scheduler's workers, read-only. Shoal's
    scheduler is Rust code, not a Python object: other state is reached
    through ``Client.scheduler_info()`` and ``Client.query(path)``."""

    def __init__(self, cluster: ClusterBase):
        self._cluster = cluster

    @property
    def address(self) -> str:
        return self._cluster.scheduler_address

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        """Worker address -> ``WorkerInfo`` (``.pid``, ``.name``, ...)."""
        return {w.address: w for w in self._cluster.workers.values()}

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"shoal's scheduler is not a Python object; cluster.scheduler has only "
            f"'address' and 'workers', not {name!r}: use Client.scheduler_info() or "
            "Client.query('/api/status') for the rest"
        )


def read_scheduler_file(
    path: str | os.PathLike, address: str | None, token: str | None, timeout: float = 30.0
) -> tuple[str, str | None]:
    """The address and token a ``shoal scheduler --scheduler-file`` wrote.
    A file not there yet is waited for up to ``timeout`` seconds, as Dask
    does: a batch script starts its scheduler and its clients together."""
    path = os.path.expanduser(os.fspath(path))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as fh:
                info = json.load(fh)
            break
        except FileNotFoundError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"the scheduler file {path!r} did not appear in {timeout:g} s: is "
                    "`shoal scheduler --scheduler-file` running, and is the path one "
                    "that both of you see?"
                ) from e
            time.sleep(0.1)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the scheduler file {path!r}: {e}") from e
    if address is not None and address != info.get("address"):
        raise ValueError(
            f"address {address!r} and scheduler file ({info.get('address')!r}) disagree; "
            "give one of them"
        )
    tls = info.get("tls")
    if tls:  # the scheduler's certificates, which this site shares
        from ._core import configure_tls

        configure_tls(tls["ca"], tls["cert"], tls["key"])
    if token is None and info.get("token_file"):
        try:
            with open(info["token_file"]) as fh:
                token = fh.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read the cluster's token file: {e}") from e
    return info["address"], token


def dashboard_link(url: str | None, token: str | None) -> str | None:
    """The dashboard's URL with the access token it asks for. Where
    ``SHOAL_DASHBOARD_LINK`` is set (as Dask's ``distributed.dashboard.link``),
    the URL is that template with ``{scheme}``, ``{host}``, ``{port}`` and
    any environment variable filled in: behind JupyterHub's proxy,
    ``{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/``."""
    if url is None or token is None:
        return None
    template = _core.setting("SHOAL_DASHBOARD_LINK")
    if template:
        url = link_from_template(template, url)
    return f"{url}?token={_core.dashboard_token(token)}"


def link_from_template(template: str, url: str) -> str:
    """``template`` filled from the dashboard's ``url`` and the environment;
    ``ValueError`` naming a field that is neither."""
    parts = urllib.parse.urlsplit(url)
    fields = {
        **os.environ,
        "scheme": parts.scheme,
        "host": parts.hostname or "",
        "port": str(parts.port or ""),
    }
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"SHOAL_DASHBOARD_LINK {template!r} names {e}, which is neither scheme, host, "
            "port nor a set environment variable"
        ) from None


class ClusterBase:
    """What every Shoal cluster offers (``LocalCluster``, ``SLURMCluster``,
    ``PBSCluster``); ``Client(cluster)`` connects to any of them."""

    scheduler_address: str = ""
    _threads_per_worker = 1
    _closed = False

    # -- what each kind provides
    def _connection(self) -> tuple[str, str | None]:
        """The scheduler's address and the cluster's token."""
        raise NotImplementedError

    def _scale_workers(self, n: int) -> None:
        """Runs ``n`` workers (adapt's step)."""
        raise NotImplementedError

    def _worker_count(self) -> int:
        """Workers started or asked for (adapt's measure)."""
        raise NotImplementedError

    # -- shared
    def _core(self) -> Any:
        """A scheduler connection of the cluster's own, for its questions."""
        core = getattr(self, "_info_core", None)
        if core is None:
            address, token = self._connection()
            core = self._info_core = _core.ClientCore(address, token, None)
        return core

    def _close_core(self) -> None:
        core = getattr(self, "_info_core", None)
        if core is not None:
            self._info_core = None
            core.close()

    def scheduler_info(self, timeout: float = 10.0) -> dict[str, Any]:
        """As ``Client.scheduler_info()``: workers by address, tasks, clients."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        info = self._core().cluster_info(timeout)
        info["workers"] = {w.pop("address"): w for w in info["workers"]}
        return info

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        """The workers that have joined, by name (empty once closed)."""
        if self._closed:
            return {}
        out = {}
        for address, w in self.scheduler_info()["workers"].items():
            name = w.get("name") or address
            out[name] = WorkerInfo(name, address, w["pid"], w["nthreads"], w["memory_limit"])
        return out

    @property
    def scheduler(self) -> SchedulerView:
        return SchedulerView(self)

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL with its access token (None: no dashboard)."""
        if self._closed:
            return None
        url = self._core().cluster_info(10.0).get("dashboard") or None
        return dashboard_link(url, self._connection()[1])

    def get_client(self) -> Any:
        """A new ``Client`` of this cluster."""
        return _context.client_class(self)

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> None:
        """Blocks until ``n_workers`` workers have joined; ``TimeoutError``
        after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (have := len(self.scheduler_info()["workers"])) < n_workers:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"only {have} of {n_workers} workers joined within {timeout} s")
            time.sleep(0.05)

    def _waiting_tasks(self) -> int:
        """Tasks waiting, ready or running (-1: no answer)."""
        try:
            groups = json.loads(self._core().query("/api/status", 10.0))["groups"]
        except Exception:  # noqa: BLE001 - no answer: no change
            return -1
        keys = ("waiting", "ready", "processing")
        return sum(sum(g.get(k, 0) for k in keys) for g in groups)

    def adapt(
        self,
        minimum: int = 0,
        maximum: int | float | None = None,
        interval: float | str = 1.0,
        wait_count: int = 3,
        **kwargs: Any,
    ) -> None:
        """Scales with the work: enough workers for the tasks waiting, ready
        and running (a thread each), between ``minimum`` and ``maximum``
        (default: as many as this host has cores). It grows at once and
        shrinks after ``wait_count`` checks, ``interval`` seconds apart, in
        a row that wanted fewer (retiring workers hand their results over).
        ``scale()`` stops adapting."""
        if kwargs:
            raise TypeError(f"adapt() got unexpected arguments {sorted(kwargs)}")
        if maximum is None:
            maximum = max(1, (os.cpu_count() or 1) // self._threads_per_worker)
        if not 0 <= minimum <= maximum:
            raise ValueError(f"need 0 <= minimum <= maximum, not {minimum} and {maximum}")
        every = _commands.parse_duration(interval, "interval") or 0.0
        if not every > 0:
            raise ValueError(f"interval must be above 0 seconds, not {interval!r}")
        self._stop_adapting()
        stop = threading.Event()
        thread = threading.Thread(
            target=self._adapt_loop,
            args=(stop, minimum, maximum, every, wait_count),
            name="shoal-adapt",
            daemon=True,
        )
        self._adapting = (stop, thread)
        thread.start()

    def _stop_adapting(self) -> None:
        adapting = getattr(self, "_adapting", None)
        self._adapting = None
        if adapting is not None:
            adapting[0].set()
            if adapting[1] is not threading.current_thread():
                adapting[1].join()

    def _adapt_loop(
        self, stop: threading.Event, lo: int, hi: float, every: float, wait_count: int
    ) -> None:
        lower = 0
        while not stop.is_set():
            try:
                tasks = self._waiting_tasks()
                if tasks >= 0:
                    want = int(max(lo, min(hi, math.ceil(tasks / self._threads_per_worker))))
                    have = self._worker_count()
                    lower = lower + 1 if want < have else 0
                    if want > have or lower >= wait_count:
                        self._scale_workers(want)
                        lower = 0
            except Exception as e:  # noqa: BLE001 - adapt must not die of one bad step
                print(f"shoal adapt: {e}", file=sys.stderr, flush=True)
            stop.wait(every)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _repr_html_(self) -> str:
        """Jupyter: the scheduler, its workers and a dashboard link."""
        return html_summary(type(self).__name__, self.scheduler_address, self, self._closed)


def tied_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a ``shoal scheduler`` or ``shoal worker`` this process
    starts with ``subprocess``, which then ends when this process does
    (``SHOAL_PARENT_PID``), as ``LocalCluster``'s workers do: a program that
    exits or is killed without closing its cluster leaves nothing running."""
    return {**env, "SHOAL_PARENT_PID": str(os.getpid())}


def html_summary(title: str, scheduler: str, source: Any, closed: bool) -> str:
    """The HTML table Jupyter shows for a cluster or a client: the
    scheduler, its workers and threads, their memory, the dashboard link.
    ``source`` has ``scheduler_info()`` and ``dashboard_link``."""
    rows = [("scheduler", scheduler)]
    if closed:
        rows.append(("state", "closed"))
    else:
        try:
            workers = list(source.scheduler_info()["workers"].values())
            link = source.dashboard_link
        except Exception as e:  # noqa: BLE001 - a repr must not raise
            workers, link = None, None
            rows.append(("state", f"unreachable ({e})"))
        if workers is not None:
            threads = sum(w["nthreads"] for w in workers)
            memory = sum(w["memory_limit"] for w in workers)
            rows.append(("workers", f"{len(workers)} ({threads} threads)"))
            if memory:
                rows.append(("memory limit", f"{memory / 2**30:.1f} GiB in all"))
        if link:
            rows.append(("dashboard", link))
    cells = []
    for k, v in rows:
        esc = html.escape(v, quote=True)
        if k == "dashboard":
            esc = f'<a href="{esc}" target="_blank">{esc}</a>'
        cells.append(
            f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{esc}</td></tr>"
        )
    return f"<div><strong>{title}</strong><table>{''.join(cells)}</table></div>"


MAX_COUNT = 4096  # workers or threads: more is a typo, and would exhaust the host first


def check_count(name: str, value: Any, low: int) -> int:
    """``value`` as a count of workers or threads: a whole number from
    ``low`` to ``MAX_COUNT``; else a ``ValueError`` saying so."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be from {low} to {MAX_COUNT}, not {value!r}")
    return int(value)


def default_shape(
    n_workers: int | None, threads_per_worker: int | None, processes: bool
) -> tuple[int, int]:
    """Dask's defaults: with processes, workers times threads covers the
    cores (as many processes as cores up to 4, then fewer with more
    threads); without, one worker with a thread per core."""
    cores = os.cpu_count() or 1
    if n_workers is None and threads_per_worker is None:
        if not processes:
            return 1, cores
        if cores <= 4:
            return cores, 1
        procs = min(f for f in range(1, cores + 1) if cores % f == 0 and f >= math.sqrt(cores))
        return procs, cores // procs
    if n_workers is None:
        assert threads_per_worker is not None
        return max(1, cores // threads_per_worker), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, math.ceil(cores / max(n_workers, 1)))
    return n_workers, threads_per_worker


_DASK_ONLY = {
    # Dask's arguments with no meaning here, and what to do instead.
    "asynchronous": "Shoal's Client is synchronous; run it in a thread "
    "(asyncio.to_thread) from async code",
    "host": "the local cluster listens on a private Unix socket; for a TCP "
    "scheduler run `shoal scheduler --host HOST`",
    "ip": "the local cluster listens on a private Unix socket; for a TCP "
    "scheduler run `shoal scheduler --host HOST`",
    "protocol": "the local cluster listens on a private Unix socket; for TCP or "
    "TLS run `shoal scheduler`",
    "security": "for TLS run `shoal scheduler --tls-ca ... --tls-cert ... --tls-key ...`",
    "worker_class": "Shoal has one kind of worker",
    "scheduler_kwargs": "the scheduler takes settings from SHOAL_* variables (see `shoal info`)",
}
# Accepted and without effect here (their purpose is met otherwise).
_IGNORED = {
    "silence_logs",  # workers log at SHOAL_LOG's level (warnings by default)
    "name",
    "loop",
    "start",
    "scheduler_port",  # 0 (any) is all a Unix socket needs
    "worker_dashboard_address",
    "diagnostics_port",
    "interface",
    "nanny",
}


class LocalCluster(ClusterBase):
    """A scheduler in this process and workers on this host (see the module).

    ``n_workers`` and ``threads_per_worker`` default as in Dask (all cores
    covered; see ``default_shape``). ``memory_limit``: per worker (bytes,
    ``"2GB"``, a fraction of the host, ``"auto"``: its share; ``None`` or 0:
    none). ``resources``: what each worker offers tasks (``{"GPU": 1}``).
    ``dashboard_address``: where the dashboard serves (``":8787"``:
    loopback; None: no dashboard). ``preload``: modules workers import
    first, before any task (the heavy libraries this process imported
    are added, imported while no task waits; ``None``: neither).
    Worker processes are forked from a copy of this process where that is
    safe, else started anew (``SHOAL_WORKER_START``; ``worker_start`` says
    which, and why).
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        memory_limit: str | float | None = "auto",
        dashboard_address: str | None = ":8787",
        resources: Mapping[str, float] | None = None,
        local_directory: str | os.PathLike | None = None,
        preload: Iterable[str] | None = (),
        **kwargs: Any,
    ):
        for k, v in kwargs.items():
            if k in _DASK_ONLY and v not in (None, False, 0, ""):
                raise ValueError(f"LocalCluster({k}=...) is not supported: {_DASK_ONLY[k]}")
            if k not in _DASK_ONLY and k not in _IGNORED:
                raise TypeError(f"LocalCluster() got an unexpected keyword argument {k!r}")
        if n_workers is not None:
            n_workers = check_count("n_workers", n_workers, 0)
        if threads_per_worker is not None:
            threads_per_worker = check_count("threads_per_worker", threads_per_worker, 1)
        n, threads = default_shape(n_workers, threads_per_worker, processes)
        self.processes = bool(processes)
        self._threads_per_worker = threads
        self._pid = os.getpid()
        offered = _resources.normalize(resources, "LocalCluster")
        if any(name == "CPU" for name, _ in offered):
            raise ValueError("resources: CPU is a worker's threads; set threads_per_worker instead")
        # Each worker's share of the host's memory, checked here: a bad
        # value fails in the caller, not in n worker processes.
        self._memory_limit = _store.parse_memory(memory_limit, 1 / max(n, 1))
        self._resources = dict(offered)
        self._local_directory = None if local_directory is None else os.fspath(local_directory)
        from ._profile import interval_from_env

        interval_from_env()  # a bad SHOAL_PROFILE_INTERVAL fails here, clearly
        dashboard = None if dashboard_address is None else _dashboard_address(dashboard_address)
        args = ["-m", "shoal._worker", "--nthreads", str(threads)]
        if offered:
            args += ["--resources", ",".join(f"{k}={v!r}" for k, v in offered)]
        args += ["--memory-limit", str(self._memory_limit or "none")]
        if self._local_directory is not None:
            args += ["--local-directory", self._local_directory]
        self._preload, idle = _preloads(preload)
        if self._preload:
            args += ["--preload", ",".join(self._preload)]
        if idle:
            args += ["--idle-imports", ",".join(idle)]
        env = [("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))]
        self._inproc: list[Any] = []  # processes=False: the executors
        self._inproc_lock = threading.Lock()
        # Forked before the scheduler's threads exist (see _zygote).
        why = _zygote.why_not() if processes else "processes=False"
        zygote = _zygote.start() if why is None else None
        #: How worker processes start: "fork", or "spawn (why not fork)".
        self.worker_start = "fork" if why is None else f"spawn ({why})"
        self._cluster: Any = _core.Cluster(
            n if processes else 0, sys.executable, args, env, dashboard, zygote
        )
        self.scheduler_address = self._cluster.address
        self._token: str = self._cluster.token
        tokens[self.scheduler_address] = self._token
        _live.add(self)
        if not processes:
            try:
                self._scale_workers(n)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------ workers

    def _connection(self) -> tuple[str, str | None]:
        return self.scheduler_address, self._token

    def _check(self) -> Any:
        if self._closed or self._cluster is None:
            raise RuntimeError("this LocalCluster is closed; create a new one")
        return self._cluster

    def _start_thread_worker(self) -> Any:
        from . import _worker

        name = f"inproc-{os.getpid()}-{len(self._inproc)}"
        ex = _worker.start(
            self.scheduler_address,
            self._token,
            nthreads=self._threads_per_worker,
            name=name,
            resources=self._resources,
            memory_limit=self._memory_limit or "none",
            local_directory=self._local_directory,
            preload=self._preload,
            in_process=True,
        )

        def finish() -> None:  # told to stop (retired, or the cluster closed)
            ex.stopped.wait()
            ex.finish()
            with self._inproc_lock:
                if ex in self._inproc:
                    self._inproc.remove(ex)

        threading.Thread(target=finish, name="shoal-inproc-finish", daemon=True).start()
        return ex

    def _scale_workers(self, n: int) -> None:
        cluster = self._check()
        if self.processes:
            cluster.scale(n)
            failure = cluster.failure()
            if failure:
                raise RuntimeError(f"the cluster cannot start workers: {failure}")
            return
        with self._inproc_lock:
            live = [ex for ex in self._inproc if not getattr(ex, "retiring", False)]
        for _ in range(n - len(live)):
            ex = self._start_thread_worker()
            with self._inproc_lock:
                self._inproc.append(ex)
        for ex in live[n:] if n < len(live) else []:
            ex.retiring = True
            ex.core.retire()  # hands its results over, then the scheduler stops it

    def _worker_count(self) -> int:
        cluster = self._check()
        if self.processes:
            return cluster.target()
        with self._inproc_lock:
            return sum(1 for ex in self._inproc if not getattr(ex, "retiring", False))

    def scale(self, n: int | None = None, *, memory: Any = None, cores: Any = None) -> None:
        """Runs ``n`` workers: starts more, or retires the newest (they
        hand the results still needed to the others first). Stops
        ``adapt``."""
        if memory is not None or cores is not None:
            raise ValueError("LocalCluster.scale takes a number of workers: scale(n)")
        if n is None:
            raise ValueError("scale(n) takes a number of workers (0 or more), not None")
        n = check_count("scale(n), the number of workers,", n, 0)
        self._stop_adapting()
        self._scale_workers(n)

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        """The workers by name. Workers still starting are waited for (up
        to 30 s), so that right after ``LocalCluster(n_workers=4)`` this
        shows the four, as in Dask."""
        if not self._closed and self.processes:
            deadline = time.monotonic() + 30
            while (
                len(self.scheduler_info()["workers"]) < self._worker_count()
                and time.monotonic() < deadline
                and not self._check().failure()
            ):
                time.sleep(0.02)
        return super().workers

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (empty with processes=False)."""
        return list(self._cluster.worker_pids()) if self._cluster is not None else []

    @property
    def dashboard_link(self) -> str | None:
        if self._cluster is None:
            return None
        return dashboard_link(self._cluster.dashboard, self._token)

    def close(self, timeout: float | None = None) -> None:
        """Stops the workers (processes exit; a worker thread stops once its
        running tasks end) and the scheduler. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # a forked child's copy: the parent's workers are not ours
        self._stop_adapting()
        self._close_core()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()
        tokens.pop(self.scheduler_address, None)
        deadline = time.monotonic() + (5.0 if timeout is None else timeout)
        for ex in list(self._inproc):
            ex.stopped.wait(max(0.0, deadline - time.monotonic()))
        _live.discard(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        kind = "processes" if self.processes else "threads"
        state = "closed" if self._closed else self.scheduler_address
        try:
            workers = 0 if self._closed else self._worker_count()
        except Exception:  # noqa: BLE001
            workers = 0
        return (
            f"LocalCluster({state!r}, workers={workers}, "
            f"threads_per_worker={self._threads_per_worker}, {kind})"
        )


_live: weakref.WeakSet[LocalCluster] = weakref.WeakSet()
_inherited: list[Any] = []  # a forked child's copies of its parent's clusters


def _after_fork_in_child() -> None:
    """A forked child's copies of this process's clusters are closed and
    their handles kept (dropping one would stop the parent's workers)."""
    for c in list(_live):
        _inherited.append(c._cluster)
        c._cluster = None
        c._closed = True
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _dashboard_address(addr: str) -> str:
    """``":8787"`` (Dask's spelling) means loopback here; ``HOST:PORT`` as given."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"dashboard_address must be HOST:PORT or :PORT, not {addr!r}")
    return f"{host or '127.0.0.1'}:{port}"


# Libraries slow to import (hundreds of milliseconds) that tasks of a
# process which imported them are likely to need: a local cluster's
# workers preload those this process has.
_HEAVY = (
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "sklearn",
    "xarray",
    "dask",
    "dask.array",
    "dask.dataframe",
    "dask.bag",
)


def _preloads(named: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """What a local cluster's workers import: the modules ``named``, right
    after start and before any task (a preload may set up what tasks
    need), and the heavy libraries this process has imported, while no task
    waits (None: nothing at all)."""
    if named is None:
        return [], []
    if isinstance(named, str):
        named = [named]
    out: list[str] = []
    for m in named:
        if not isinstance(m, str) or not m or "," in m:
            raise ValueError(f"preload takes module names, not {m!r}")
        if m not in out:
            out.append(m)
    heavy = set(_HEAVY) - set(out)
    # In the order this process imported them: what it used first first.
    return out, [m for m in list(sys.modules) if m in heavy]
