"""What a worker process knows of the task each thread runs.

A leaf module (it imports nothing of Shoal's), so that the client API can
ask "am I inside a task?" (``get_client``, ``secede``, waits that lend the
task's thread) without importing the worker, and the worker can run tasks
without importing the client. It also keeps the process's open clients, so
that progress bars and reports find the current one without importing the
client module.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any


class _TaskLocal(threading.local):
    # Class defaults: a missing attribute would cost an exception per read.
    in_task = False  # a task runs in this thread
    seceded = False  # it lent its thread (secede)
    numpy = False  # NumPy's memory handler is set in this thread
    lane = 0  # the execution thread's lane (its slot for its supervisor)
    # The executor this execution thread belongs to (workers running in a
    # client's own process have one each; see `current_executor`).
    executor: Any = None


task_local = _TaskLocal()

# Actor id -> instance, in an actor's process.
actors: dict[str, Any] = {}

# This worker process's executor (`shoal._worker._Executor`); None outside
# worker processes.
executor: Any = None

# `shoal.Client` (set when the client module loads): what a worker or a
# cluster opens a client with, without importing the client module.
client_class: Any = None

# Clients of this process, oldest first (weak: a client nobody holds goes).
recent_clients: list[weakref.ref[Any]] = []


def current_executor() -> Any:
    """The executor running tasks in this thread (a worker in this client's
    process), else this worker process's, else None."""
    return task_local.executor or executor


def register_client(client: Any) -> None:
    """A client opened: the newest is what ``get_client`` returns."""
    recent_clients[:] = [r for r in recent_clients if r() is not None] + [weakref.ref(client)]


def get_client() -> Any:
    """Inside a task: a client of the cluster running it (tasks may submit
    tasks; waiting on them lends the task's thread, so recursion cannot
    deadlock). Elsewhere: the most recently created client of this process
    that is still open. Raises ``ValueError`` if there is none."""
    ex = task_local.executor or executor
    if ex is not None:
        return ex.get_client()
    for ref in reversed(recent_clients):
        c = ref()
        if c is not None and not c._session.closed:
            return c
    raise ValueError("no shoal Client is open; create one with shoal.Client()")
