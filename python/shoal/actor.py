"""Ray-style actors: ``@shoal.remote`` on a class.

``Counter.remote(*args)`` starts a dedicated worker process that builds the
instance and keeps it; ``handle.incr.remote(1)`` returns a future, and the
calls run one at a time in that process, in the order they were made.
Handles can be passed to tasks (calls made there go through the task's
``get_client()``).

How: the actor's process is an ordinary worker that offers one unit of a
resource named after the actor (``actor-<id>``), and every method call is a
task needing that unit, so the scheduler runs calls only there and one at a
time; call priorities fall with each call, so ready calls run in call order.
The client supervises the process: if it dies, it is started again (the
constructor runs again: state is lost) up to ``max_restarts`` times, and
calls waiting meanwhile run on the new instance; after that, outstanding and
later calls fail with ``ActorDiedError``. The process runs on the client's
host, connected to the client's scheduler.

A detached actor (``.options(name=..., lifetime="detached")``, as in Ray)
outlives the process that created it: its supervisor is a process of its
own (``shoal.actor._main``, in a session of its own) with its own
client, which holds the actor's name, so the name lives exactly as long as
the actor. It ends with ``shoal.kill(handle)`` from any client, when its
restarts are spent, or with the cluster.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

import cloudpickle

from . import _context, _core
from ._futures import returns
from ._waiting import fire_and_forget
from .client import Client, Future, default_client
from .errors import ActorDiedError

_ids = itertools.count(1)

# Exit status of an actor's process stopped by `kill`: not restarted.
KILLED = 93


def _die() -> None:
    """Task body of ``kill`` for an actor supervised elsewhere."""
    os._exit(KILLED)


def _call(actor_id: str, method: str, args: tuple, kwargs: dict) -> Any:
    """Task body of a method call, run in the actor's process."""
    from . import _worker

    instance = _context.actors.get(actor_id)
    if instance is None:
        raise ActorDiedError(f"actor {actor_id} is not in this process")
    if isinstance(instance, _worker.ActorFailed):
        raise instance.error
    return getattr(instance, method)(*args, **kwargs)


class _Method:
    __slots__ = ("_handle", "_name")

    def __init__(self, handle: ActorHandle, name: str):
        self._handle = handle
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the method in the actor's process; returns its future (a
        list of them for a method marked ``@shoal.method(num_returns=n)``)."""
        return self._handle._call(self._name, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor methods are called with .{self._name}.remote(...)")


class ActorHandle:
    """A handle to an actor: ``handle.method.remote(...)`` returns a future.
    Picklable: pass it to tasks to call the actor from there."""

    def __init__(
        self,
        actor_id: str,
        cls_name: str,
        methods: frozenset[str],
        returns: dict[str, int] | None = None,
    ):
        self._actor_id = actor_id
        self._cls_name = cls_name
        self._methods = methods
        self._returns = returns or {}  # num_returns of methods marked with shoal.method
        self._seq = itertools.count()

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(f"actor {self._cls_name} has no method {name!r}")
        return _Method(self, name)

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        client = default_client()
        sup = _supervisors.get(self._actor_id)
        if sup is not None and sup.dead is not None:
            raise ActorDiedError(sup.dead)
        # Falling priorities: ready calls run in the order they were made.
        # A call its actor's process dies running fails: it is not run
        # again on the restarted actor (it may be what killed it). A
        # supervisor here cancels it, saying why; elsewhere (a detached
        # actor, or one made by another process) the scheduler fails it
        # (crash_limit=1).
        f = client._session.submit(
            _call,
            (self._actor_id, name, args, kwargs),
            {},
            priority=-(1 << 20) - next(self._seq) % (1 << 30),
            resources={f"actor-{self._actor_id}": 1},
            crash_limit=0 if sup is not None else 1,
        )
        if sup is not None:
            sup.track(f)
        # Ray runs a call whether or not its ref is kept
        # (`counter.incr.remote()` as a statement).
        fire_and_forget(f)
        return returns(client, f, self._returns.get(name, 1))

    def __reduce__(self):
        return (ActorHandle, (self._actor_id, self._cls_name, self._methods, self._returns))

    def __repr__(self) -> str:
        return f"<ActorHandle {self._cls_name} {self._actor_id}>"


def _child_env(client: Client) -> dict[str, str]:
    """An actor's process (or supervisor) imports what this one can, and
    authenticates as this client does."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if client._session.token is not None:
        env["SHOAL_TOKEN"] = client._session.token
    return env


