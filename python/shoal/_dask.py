"""Dask graphs on Shoal: the scheduler ``get`` and ``compute``/``persist``.

A Dask graph (task spec nodes or legacy tuples) becomes one Shoal task per
node, or per partition's pipeline (``_fuse_partitions``), sent in dependency
order in batches growing fourfold: the first tasks run while the rest is
packed. A node runs on a worker as ``node({dependency key: value})``.
Aliases cost no task.

Futures of a ``persist`` carry their Dask key (``Future.key``) and
``__dask_future__``, so later graphs that contain them, or name their keys,
use the results held on the cluster instead of computing them again.

Dask is optional: this module imports it only when a graph arrives.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from . import _core, _imports, _serialize
from ._futures import Future

if TYPE_CHECKING:
    from .client import Client

Key = Hashable


def _execute(node: Any, inputs: dict[Key, Any]) -> Any:
    """Worker side: runs one graph node on its inputs' values (a plain call,
    see ``_plain_call``, runs as a task of its own function instead)."""
    return node(inputs)


_EXECUTE = _serialize.dumps_function(_execute)
_FIRST_BATCH = 64  # tasks of a graph sent before the rest is packed


def _require_dask() -> Any:
    try:
        import dask  # noqa: F401
        from dask import _task_spec
    except ImportError as e:
        raise ImportError("running Dask graphs needs dask: pip install 'shoal[dask]'") from e
    return _task_spec


def _flatten(keys: Any, out: list[Key]) -> list[Key]:
    stack = [keys]
    while stack:
        k = stack.pop()
        if isinstance(k, list):
            stack.extend(reversed(k))
        else:
            out.append(k)
    return out


def _pack(keys: Any, values: dict[Key, Any]) -> Any:
    """``keys``' shape with values: lists become tuples, as in dask.local."""
    if isinstance(keys, list):
        return tuple(_pack(k, values) for k in keys)
    return values[keys]


def _held_task(client: Client, key: Key) -> int | None:
    """The id of a live task of ``client`` known by ``key`` (a persisted
    Dask key, a ``submit(key=...)`` or an automatic ``name-<hex id>``)."""
    session = client._session
    tid = session.named(key)
    if tid is not None:
        return tid
    if isinstance(key, str) and "-" in key:
        try:
            tid = int(key.rsplit("-", 1)[1], 16)
        except ValueError:
            return None
        if tid in session.refs:
            return tid
    return None


def _graph_of(expr: Any) -> Any:
    """The task graph of what ``dask.compute`` hands a scheduler. Where the
    only low-level optimization is ``dask.delayed``'s (a cull, with delayed
    fusion off), the raw graphs are merged instead: ``submit_graph`` culls
    the flat graph itself in one pass, where Dask's layer-by-layer cull
    takes seconds on a graph of many delayed calls (each one a layer)."""
    import dask
    from dask.delayed import optimize as delayed_optimize

    groups = getattr(expr, "operands", None)
    if (
        type(expr).__name__ == "_HLGExprSequence"
        and groups
        and not dask.config.get("optimization.fuse.delayed")
        and all(
            getattr(g, "low_level_optimizer", None) is delayed_optimize and hasattr(g, "hlg")
            for g in groups
        )
    ):
        from dask.highlevelgraph import HighLevelGraph
        from dask.utils import ensure_dict

        return ensure_dict(HighLevelGraph.merge(*[g.hlg for g in groups]))
    return expr.__dask_graph__()


