"""Waiting on futures: ``wait``, ``as_completed``, ``fire_and_forget``, and
lending a task's thread while it waits (``secede``, ``rejoin``).

It knows futures and the task-local state, not the client module.
"""

from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _context
from ._futures import Future, FutureList

if TYPE_CHECKING:
    from .client import Client


FIRST_COMPLETED = "FIRST_COMPLETED"


ALL_COMPLETED = "ALL_COMPLETED"


DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])


def secede() -> None:
    """Inside a task: stop counting against the worker's threads (another
    task may start) until ``rejoin()``. Waiting on futures inside a task does
    this by itself."""
    ex, local = _context.current_executor(), _context.task_local
    if ex is None or not local.in_task:
        raise RuntimeError("secede() can only be called inside a task")
    if not local.seceded:
        local.seceded = True
        ex.secede()


def rejoin() -> None:
    """Inside a task, after ``secede()``: count against the worker's threads again."""
    ex, local = _context.current_executor(), _context.task_local
    if ex is not None and local.seceded:
        local.seceded = False
        ex.rejoin()


class _LendThread:
    """Around a blocking wait: inside a task that has not seceded, lend the
    task's thread for the wait (a task waiting on tasks must not hold the
    slot they need)."""

    __slots__ = ("lent",)

    def __enter__(self) -> None:
        local = _context.task_local
        self.lent = local.in_task and not local.seceded and _context.current_executor() is not None
        if self.lent:
            secede()

    def __exit__(self, *exc: Any) -> None:
        if self.lent:
            rejoin()


def _by_client(futures: Iterable[Future]) -> dict[Client, list[Future]]:
    out: dict[Client, list[Future]] = {}
    for f in futures:
        if not isinstance(f, Future):
            raise TypeError(f"expected shoal Futures, got {type(f).__name__}")
        out.setdefault(f._client, []).append(f)
    return out


def fire_and_forget(obj: Any) -> None:
    """Runs these tasks to their end even if every future of them is
    released (Dask's ``fire_and_forget``): ``obj`` is a future, a ``map``'s
    futures, or lists, tuples, sets and dicts of them. Their results are
    dropped once they finish, unless a future still holds them. Ray-style
    ``.remote()`` calls always run this way."""
    ids: dict[Client, set[int]] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Future):
            ids.setdefault(o._client, set()).add(o._id)
        elif isinstance(o, FutureList):
            ids.setdefault(o._client, set()).update(o._ids)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        else:
            raise TypeError(f"fire_and_forget takes futures, not {type(o).__name__}")
    for client, group in ids.items():
        client._session.check().detach(sorted(group))


def wait(
    fs: Iterable[Future] | Future,
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
    *,
    num_returns: int | None = None,
) -> Any:
    """Waits for futures; returns ``(done, not_done)`` sets. ``TimeoutError``
    if ``ALL_COMPLETED`` is not reached within ``timeout`` seconds.

    With ``num_returns`` it is Ray's ``wait``: it returns ``(ready,
    not_ready)`` lists in input order once ``num_returns`` futures are done
    or ``timeout`` has passed, and never raises ``TimeoutError``."""
    futures = [fs] if isinstance(fs, Future) else list(fs)
    if num_returns is not None:
        return _wait_ray(futures, num_returns, timeout)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError(f"return_when must be ALL_COMPLETED or FIRST_COMPLETED, not {return_when}")
    for client, group in _by_client(futures).items():
        ids = list({f._id for f in group})
        need = len(ids) if return_when == ALL_COMPLETED else 1
        with _LendThread():
            got = client._session.check().wait(ids, need, timeout)
        if got < need and return_when == ALL_COMPLETED:
            raise TimeoutError(f"{len(ids) - got} of {len(ids)} tasks unfinished after {timeout}s")
        if return_when == FIRST_COMPLETED and got >= 1:
            break
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, set(futures) - done)


def _wait_ray(
    futures: list[Future], num_returns: int, timeout: float | None
) -> tuple[list[Future], list[Future]]:
    if not 1 <= num_returns <= len(futures):
        raise ValueError(
            f"num_returns must be between 1 and the number of futures ({len(futures)}), "
            f"not {num_returns}"
        )
    if len(set(futures)) != len(futures):
        raise ValueError("wait() got the same future twice")
    deadline = None if timeout is None else time.monotonic() + timeout
    groups = _by_client(futures)
    while True:
        ready = [f for f in futures if f.done()]
        if len(ready) >= num_returns:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if len(groups) == 1:
            ((client, group),) = groups.items()
            ids = list({f._id for f in group})
            done_ids = {f._id for f in ready}
            client._session.check().wait(ids, len(done_ids) + 1, left)
        else:
            time.sleep(0.005 if left is None else min(0.005, left))
    ready = ready[:num_returns]
    taken = set(ready)
    return ready, [f for f in futures if f not in taken]


class as_completed:  # noqa: N801 - named like distributed.as_completed
    """Iterates over futures as they finish (``with_results=True`` yields
    ``(future, result)`` pairs). More futures can be ``add``-ed while iterating."""

    def __init__(
        self,
        futures: Iterable[Future] = (),
        with_results: bool = False,
        raise_errors: bool = True,
        timeout: float | None = None,
    ):
        self._with_results = with_results
        self._raise_errors = raise_errors
        self._timeout = timeout
        self._pending: dict[int, list[Future]] = {}
        self._ready: list[Future] = []
        self._watchers: dict[Client, Any] = {}
        for f in futures:
            self.add(f)

    def add(self, future: Future) -> None:
        client = future._client
        w = self._watchers.get(client)
        if w is None:
            w = self._watchers[client] = client._session.check().watcher()
        first = future._id not in self._pending
        self._pending.setdefault(future._id, []).append(future)
        if first:
            w.add([future._id])

    def count(self) -> int:
        return sum(len(v) for v in self._pending.values()) + len(self._ready)

    def is_empty(self) -> bool:
        return self.count() == 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        while not self._ready:
            if not self._pending:
                raise StopIteration
            progressed = False
            for w in list(self._watchers.values()):
                per = 0.05 if len(self._watchers) > 1 else self._timeout
                for tid in w.next(per):
                    self._ready.extend(self._pending.pop(tid, []))
                    progressed = True
            if not progressed and self._timeout is not None and len(self._watchers) == 1:
                raise TimeoutError(f"no future finished within {self._timeout} seconds")
        f = self._ready.pop(0)
        if not self._with_results:
            return f
        try:
            return f, f.result()
        except Exception as e:
            if self._raise_errors:
                raise
            return f, e
