"""Shoal: a parallel and distributed task runtime for Python with a Rust engine.

>>> import shoal
>>> with shoal.Client() as client:          # embedded cluster, one worker per core
...     client.submit(pow, 2, 10).result()
1024
"""

from . import _imports
from ._core import __version__
from ._waiting import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    as_completed,
    fire_and_forget,
    rejoin,
    secede,
    wait,
)
from .actor import ActorHandle, get_actor, kill
from .client import Client, Future, FutureList, default_client, get_client

# distributed's names: print and warn as Dask's; the others raise an error
# naming Shoal's way (shoal.compat.UNSUPPORTED).
from .compat import (
    Event as Event,
)
from .compat import (
    Lock as Lock,
)
from .compat import (
    MultiLock as MultiLock,
)
from .compat import (
    Nanny as Nanny,
)
from .compat import (
    Pub as Pub,
)
from .compat import (
    Queue as Queue,
)
from .compat import (
    Scheduler as Scheduler,
)
from .compat import (
    Security as Security,
)
from .compat import (
    Semaphore as Semaphore,
)
from .compat import (
    SpecCluster as SpecCluster,
)
from .compat import (
    Sub as Sub,
)
from .compat import (
    Variable as Variable,
)
from .compat import (
    Worker as Worker,
)
from .compat import futures_of, get_worker, worker_client
from .compat import (
    get_task_stream as get_task_stream,
)
from .compat import (
    print as print,
)
from .compat import (
    warn as warn,
)
from .deploy import LocalCluster
from .diagnostics import performance_report, progress
from .errors import (
    ActorDiedError,
    CommandError,
    DataLostError,
    ForeignFutureError,
    FutureCancelledError,
    KilledWorker,
    MissingDependencyError,
    RemoteError,
    SchedulerLostError,
    ShoalError,
    TaskAbortedError,
    TaskTimeoutError,
    UnsatisfiableError,
)
from .executor import Executor
from .jobqueue import PBSCluster, SLURMCluster
from .remote import cancel, get, init, is_initialized, method, put, remote, shutdown

__all__ = [
    "__version__",
    "Client",
    "Future",
    "FutureList",
    "Executor",
    "LocalCluster",
    "get_worker",
    "worker_client",
    "futures_of",
    "default_client",
    "SLURMCluster",
    "PBSCluster",
    "ForeignFutureError",
    "ActorHandle",
    "kill",
    "get_actor",
    "ActorDiedError",
    "remote",
    "get",
    "put",
    "init",
    "shutdown",
    "is_initialized",
    "cancel",
    "method",
    "get_client",
    "secede",
    "rejoin",
    "wait",
    "fire_and_forget",
    "as_completed",
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "ShoalError",
    "SchedulerLostError",
    "KilledWorker",
    "FutureCancelledError",
    "TaskAbortedError",
    "MissingDependencyError",
    "UnsatisfiableError",
    "DataLostError",
    "RemoteError",
    "CommandError",
    "TaskTimeoutError",
    "progress",
    "performance_report",
]


def _register_joblib() -> None:
    from ._joblib import register

    register()


_imports.when_imported("joblib", _register_joblib)
