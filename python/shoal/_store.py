"""A worker's results: in memory, in shared memory, or spilled to disk.

Small results travel inline to the scheduler. A large one stays here in one
of three forms, all reachable by id:

* a live Python object (``objects``): array-like results stay so until a
  peer or client asks for them (most are consumed where they were made);
* a file in this process's shared-memory directory (``/dev/shm``): peers and
  clients on this host map it, read-only, without copying. An object
  exported for a peer is let go (the data is then in memory once); a task
  here that reads it later maps the file, and that view is kept. A result
  pickled when it was made (a dict of DataFrames: a shuffle's groups) keeps
  its object beside the file for the tasks here that read it (``copies``),
  until memory runs short;
* a file in the spill directory, once the memory manager needed the room.

Large NumPy arrays made in a worker's task threads are in shared memory from
the start (``shoal_runtime::shm_pool``, through a NumPy memory handler): a
result whose one buffer lies in such a block is exported by writing its
frame header into the block's first page and naming the file, not by
copying it. ``SHOAL_SHM_ALLOC=0`` turns that off (arrays then live in
ordinary memory and are copied into shared memory when first exported).

The memory manager thread follows Dask's fractions of the worker's memory
limit: above 60 % of it in managed results, or 70 % in process memory, it
spills the least recently used results; above 80 % the worker pauses (the
scheduler gives it no work and takes back what it queued); above 95 % it
restarts itself, deliberately, before the kernel's OOM killer picks a
victim: its tasks and results are recovered as for any lost worker.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import shutil
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

from . import _core, _puts, _serialize
from ._core import INLINE_LIMIT

# The memory rules (spill, pause and restart at fractions of the limit)
# are shoal-core's (`shoal_core::memory`): this store measures and acts.
TERMINATE = _core.MemoryPolicy.TERMINATE

_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_memory(text: str | int | float | None, share: float = 1.0) -> int | None:
    """A memory limit: bytes, ``"4GB"``/``"512MiB"``, a fraction of the
    host's memory (``0.5``), ``"auto"`` (``share`` of the host), or
    ``0``/``"none"`` for no limit."""
    if text is None or text == "auto":
        return int(host_memory() * share)
    if isinstance(text, int | float):
        value = float(text)
    else:
        t = text.strip().lower()
        if t in ("0", "none", ""):
            return None
        m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(i?)b?", t)
        if not m:
            raise ValueError(
                f"memory limit {text!r} is not understood: give bytes, a size such as "
                "'4GB' or '512MiB', a fraction of the host's memory such as 0.5, "
                "'auto', or 'none'"
            )
        scale = _UNITS[m.group(2)]
        if m.group(3):
            scale = 1024 ** ("kmgt".index(m.group(2)) + 1)
        value = float(m.group(1)) * scale
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"memory limit {text!r} must be a size of 0 (no limit) or more, a fraction "
            "such as 0.5, 'auto' or 'none'"
        )
    if value == 0:
        return None
    if value <= 1:
        return int(host_memory() * value)
    return int(value)


def host_memory() -> int:
    """The memory this host (or our cgroup, if less) has, in bytes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as fh:
                total = min(total, int(fh.read().strip()))
    return total


ALLOC_MIN = 1 << 20  # smaller NumPy allocations stay in ordinary memory
SPARE_MAX = 256 << 20  # freed shared-memory blocks kept for reuse, per worker


def rss_anon() -> int:
    """This process's private resident memory (shared segments excluded:
    those it owns are counted by size, those of peers by their owners)."""
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _references(obj: Any) -> int:
    return sys.getrefcount(obj)


def _calibrate() -> tuple[int, int]:
    """References a result has at ``Store.finish`` when nothing but the
    task's return holds it, and an array base held only by its view: the
    same call chain, measured (interpreters count differently)."""

    class View:
        base: Any = None

    def sole(result: Any) -> int:  # sole_reference's place
        return _references(result)

    def finish(result: Any) -> int:
        return sole(result)

    def execute() -> int:
        result = object()
        return finish(result)

    v = View()
    v.base = object()
    base = v.base
    return execute(), _references(base)


_SOLE, _SOLE_BASE = _calibrate()


