"""Results: a task's outcome waited for, fetched, and turned into its value
or into the exception that says what happened (``Client.gather``,
``Future.result``). A mixin of the client's ``Session``, which holds the
connection (``check``) and what is known of its tasks (``cancelled``,
``actor_died``, ``batch_cache``)."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterable, Iterator
from typing import Any

from . import _serialize
from ._core import Outcome
from ._futures import Future, FutureList
from ._waiting import _LendThread
from .errors import (
    ActorDiedError,
    DataLostError,
    ForeignFutureError,
    FutureCancelledError,
    KilledWorker,
    MissingDependencyError,
    UnsatisfiableError,
)

_SKIP = object()


def _with_traceback(exc: BaseException, tb: str, name: str) -> BaseException:
    # No traceback (a command task's error says it all): no note.
    if tb and not getattr(exc, "_shoal_noted", False):
        try:
            exc.add_note(f"\nTraceback of task {name!r} on its worker:\n{tb.rstrip()}")
            exc._shoal_noted = True  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - exceptions with __slots__
            pass
    return exc


def _collect(obj: Any, out: list[Future]) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, list | tuple | set | frozenset | FutureList):
        for x in obj:
            _collect(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, out)


def _rebuild(obj: Any, values: Iterator[Any]) -> Any:
    """Rebuilds ``obj`` with its futures replaced by ``values`` (in ``_collect`` order)."""
    if isinstance(obj, Future):
        return next(values)
    if isinstance(obj, list | FutureList):
        return [v for v in (_rebuild(x, values) for x in obj) if v is not _SKIP]
    if isinstance(obj, tuple | set | frozenset):
        return type(obj)(_rebuild(x, values) for x in obj)
    if isinstance(obj, dict):
        return {k: _rebuild(v, values) for k, v in obj.items()}
    return obj


# A batch element whose batch this client already unpickled (`_batch_cache`).
_CACHED = Outcome.Value(None)


class Results:
    def outcome(self, task_id: int, key: str, timeout: float | None) -> Outcome:
        core = self.check()
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if task_id in self.cancelled:
                died = self.actor_died.get(task_id)
                if died is not None:
                    raise ActorDiedError(died)
                raise FutureCancelledError(f"{key} was cancelled")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if core.status(task_id) == "pending":
                with _LendThread():
                    got = core.wait([task_id], 1, left)
            else:
                got = 1
            if got < 1:
                raise TimeoutError(f"{key} did not finish within {timeout} seconds")
            # A large result is fetched from its worker: within what is left
            # of the timeout, and Ctrl-C stops it.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            outcome = core.outcome(task_id, left)
            if type(outcome) is not Outcome.Pending:
                return outcome
            if core.status(task_id) == "released":
                raise RuntimeError(f"{key} was released; its result is gone")

    def value(self, f: Future, outcome: Outcome) -> Any:
        """``f``'s value, or the exception its outcome stands for."""
        if type(outcome) is Outcome.Value:  # the common case first
            a = outcome.data
            if f._index is None:
                return _serialize.loads(a)
            batch = self.batch_cache.get(f._id)
            if batch is None:
                batch = _serialize.loads(a)
                self.batch_cache[f._id] = batch
            if isinstance(batch, list):
                return batch[f._index]
            err = batch.errors.get(f._index)
            if err is not None:
                raise _with_traceback(err[0], err[1], f.key)
            return batch.values[f._index]
        died = self.actor_died.get(f._id)
        match outcome:
            case Outcome.Raised(cause=cause, error=error):
                exc, tb = pickle.loads(error)
                raise _with_traceback(exc, tb, cause)
            case Outcome.Killed() if died is None and f._group == "_call":
                raise ActorDiedError(
                    f"the actor's process died while running {f.key}; as in Ray, the call is "
                    "not run again"
                )
            case Outcome.Killed() | Outcome.Cancelled() if died is not None:
                raise ActorDiedError(died)
            case Outcome.Killed(cause=cause, kills=kills):
                raise KilledWorker(
                    f"task {cause!r} was running on {kills} workers that died, so it failed; "
                    "it probably crashes its worker (segfault, os._exit, memory exhaustion)"
                )
            case Outcome.Cancelled(cause=cause):
                why = "" if cause == f.key else f" (its input {cause!r} was cancelled)"
                raise FutureCancelledError(f"{f.key} was cancelled{why}")
            case Outcome.Unsatisfiable(cause=cause, detail=detail):
                raise UnsatisfiableError(f"no worker can run {cause}: {detail}")
            case Outcome.Lost(cause=cause):
                what = (
                    f"{f.key} was"
                    if cause == f.key
                    else f"{f.key} cannot be computed: its input {cause!r} was"
                )
                raise DataLostError(
                    f"{what} data put on the cluster (scatter/put) and lost with the worker "
                    "that held it; such data cannot be recomputed: scatter it again"
                )
            case Outcome.Unreachable(address=address, detail=detail):
                raise ConnectionError(
                    f"could not fetch the result of {f.key} from the worker at {address} "
                    f"({detail}); it still holds it, but this client cannot reach it: clients "
                    "must reach the workers' data addresses (see scheduler_info()) as well as "
                    "the scheduler"
                )
            case Outcome.Cycle(cause=cause):
                raise ValueError(
                    f"{f.key} can never run: its inputs lead back to {cause!r} (the graph has "
                    "a cycle); a task graph must be acyclic"
                )
            case Outcome.Missing(dep=dep) if dep == f._id:
                raise MissingDependencyError(
                    f"{f.key} came as a reference inside another task's result, but the "
                    "scheduler no longer knows it: the result that held it was released or "
                    "lost before this client claimed it"
                )
            case Outcome.Missing(dep=dep):
                raise MissingDependencyError(
                    f"{f.key} takes a future the scheduler does not know (task id {dep:x}): "
                    "it was released or belongs to another cluster; keep input futures alive"
                )
        raise AssertionError(f"unknown outcome {outcome!r}")

    def own(self, futures: Iterable[Future | FutureList]) -> None:
        """Refuses futures of other clients: their ids name tasks of another
        client (or cluster), and would read as whatever this one has there."""
        for f in futures:
            owner = f._client
            if owner is not None and owner is not self.client:
                raise ForeignFutureError(
                    f"{f!r} belongs to another client ({owner!r}); gather it there, or "
                    "call its .result()"
                )

    def settle(self, f: Future, timeout: float | None) -> Outcome:
        """``f``'s outcome, waited for up to ``timeout`` seconds: what
        ``_value`` turns into its value or its exception. Raises only this
        wait's own ``TimeoutError`` (or a Ctrl-C)."""
        if f._index is not None and f._id in self.batch_cache:
            return _CACHED
        return self.outcome(f._id, f.key, timeout)

    def result(self, f: Future, timeout: float | None) -> Any:
        return self.value(f, self.settle(f, timeout))

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """Values of (nested lists, tuples, dicts of) futures, same shape.
        ``errors="skip"`` leaves out failed ones (lists only)."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        if isinstance(futures, Future):
            self.own([futures])
            return self.result(futures, None)
        if isinstance(futures, FutureList):
            self.own([futures])
            return self._gather_list(futures, errors == "skip")
        flat: list[Future] = []
        _collect(futures, flat)
        self.own(flat)
        core = self.check()
        ids = list(dict.fromkeys(f._id for f in flat))
        if core.wait(ids, len(ids), 0) < len(ids):
            with _LendThread():
                core.wait(ids, len(ids), None)
        outcomes: dict[int, Outcome] = {}
        values: list[Any] = []
        cache = self.batch_cache
        for f in flat:
            tid = f._id
            try:
                if f._index is not None and tid in cache:
                    batch = cache[tid]
                    if type(batch) is list:
                        values.append(batch[f._index])
                        continue
                o = outcomes.get(tid)
                if o is None:
                    o = outcomes[tid] = self.outcome(tid, f.key, None)
                values.append(self.value(f, o))
            except Exception:
                if errors == "raise":
                    raise
                values.append(_SKIP)
        if type(futures) is list and len(values) == len(futures):
            if errors == "skip":
                return [v for v in values if v is not _SKIP]
            return values
        return _rebuild(futures, iter(values))

    def _gather_list(self, fl: FutureList, skip: bool) -> list[Any]:
        """``gather`` of a whole ``map``: one outcome per task, no element futures."""
        core = self.check()
        ids = fl._ids
        if core.wait(ids, len(ids), 0) < len(ids):
            with _LendThread():
                core.wait(ids, len(ids), None)
        out: list[Any] = []
        size = fl._batch
        for j, tid in enumerate(ids):
            batch = self.batch_cache.get(tid) if size else None
            if batch is None:
                outcome = self.outcome(tid, f"{fl._group}-{tid:x}", None)
                if type(outcome) is not Outcome.Value:
                    if skip:
                        continue
                    # Raise as the first element of the failed task would.
                    self.value(fl[j * size if size else j], outcome)
                batch = _serialize.loads(outcome.data)
                if not size:
                    out.append(batch)
                    continue
            if type(batch) is list:
                out += batch
                continue
            for k, value in enumerate(batch.values):
                err = batch.errors.get(k)
                if err is None:
                    out.append(value)
                elif not skip:
                    raise _with_traceback(err[0], err[1], fl[j * size + k].key)
        return out
