"""Shoal's exception classes."""

from __future__ import annotations

from concurrent.futures import CancelledError

from ._core import SchedulerLostError, ShoalError

__all__ = [
    "ShoalError",
    "SchedulerLostError",
    "KilledWorker",
    "FutureCancelledError",
    "TaskAbortedError",
    "MissingDependencyError",
    "UnsatisfiableError",
    "ActorDiedError",
    "DataLostError",
    "ForeignFutureError",
    "RemoteError",
    "CommandError",
    "TaskTimeoutError",
]


class KilledWorker(ShoalError):
    """A task was running on several workers that died (default: 3).

    The task probably crashes its worker process: a segfault in an extension,
    ``os._exit``, or memory exhaustion. The message names the task.
    """


class FutureCancelledError(CancelledError):
    """The future (or one of its inputs) was cancelled."""


class TaskAbortedError(ShoalError):
    """A task raised ``KeyboardInterrupt``, ``SystemExit`` or ``GeneratorExit``.

    These are not re-raised in the client as they are: doing so would stop the
    client program because of what one task did. The original type and
    message are in this error's message; the worker kept running.
    """


class MissingDependencyError(ShoalError):
    """A task was given a future the scheduler no longer knows (released, or
    from another cluster)."""


class UnsatisfiableError(ShoalError):
    """A task needs more of a resource (``resources=``) than any worker of
    the cluster has: it can never run."""


class ActorDiedError(ShoalError):
    """An actor's process is gone for good (it died more often than its
    ``max_restarts``, or was killed): its outstanding and later calls fail."""


class DataLostError(ShoalError):
    """Data put on the cluster (``scatter``, ``put``) was lost with the worker
    that held it. Unlike computed results it cannot be recomputed: scatter
    it again (or compute it in a task, so that it can be)."""


class ForeignFutureError(ShoalError, ValueError):
    """A future was given to a client other than the one that made it (it
    names a task of that client, possibly of another cluster)."""


class RemoteError(ShoalError):
    """A task raised an exception whose class cannot be loaded here (its
    module is not importable in this process, or it does not unpickle).
    ``type_name`` and the message are the original's; the worker's
    traceback follows as a note, as for any task error."""

    def __init__(self, type_name: str, message: str, reason: str = ""):
        why = f" (its class cannot be loaded here: {reason})" if reason else ""
        super().__init__(f"{type_name}: {message}{why}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self):
        return (RemoteError, (self.type_name, self.message))


class CommandError(ShoalError):
    """A command task's program failed: it exited with a non-zero status,
    was killed by a signal, or could not start. ``returncode`` is the exit
    status (negative: the signal, as in ``subprocess``; None: it did not
    start), ``cmd`` the argument list, ``stderr`` the tail of its standard
    error (as text; empty when it was not kept)."""

    def __init__(self, message: str, cmd: list[str], returncode: int | None, stderr: str = ""):
        super().__init__(message)
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr

    def __reduce__(self):
        return (CommandError, (self.args[0], self.cmd, self.returncode, self.stderr))


class TaskTimeoutError(ShoalError, TimeoutError):
    """A task ran past its ``time_limit`` and was stopped: a command's
    process group got SIGTERM (then SIGKILL after the grace period), a
    Python task was interrupted (or, stuck in C code, its worker process
    was restarted)."""