def _plain_call(task_spec: Any, node: Any, ids: dict[Key, int]) -> tuple | None:
    """A ``Task`` whose arguments are values or references to other tasks
    (most of a graph's nodes), as ``(func, args, kwargs)`` with ``Ref``s for
    the references: pickling that costs a third of pickling the node. None
    for anything else (nested containers of references, aliases, data)."""
    if type(node) is not task_spec.Task:
        return None
    graph_node, task_ref = task_spec.GraphNode, task_spec.TaskRef

    def arg(a: Any) -> Any:
        if isinstance(a, task_ref):
            return _serialize.Ref(ids[a.key])
        if isinstance(a, graph_node):
            raise LookupError  # evaluated by the node itself
        return a

    try:
        args = tuple(map(arg, node.args))
        kwargs = {k: arg(v) for k, v in node.kwargs.items()} if node.kwargs else {}
    except LookupError:
        return None
    return (node.func, args, kwargs)


def _holds_strided(task_spec: Any, obj: Any, depth: int = 0) -> bool:
    """Whether a graph node holds a large non-contiguous array (the column
    slices of Dask's ``from_array``, inside fused tasks' subgraphs), which
    ``Session.pack_args`` then puts on its own. A bounded look: nodes,
    their arguments, and small containers, a few levels deep."""
    if depth > 5:
        return False
    if _serialize.is_large_strided(obj):
        return True
    if isinstance(obj, task_spec.DataNode):
        return _holds_strided(task_spec, obj.value, depth + 1)
    if isinstance(obj, task_spec.Task):
        values: Any = (*obj.args, *obj.kwargs.values()) if obj.kwargs else obj.args
    elif type(obj) is dict:
        values = obj.values()
    elif type(obj) in (list, tuple):
        values = obj
    else:
        return False
    if len(values) > 64:
        return False
    return any(_holds_strided(task_spec, v, depth + 1) for v in values)


def _index(key: Key) -> tuple | None:
    """The partition or block index of a collection's key (``("name", 3)``
    -> ``(3,)``); None for other keys (``delayed``'s strings)."""
    return key[1:] if type(key) is tuple and len(key) > 1 else None


def _run_fused(nodes: tuple, drops: tuple, inputs: tuple, *values: Any) -> Any:
    """Worker side: a partition's pipeline fused into one task (see
    ``_fuse_partitions``). ``nodes`` in topological order, the output last;
    after node i, the values ``drops[i]`` names are needed no more."""
    cache = dict(zip(inputs, values, strict=True))
    for node, drop in zip(nodes, drops, strict=True):
        cache[node.key] = node(cache)
        for k in drop:
            del cache[k]
    return cache[nodes[-1].key]


def _fuse_partitions(
    task_spec: Any,
    needed: dict[Key, Any],
    topo: list[Key],
    keep: set[Key],
    small: Callable[[Any], bool],
) -> tuple[list[Key], dict[Key, list[Key]]]:
    """Groups each partition's pipeline to run as one task: the new
    topological order, and each group's output key -> its keys in
    topological order (groups of one left out).

    Dask's dataframe graphs leave every operation on a partition a task of
    its own (q6's filter is 19 per partition, most taking microseconds);
    as tasks each pays a scheduling round trip and, where placement
    separates them, a transfer. A node joins the group of its dependents
    when all of them are in one group, every key involved has its index
    (same partition or block), and none of those dependents gathers parts
    of other indices (a tree reduction, a shuffle's collection), whose
    inputs must stay tasks that run in parallel. What ``keep`` names stays
    a task's result; data joins its consumers only where ``small`` says it
    is.
    """
    dependents: dict[Key, list[Key]] = {k: [] for k in needed}
    for k, node in needed.items():
        for d in node.dependencies:
            if d in dependents:
                dependents[d].append(k)

    def fusable(k: Key) -> bool:
        node = needed[k]
        if type(node) is task_spec.DataNode:  # a large one is put on its own
            return small(node.value)
        return type(node) is task_spec.Task and not getattr(node, "block_fusion", False)

    @functools.cache
    def gathers(k: Key) -> bool:
        # An input of another index that only k reads is a part k gathers
        # (a reduction's); one that many read is broadcast (a small table
        # joined to every partition, a shuffle's store). Cached: each of a
        # wide node's inputs asks about it.
        i = _index(k)
        return any(
            _index(d) != i and len(dependents.get(d, ())) == 1 for d in needed[k].dependencies
        )

    group: dict[Key, Key] = {}  # key -> the key of its group's output
    for k in reversed(topo):
        group[k] = k
        i = _index(k)
        outs = dependents[k]
        if k in keep or i is None or not outs or not fusable(k):
            continue
        roots = {group[d] for d in outs}
        if len(roots) != 1:
            continue
        (root,) = roots
        if (
            _index(root) == i
            and type(needed[root]) is task_spec.Task  # data is no group's output
            and fusable(root)
            and not any(gathers(d) for d in outs)
        ):
            group[k] = root
    groups: dict[Key, list[Key]] = {}
    for k in topo:
        if group[k] != k:
            groups.setdefault(group[k], []).append(k)
    for root, inner in groups.items():
        inner.append(root)
    return [k for k in topo if group[k] == k], groups