class _Supervisor:
    """Keeps an actor's process alive (up to ``max_restarts`` restarts)."""

    def __init__(
        self, client: Client, actor_id: str, cmd: list[str], max_restarts: int, name: str | None
    ):
        self.client = client
        self.actor_id = actor_id
        self.name = name
        self.cmd = cmd
        self.restarts_left = max_restarts
        self.dead: str | None = None
        self.pending: list[weakref.ref[Future]] = []
        # Calls made through this client not finished yet, and the pickle
        # to delete once the creating handle is gone: as in Ray, the actor
        # lives on until its outstanding calls are done
        # (`Counter.remote().incr.remote()` runs its call).
        self.outstanding = 0
        self.forgotten: str | None = None
        self.lock = threading.Lock()
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, env=_child_env(self.client))

    def track(self, f: Future) -> None:
        with self.lock:
            self.pending = [r for r in self.pending if (g := r()) is not None and not g.done()]
            self.pending.append(weakref.ref(f))
            self.outstanding += 1
        # The callback holds the future until it is done (the call is
        # detached: it runs even if the caller drops it).
        f.add_done_callback(self._call_done)

    def _call_done(self, f: Future) -> None:
        with self.lock:
            self.outstanding -= 1

    def poll(self) -> bool:
        """Returns False once the actor is gone for good."""
        code = self.proc.poll()
        if code is None or self.dead is not None:
            return self.dead is None
        _core.remove_process_dirs(self.proc.pid)  # its shared memory and spill files
        if self.client._session.closed:
            self.dead = "its client closed"
            return False
        if self.restarts_left > 0 and code != KILLED:
            self.restarts_left -= 1
            print(
                f"shoal: actor {self.actor_id} process died (exit {code}); restarting it",
                file=sys.stderr,
            )
            # As in Ray, the call it was running fails rather than run again
            # on the new instance (it may be what killed it). Calls run in
            # order, so that is the oldest unfinished one. Cancelled before
            # the new process starts, so the scheduler cannot re-run it.
            with self.lock:
                running = next(
                    (g for r in self.pending if (g := r()) is not None and not g.done()), None
                )
            if running is not None:
                self.client._session.actor_died[running._id] = (
                    f"actor {self.actor_id} died (exit {code}) while running this call; "
                    "it was restarted"
                )
                self.client.cancel([running])
            self.proc = self._spawn()
            return True
        self.dead = (
            f"actor {self.actor_id} died (its process exited with {code}) and has no restarts left"
        )
        with self.lock:
            futures = [g for r in self.pending if (g := r()) is not None and not g.done()]
        for f in futures:
            self.client._session.actor_died[f._id] = self.dead
        if futures:
            self.client.cancel(futures)
        # Calls made elsewhere (inside tasks) fail too instead of waiting.
        core = self.client._session.core
        if core is not None:
            core.withdraw(f"actor-{self.actor_id}")
            if self.name is not None:
                core.unname(_named(self.name))
        return False

    def stop(self) -> None:
        self.dead = self.dead or f"actor {self.actor_id} was stopped"
        core = self.client._session.core
        if core is not None:
            core.withdraw(f"actor-{self.actor_id}")
            if self.name is not None:
                core.unname(_named(self.name))
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _core.remove_process_dirs(self.proc.pid)


_supervisors: dict[str, _Supervisor] = {}
_watch_lock = threading.Lock()
_watcher: list[threading.Thread] = []
# Actors whose creating handle was collected: (actor id, pickle path). The
# finalizer only appends (it may run inside any allocation, even in a
# thread that holds `_watch_lock`); the watcher stops them.
_forgotten: collections.deque[tuple[str, str]] = collections.deque()


def _watch() -> None:
    while True:
        while _forgotten:
            actor_id, path = _forgotten.popleft()
            with _watch_lock:
                sup = _supervisors.get(actor_id)
            if sup is None:
                _unlink(path)
            else:
                sup.forgotten = path
        with _watch_lock:
            sups = list(_supervisors.values())
        for s in sups:
            if s.dead is None:
                s.poll()  # a dead one stays listed: later calls fail at once
            if s.forgotten is not None and (s.outstanding == 0 or s.dead is not None):
                s.stop()  # no handle left here, no call outstanding
                _unlink(s.forgotten)
                s.forgotten = None
        time.sleep(0.05)


def _named(name: str) -> str:
    return f"actor:{name}"


def _worker_cmd(address: str, cls_name: str, actor_id: str, path: str) -> list[str]:
    """The actor's process: a one-thread worker offering the actor's
    resource, which builds the instance from ``path`` and exits with its
    supervisor (this process)."""
    return [
        sys.executable,
        "-m",
        "shoal._worker",
        address,
        "--nthreads",
        "1",
        "--name",
        f"actor-{cls_name}-{actor_id}",
        "--resources",
        f"actor-{actor_id}=1",
        "--actor",
        f"{actor_id}={path}",
        "--parent",
        str(os.getpid()),
    ]


def _claim_name(client: Client, name: str, info: dict[str, Any]) -> None:
    answer = json.loads(client._session.check().name(_named(name), json.dumps(info)))
    if "error" in answer:
        raise ValueError(f"an actor named {name!r} already exists in this cluster")


