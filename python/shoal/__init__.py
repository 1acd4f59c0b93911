"""Shoal: a parallel and distributed task runtime for Python with a Rust engine.

>>> import shoal
>>> with shoal.Client() as client:          # embedded cluster, one worker per core
...     client.submit(pow, 2, 10).result()
1024
"""

from ._core import __version__
from .client import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    Client,
    Future,
    FutureList,
    as_completed,
    wait,
)
from .errors import (
    FutureCancelledError,
    KilledWorker,
    MissingDependencyError,
    SchedulerLostError,
    ShoalError,
    TaskAbortedError,
)

__all__ = [
    "__version__",
    "Client",
    "Future",
    "FutureList",
    "wait",
    "as_completed",
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "ShoalError",
    "SchedulerLostError",
    "KilledWorker",
    "FutureCancelledError",
    "TaskAbortedError",
    "MissingDependencyError",
]
