"""The Ray-style API: ``@shoal.remote`` functions, ``shoal.get``, ``shoal.init``.

``f.remote(...)`` returns a Shoal ``Future`` (Ray's object ref): it can be
passed to other ``.remote`` calls, ``shoal.get`` and ``shoal.wait(refs,
num_returns=...)``. Calls go to ``shoal.get_client()``, or to an embedded
cluster started on first use, as ``ray.init()`` would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._futures import returns as _returns
from ._waiting import fire_and_forget, wait
from .client import Client, Future, close_default_client, default_client, get_client

_OPTIONS = {
    "num_cpus",
    "num_gpus",
    "resources",
    "retries",
    "max_retries",
    "priority",
    "name",
    "num_returns",
}
_ACTOR_OPTIONS = {"max_restarts", "num_cpus", "name", "lifetime"}

# Clients init() started or connected (shutdown() closes them).
_inited: list[Client] = []


def init(address: str | None = None, **client_kwargs: Any) -> Client:
    """Connects (``address``) or starts the default cluster for Ray-style calls."""
    try:
        client = get_client()
        if address is None and not client_kwargs:
            return client
    except ValueError:
        pass
    client = Client(address, **client_kwargs)
    _inited.append(client)
    return client


def is_initialized() -> bool:
    """Whether Ray-style calls have a client to go to (``init()`` ran, or
    any client of this process is open)."""
    try:
        get_client()
    except ValueError:
        return False
    return True


def shutdown() -> None:
    """Closes what ``init()`` and the first Ray-style call started or
    connected (Ray's ``shutdown``); other clients stay open."""
    for c in _inited:
        c.close()
    _inited.clear()
    close_default_client()


def cancel(ref: Future, *, force: bool = False, recursive: bool = True) -> None:
    """Cancels a call (Ray's ``cancel``): its ref raises
    ``FutureCancelledError``; calls depending on it fail too. ``force`` and
    ``recursive`` are accepted as in Ray: a call already running runs to
    its end (its result is dropped)."""
    del force, recursive
    if not isinstance(ref, Future):
        raise TypeError(f"shoal.cancel takes a Future (object ref), not {type(ref).__name__}")
    ref.client.cancel([ref])


def _check_num_returns(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"num_returns must be a whole number >= 0, not {n!r}")
    return n


def method(*, num_returns: int = 1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@shoal.method(num_returns=2)`` on an actor method (Ray's
    ``ray.method``): its ``.remote()`` returns that many refs."""
    n = _check_num_returns(num_returns)

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__shoal_num_returns__ = n  # type: ignore[attr-defined]
        return fn

    return mark


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown remote options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    cpus = options.get("num_cpus", 1)
    if not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"num_cpus must be a whole number >= 1, not {cpus!r}")
    _check_num_returns(options.get("num_returns", 1))
    return options


class RemoteFunction:
    """A function made remote by ``@shoal.remote``: call ``.remote(...)``."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]):
        self._fn = fn
        self._options = _check_options(options)
        functools.update_wrapper(self, fn)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the function on the cluster; returns its future (object
        ref), or with ``num_returns=n`` a list of ``n`` of them."""
        o = self._options
        retries = o.get("retries", o.get("max_retries", 0))
        resources = dict(o.get("resources") or {})
        if o.get("num_gpus"):
            resources["GPU"] = o["num_gpus"]
        if o.get("num_cpus", 1) > 1:
            resources["CPU"] = o["num_cpus"]  # worker threads it occupies
        client = default_client()
        f = client._session.submit(
            self._fn,
            args,
            kwargs,
            retries=max(0, retries),
            priority=o.get("priority", 0),
            resources=resources or None,
        )
        # Ray runs a call whether or not its ref is kept.
        fire_and_forget(f)
        return _returns(client, f, o.get("num_returns", 1))

    def options(self, **options: Any) -> RemoteFunction:
        """A copy with other options (``num_cpus``: worker threads it
        occupies; ``num_gpus``; ``resources``; ``retries``/``max_retries``;
        ``priority``; ``num_returns``)."""
        return RemoteFunction(self._fn, {**self._options, **options})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"remote function {self._fn.__name__!r} cannot be called directly; "
            f"use {self._fn.__name__}.remote(...)"
        )


def remote(*args: Any, **options: Any) -> Any:
    """``@shoal.remote`` or ``@shoal.remote(retries=2)`` on a function."""

    def make(obj: Any) -> Any:
        if isinstance(obj, type):
            return ActorClass(obj, options)
        if not callable(obj):
            raise TypeError(f"@shoal.remote needs a function, not {type(obj).__name__}")
        return RemoteFunction(obj, options)

    if len(args) == 1 and not options and (callable(args[0]) or isinstance(args[0], type)):
        return make(args[0])
    if args:
        raise TypeError("use @shoal.remote or @shoal.remote(option=value, ...)")
    return make


class ActorClass:
    """A class made remote by ``@shoal.remote``: ``.remote(*args)`` starts an
    actor (see ``shoal.actor``) and returns its handle."""

    def __init__(self, cls: type, options: dict[str, Any]):
        unknown = set(options) - _ACTOR_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown actor options {sorted(unknown)}; known: {sorted(_ACTOR_OPTIONS)}"
            )
        if options.get("num_cpus", 1) != 1:
            raise NotImplementedError("actors take one thread: num_cpus other than 1")
        restarts = options.get("max_restarts", 0)
        if not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"max_restarts must be a whole number >= 0, not {restarts!r}")
        name = options.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"an actor's name must be a non-empty string, not {name!r}")
        lifetime = options.get("lifetime")
        if lifetime not in (None, "non_detached", "detached"):
            raise ValueError(
                f"an actor's lifetime is 'detached' or 'non_detached' (the default), "
                f"not {lifetime!r}"
            )
        if lifetime == "detached" and name is None:
            raise ValueError(
                "a detached actor must be named (.options(name=..., lifetime='detached')): "
                "its name is the only way to reach it once its creator is gone"
            )
        self._cls = cls
        self._options = options

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Starts the actor's process; returns its handle."""
        from .actor import create

        o = self._options
        return create(
            self._cls,
            args,
            kwargs,
            o.get("max_restarts", 0),
            o.get("name"),
            detached=o.get("lifetime") == "detached",
        )

    def options(self, **options: Any) -> ActorClass:
        """A copy with other options (``max_restarts``; ``name``: a name
        unique in the cluster, for ``shoal.get_actor`` from any client;
        ``lifetime="detached"``: the named actor outlives its creator, until
        ``shoal.kill`` or the cluster's end)."""
        return ActorClass(self._cls, {**self._options, **options})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor class {self._cls.__name__!r} cannot be instantiated directly; "
            f"use {self._cls.__name__}.remote(...)"
        )


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """Values of a future or a list of futures (Ray's ``get``);
    ``TimeoutError`` if they are not all ready within ``timeout`` seconds."""
    if isinstance(refs, Future):
        return refs.result(timeout)
    refs = list(refs)
    if not refs:
        return []
    if not all(isinstance(r, Future) for r in refs):
        raise TypeError("shoal.get takes a Future or a list of Futures")
    if timeout is not None:
        wait(refs, timeout)
    return (
        refs[0].client.gather(refs)
        if len({r.client for r in refs}) == 1
        else [r.result() for r in refs]
    )


def put(value: Any) -> Future:
    """Puts ``value`` on the cluster once and returns a future to pass to
    many tasks (Ray's ``put``; ``Client.scatter`` of one object). On one
    host it lives in shared memory and tasks map it without copying."""
    if isinstance(value, Future):
        raise TypeError("shoal.put takes a value, not a Future (it is already on the cluster)")
    return default_client()._session.put(value, None)