def sole_reference(result: Any) -> bool:
    """Whether nothing outside the finished task holds ``result`` or the
    arrays whose memory it views (an actor's state, a cache, a global):
    only then may its memory be published to consumers in place, since no
    one can write it afterwards. Call as ``Store.finish`` does."""
    if _references(result) > _SOLE:
        return False
    base = getattr(result, "base", None)
    while base is not None:
        if _references(base) > _SOLE_BASE:
            return False
        base = getattr(base, "base", None)
    return True


_CONTAINERS = (dict, tuple, list)


class Store:
    """Large results of one worker process, and its memory manager."""

    def __init__(
        self,
        core: Any,
        memory_limit: int | None,
        local_directory: str | None,
        in_process: bool = False,
    ):
        self.core = core
        # In a client's own process (LocalCluster(processes=False)): past
        # the limit it pauses and warns instead of ending the process.
        self.in_process = in_process
        self._heap_trimmed = 0.0  # time.monotonic() of the last trim under pressure
        self.policy = _core.MemoryPolicy(memory_limit or 0, not in_process)
        self.closed = threading.Event()
        self._warned = False
        self.limit = memory_limit
        self.local_directory = local_directory
        self.lock = threading.RLock()
        self.objects: dict[int, Any] = {}
        self.files: dict[int, tuple[str, int, bool]] = {}  # id -> (path, length, on disk)
        # Held results something else also holds: copied when exported,
        # never published in place (their producer may write them later).
        self.shared: set[int] = set()
        # Held results whose object is kept beside its shared-memory file
        # (not a view of it): the first to go when memory runs short.
        self.copies: set[int] = set()
        # Held put files, and where each goes back to once let go (`_puts`).
        self.homes: dict[int, str] = {}
        self.returns = _puts.Returns(min((memory_limit or 4 << 30) // 8, SPARE_MAX))
        # Held results that cannot be pickled (a generator): usable by tasks
        # here only; fetches from elsewhere fail with the reason. Never
        # spilled (they cannot be written), so not in `managed`.
        self.unpicklable: dict[int, str] = {}
        self.managed: OrderedDict[int, int] = OrderedDict()  # in memory, LRU first
        self.managed_bytes = 0
        self.shm_bytes = 0  # our segments' sizes
        self.disk_bytes = 0  # results on disk now
        self.spilled_total = 0  # bytes ever written to disk spilling
        self.paused = False
        self._spill_dir: str | None = None
        self._io = threading.Lock()  # one export or spill at a time
        segment_dir()  # now: its first call empties a stale one
        self._checking = threading.Lock()
        # Bytes stored since the last check, and how many call for one at
        # once (the monitor thread checks every 50 ms anyway): a check reads
        # /proc and costs about 100 us, more than many small tasks.
        self._unchecked = 0
        self._check_every = (memory_limit or 4 << 30) // 64
        self._alloc_lock = threading.Lock()
        self.numpy_allocator = _core.setting("SHOAL_SHM_ALLOC").lower() not in (
            "0",
            "off",
            "no",
            "false",
        )

    # ----------------------------------------------------------- directories

    def seg_dir(self) -> str:
        return segment_dir()

    def spill_dir(self) -> str:
        if self._spill_dir is None:
            self._spill_dir = _core.spill_dir(self.local_directory)
        return self._spill_dir

    def use_numpy_allocator(self) -> bool:
        """Makes NumPy in the calling thread take large arrays from shared
        memory (installing the handler on first use; NumPy must be imported).
        False if it is off or cannot be installed (said once on stderr)."""
        if not self.numpy_allocator:
            return False
        try:
            with self._alloc_lock:
                limit = self.limit or host_memory() // 2
                # Freed blocks kept for reuse: an eighth of the limit, at most
                # 256 MiB. A block made anew fills at 8 GiB/s here (32 ms for
                # 256 MiB), while kept ones sit idle in one worker as another
                # makes its own: 1 GiB kept per worker held a transfer's peak
                # 14-22 % above Dask threads' for 1.5x its speed; 256 MiB holds
                # it level at 1.3x (bench_data.py transfer).
                spare = min(limit // 8, SPARE_MAX)
                if _core.shm_allocator_stats() is None:  # not installed yet
                    if not _core.shm_allocator_install(self.seg_dir(), ALLOC_MIN, limit, spare):
                        self.numpy_allocator = False
                        return False
                    # A child a task forks gets private copies, as fork promises.
                    os.register_at_fork(after_in_child=_core.shm_allocator_forked)
            return _core.shm_allocator_use()
        except Exception as e:  # noqa: BLE001 - ordinary memory still works
            self.numpy_allocator = False
            sys.stderr.write(
                f"shoal worker {os.getpid()}: NumPy arrays stay in private memory: {e}\n"
            )
            return False

    def close(self) -> None:
        """Removes this process's segments and spilled data (in a client's
        process only the spilled data: the segments are the process's,
        removed when it exits)."""
        self.closed.set()
        self.returns.trim(everything=True)
        dirs = (self._spill_dir,) if self.in_process else (_dirs.get(os.getpid()), self._spill_dir)
        for d in dirs:
            if d:
                shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------- results

    def finish(self, tid: int, result: Any, size: int | None, name: str = "") -> tuple[Any, int]:
        """Stores a task's result; returns ``(payload, size)`` for the report:
        the pickle (small: travels inline), the path of its shared-memory
        file, or None (kept as the Python object). ``size``: the result's
        buffer size if it is array-like (kept unpickled when large). A
        result that cannot be pickled is kept as the object, as distributed
        does: tasks here use it, fetches from elsewhere fail saying why."""
        if type(result) is Adopted:
            return self._adopt(tid, result)
        if size is not None and size > INLINE_LIMIT:
            # A container's items may be held elsewhere too (and written
            # there later): never published in place.
            sole = not isinstance(result, _CONTAINERS) and sole_reference(result)
            with self.lock:
                self.objects[tid] = result
                if not sole:
                    self.shared.add(tid)
                self._account(tid, size)
            self._stored(size)
            return None, size
        try:
            parts, length, oob = _serialize.frame_parts(result, tid)
        except Exception as e:  # noqa: BLE001 - any pickling failure
            why = (
                f"the result of task {name or hex(tid)!r} ({type(result).__name__}) could not be "
                f"pickled, so it can be used only by tasks on the worker that made it: {e}"
            )
            with self.lock:
                self.objects[tid] = result
                self.unpicklable[tid] = why
            # A size, however rough, so that the scheduler prefers this
            # worker for its consumers (it places by bytes held).
            return None, max(1, sys.getsizeof(result))
        if length <= INLINE_LIMIT:
            return (parts[0] if len(parts) == 1 else b"".join(parts)), length
        # A container's arrays may be held elsewhere too: copied.
        path, _, length = self._write_segment(tid, parts, length, oob, in_place=False)
        with self.lock:
            # The object stays for the tasks here that read it (mapping it
            # back would unpickle every DataFrame in it again: a tenth of a
            # shuffle's worker time), the file for peers.
            self.objects[tid] = result
            self.copies.add(tid)
            self._account(tid, length)
        self._stored(length)
        return path, length

    def _adopt(self, tid: int, a: Adopted) -> tuple[Any, int]:
        path = os.path.join(self.seg_dir(), f"{tid:x}")
        os.rename(a.path, path)  # same file system: no copy
        with self.lock:
            self.files[tid] = (path, a.length, False)
            self.homes[tid] = _puts.returned_dir(os.path.dirname(a.path))
            self.shm_bytes += a.length
            self.objects[tid] = _serialize.load_file(path)
            self._account(tid, a.length)
        self._stored(a.length)
        return path, a.length

    def _write_segment(
        self, tid: int, parts: list[Any], length: int, oob: bool, in_place: bool = True
    ) -> tuple[str, bool, int]:
        """Puts a frame (``length`` bytes) in a shared-memory file: its
        buffer's own block where it lies in one, else a copy (to disk if
        shared memory is full); records it. Returns the path, whether it is
        on disk, and the frame's length in the file."""
        path = os.path.join(self.seg_dir(), f"{tid:x}")
        on_disk = False
        published = self._publish_in_place(path, parts) if oob and in_place else None
        if published is not None:
            length = published
        elif not self._copy_into_pool(path, parts, length):
            try:
                _serialize.write_file(path, parts)
            except OSError:  # /dev/shm full (small in containers): use the disk
                path = os.path.join(self.spill_dir(), f"{tid:x}")
                _serialize.write_file(path, parts)
                on_disk = True
        with self.lock:
            self.files[tid] = (path, length, on_disk)
            if on_disk:
                self.disk_bytes += length
            else:
                self.shm_bytes += length
        return path, on_disk, length

    def _copy_into_pool(self, path: str, parts: list[Any], length: int) -> bool:
        """Copies a frame into a recycled shared-memory block named
        ``path`` (faster than a new file's fresh pages); False if the pool
        does not take it (off, too small, a non-contiguous buffer, full)."""
        if not self.numpy_allocator:
            return False
        try:
            views = [p if type(p) is bytes else memoryview(p).cast("B") for p in parts]
            return _core.shm_publish_frame(path, views) is not None
        except (TypeError, ValueError, BufferError, OSError):
            return False

    def _publish_in_place(self, path: str, parts: list[Any]) -> int | None:
        """Names the shared-memory block holding a frame's one buffer
        ``path``, the frame's header written before the buffer; returns the
        frame's length, or None if the buffer is not in a block."""
        if not self.numpy_allocator:
            return None
        where = _core.shm_locate(parts[-1])
        if where is None:
            return None
        key, offset = where
        head = _serialize.in_place_head(parts, offset)
        if head is None or not _core.shm_publish(key, path, head[0]):
            return None
        return offset + head[1].nbytes

    def _stored(self, size: int) -> None:
        """A result of ``size`` bytes was stored: the memory fractions are
        applied at once if what was stored since they last were is a
        sizable part of the limit (1/64: 8 MiB of 512 MiB)."""
        self._unchecked += size
        if self._unchecked >= self._check_every:
            self.check()

    def _account(self, tid: int, size: int) -> None:
        old = self.managed.pop(tid, 0)
        self.managed[tid] = size
        self.managed_bytes += size - old

    def get(self, tid: int) -> Any:
        """A result this worker holds, as an input of a task here."""
        with self.lock:
            obj = self.objects.get(tid, _MISSING)
            if obj is not _MISSING:
                if tid in self.managed:
                    self.managed.move_to_end(tid)
                return obj
            f = self.files.get(tid)
        if f is None:
            # Copied here by the Rust side from a retiring worker.
            found = self.core.stored_file(tid)
            if found is None:
                raise RuntimeError(f"this worker lost the result of task {tid:x}")
            f = (found[0], found[1], False)
        # Exported or spilled: map the file (read-only views). A view of
        # shared memory is kept for the next reader (it holds no second
        # copy); one of a spill file is not (the point was to free memory).
        obj = _serialize.load_file(f[0])
        if not f[2]:
            with self.lock:
                if self.files.get(tid) == f and tid not in self.objects:
                    self.objects[tid] = obj
        return obj

    def export(self, tid: int, replaced: list[Any]) -> tuple[str, int] | None:
        """A peer or client asks for a held result: writes it to shared
        memory (once), swaps the object for a view of it; returns the file.
        The object swapped out goes to ``replaced``, for the caller to drop
        once it has answered (unmapping a large array takes milliseconds:
        30 ms per GiB)."""
        with self._io:
            return self._export(tid, replaced)

    def _export(self, tid: int, replaced: list[Any]) -> tuple[str, int] | None:
        with self.lock:
            f = self.files.get(tid)
            if f is not None:
                return f[0], f[1]
            obj = self.objects.get(tid, _MISSING)
        if obj is _MISSING:
            return None
        parts, length, oob = _serialize.frame_parts(obj, tid)
        in_place = tid not in self.shared
        path, on_disk, length = self._write_segment(tid, parts, length, oob, in_place)
        with self.lock:
            if tid not in self.objects:  # released meanwhile
                self._drop_file(tid)
                return None
            if oob and not on_disk:
                # The data is in the file now: the object goes. Mapping it
                # back waits for a task here that reads it (``get``); most
                # exported results are read only where they were sent.
                replaced.append(self.objects.pop(tid))
                self.copies.discard(tid)
        return path, length

    def frame(self, tid: int) -> list[Any] | None:
        """A held result's frame for a transfer to another host: its parts,
        buffers not copied (sent from where they lie: no shared-memory file
        is made for a peer that cannot map it). None if it is no longer held
        as an object here, or if its one buffer lies in a shared-memory
        block: that one is published in place instead (``export``), and the
        kernel sends the block's pages with no copy at all."""
        with self.lock:
            obj = self.objects.get(tid, _MISSING)
        if obj is _MISSING:
            return None
        parts, _, oob = _serialize.frame_parts(obj, tid)
        if oob and self.numpy_allocator and _core.shm_locate(parts[-1]) is not None:
            return None
        return [p if type(p) is bytes else memoryview(p).cast("B") for p in parts]

    def release(self, ids: list[int]) -> None:
        with self.lock:
            for tid in ids:
                self.objects.pop(tid, None)
                self.shared.discard(tid)
                self.copies.discard(tid)
                self.unpicklable.pop(tid, None)
                size = self.managed.pop(tid, None)
                if size is not None:
                    self.managed_bytes -= size
                self._drop_file(tid)

    def _drop_file(self, tid: int) -> None:
        f = self.files.pop(tid, None)
        home = self.homes.pop(tid, None)
        if f is None:
            return
        path, length, on_disk = f
        if on_disk:
            self.disk_bytes -= length
        else:
            self.shm_bytes -= length
            if home is not None and self.returns.give_back(path, length, home):
                return  # a put's file: its client writes the next put into it
            if self.numpy_allocator and _core.shm_unpublish(path):
                return  # a block of the pool's: renamed, reused once unread
        with contextlib.suppress(OSError):
            os.unlink(path)

    # ----------------------------------------------------------- memory

    def process_memory(self) -> int:
        pool = _core.shm_allocator_stats()
        return rss_anon() + self.shm_bytes + (pool[0] + pool[1] if pool else 0)

    def drop_copies(self) -> int:
        """Lets go of the objects kept beside their shared-memory files
        (readers here map the files instead); returns how many."""
        with self.lock:
            dropped = [self.objects.pop(tid, None) for tid in self.copies]
            self.copies.clear()
        return len(dropped)

    def spill_one(self) -> bool:
        """Moves the least recently used in-memory result to disk; False if
        there is none."""
        with self._io:
            return self._spill_one()

    def _spill_one(self) -> bool:
        with self.lock:
            if not self.managed:
                return False
            tid, size = next(iter(self.managed.items()))
            obj = self.objects.get(tid, _MISSING)
            f = self.files.get(tid)
        if f is not None and f[2]:
            # Already on disk (written there when shared memory was full):
            # only the object in memory goes.
            with self.lock:
                if self.managed.pop(tid, None) is not None:
                    self.managed_bytes -= size
                self.objects.pop(tid, None)
                self.copies.discard(tid)
            return True
        path = os.path.join(self.spill_dir(), f"{tid:x}")
        start_us, t0 = int(time.time() * 1e6), time.perf_counter()
        if obj is not _MISSING:
            # Compressed where it pays (see `compressed_parts`).
            parts, length, _ = _serialize.frame_parts(obj, tid)
            z = _serialize.compressed_parts(parts, length)
            if z is not None:
                parts = z
                length = sum(memoryview(p).nbytes for p in z)
            _serialize.write_file(path, parts)
        elif f is not None:
            shutil.copyfile(f[0], path)  # kernel copy, GIL released
            length = f[1]
        else:  # nothing to write: forget it, or the loop would spin
            with self.lock:
                if self.managed.pop(tid, None) is not None:
                    self.managed_bytes -= size
            return True
        with self.lock:
            if tid not in self.managed:  # released meanwhile
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return True
            self._drop_file(tid)
            self.files[tid] = (path, length, True)
            self.objects.pop(tid, None)
            self.copies.discard(tid)
            self.managed_bytes -= self.managed.pop(tid)
            self.disk_bytes += length
            self.spilled_total += length
        duration_us = int((time.perf_counter() - t0) * 1e6)
        self.core.record_activity("spill", tid, length, start_us, duration_us)
        # Transfers now read the spill file (a fetch that got the old path
        # finds it gone and asks again).
        self.core.put_stored(tid, (path, length))
        return True

    def check(self) -> None:
        """Applies the memory fractions once (after results adding up to a
        sizable part of the limit, see ``_stored``, and every 50 ms from
        the monitor thread), and hands the figures to the heartbeat."""
        if not self._checking.acquire(blocking=False):
            return
        self._unchecked = 0
        try:
            _core.shm_allocator_trim(5.0)  # blocks not reused within 5 s
            self.returns.trim()  # put files no put took back within 5 s
            proc = self._check() if self.limit else self.process_memory()
            self.core.set_metrics(
                proc,
                self.managed_bytes,
                self.disk_bytes,
                self.limit or 0,
                self.paused,
                self.spilled_total,
            )
        finally:
            self._checking.release()

    def _check(self) -> int:
        decide = self.policy.decide
        proc = self.process_memory()
        d = decide(proc, self.managed_bytes)
        # Freed shared-memory blocks kept for reuse go first, then objects
        # kept beside their files, and the C heap's free memory.
        if d.trim:
            freed = _core.shm_allocator_trim(0.0) + self.drop_copies()
            if self._trim_heap() or freed:
                proc = self.process_memory()
                d = decide(proc, self.managed_bytes)
        if d.past_restart:
            self._terminate(proc, d.restart)
        while d.spill and self.spill_one():
            if d.trim:  # the spilled array's block is not kept
                _core.shm_allocator_trim(0.0)
            proc = self.process_memory()
            d = decide(proc, self.managed_bytes)
        paused = d.pause
        if paused != self.paused:
            self.paused = paused
            self.core.set_paused(paused)
        return proc

    def _trim_heap(self) -> bool:
        # A worker process's only (a client's process is its user's), and
        # at most every second: with nothing to return it still walks the
        # heap.
        now = time.monotonic()
        if self.in_process or now - self._heap_trimmed < 1.0:
            return False
        self._heap_trimmed = now
        return _core.malloc_trim()

    def _terminate(self, proc: int, restart: bool) -> None:
        if not restart:
            # No nanny to start a fresh process: stay paused, say so once.
            if not self._warned:
                self._warned = True
                sys.stderr.write(
                    f"shoal: this process's memory {proc / 2**30:.2f} GiB is above "
                    f"{TERMINATE:.0%} of its workers' limit ({self.limit / 2**30:.2f} GiB); "
                    "workers in the client's process cannot be restarted "
                    "(LocalCluster(processes=True) can)\n"
                )
            return
        sys.stderr.write(
            f"shoal worker {os.getpid()}: process memory {proc / 2**30:.2f} GiB is above "
            f"{TERMINATE:.0%} of its limit ({self.limit / 2**30:.2f} GiB); restarting it "
            "(its tasks run again elsewhere). Give workers more memory (memory_limit=) "
            "or make tasks smaller.\n"
        )
        sys.stderr.flush()
        self.close()
        os._exit(70)

    def monitor(self) -> None:
        """Thread: applies the memory fractions every 50 ms (with a limit;
        otherwise only measures, twice a second)."""
        interval = 0.05 if self.limit else 0.5
        while not self.closed.wait(interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the monitor must keep running
                traceback.print_exc()


_MISSING = object()

_dirs: dict[int, str] = {}  # pid -> segment directory


def segment_dir() -> str:
    """This process's shared-memory directory (created on first use; the
    worker's store and a client in the same process share it)."""
    pid = os.getpid()
    d = _dirs.get(pid)
    if d is None:
        d = _dirs[pid] = _core.segment_dir()
        atexit.register(shutil.rmtree, d, True)
    return d


def put_task(arg: tuple) -> Any:
    """The task of ``Client.scatter``: ``("file", path, length)`` is a file
    the client wrote in shared memory (this worker takes it over),
    ``("bytes", pickle)`` the data itself."""
    if arg[0] == "file":
        return Adopted(arg[1], arg[2])
    return _serialize.loads(arg[1])


class Adopted:
    """A task's result that is a file already written in shared memory
    (``scatter``): the worker takes the file over instead of copying it."""

    __slots__ = ("path", "length")

    def __init__(self, path: str, length: int):
        self.path = path
        self.length = length
