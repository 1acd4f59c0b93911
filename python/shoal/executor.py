"""``shoal.Executor``: the cluster behind the ``concurrent.futures`` API."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .client import Client, Future
from .errors import FutureCancelledError


class _ExecutorFuture(cf.Future):
    """A ``concurrent.futures.Future`` bound to a Shoal task: cancelling it
    cancels the task."""

    def __init__(self) -> None:
        super().__init__()
        self.task: Future | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        if self.task is not None:
            self.task.cancel()
        return True


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` that runs calls on a Shoal cluster.

    ``Executor(client)`` uses that client; ``Executor(**kwargs)`` starts
    ``Client(**kwargs)`` and closes it at ``shutdown``. Its futures are real
    ``concurrent.futures.Future`` objects, so ``cf.wait`` and
    ``cf.as_completed`` work on them. A future stays PENDING until its task
    finishes (the cluster does not report starts), so ``cancel()`` (and
    ``shutdown(cancel_futures=True)``) succeeds until then; a call already
    running finishes on its worker and its result is dropped.
    """

    def __init__(self, client: Client | None = None, **client_kwargs: Any):
        if client is not None and client_kwargs:
            raise TypeError("pass either a client or Client arguments, not both")
        self._owns = client is None
        self.client = (
            client if client is not None else Client(set_as_default=False, **client_kwargs)
        )
        self._pending: set[_ExecutorFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False
        # Dask reads this when the executor is given as its scheduler.
        self._max_workers = self.client._nthreads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            cff = _ExecutorFuture()
            self._pending.add(cff)
        task = self.client.submit(fn, *args, **kwargs)
        cff.task = task
        task.add_done_callback(lambda t: self._finish(cff, t))
        return cff

    def _finish(self, cff: _ExecutorFuture, task: Future) -> None:
        with self._lock:
            self._pending.discard(cff)
        if not cff.set_running_or_notify_cancel():
            return  # cancelled here first
        try:
            cff.set_result(task.result())
        except FutureCancelledError:
            # Cancelled through the task (client.cancel): report it as such.
            with cff._condition:
                cff._state = "CANCELLED_AND_NOTIFIED"
                cff._condition.notify_all()
            cff._invoke_callbacks()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            cff.set_exception(e)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``Executor.map``: results in order; ``chunksize`` elements per
        task; ``TimeoutError`` if a result is not ready ``timeout`` seconds
        after the call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = self.client.map(fn, *iterables, batch_size=chunksize)

        def results() -> Iterator[Any]:
            for f in futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                yield f.result(left)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            cf.wait(pending)
            if self._owns:
                self.client.close()
        elif self._owns:  # close once the remaining calls are done
            threading.Thread(
                target=lambda: (cf.wait(pending), self.client.close()), daemon=True
            ).start()