def _fused_call(needed: dict[Key, Any], inner: list[Key], ids: dict[Key, int]) -> tuple:
    """``(func, args, kwargs)`` of a fused group (``_run_fused``): its
    inputs are the results of the keys outside the group it depends on."""
    inside = set(inner)
    inputs: list[Key] = []
    last: dict[Key, int] = {}  # a value's last reader's position
    for i, k in enumerate(inner):
        for d in needed[k].dependencies:
            if d not in inside and d not in last:
                inputs.append(d)
            last[d] = i
    drops: list[list[Key]] = [[] for _ in inner]
    for d, i in last.items():
        drops[i].append(d)
    nodes = tuple(needed[k] for k in inner)
    refs = (_serialize.Ref(ids[d]) for d in inputs)
    return (_run_fused, (nodes, tuple(map(tuple, drops)), tuple(inputs), *refs), {})


def submit_graph(client: Client, dsk: Any, keys: list[Key], retries: int = 0) -> dict[Key, int]:
    """Submits what ``keys`` need of ``dsk``; returns key -> task id for
    ``keys``. The caller owns those ids (must release them); every other task
    is released at once and lives only while its dependents need it."""
    task_spec = _require_dask()
    from dask.sizeof import sizeof
    from dask.utils import key_split

    if not isinstance(dsk, Mapping):
        dsk = _graph_of(dsk)
    graph = task_spec.convert_legacy_graph(dsk)

    # Cull to what the keys need, and order topologically (iteratively: a
    # 10,000-deep chain must not recurse).
    ids: dict[Key, int] = {}
    needed: dict[Key, Any] = {}
    topo: list[Key] = []
    for k in keys:
        if k not in graph and _held_task(client, k) is None:
            raise KeyError(k)
    stack: list[tuple[Key, bool]] = [(k, False) for k in reversed(keys)]
    # The keys being expanded, root first: the entry popped next is a
    # dependency of the last, so meeting one of them again is a cycle.
    path: list[Key] = []
    on_path: set[Key] = set()
    while stack:
        k, expanded = stack.pop()
        if expanded:
            topo.append(k)
            on_path.discard(path.pop())
            continue
        if k in on_path:
            cycle = [*path[path.index(k) :], k]
            raise RuntimeError(
                "Cycle detected between the following keys:\n  -> "
                + "\n  -> ".join(str(x) for x in cycle)
            )
        if k in needed or k in ids:
            continue
        node = graph.get(k)
        held = _held_task(client, k)
        if held is not None or node is None:
            if held is None:
                raise KeyError(f"the graph needs {k!r}, which is neither in it nor held")
            ids[k] = held  # held already (persisted, or an earlier submit)
            continue
        needed[k] = node
        stack.append((k, True))
        path.append(k)
        on_path.add(k)
        stack.extend((d, False) for d in node.dependencies if d not in ids)

    groups: dict[Key, list[Key]] = {}
    # Only collections' keys (tuples) fuse: a delayed graph skips the pass.
    if _core.setting("SHOAL_DASK_FUSE") != "0" and any(type(k) is tuple for k in topo):
        topo, groups = _fuse_partitions(
            task_spec, needed, topo, set(keys), lambda v: sizeof(v) < _serialize.LARGE_BUFFER
        )

    # The core's own order (deepest ready task first, then the oldest) holds
    # less memory than dask.order's priorities on the array workloads
    # measured (docs/architecture.md) and costs nothing here; dask.order
    # took a third of a big graph's submission. SHOAL_DASK_ORDER=dask
    # brings it back.
    if len(needed) > 1 and _core.setting("SHOAL_DASK_ORDER") == "dask":
        from dask.order import order

        priorities = order(needed)
    else:
        priorities = dict.fromkeys(needed, 0)
    session = client._session
    core = session.check()
    next_id = core.new_ids(len(topo))
    items: list[tuple[int, str, str | None, bytes, list[int], int, bytes | None]] = []
    sent: list[int] = []  # known to the cluster: puts, and tasks sent
    puts: list[Any] = []  # large arguments put beside their tasks, held until sent
    # Sent in batches growing fourfold, so that workers run the first tasks
    # (leaves come early in topological order) while the rest is packed, as
    # Dask's threads start while their scheduler still walks the graph
    # (packing a 1,000-task array graph took 50 ms before any task ran).
    send_at = _FIRST_BATCH

    def send() -> None:
        core.submit_graph(_EXECUTE, items, retries)
        sent.extend(item[0] for item in items)

    try:
        for k in topo:
            node = needed[k]
            if isinstance(node, task_spec.Alias) and node.target in ids:
                ids[k] = ids[node.target]  # no task: the same result
                continue
            if type(node) is task_spec.DataNode and sizeof(node.value) >= _serialize.LARGE_BUFFER:
                # Large data in the graph (`from_array`'s array): put on the
                # cluster as is, so that its result is the put's file, which
                # consumers elsewhere on the host map (a task returning it would
                # hold a view that each export copies).
                tid = ids[k] = session.put_id(node.value)
                sent.append(tid)
                continue
            inner = groups.get(k)
            call = _fused_call(needed, inner, ids) if inner else _plain_call(task_spec, node, ids)
            own: bytes | None = None
            if call is not None:
                # Run as the task's own function, pickled once per function
                # (each task carrying it by value cost most of a delayed
                # graph's submission when it came from __main__).
                fn, a, kw = call
                try:
                    own = _serialize.dumps_function(fn)
                except Exception as e:
                    raise TypeError(
                        f"could not pickle the function of the Dask task {k!r}: {e}"
                    ) from e
                args: Any = (a, kw or None)
            else:
                args = ((node, {d: _serialize.Ref(ids[d]) for d in node.dependencies}), None)
            strided = any(_holds_strided(task_spec, needed[m]) for m in inner or (k,))
            payload, deps, p = session.pack_args(args, f"the Dask task {k!r}", strided)
            puts += p
            tid = ids[k] = next_id
            next_id += 1
            items.append((tid, key_split(k), str(k), payload, deps, -priorities[k], own))
            if len(items) >= send_at:
                send()
                items, puts = [], []
                send_at *= 4
        if items:
            send()
    except BaseException:
        # What the cluster already has of a graph that cannot be submitted
        # whole (an argument that does not pickle, Ctrl-C) is let go.
        if sent:
            core.release(sent)
        raise
    del puts
    wanted = {ids[k] for k in keys}
    intermediate = set(sent) - wanted
    if intermediate:
        core.release(sorted(intermediate))
    return {k: ids[k] for k in keys}