def create(
    cls: type,
    args: tuple,
    kwargs: dict,
    max_restarts: int,
    name: str | None = None,
    detached: bool = False,
) -> ActorHandle:
    """Starts an actor of ``cls`` (named ``name`` in the cluster, if given;
    ``detached``: supervised by a process of its own, see the module's
    doc); returns its handle."""
    client = default_client()
    # Constructor arguments that are futures are resolved here: the process
    # builds the instance before it joins the cluster.
    args, kwargs = client.gather((list(args), dict(kwargs)))
    actor_id = f"{os.getpid():x}-{next(_ids)}"
    methods = frozenset(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n)))
    marked = {n: getattr(getattr(cls, n), "__shoal_num_returns__", 1) for n in methods}
    returns = {n: k for n, k in marked.items() if k != 1}
    info = {"id": actor_id, "cls": cls.__name__, "methods": sorted(methods), "returns": returns}
    if name is not None and not detached:
        _claim_name(client, name, info)
    fd, path = tempfile.mkstemp(prefix=f"shoal-actor-{actor_id}-", suffix=".pkl")
    with os.fdopen(fd, "wb") as fh:
        cloudpickle.dump((cls, tuple(args), kwargs), fh)
    handle = ActorHandle(actor_id, cls.__name__, methods, returns)
    if detached:
        assert name is not None
        _start_detached(client, path, name, info, max_restarts)
        return handle
    cmd = _worker_cmd(client.scheduler_address, cls.__name__, actor_id, path)
    # Calls made before the process joins wait for it (not "unsatisfiable").
    client._session.check().expect(f"actor-{actor_id}")
    sup = _Supervisor(client, actor_id, cmd, max_restarts, name)
    with _watch_lock:
        _supervisors[actor_id] = sup
        if not _watcher:
            t = threading.Thread(target=_watch, name="shoal-actors", daemon=True)
            t.start()
            _watcher.append(t)
    client._session.on_close.append(sup.stop)
    weakref.finalize(handle, _forget, actor_id, path)
    return handle


def _start_detached(
    client: Client, path: str, name: str, info: dict[str, Any], max_restarts: int
) -> None:
    """Starts a detached actor's supervisor; returns once it holds the name
    (``ValueError`` if the name is taken)."""
    spec = {
        "address": client.scheduler_address,
        "path": path,
        "name": name,
        "info": info,
        "max_restarts": max_restarts,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", "import shoal.actor as a; a._main()", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=_child_env(client),
        start_new_session=True,  # not stopped with its creator's process group
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    try:
        answer = json.loads(line)
    except ValueError:
        proc.wait()
        _unlink(path)
        raise RuntimeError(
            f"the detached actor's supervisor exited with {proc.returncode} before it started "
            "(see its output above)"
        ) from None
    if "error" in answer:
        proc.wait()
        _unlink(path)
        raise ValueError(answer["error"])


def _supervise_detached(spec: dict[str, Any]) -> int:
    """Main of a detached actor's supervisor (``_main``, given SPEC as JSON):
    holds the actor's name, keeps its process alive, and ends when the actor
    is dead for good or the cluster is gone."""
    info, path = spec["info"], spec["path"]
    actor_id = info["id"]
    client = Client(spec["address"], set_as_default=False)
    try:
        # Expected before the creator hears "ok" and calls it: the name's
        # answer comes after the scheduler took the `expect` sent before.
        client._session.check().expect(f"actor-{actor_id}")
        try:
            _claim_name(client, spec["name"], info)
        except ValueError as e:
            client._session.check().withdraw(f"actor-{actor_id}")
            print(json.dumps({"error": str(e)}), flush=True)
            return 1
        print(json.dumps({"ok": True}), flush=True)
        # Its creator does not read on, and may be gone: neither this
        # process nor the actor's keeps the creator's output streams (one
        # that waits for their end would wait for the actor's).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        cmd = _worker_cmd(spec["address"], info["cls"], actor_id, path)
        sup = _Supervisor(client, actor_id, cmd, spec["max_restarts"], spec["name"])
        core = client._session.check()
        while sup.poll() and core.closed_reason() is None:
            time.sleep(0.1)
        sup.stop()
        return 0
    finally:
        _unlink(path)
        client.close()


def _forget(actor_id: str, path: str) -> None:
    """The creating handle is gone: the watcher stops the actor's process
    once its outstanding calls are done."""
    _forgotten.append((actor_id, path))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def get_actor(name: str) -> ActorHandle:
    """The handle of the actor created with ``.options(name=name)``, from
    any client of the cluster (Ray's ``get_actor``). Raises ``ValueError``
    if there is none. The actor lives as long as its creator keeps it."""
    answer = json.loads(default_client()._session.check().name(_named(name)))
    info = answer.get("value")
    if info is None:
        raise ValueError(f"no actor named {name!r} in this cluster")
    info = json.loads(info)
    return ActorHandle(info["id"], info["cls"], frozenset(info["methods"]), info["returns"])


def kill(handle: ActorHandle) -> None:
    """Stops an actor's process now; its outstanding calls fail, and it is
    not restarted. From any client: an actor supervised elsewhere (detached,
    or made by another process) is told to exit by a call of its own."""
    with _watch_lock:
        sup = _supervisors.get(handle._actor_id)
    if sup is not None:
        sup.restarts_left = 0
        sup.proc.kill()
        return
    client = default_client()
    f = client._session.submit(
        _die, (), {}, priority=1 << 30, resources={f"actor-{handle._actor_id}": 1}, crash_limit=1
    )
    fire_and_forget(f)


def _main() -> None:
    sys.exit(_supervise_detached(json.loads(sys.argv[1])))
