"""Futures: a task's eventual result (``Future``) and the results of a
``map`` (``FutureList``).

They call back into their client's session (``client._session``: reference
counts, results, callbacks) but import neither, so that modules working on
futures (the Dask bridge, progress bars) need not import the client either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from . import _serialize

if TYPE_CHECKING:
    from .client import Client


class Future:
    """A task's eventual result. Holding it keeps the result on the cluster;
    dropping every future of a task releases it."""

    # Four slots: a 64-byte object (a million held futures are 16 MB less
    # than with the group, key and index in slots of their own). ``_name``:
    # the group, or ``(group, key, index)`` when a key or index is given.
    __slots__ = ("_client", "_id", "_name", "__weakref__")

    def __init__(
        self,
        client: Client,
        task_id: int,
        group: str = "task",
        key: Any = None,
        index: int | None = None,
    ):
        self._client = client
        self._id = task_id
        self._name = group if key is None and index is None else (group, key, index)
        client._session.incref(task_id, 1)

    @property
    def _group(self) -> str:
        n = self._name
        return n if type(n) is str else n[0]

    @property
    def _user_key(self) -> Any:
        n = self._name
        return None if type(n) is str else n[1]

    @property
    def _index(self) -> int | None:
        n = self._name
        return None if type(n) is str else n[2]

    # Dask treats objects with this flag and a ``key`` as results held by
    # the scheduler (see ``_dask``).
    __dask_future__ = True

    def __dask_tokenize__(self) -> tuple:
        """Dask's deterministic token (as distributed's futures have): a
        persisted collection's graph holds futures, and every later
        expression on it (a groupby, ``.loc``, a sort) tokenizes them."""
        return ("shoal.Future", self.key, self._id)

    @property
    def key(self) -> Any:
        """The task's key: given (a string, or a Dask key for Dask results),
        or ``<function name>-<id in hex>``."""
        base = self._user_key
        if base is None:
            base = f"{self._group}-{self._id:x}"
        return base if self._index is None else f"{base}[{self._index}]"

    @property
    def id(self) -> int:
        """The task's id in its cluster: what the dashboard, ``shoal task
        ID`` and ``shoal job task-ids`` show (an element of a batch shares
        its batch's id)."""
        return self._id

    @property
    def client(self) -> Client:
        return self._client

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error``, ``cancelled`` or ``lost``."""
        session = self._client._session
        if self._id in session.cancelled:
            return "cancelled"
        s = session.status(self._id)
        return "lost" if s == "released" else s

    def done(self) -> bool:
        """True when the task finished, failed or was cancelled."""
        return self.status != "pending"

    def cancelled(self) -> bool:
        return self._id in self._client._session.cancelled

    def result(self, timeout: float | None = None) -> Any:
        """The task's value. Raises the task's exception (same type, remote
        traceback attached as a note), ``TimeoutError`` after ``timeout``
        seconds, ``FutureCancelledError`` if cancelled."""
        return self._client._session.result(self, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the task raised, or None if it succeeded."""
        # The wait itself may raise (its timeout, a Ctrl-C); what the task
        # raised (a TimeoutError of its own, TaskTimeoutError included) is
        # returned.
        session = self._client._session
        outcome = session.settle(self, timeout)
        try:
            session.value(self, outcome)
        except BaseException as e:  # noqa: BLE001
            return e
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        """The traceback of the task's exception (None if it succeeded); the
        worker's own traceback text is a note on the exception."""
        e = self.exception(timeout)
        return None if e is None else e.__traceback__

    def retry(self) -> None:
        """Not provided: say how often a task may run again when it is
        submitted (``submit(..., retries=n)``), or submit it again."""
        raise NotImplementedError(
            "Future.retry() is not provided by Shoal: submit with retries=n, or submit again"
        )

    def cancel(self) -> bool:
        """Cancels the task if it has not finished; the future then raises
        ``FutureCancelledError``."""
        self._client.cancel([self])
        return True

    def release(self) -> None:
        """Drops this future's hold on the result now (instead of at garbage collection)."""
        client, self._client = self._client, None
        if client is not None:
            client._session.decref(self._id)

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Calls ``fn(self)`` when the task is done (in a client thread; at
        once if it is already done). Exceptions in ``fn`` are printed."""
        self._client._session.add_callback(self, fn)

    def __reduce__(self):
        if _serialize.record_dependency(self._id, self._client, self.key):
            return (_serialize.resolve, (self._id, self._index))
        if _serialize.record_held(self._client, self._id):
            # In a task's result: a reference the receiver claims.
            return (_serialize.adopt, (self._id, self._group, self._user_key, self._index))
        raise TypeError(
            f"a shoal Future ({self.key}) can only be pickled as an argument of a task "
            "of the same client, or in a task's result; call .result() to get its value"
        )

    def __del__(self):
        client = self._client
        if client is not None:
            try:
                client._session.decref(self._id)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key}>"

    def _repr_html_(self) -> str:
        """Jupyter: the task group, its status (coloured) and its key."""
        import html

        status = self.status
        colour = {"finished": "green", "error": "red", "cancelled": "gray", "lost": "red"}
        key = html.escape(str(self.key), quote=True)
        return (
            f"<strong>Future: {html.escape(self._group)}</strong> "
            f"<span style='color: {colour.get(status, 'orange')}'>status: {status}</span>, "
            f"key: <code>{key}</code>"
        )

    def __await__(self):
        raise TypeError("shoal futures are not awaitable yet; call .result()")


class FutureList(Sequence[Future]):
    """The futures of a ``map``: a read-only sequence whose elements are
    made when first touched. It holds every batch's result on the cluster
    while it lives; an element taken from it keeps its own batch alive."""

    __slots__ = ("_client", "_ids", "_group", "_batch", "_n", "_items", "__weakref__")

    def __init__(self, client: Client, ids: list[int], group: str, batch: int, n: int):
        self._client: Client | None = client
        self._ids = ids
        self._group = group
        self._batch = batch  # elements per task; 0 means one plain task per element
        self._n = n
        self._items: list[Future | None] | None = None
        client._session.incref_many(ids)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Future: ...
    @overload
    def __getitem__(self, i: slice) -> list[Future]: ...
    def __getitem__(self, i: int | slice) -> Future | list[Future]:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._n))]
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("FutureList index out of range")
        return self._get(i)

    def _get(self, i: int) -> Future:
        items = self._items
        if items is None:
            items = self._items = [None] * self._n
        f = items[i]
        if f is None:
            client = self._client
            if client is None:
                raise RuntimeError("this FutureList was released")
            if self._batch:
                tid, index = self._ids[i // self._batch], i % self._batch
                f = Future(client, tid, self._group, None, index)
            else:
                f = Future(client, self._ids[i], self._group)
            items[i] = f
        return f

    def __iter__(self) -> Iterator[Future]:
        return (self._get(i) for i in range(self._n))

    def __add__(self, other: Iterable[Future]) -> list[Future]:
        return [*self, *other]

    def __radd__(self, other: Iterable[Future]) -> list[Future]:
        return [*other, *self]

    def release(self) -> None:
        """Drops this list's hold on the results (elements taken keep theirs)."""
        client, self._client = self._client, None
        if client is not None:
            client._session.decref_many(self._ids)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __reduce__(self):
        owner = self._client
        if all([_serialize.record_dependency(tid, owner, repr(self)) for tid in self._ids]):
            return (_serialize.resolve_many, (self._ids, self._batch, self._n))
        raise TypeError(
            "a shoal FutureList can only be pickled as an argument of a task "
            "of the same client; call gather() to get its values"
        )

    def __repr__(self) -> str:
        return f"<FutureList: {self._n} futures of {self._group}, {len(self._ids)} tasks>"


def _nth(value: Any, i: int, n: int) -> Any:
    """Element ``i`` of a call's result declared to have ``n`` values."""
    try:
        k = len(value)
    except TypeError:
        raise ValueError(
            f"the task was declared with num_returns={n} but returned a "
            f"{type(value).__name__}, not a sequence of {n} values"
        ) from None
    if k != n:
        raise ValueError(f"the task was declared with num_returns={n} but returned {k} values")
    return value[i]


def returns(client: Client, f: Future, n: int) -> Any:
    """What ``.remote()`` returns for ``num_returns=n``: the ref itself
    (1), None (0), or one ref per value."""
    if n == 1:
        return f
    if n == 0:
        return None
    return [client.submit(_nth, f, i, n) for i in range(n)]