def get(client: Client, dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """A Dask scheduler ``get``: computes ``keys`` of ``dsk`` on the cluster.
    Unknown keyword arguments are ignored, as Dask expects."""
    flat = list(dict.fromkeys(_flatten(keys, [])))
    ids = submit_graph(client, dsk, flat, retries=kwargs.get("retries", 0) or 0)
    # Each future takes over the scheduler-side hold of its task.
    futures = [Future(client, tid, "dask", k) for k, tid in ids.items()]
    values = client.gather(futures)
    return _pack(keys, dict(zip(flat, values, strict=True)))


def futures_get(client: Client, dsk: Any, keys: Any, **kwargs: Any) -> list[Future]:
    """Like ``get``, but returns one future per (flat) key, without waiting:
    handed to ``dask.compute``/``dask.persist`` as the scheduler, so that Dask
    repacks futures instead of values."""
    flat = _flatten(keys, [])
    ids = submit_graph(client, dsk, list(dict.fromkeys(flat)))
    out = {k: Future(client, tid, "dask", k) for k, tid in ids.items()}
    for k, tid in ids.items():
        client._session.name(k, tid)
    return [out[k] for k in flat]


def _run_with_futures(
    how: str, client: Client, collections: Any, optimize_graph: bool, kwargs: dict[str, Any]
) -> Any:
    """Dask's own ``compute``/``persist`` (``how``), with a scheduler that
    returns futures instead of values; one result per collection given (a
    list for a list or tuple)."""
    _require_dask()
    import dask

    single = not isinstance(collections, list | tuple)
    colls = [collections] if single else list(collections)
    run = getattr(dask, how)
    scheduler = functools.partial(futures_get, client)
    out = run(*colls, scheduler=scheduler, optimize_graph=optimize_graph, **kwargs)
    return out[0] if single else list(out)


def compute(client: Client, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
    """``client.compute``: one future per collection, for its final value."""
    return _run_with_futures("compute", client, collections, optimize_graph, kwargs)


def persist(client: Client, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
    """``client.persist``: the same collections, their chunks held as futures."""
    return _run_with_futures("persist", client, collections, optimize_graph, kwargs)


# ------------------------------------------------------------ set_as_default


_defaults: list[Callable[..., Any]] = []  # open clients' get, most recent last
_NOTHING = object()
# Dask's settings before any client's: the scheduler, and the shuffle method
# (without a distributed client Dask shuffles through local disk, which only
# works on one host with a shared /tmp; a cluster wants the "tasks" shuffle).
_before: dict[str, Any] = {}
_SETTINGS = ("scheduler", "dataframe.shuffle.method")


def _set_default(get_fn: Callable[..., Any]) -> Callable[[], None]:
    """Makes ``get_fn`` Dask's default scheduler (now, or when dask is
    imported: importing dask here would slow every ``Client()`` down).
    Returns the undo, which hands the default back to the most recent
    client still open, or to what it was before."""

    def apply() -> None:
        # Not `import dask.config`: this may run while dask/__init__ is
        # importing it, before the attribute exists.
        config = sys.modules["dask.config"]
        if not _defaults:
            for name in _SETTINGS:
                _before[name] = config.get(name, _NOTHING)
        _defaults.append(get_fn)
        shuffle = config.get("dataframe.shuffle.method", None)
        # Dask's own defaults hold None for it: unset, not a choice to keep.
        chosen = shuffle not in (None, "")
        config.set(
            {
                "scheduler": get_fn,
                "dataframe.shuffle.method": shuffle if chosen else "tasks",
            }
        )

    def undo() -> None:
        _imports.cancel("dask.config", apply)
        if get_fn not in _defaults:
            return
        _defaults.remove(get_fn)
        config = sys.modules["dask.config"]
        if config.get("scheduler", None) is not get_fn:
            return  # someone set another scheduler since: leave it
        if _defaults:
            config.set(scheduler=_defaults[-1])
            return
        for name in _SETTINGS:
            value = _before.pop(name, _NOTHING)
            if value is _NOTHING:
                section, _, key = name.rpartition(".")
                target = config.config
                for part in section.split(".") if section else []:
                    target = target.get(part, {})
                target.pop(key, None)
            else:
                config.set({name: value})

    _imports.when_imported("dask.config", apply)
    return undo
