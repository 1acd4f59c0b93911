"""What a worker process knows of the task each thread runs.

A leaf module (it imports nothing of Shoal's), so that the client API can
ask "am I inside a task?" (``get_client``, ``secede``, waits that lend the
task's thread) without importing the worker, and the worker can run tasks
without importing the client.
"""

from __future__ import annotations

import threading
from typing import Any


class _TaskLocal(threading.local):
    # Class defaults: a missing attribute would cost an exception per read.
    in_task = False  # a task runs in this thread
    seceded = False  # it lent its thread (secede)
    numpy = False  # NumPy's memory handler is set in this thread


task_local = _TaskLocal()

# Actor id -> instance, in an actor's process.
actors: dict[str, Any] = {}

# This worker process's executor (`shoal._worker._Executor`); None outside
# worker processes.
executor: Any = None
