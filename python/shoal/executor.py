"""``shoal.Executor``: the cluster behind the ``concurrent.futures`` API.

It behaves as ``ProcessPoolExecutor`` does where code can tell: every
keyword of ``submit`` goes to the called function, ``initializer`` runs once
in each worker process before its first call (and one that raises breaks the
executor), calls still pending when the interpreter exits or after
``shutdown(wait=False)`` run to their end, and ``shutdown(cancel_futures=True)``
cancels only calls that have not started.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._session import group_name
from ._waiting import wait
from .client import Client, Future, FutureList
from .errors import FutureCancelledError

_LOG = logging.getLogger("concurrent.futures")


class _InitializerFailed(Exception):
    """Raised in a worker process whose executor initializer raised; carries
    the initializer's traceback text."""


# In worker processes: executor key -> the initializer's traceback text if it
# raised, None if it ran.
_initialized: dict[str, str | None] = {}
_init_lock = threading.Lock()


class _Initialized:
    """``fn`` run after the executor's initializer has run once in this
    process (the first call of each worker process runs it)."""

    __slots__ = ("fn", "init", "initargs", "key", "__name__", "__weakref__")

    def __init__(self, fn: Callable[..., Any], init: Callable[..., Any], initargs: tuple, key: str):
        self.fn, self.init, self.initargs, self.key = fn, init, initargs, key
        self.__name__ = group_name(fn)  # the task group shown for it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _init_lock:
            if self.key not in _initialized:
                try:
                    self.init(*self.initargs)
                    _initialized[self.key] = None
                except BaseException:  # noqa: BLE001 - reported to the executor
                    _initialized[self.key] = traceback.format_exc()
        failed = _initialized[self.key]
        if failed is not None:
            raise _InitializerFailed(failed)
        return self.fn(*args, **kwargs)


class _ExecutorFuture(cf.Future):
    """A ``concurrent.futures.Future`` bound to a Shoal task."""

    def __init__(self, executor: Executor, task: Future) -> None:
        super().__init__()
        self.executor = executor
        self.task = task

    def cancel(self) -> bool:
        # As in CPython, a call a worker has started is not stopped: only the
        # cluster knows whether it has, so the task is cancelled there unless
        # it started (then it runs on and its result is dropped here).
        if not super().cancel():
            return False
        self.executor.client._session.cancel_queued([self.task])
        return True


_executors: weakref.WeakSet[Executor] = weakref.WeakSet()
_exiting = False


def _run_pending_at_exit() -> None:
    """At interpreter exit, calls still pending run to their end (as in
    CPython), before the clients close (their hook runs after this one)."""
    global _exiting
    _exiting = True
    for ex in list(_executors):
        ex._wait_pending()


