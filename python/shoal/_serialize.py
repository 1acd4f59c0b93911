"""Pickling for tasks: cloudpickle where it must, the C pickler where it can.

Functions are pickled with cloudpickle once per function object and cached
(pickling a function by value costs tens of microseconds). Arguments and
results go through the C pickler (protocol 5) and fall back to cloudpickle
only when that fails or refers to ``__main__`` (which a worker cannot import).

Futures inside arguments reduce to references: while arguments are pickled,
every future met is recorded as a dependency; on the worker the reference
resolves to the input's value.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _core
from .errors import ForeignFutureError, RemoteError

PROTOCOL = 5


class _Local(threading.local):
    # Class defaults: a missing attribute would cost an exception per read
    # (these are read for every task's arguments and result).
    deps: list[int] | None = None  # pickling task arguments: their futures
    owner: Any = None  # the client pickling them
    inputs: dict[int, Any] | None = None  # worker: values of a task's inputs
    result_of: int | None = None  # worker: the task whose result is pickled
    held: dict[Any, list[int]] | None = None  # futures met in that result


_local = _Local()
_func_cache: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
_func_cache_strong: dict[Any, bytes] = {}


class _HookPickler(cloudpickle.Pickler):
    """cloudpickle with a hook that may reduce an object its own way
    (returns ``NotImplemented`` for the rest)."""

    hook: Any = None

    def reducer_override(self, obj: Any) -> Any:
        r = self.hook(obj)
        if r is not NotImplemented:
            return r
        return super().reducer_override(obj)


def dumps(
    obj: Any,
    large: list[pickle.PickleBuffer] | None = None,
    hook: Callable[[Any], Any] | None = None,
) -> bytes:
    """Pickles ``obj``; raises ``TypeError`` naming the failure. With
    ``large``, buffers of at least ``LARGE_BUFFER`` bytes (NumPy arrays'
    data) are left out of the pickle and appended there, in order: load it
    with ``pickle.loads(data, buffers=large)``. ``hook``: called on every
    object (slow: a Python call each), it may reduce one its own way."""
    callback = None
    if large is not None:

        def callback(b: pickle.PickleBuffer) -> bool:
            if b.raw().nbytes < LARGE_BUFFER:
                return True  # in band
            large.append(b)
            return False

    if hook is not None:
        out = io.BytesIO()
        p = _HookPickler(out, protocol=PROTOCOL, buffer_callback=callback)
        p.hook = hook
        p.dump(obj)
        return out.getvalue()
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    if large:
        large.clear()
    return cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)


# Task arguments: a buffer this large is not pickled into the task (which
# travels through the scheduler) but put on the cluster beside it, in shared
# memory on one host, and mapped by the task; arguments that still pickle
# larger than LARGE_ARGS (data NumPy cannot hand out of band, such as a
# broadcast array) are put whole. See `Session.pack_args`.
LARGE_BUFFER = 1 << 20
LARGE_ARGS = 16 << 20


class Packed:
    """Task arguments whose large buffers were put on the cluster: pickled
    as the header and the futures of the buffers, which the task's worker
    resolves to the buffers (mapped) before loading the header."""

    __slots__ = ("header", "buffers")

    def __init__(self, header: bytes | None, buffers: list[Any]):
        self.header = header  # None: buffers[0] is the whole pickle
        self.buffers = buffers

    def __reduce__(self):
        return (unpack, (self.header, self.buffers))


def unpack(header: bytes | None, buffers: list[Any]) -> Any:
    """Worker side: loads packed arguments (see ``Packed``)."""
    if header is None:
        return pickle.loads(buffers[0])
    return pickle.loads(header, buffers=buffers)


# Out-of-band framing for large arrays: MAGIC, u32 count, u64 header
# length, u64 offset of the first buffer, u64 buffer lengths, header, then
# the buffers from that offset, each next one at a 64-byte aligned offset.
# Pickling in band copies the data into the pickle (and again on growth) and
# unpickling copies it out; this copies it once into the frame, and
# unpickling makes views of the received (writable) buffer. The explicit
# first offset lets a buffer already in a shared-memory block stay where it
# is: the header goes into the block's first page (`in_place_head`).
_OOB_MAGIC = b"SHOALOB2"
_ALIGN = 64


def frame_parts(obj: Any, result_of: int | None = None) -> tuple[list[Any], int, bool]:
    """Pickles ``obj`` with its buffers out of band: the parts of the frame
    (to join or write; buffers are not copied), its length, and whether it
    has out-of-band buffers (otherwise it is a plain pickle). Raises
    ``TypeError`` naming the failure, as ``dumps``.

    ``result_of``: ``obj`` is that task's result (on a worker). Futures in
    it are pickled as references that whoever unpickles them claims
    (``adopt``), and the scheduler is told that the result holds them
    (``Session.hold``) before their client here can let them go."""
    if result_of is None:
        return _frame_parts(obj)
    _local.result_of = result_of
    try:
        return _frame_parts(obj)
    finally:
        _local.result_of = None
        held = _local.held
        if held:
            _local.held = None
            for client, ids in held.items():
                client._session.hold(result_of, ids)


class _Bytes:
    """A large ``bytes``/``bytearray``/``memoryview`` result, pickled with
    its data out of band (pickle keeps these types' data in band)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview):
        self.data = data

    def __reduce_ex__(self, protocol: int):
        kind = type(self.data)
        return (_rebuild_bytes, (pickle.PickleBuffer(self.data), kind.__name__))


def _rebuild_bytes(buffer: Any, kind: str) -> bytes | bytearray | memoryview:
    """Unpickling a ``_Bytes``: a memoryview stays a view of the received
    frame (mapped, not copied); bytes and bytearray own their memory."""
    if kind == "memoryview":
        return memoryview(buffer)
    return bytes(buffer) if kind == "bytes" else bytearray(buffer)


def _frame_parts(obj: Any) -> tuple[list[Any], int, bool]:
    t = type(obj)
    if t is bytes or t is bytearray:
        if len(obj) >= LARGE_BUFFER:
            obj = _Bytes(obj)
    elif t is memoryview and obj.nbytes >= LARGE_BUFFER and obj.c_contiguous:
        obj = _Bytes(obj)
    buffers: list[pickle.PickleBuffer] = []
    try:
        header = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        if b"__main__" in header:
            buffers.clear()
            header = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
    except Exception:
        # Non-contiguous buffers, or something only cloudpickle handles: in
        # band (raises if it cannot be pickled at all).
        data = dumps(obj)
        return [data], len(data), False
    if not raws:
        return [header], len(header), False
    lengths = [r.nbytes for r in raws]
    head_len = _prefix_len(len(raws)) + len(header)
    first = head_len + (-head_len % _ALIGN)
    prefix = _prefix(len(header), first, lengths)
    parts: list[Any] = [prefix, header]
    offset = head_len
    for r in raws:
        pad = -offset % _ALIGN
        if pad:
            parts.append(b"\0" * pad)
        parts.append(r)
        offset += pad + r.nbytes
    return parts, offset, True


def _prefix_len(count: int) -> int:
    return 8 + struct.calcsize(f"<IQQ{count}Q")


def _prefix(header_len: int, first: int, lengths: list[int]) -> bytes:
    return _OOB_MAGIC + struct.pack(
        f"<IQQ{len(lengths)}Q", len(lengths), header_len, first, *lengths
    )


def in_place_head(parts: list[Any], offset: int) -> tuple[bytes, memoryview] | None:
    """For a frame of ``frame_parts`` with one out-of-band buffer: the
    frame's prefix and header for that buffer lying at ``offset`` of a file,
    and the buffer; None for other frames."""
    if len(parts) < 3 or parts[0][:8] != _OOB_MAGIC or len(parts[0]) != _prefix_len(1):
        return None
    header, raw = parts[1], parts[-1]
    return _prefix(len(header), offset, [raw.nbytes]) + header, raw


def dumps_large(obj: Any) -> bytes:
    """Pickles a large array-like result with its buffers out of band."""
    parts, _, _ = frame_parts(obj)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Strided:
    """A large array that is not contiguous (a column slice, as Dask's
    ``from_array`` makes): pickled as a reference to one out-of-band buffer
    that ``strided_parts`` fills with its data in order."""

    __slots__ = ("array", "marker")

    def __init__(self, array: Any):
        self.array = array
        self.marker = bytearray()

    def __reduce_ex__(self, protocol: int):
        a = self.array
        return (_rebuild_array, (pickle.PickleBuffer(self.marker), a.dtype, a.shape))


def _rebuild_array(buffer: Any, dtype: Any, shape: tuple) -> Any:
    import numpy as np

    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def is_large_strided(obj: Any) -> bool:
    """A NumPy array of at least ``LARGE_BUFFER`` bytes that is not
    contiguous (pickle copies its data in band)."""
    if type(obj).__name__ != "ndarray" or type(obj).__module__ != "numpy":
        return False
    return (
        obj.nbytes >= LARGE_BUFFER
        and not obj.dtype.hasobject
        and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
    )


def strided_parts(obj: Any) -> tuple[list[Any], int] | None:
    """The frame of a large non-contiguous NumPy array whose data part is
    the array itself, for ``write_file`` to copy in order straight into the
    file (pickle would first copy it into a pickle of its own). None for
    anything else."""
    if not is_large_strided(obj):
        return None
    header = pickle.dumps(_Strided(obj), protocol=PROTOCOL, buffer_callback=lambda b: False)
    head_len = _prefix_len(1) + len(header)
    first = head_len + (-head_len % _ALIGN)
    parts = [_prefix(len(header), first, [obj.nbytes]), header, b"\0" * (first - head_len), obj]
    return parts, first + obj.nbytes


def _write_array(fd: int, a: Any) -> None:
    """Writes an array's data in C order, a few MiB at a time through a
    small contiguous copy (cache-hot) for a non-contiguous one."""
    import numpy as np

    if a.flags.c_contiguous:
        _write_all(fd, memoryview(a).cast("B"))
        return
    rows = max(1, (4 << 20) // max(1, a[0].nbytes)) if a.ndim > 1 else 0
    if not rows:
        _write_all(fd, memoryview(np.ascontiguousarray(a)).cast("B"))
        return
    for i in range(0, a.shape[0], rows):
        _write_all(fd, memoryview(np.ascontiguousarray(a[i : i + rows])).cast("B"))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_file(path: str, parts: list[Any]) -> None:
    """Writes a frame's parts to a new file (one copy of the buffers, done
    by the kernel with the GIL released; see ``strided_parts`` for arrays)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # RDWR: see shm_reserve
    try:
        length = sum(
            p.nbytes if type(p).__name__ == "ndarray" else memoryview(p).nbytes for p in parts
        )
        if length >= 1 << 20:
            # Pages reserved first (huge on tmpfs where the kernel can: five
            # times faster to fill), and a full tmpfs fails here, not midway.
            _core.shm_reserve(fd, length)
        write_parts(fd, parts)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def write_parts(fd: int, parts: list[Any]) -> None:
    """Writes a frame's parts at ``fd``'s offset, in order."""
    for part in parts:
        if type(part).__name__ == "ndarray":
            _write_array(fd, part)
            continue
        _write_all(fd, memoryview(part).cast("B"))


def load_file(path: str) -> Any:
    """Unpickles a file ``write_file`` made, mapping it: out-of-band buffers
    (arrays) become read-only views of the file's pages, not copies."""
    with open(path, "rb") as fh:
        mm = _core.map_file(fh.fileno(), False)
    return loads(mm)


# Compressed frames (spilled data that compresses well): MAGIC, then an
# LZ4 frame.
_Z_MAGIC = b"SHOALLZ4"


def _lz4() -> Any:
    try:
        import lz4.frame

        return lz4.frame
    except ImportError:
        return None


def compressed_parts(parts: list[Any], length: int) -> list[Any] | None:
    """The frame compressed for spilling, where it pays; else None.

    Off unless ``SHOAL_SPILL_COMPRESSION=lz4`` (needs ``pip install
    shoal[lz4]``): spill files are read back by mapping them, so while the
    page cache holds them, uncompressed is faster (2 GiB through 1 GiB of
    limits: 0.73 s plain, 1.99 s compressed on our 2-core machine); on a
    host whose spill really reaches a slow disk, compressing saves the I/O.
    Then only data whose three 16 KiB samples shrink eightfold is
    compressed: LZ4 does that at several GB/s, but merely halves others at
    about 0.5 GB/s. zlib, the standard library's, is too slow to pay."""
    if _core.setting("SHOAL_SPILL_COMPRESSION").lower() != "lz4" or length < 1 << 20:
        return None
    lz4 = _lz4()
    if lz4 is None:
        raise RuntimeError("SHOAL_SPILL_COMPRESSION=lz4 needs the lz4 package: pip install lz4")
    flat = [memoryview(p).cast("B") for p in parts]
    big = max(flat, key=len)
    step = max(1, (len(big) - 16384) // 2)
    sample = b"".join(bytes(big[i : i + 16384]) for i in (0, step, 2 * step))
    if len(lz4.compress(sample, store_size=False)) * 8 > len(sample):
        return None
    c = lz4.LZ4FrameCompressor()
    out: list[Any] = [_Z_MAGIC, c.begin()]
    for p in flat:
        out.append(c.compress(p))
    out.append(c.flush())
    return out


def loads(data: bytes | bytearray | memoryview | Any) -> Any:
    """Unpickles what ``dumps`` or ``dumps_large`` made (buffers of the
    latter become views of ``data``: writable for a ``bytearray`` or a
    copy-on-write ``_core.Mapped``, read-only for a read-only one or a
    received frame), compressed or not."""
    if type(data) not in (bytes, bytearray):
        data = memoryview(data)  # `_core.Frame`, `_core.Mapped`
    head = data[:8]
    if head == _Z_MAGIC:
        lz4 = _lz4()
        if lz4 is None:
            raise RuntimeError("this result was spilled compressed: install lz4 to read it")
        return loads(lz4.decompress(memoryview(data)[8:]))
    if head != _OOB_MAGIC:
        return pickle.loads(data)
    view = memoryview(data)
    count, header_len, offset = struct.unpack_from("<IQQ", view, 8)
    lengths = struct.unpack_from(f"<{count}Q", view, _prefix_len(0))
    start = _prefix_len(count)
    header = view[start : start + header_len]
    buffers = []
    for n in lengths:
        buffers.append(view[offset : offset + n])
        offset += n
        offset += -offset % _ALIGN
    return pickle.loads(header, buffers=buffers)


def dumps_function(fn: Any) -> bytes:
    """cloudpickle of a function, cached per function object."""
    try:
        return _func_cache[fn]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable (a builtin, a bound method)
        try:
            return _func_cache_strong[fn]
        except (KeyError, TypeError):
            pass
    data = cloudpickle.dumps(fn, protocol=PROTOCOL)
    try:
        _func_cache[fn] = data
    except TypeError:
        try:
            if len(_func_cache_strong) < 4096:
                _func_cache_strong[fn] = data
        except TypeError:
            pass
    return data


def dumps_args(
    args: Any,
    what: str,
    owner: Any = None,
    large: list[pickle.PickleBuffer] | None = None,
    hook: Callable[[Any], Any] | None = None,
) -> tuple[bytes, list[int]]:
    """Pickles task arguments, collecting the ids of futures among them;
    futures of a client other than ``owner`` are refused. ``large`` and
    ``hook``: as for ``dumps``."""
    deps: list[int] = []
    # Re-entrant: a hook may put data on the cluster, pickling its own task.
    outer = _local.deps, _local.owner
    _local.deps = deps
    _local.owner = owner
    try:
        return dumps(args, large, hook), deps
    except ForeignFutureError:
        raise
    except Exception as e:
        raise TypeError(f"could not pickle {what}: {describe_unpicklable(args, e)}") from e
    finally:
        _local.deps, _local.owner = outer


def describe_unpicklable(args: Any, error: Exception) -> str:
    """Names the first argument (or ``map`` element) that cannot be pickled
    (error path only). ``args``: ``(positional, kwargs[, star])``."""
    if isinstance(args, tuple) and len(args) in (2, 3) and isinstance(args[1], dict | None):
        what = "element" if len(args) == 3 else "argument"
        items = [(f"{what} {i}", a) for i, a in enumerate(args[0])]
        items += [(f"keyword argument {k!r}", v) for k, v in (args[1] or {}).items()]
        for label, value in items:
            try:
                cloudpickle.dumps(value, protocol=PROTOCOL)
            except Exception as e:
                return f"{label} ({type(value).__name__}): {e}"
    return str(error)


def record_dependency(task_id: int, owner: Any = None, key: Any = None) -> bool:
    """Called by ``Future.__reduce__``: notes a dependency if pickling task
    arguments. A future of another client (``owner``) names a task of
    another cluster, or another client's id space: refused."""
    deps = _local.deps
    if deps is None:
        return False
    pickling_for = _local.owner
    if owner is not None and pickling_for is not None and owner is not pickling_for:
        raise ForeignFutureError(
            f"the future {key} belongs to another client; a task can only take futures of "
            "the client that submits it. Pass its value (future.result()) instead"
        )
    deps.append(task_id)
    return True


def record_held(client: Any, task_id: int) -> bool:
    """Called by ``Future.__reduce__``: notes a future of ``client`` found
    in a task's result being pickled (see ``frame_parts``); False when not
    pickling a result."""
    if _local.result_of is None or client is None:
        return False
    held = _local.held
    if held is None:
        held = _local.held = {}
    held.setdefault(client, []).append(task_id)
    return True


def adopt(task_id: int, group: str, key: Any, index: int | None) -> Any:
    """Unpickles a future that came inside a task's result: a future of
    this process's client (inside a task, the worker's), which claims the
    task from the scheduler (Ray's nested object refs)."""
    from . import _context

    return _context.get_client()._session.adopt(task_id, group, key, index)


class Ref:
    """A reference to a task's result inside task arguments: pickling it
    records the dependency; unpickling on the worker gives the value."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: int):
        self.task_id = task_id

    def __reduce__(self):
        if record_dependency(self.task_id):
            return (resolve, (self.task_id,))
        raise TypeError("a task reference can only be pickled as a task argument")


def set_inputs(inputs: dict[int, Any] | None) -> None:
    """Worker side: the values that future references resolve to."""
    _local.inputs = inputs


def resolve(task_id: int, index: int | None = None) -> Any:
    """Worker side: the value of an input (an element of a batch if ``index``)."""
    inputs = _local.inputs
    if inputs is None or task_id not in inputs:
        raise RuntimeError(
            "a shoal Future was unpickled outside of a task; pass futures as task "
            "arguments, or call .result() to get their values"
        )
    value = inputs[task_id]
    if index is None:
        return value
    if isinstance(value, list):  # a map batch without errors
        return value[index]
    return value.get(index)


def resolve_many(task_ids: list[int], batch: int, n: int) -> list[Any]:
    """Worker side: the values of a ``FutureList`` (``batch`` elements per task, 0: one)."""
    if not batch:
        return [resolve(tid) for tid in task_ids]
    out: list[Any] = []
    for tid in task_ids:
        value = resolve(tid)
        if isinstance(value, list):
            out += value
        else:
            out += [value.get(i) for i in range(len(value.values))]
    assert len(out) == n, (len(out), n)
    return out


class BatchResult:
    """Result of a ``map`` batch: values, and the errors of failed elements."""

    __slots__ = ("values", "errors")

    def __init__(self, values: list[Any], errors: dict[int, tuple[BaseException, str]]):
        self.values = values
        self.errors = errors

    def get(self, index: int) -> Any:
        err = self.errors.get(index)
        if err is not None:
            raise err[0]
        return self.values[index]

    def __reduce__(self):
        errors = {k: (box_exception(e), tb) for k, (e, tb) in self.errors.items()}
        return (BatchResult, (self.values, errors))


class _ExceptionBox:
    """Pickles an exception so that it always unpickles: to itself, or
    where its class cannot be loaded, to a ``RemoteError`` with its name
    and message (a task's error must not become a ``ModuleNotFoundError``
    that hides the task, the message and the traceback)."""

    __slots__ = ("data", "type_name", "message")

    def __init__(self, data: bytes, type_name: str, message: str):
        self.data, self.type_name, self.message = data, type_name, message

    def __reduce__(self):
        return (_unbox_exception, (self.data, self.type_name, self.message))


def _unbox_exception(data: bytes, type_name: str, message: str) -> BaseException:
    try:
        return pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - any failure: keep what we know
        return RemoteError(type_name, message, f"{type(e).__name__}: {e}")


def box_exception(exc: BaseException) -> Any:
    """``exc`` wrapped for pickling (see ``_ExceptionBox``)."""
    cls = type(exc)
    type_name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = repr(exc.args)
    try:
        data = dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be unpickled
    except Exception as e:  # noqa: BLE001
        data = dumps(RemoteError(type_name, message, f"it does not pickle: {e}"))
    return _ExceptionBox(data, type_name, message)
