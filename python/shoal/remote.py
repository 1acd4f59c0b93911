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

from .client import Client, Future, default_client, fire_and_forget, get_client, wait

_OPTIONS = {"num_cpus", "num_gpus", "resources", "retries", "max_retries", "priority", "name"}
_ACTOR_OPTIONS = {"max_restarts", "num_cpus"}


def init(address: str | None = None, **client_kwargs: Any) -> Client:
    """Connects (``address``) or starts the default cluster for Ray-style calls."""
    try:
        client = get_client()
        if address is None and not client_kwargs:
            return client
    except ValueError:
        pass
    return Client(address, **client_kwargs)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown remote options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    cpus = options.get("num_cpus", 1)
    if not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"num_cpus must be a whole number >= 1, not {cpus!r}")
    return options


class RemoteFunction:
    """A function made remote by ``@shoal.remote``: call ``.remote(...)``."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]):
        self._fn = fn
        self._options = _check_options(options)
        functools.update_wrapper(self, fn)

    def remote(self, *args: Any, **kwargs: Any) -> Future:
        """Runs the function on the cluster; returns its future (object ref)."""
        o = self._options
        retries = o.get("retries", o.get("max_retries", 0))
        resources = dict(o.get("resources") or {})
        if o.get("num_gpus"):
            resources["GPU"] = o["num_gpus"]
        if o.get("num_cpus", 1) > 1:
            resources["CPU"] = o["num_cpus"]  # worker threads it occupies
        f = default_client().submit(
            self._fn,
            *args,
            retries=max(0, retries),
            priority=o.get("priority", 0),
            resources=resources or None,
            **kwargs,
        )
        # Ray runs a call whether or not its ref is kept.
        fire_and_forget(f)
        return f

    def options(self, **options: Any) -> RemoteFunction:
        """A copy with other options (``num_cpus``: worker threads it
        occupies; ``num_gpus``; ``resources``; ``retries``/``max_retries``;
        ``priority``)."""
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
        self._cls = cls
        self._options = options

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Starts the actor's process; returns its handle."""
        from .actor import create

        return create(self._cls, args, kwargs, self._options.get("max_restarts", 0))

    def options(self, **options: Any) -> ActorClass:
        """A copy with other options (``max_restarts``)."""
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
    return default_client()._put(value, None)