atexit.register(_run_pending_at_exit)


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` that runs calls on a Shoal cluster.

    ``Executor(max_workers)`` starts an embedded cluster of ``max_workers``
    worker processes (one thread each, as ``ProcessPoolExecutor``; default:
    one per core) and closes it at ``shutdown``; other keyword arguments go
    to ``Client``. ``Executor(client)`` (or ``client=``) runs on that client's
    cluster instead. ``initializer(*initargs)`` runs once in each worker
    process before its first call of this executor; if it raises, the call
    and every later one fail with ``BrokenExecutor``. ``mp_context`` is
    accepted and ignored (Shoal starts its worker processes itself).

    Its futures are real ``concurrent.futures.Future`` objects, so
    ``cf.wait`` and ``cf.as_completed`` work on them. A future stays PENDING
    until its call finishes; ``cancel()`` then succeeds, but a call a worker
    has already started runs on (its result is dropped), as in CPython.
    """

    def __init__(
        self,
        max_workers: int | Client | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        *,
        client: Client | None = None,
        **client_kwargs: Any,
    ):
        del mp_context  # see the docstring
        if isinstance(max_workers, Client):  # Executor(client), the older form
            client, max_workers = max_workers, None
        if max_workers is not None:
            if not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if client is not None and client_kwargs:
            raise TypeError("pass either a client or Client arguments, not both")
        self._owns = client is None
        if client is None:
            if max_workers is not None:
                client_kwargs.setdefault("n_workers", max_workers)
                client_kwargs.setdefault("threads_per_worker", 1)
            client = Client(set_as_default=False, **client_kwargs)
            # Its processes are its pool: ready before the first call, as a
            # process pool's calls start once queued to a process.
            try:
                client.wait_for_workers(len(client.worker_pids) or 1, timeout=60)
            except BaseException:
                client.close()
                raise
        self.client = client
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._key = uuid.uuid4().hex
        self._wrapped: dict[Any, _Initialized] = {}
        self._pending: set[_ExecutorFuture] = set()
        self._maps: list[FutureList] = []
        self._lock = threading.Lock()
        self._shutdown = False
        # Why the executor is broken (an initializer raised), or False.
        self._broken: str | bool = False
        # Dask reads this when the executor is given as its scheduler.
        self._max_workers = max_workers or self.client._session.nthreads
        _executors.add(self)

    def _check_open(self) -> None:
        if self._broken:
            raise cf.BrokenExecutor(self._broken)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _call(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, wrapped to run the initializer first where one is set."""
        if self._initializer is None:
            return fn
        try:
            w = self._wrapped.get(fn)
        except TypeError:  # unhashable callable: a wrapper per call
            return _Initialized(fn, self._initializer, self._initargs, self._key)
        if w is None:
            w = self._wrapped[fn] = _Initialized(fn, self._initializer, self._initargs, self._key)
        return w

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Runs ``fn(*args, **kwargs)`` on the cluster: every keyword goes to
        ``fn``. Raises what pickling the call raises, with nothing left
        pending."""
        with self._lock:
            self._check_open()
        task = self.client._session.submit(self._call(fn), args, kwargs)
        cff = _ExecutorFuture(self, task)
        with self._lock:
            self._pending.add(cff)
        task.add_done_callback(lambda t: self._finish(cff, t))
        return cff

    def _finish(self, cff: _ExecutorFuture, task: Future) -> None:
        with self._lock:
            self._pending.discard(cff)
        exc: BaseException | None = None
        try:
            value = task.result()
        except FutureCancelledError:
            # Cancelled on the cluster (shutdown(cancel_futures=True),
            # client.cancel): cancelled here too, waiters told.
            if cf.Future.cancel(cff):
                cff.set_running_or_notify_cancel()
            return
        except _InitializerFailed as e:
            self._break(str(e.args[0]) if e.args else "")
            exc = cf.BrokenExecutor(self._broken)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            exc = e
        if not cff.set_running_or_notify_cancel():
            return  # cancelled here first
        if exc is None:
            cff.set_result(value)
        else:
            cff.set_exception(exc)

    def _break(self, init_traceback: str) -> None:
        """An initializer raised: the executor is broken, like a process pool
        whose initializer failed; calls not finished fail."""
        with self._lock:
            first = not self._broken
            if first:
                self._broken = (
                    "an initializer failed in a worker process; the executor is not usable anymore"
                )
            pending = list(self._pending)
        if not first:
            return
        _LOG.critical("Exception in initializer:\n%s", init_traceback.rstrip())
        self.client._session.cancel_queued([f.task for f in pending])

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
            self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = self.client.map(self._call(fn), *iterables, batch_size=chunksize)
        with self._lock:
            self._maps = [m for m in self._maps if m._client is not None] + [futures]

        def results() -> Iterator[Any]:
            try:
                for f in futures:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    try:
                        yield f.result(left)
                    except _InitializerFailed as e:
                        self._break(str(e.args[0]) if e.args else "")
                        raise cf.BrokenExecutor(self._broken) from None
            finally:
                # Left early (an error, a timeout, the caller stopped): calls
                # not started are cancelled, as CPython's map does.
                if self.client._session.core is not None:
                    self.client._session.cancel_queued(futures)

        return results()

    def _wait_pending(self) -> None:
        if self.client._session.closed:
            return  # its futures have all ended (lost, if not done)
        with self._lock:
            pending = list(self._pending)
            maps = [m for m in self._maps if m._client is not None]
        cf.wait(pending)
        for m in maps:
            wait(m)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops taking calls. ``cancel_futures``: calls not started are
        cancelled (started ones run to their end). ``wait``: returns once
        every call is done (else they finish in the background, and before
        the interpreter exits). A cluster the executor started closes after."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
            maps = [m for m in self._maps if m._client is not None]
        if cancel_futures and self.client._session.core is not None:
            self.client._session.cancel_queued([f.task for f in pending])
            for m in maps:
                self.client._session.cancel_queued(m)
        if wait:
            self._wait_pending()
            if self._owns:
                self.client.close()
        elif self._owns:  # close once the remaining calls are done

            def close_when_done() -> None:
                self._wait_pending()
                self.client.close()

            # Not a daemon: the interpreter's exit waits for it (pending
            # calls run, as in CPython), and it is never stopped in a wait.
            threading.Thread(target=close_when_done, name="shoal-executor-close").start()
