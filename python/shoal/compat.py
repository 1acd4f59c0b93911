"""The rest of ``distributed``'s surface: what Shoal offers with Dask's
meaning (``get_worker``, ``worker_client``, ``print``, ``warn``,
``futures_of``), and for what it does another way, names that raise an
error saying which way (see docs/coming-from-dask.md for the table).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import _context
from ._futures import Future

__all__ = ["get_worker", "worker_client", "print", "warn", "futures_of", "UNSUPPORTED"]


@dataclass(frozen=True)
class WorkerView:
    """``get_worker()``: the worker running the calling task."""

    name: str
    nthreads: int
    pid: int
    scheduler_address: str

    @property
    def id(self) -> str:
        return self.name


def get_worker() -> WorkerView:
    """Inside a task: the worker running it (``name``, ``nthreads``,
    ``pid``, ``scheduler_address``). Elsewhere ``ValueError``, as in Dask.
    Shoal's worker is Rust code: its state is not a Python object."""
    ex = _context.current_executor()
    if ex is None or not _context.task_local.in_task:
        raise ValueError("No worker found: get_worker() works only inside a task")
    return WorkerView(ex.name, ex.nthreads, os.getpid(), ex.address)


@contextlib.contextmanager
def worker_client(timeout: float | None = None, separate_thread: bool = True) -> Iterator[Any]:
    """Inside a task: a client of the cluster running it, with the task's
    thread lent to the worker while the block runs (so that tasks it
    submits and waits for can run), as in Dask."""
    from ._waiting import rejoin, secede

    local = _context.task_local
    if _context.current_executor() is None or not local.in_task:
        raise ValueError("worker_client() works only inside a task; use get_client() elsewhere")
    client = _context.get_client()
    lent = separate_thread and not local.seceded
    if lent:
        secede()
    try:
        yield client
    finally:
        if lent:
            rejoin()


_task_log = logging.getLogger("shoal.task")


def print(*args: Any, sep: str = " ", end: str = "\n", file: Any = None, flush: bool = False):  # noqa: A001
    """``print`` that also reaches the worker's log when called in a task
    (``client.get_worker_logs()``, the dashboard's log panel). The line
    goes to the worker's stdout too (an embedded cluster's workers share
    the client's terminal); Dask also forwards it to the client's own
    stdout, which Shoal does not."""
    builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
    if _context.task_local.in_task:
        _task_log.warning("%s", sep.join(str(a) for a in args))


def warn(message: Any, category: type[Warning] | None = None, stacklevel: int = 1) -> None:
    """``warnings.warn`` that also reaches the worker's log in a task."""
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    if _context.task_local.in_task:
        name = (category or UserWarning).__name__
        _task_log.warning("%s: %s", name, message)


def futures_of(obj: Any) -> list[Future]:
    """The futures in a persisted Dask collection's graph, or in a
    (nested) list, tuple or dict of futures."""
    out: list[Future] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Future):
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
        elif isinstance(o, list | tuple | set):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif hasattr(o, "__dask_graph__"):
            graph = o.__dask_graph__()
            stack.extend(graph.values() if graph is not None else ())
        elif type(o).__module__.startswith("dask._task_spec"):
            value = getattr(o, "value", None)  # DataNode
            if value is not None:
                stack.append(value)
    return out[::-1]


_ACTOR = "a named actor: @shoal.remote on a class, then Cls.options(name=...).remote()"
UNSUPPORTED: dict[str, str] = {
    # distributed's coordination primitives keep state in its Python
    # scheduler; Shoal's is Rust and keeps none of the user's.
    "Variable": f"keep the value in {_ACTOR}, or pass futures to the tasks that need them",
    "Queue": f"as_completed(futures) hands results over as they finish; or {_ACTOR}",
    "Event": f"{_ACTOR} with set/is_set methods",
    "Lock": f"{_ACTOR}: its methods run one at a time, in order",
    "MultiLock": f"{_ACTOR}: its methods run one at a time, in order",
    "Semaphore": "resources: Client(resources={'db': 2}) and submit(..., "
    f"resources={{'db': 1}}) run at most two such tasks at once per worker; or {_ACTOR}",
    "Pub": f"{_ACTOR} holding the messages",
    "Sub": f"{_ACTOR} holding the messages",
    "Nanny": "workers are supervised by LocalCluster or `shoal worker`",
    "Worker": "start workers with LocalCluster or `shoal worker`",
    "Scheduler": "start a scheduler with LocalCluster or `shoal scheduler`",
    "SpecCluster": "LocalCluster, SLURMCluster or PBSCluster",
    "Security": "`shoal certs`, then `shoal scheduler --tls-ca/--tls-cert/--tls-key`",
    "get_task_stream": "client.trace('trace.json') writes the task stream; the dashboard "
    "shows it live",
}


def unsupported(name: str) -> type:
    """A stand-in for distributed's ``name``: using it raises an error
    that names Shoal's way."""
    why = UNSUPPORTED[name]

    class Unsupported:
        def __init__(self, *args: Any, **kwargs: Any):
            raise NotImplementedError(f"shoal.{name} is not provided: {why}")

        def __init_subclass__(cls, **kwargs: Any):
            raise NotImplementedError(f"shoal.{name} is not provided: {why}")

    Unsupported.__name__ = Unsupported.__qualname__ = name
    Unsupported.__doc__ = f"Not provided by Shoal: {why}."
    return Unsupported


Variable = unsupported("Variable")
Queue = unsupported("Queue")
Event = unsupported("Event")
Lock = unsupported("Lock")
MultiLock = unsupported("MultiLock")
Semaphore = unsupported("Semaphore")
Pub = unsupported("Pub")
Sub = unsupported("Sub")
Nanny = unsupported("Nanny")
Worker = unsupported("Worker")
Scheduler = unsupported("Scheduler")
SpecCluster = unsupported("SpecCluster")
Security = unsupported("Security")
get_task_stream = unsupported("get_task_stream")
