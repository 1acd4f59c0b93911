"""A client's session with its scheduler: the one internal object that
futures, the Dask bridge, actors, the executor, remote functions and the
progress bars work through.

``Client`` is the public API and owns a ``Session``; everything a future
or a bridge needs (reference counts, keys, submitting packed tasks,
cancelling, results, callbacks) is a method here, not a private attribute
of the client. The session points back at its client weakly (futures it
makes hold the client, as the user's futures do), so dropping the last
reference to a client still closes it at once.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import pickle
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _commands, _core, _puts, _resources, _serialize, _store
from ._core import INLINE_LIMIT, ClientCore
from ._futures import Future, FutureList
from ._results import Results
from .errors import SchedulerLostError

if TYPE_CHECKING:
    from .client import Client


def group_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)  # functools.partial
        name = getattr(inner, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


def prepare_function(fn: Any, caller: str) -> tuple[str, bytes]:
    """Group name and (cached) pickle of a task function; clear errors."""
    if not callable(fn):
        raise TypeError(f"{caller} needs a callable as first argument, not {type(fn).__name__}")
    group = group_name(fn)
    try:
        return group, _serialize.dumps_function(fn)
    except Exception as e:
        raise TypeError(f"could not pickle the function {group!r}: {e}") from e


class Session(Results):
    """One client's connection and the state of its futures."""

    def __init__(
        self,
        client: Client,
        core: ClientCore,
        token: str | None,
        nthreads: int,
        same_host: bool,
    ):
        self._owner = weakref.ref(client)
        self.core: ClientCore | None = core
        self.token = token
        self.nthreads = nthreads  # threads in the cluster (what map batches for)
        # On this host (embedded cluster, unix socket): data put on the
        # cluster goes through shared memory.
        self.same_host = same_host
        self.closed = False
        # Live futures per task, keyed by this client's id: its own tasks'
        # counts are 4 bytes each (see incref).
        self.refs = _core.RefCounts(core.id)
        self._refs_lock = threading.Lock()
        self._dropped: collections.deque[int] = collections.deque()  # see decref
        self._keys: dict[Any, int] = {}  # user and Dask keys of live tasks
        self._key_of: dict[int, Any] = {}
        self.batch_cache: dict[int, Any] = {}
        self.cancelled: set[int] = set()
        self.actor_died: dict[int, str] = {}  # cancelled because their actor died
        self.on_close: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._callbacks: dict[int, list[tuple[Future, Callable]]] = {}
        self._cb_watcher: Any = None
        self._cb_thread: threading.Thread | None = None
        self._put_files: list[str] = []  # scattered data not yet taken over

    @property
    def client(self) -> Client:
        """The client of this session (alive while anything uses it)."""
        c = self._owner()
        if c is None:
            raise RuntimeError("this Client was dropped; create a new one")
        return c

    def check(self) -> ClientCore:
        """The connection; a clear error once the client is closed."""
        core = self.core
        if core is None:
            raise RuntimeError("this Client is closed; create a new one")
        return core

    def status(self, task_id: int) -> str:
        """The task's state as the client sees it (``released`` once closed)."""
        core = self.core
        return core.status(task_id) if core is not None else "released"

    # ----------------------------------------------------------- refcounts

    def adopt(self, task_id: int, group: str, key: Any, index: int | None) -> Future:
        """A future of a task another client submitted, found in a result
        (``_serialize.adopt``): this client claims the task."""
        core = self.check()
        with self._refs_lock:
            known = task_id in self.refs
        f = Future(self.client, task_id, group, key, index)
        if not known:
            core.adopt([task_id])
        return f

    def hold(self, by: int, task_ids: list[int]) -> None:
        """Worker side: the result of task ``by`` holds these futures."""
        if self.core is not None:
            self.core.hold(by, task_ids)

    def incref(self, task_id: int, n: int) -> None:
        with self._refs_lock:
            self.refs.incref(task_id, n)
        if self._dropped:
            self._drain_dropped()

    def incref_many(self, task_ids: Iterable[int]) -> None:
        ids = task_ids if isinstance(task_ids, list) else list(task_ids)
        with self._refs_lock:
            self.refs.incref_many(ids)
        if self._dropped:
            self._drain_dropped()

    def decref(self, task_id: int) -> None:
        """Drops one hold on a task. Called from ``__del__``, which the
        garbage collector may run in any thread, even inside a locked
        section of this one: the drop is queued (an atomic append) and
        applied by whoever holds the lock next, never lost or raced."""
        self._dropped.append(task_id)
        self._drain_dropped()

    def decref_many(self, task_ids: Iterable[int]) -> None:
        """``decref`` of each (a ``FutureList`` let go)."""
        self._dropped.extend(task_ids)
        self._drain_dropped()

    def _drain_dropped(self) -> None:
        # Re-checked after each release: a drop queued while another thread
        # held the lock is applied by that thread's last pass or by ours.
        while self._dropped:
            if not self._refs_lock.acquire(blocking=False):
                return  # the holder drains after it releases
            released = []
            try:
                refs, dropped = self.refs, self._dropped
                while dropped:
                    task_id = dropped.popleft()
                    if not refs.decref(task_id):
                        continue
                    if self._key_of:
                        key = self._key_of.pop(task_id, None)
                        if key is not None and self._keys.get(key) == task_id:
                            del self._keys[key]
                    self.batch_cache.pop(task_id, None)
                    self.cancelled.discard(task_id)
                    self.actor_died.pop(task_id, None)
                    released.append(task_id)
            finally:
                self._refs_lock.release()
            core = self.core
            if released and core is not None:
                core.release(released)

    def live_ids(self) -> list[int]:
        """Every task this client holds a future of."""
        with self._refs_lock:
            return self.refs.ids()

    def name(self, key: Any, task_id: int) -> None:
        """Lets ``key`` find the task while it lives (held by a future)."""
        self._keys[key] = task_id
        self._key_of[task_id] = key

    def named(self, key: Any) -> int | None:
        """The live task ``key`` names (``name``), if any."""
        tid = self._keys.get(key)
        return tid if tid is not None and tid in self.refs else None

    # ----------------------------------------------------------- submitting

    def submit(
        self,
        fn: Callable,
        args: tuple,
        kwargs: dict[str, Any] | None,
        key: str | None = None,
        priority: int = 0,
        retries: int = 0,
        pure: bool = False,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        time_request: float | str | None = None,
        crash_limit: int = 0,
    ) -> Future:
        """``Client.submit`` with the call's arguments apart from the task's
        options (``Executor.submit`` passes every keyword to ``fn``).
        ``crash_limit``: workers that may die running it before it fails
        (0: the scheduler's default)."""
        core = self.check()
        needs = _resources.normalize(resources, "submit")
        limit = _commands.limit_ms(time_limit)
        request = _commands.limit_ms(time_request, "time_request")
        group, func = prepare_function(fn, "submit")
        payload, deps, puts = self.pack_args((args, kwargs or None), f"the arguments of {group}")
        if pure and key is None:
            key = f"{group}-{hashlib.sha1(func + (payload or repr(deps).encode())).hexdigest()}"
        client = self.client
        if key is not None:
            existing = self.named(key)
            if existing is not None:
                return Future(client, existing, group, key)
        tid = core.submit(
            group,
            key,
            False,
            func,
            payload,
            deps,
            priority,
            retries,
            needs,
            True,
            limit,
            request,
            crash_limit,
        )
        del puts  # the task holds them now
        f = Future(client, tid, group, key)
        if key is not None:
            self.name(key, tid)
        return f

    def pack_args(
        self, args: Any, what: str, strided: bool = False
    ) -> tuple[bytes, list[int], list[Future]]:
        """Pickles task arguments (as ``_serialize.dumps_args``), putting
        their large buffers on the cluster beside the task instead of in it
        (see ``_serialize.LARGE_BUFFER``): no task message grows with the
        data it carries, and on one host the data is written once to shared
        memory and mapped by the task. Returns the payload, its
        dependencies, and the puts' futures, to hold until the task is
        submitted (it depends on them from then on). ``strided``: the
        arguments hold large non-contiguous arrays (a caller's cheap scan
        says so), which pickle would copy in band: each is put on its own,
        written once straight into shared memory (pickling is slower then:
        a Python hook sees every object)."""
        client = self.client
        if (
            type(args) is tuple
            and len(args) == 2
            and args[1] is None
            and type(args[0]) is tuple
            and len(args[0]) == 1
            and type(args[0][0]) is Future
            and args[0][0]._client is client
            and args[0][0]._index is None
        ):
            # One argument, another task's result (a chain, a map over
            # futures): no pickle at all; the worker passes its one input
            # (62 bytes less per task to keep, on a million-task graph).
            return b"", [args[0][0]._id], []
        large: list[pickle.PickleBuffer] = []
        hooked: list[Future] = []
        hook = None
        if strided:

            def hook(o: Any) -> Any:
                if not _serialize.is_large_strided(o):
                    return NotImplemented
                f = self.put(o, None)
                hooked.append(f)
                return f.__reduce__()  # a dependency of the task

        payload, deps = _serialize.dumps_args(args, what, client, large, hook)
        if not large and len(payload) <= _serialize.LARGE_ARGS:
            return payload, deps, hooked
        header: bytes | None = payload
        if not large:
            header, large = None, [pickle.PickleBuffer(payload)]
        puts = [self.put(b, None) for b in large]
        packed, more = _serialize.dumps_args(_serialize.Packed(header, puts), what, client)
        return packed, deps + more, puts + hooked

    def put(self, obj: Any, key: Any) -> Future:
        """Puts ``obj`` on the cluster (``scatter``); ``key`` names it."""
        if key is not None:
            existing = self.named(key)
            if existing is not None:
                return Future(self.client, existing, "scatter", key)
        return Future(self.client, self.put_id(obj, key), "scatter", key)

    def put_id(self, obj: Any, key: Any = None) -> int:
        """Puts ``obj`` on the cluster; returns its task id, whose interest
        the caller owns (a ``Future`` takes it, or the caller releases it)."""
        core = self.check()
        same_host = self.same_host
        strided = _serialize.strided_parts(obj) if same_host else None
        parts, length = strided or _serialize.frame_parts(obj)[:2]
        if same_host and length > INLINE_LIMIT:
            path = _puts.write(_store.segment_dir(), parts, length)
            if len(self._put_files) >= 1024:  # forget those taken over
                self._put_files = [p for p in self._put_files if os.path.exists(p)]
            self._put_files.append(path)
            arg: tuple = ("file", path, length)
        else:
            arg = ("bytes", parts[0] if len(parts) == 1 else b"".join(parts))
        func = _serialize.dumps_function(_store.put_task)
        payload, _ = _serialize.dumps_args(((arg,), None), "scattered data", self.client)
        k = None if key is None else str(key)
        # Highest priority: data is cheap to place and others wait on it.
        tid = core.submit("scatter", k, False, func, payload, [], 2**30, 0, [], False)
        if key is not None:
            self.name(key, tid)
        return tid

    # ----------------------------------------------------------- cancelling

    def cancel(self, ids: list[int]) -> None:
        """Cancels unfinished tasks; their futures raise ``FutureCancelledError``."""
        self.cancelled.update(ids)
        self.check().cancel(ids)

    def cancel_queued(self, futures: Iterable[Future] | FutureList) -> None:
        """Cancels these tasks unless a worker has started them (started ones
        run to their end): ``concurrent.futures``' cancellation."""
        if isinstance(futures, FutureList):
            ids = list(futures._ids)
        else:
            ids = [f._id for f in futures]
        if ids:
            self.check().cancel_queued(ids)

    # ----------------------------------------------------------- callbacks

    def add_callback(self, f: Future, fn: Callable[[Future], Any]) -> None:
        core = self.check()
        if f.done():
            fn(f)
            return
        with self._lock:
            if self._cb_watcher is None:
                self._cb_watcher = core.watcher()
                self._cb_thread = threading.Thread(
                    target=self._run_callbacks, name="shoal-callbacks", daemon=True
                )
                self._cb_thread.start()
            self._callbacks.setdefault(f._id, []).append((f, fn))
            self._cb_watcher.add([f._id])

    def _run_callbacks(self) -> None:
        watcher = self._cb_watcher
        while not self.closed:
            try:
                ids = watcher.next(0.2)
            except SchedulerLostError:
                return
            for tid in ids:
                with self._lock:
                    cbs = self._callbacks.pop(tid, [])
                for f, fn in cbs:
                    try:
                        fn(f)
                    except Exception:  # noqa: BLE001
                        import traceback

                        traceback.print_exc()

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Runs the close hooks and disconnects. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 - closing goes on
                pass
        for path in self._put_files:  # not taken over by a worker
            with contextlib.suppress(OSError):
                os.unlink(path)
        # The callback thread waits in Rust (0.2 s at a time): let it see
        # the close and end, rather than be stopped inside that wait by the
        # interpreter's exit (which aborts the process).
        cb = self._cb_thread
        if cb is not None and cb is not threading.current_thread():
            cb.join(2.0)
        if self.core is not None:
            self.core.close()  # before its cluster: not reconnecting to it
        self.core = None

    def forked(self) -> tuple[Any, Any]:
        """In a forked child: closed without touching the connection, whose
        threads the child does not have. Returns its handles, which the
        child must keep (never drop)."""
        handles = (self.core, self._cb_watcher)
        self.core = self._cb_watcher = None
        self._cb_thread = None
        self._lock = threading.Lock()  # may have been held by a thread not copied
        self.closed = True
        return handles
