"""Shared by the benchmark scripts: which runners can run here, the
memory state a first run meets, and how much memory a runner holds."""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def available(own: list, peers: list[tuple[type, str]]) -> list:
    """``own`` runners, then each peer runner whose module imports (a peer
    that is not installed is skipped, and said so)."""
    out = list(own)
    for cls, mod in peers:
        try:
            __import__(mod)
            out.append(cls)
        except ImportError:
            print(f"({cls.name} not installed: skipped)")
    return out


PIECE = 64 * 2**20  # bytes


def warm(gib: float, threads: int = 2) -> tuple[float, float]:
    """Fills and frees ``gib`` GiB of anonymous memory (NumPy, huge pages
    where THP allows) and as much huge shared memory, in 64 MiB pieces on
    ``threads`` threads; returns the rates seen (GiB/s)."""
    import numpy as np

    n = max(1, int(gib * 16))

    # Each piece is held until all are made, so the whole amount is touched.
    def anon(_):
        return np.full(PIECE // 8, 1.0)

    def shm(_):
        from shoal import _core

        with open(f"/dev/shm/bench-warm-{os.getpid()}-{threading.get_ident()}", "w+b") as fh:
            os.unlink(fh.name)
            _core.shm_reserve(fh.fileno(), PIECE)
            m = mmap.mmap(fh.fileno(), PIECE)
        a = np.frombuffer(m, dtype=np.float64)
        a[:] = 1.0
        return a, m

    rates = []
    for fn in (anon, shm):
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            held = list(ex.map(fn, range(n)))
        rates.append(n * PIECE / 2**30 / (time.perf_counter() - t))
        del held
    return rates[0], rates[1]


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def _read_field(path: str, field: bytes) -> int:
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _sys_used() -> int:
    total_kb = _read_field("/proc/meminfo", b"MemTotal:")
    avail_kb = _read_field("/proc/meminfo", b"MemAvailable:")
    return (total_kb - avail_kb) * 1024


class Sampler:
    """Samples a runner's memory and disk writes in a thread (or not at all
    if not ``enabled``), every 20 ms and once more when asked (``sample``:
    a transfer's consuming phase lasts about 15 ms, less than the interval,
    so the interval alone missed part of the peak of the runner that frees
    soonest).

    A runner's processes are this one and every one below it.

    ``peak_pss``: the peak of the summed proportional set size (shared pages
    divided among the processes that map them, so shared memory counts once;
    an RSS sum would count a segment once per process mapping it).
    ``peak_sys``: the peak of the host's used memory (MemTotal -
    MemAvailable, which counts shared memory files too) above its level at
    the start. ``written``: the processes' ``write_bytes`` (bytes dirtied for
    storage; tmpfs and sockets excluded)."""

    current: Sampler | None = None

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stop = threading.Event()
        self.peak_pss = 0
        self.paused = 0.0  # seconds a runner waited for samples it asked for
        self.sys_base = _sys_used()
        self.peak_sys = 0
        self.writes: dict[int, int] = {}
        self.writes_base: dict[int, int] = {}
        for p in descendants(os.getpid()):
            self.writes_base[p] = _read_field(f"/proc/{p}/io", b"write_bytes:")

    def sample(self) -> None:
        pss = 0
        for p in descendants(os.getpid()):
            pss += _read_field(f"/proc/{p}/smaps_rollup", b"Pss:") * 1024
            w = _read_field(f"/proc/{p}/io", b"write_bytes:")
            self.writes[p] = max(self.writes.get(p, 0), w)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_sys = max(self.peak_sys, _sys_used() - self.sys_base)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.02)

    def __enter__(self):
        if self.enabled:
            Sampler.current = self
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *a):
        if self.enabled:
            Sampler.current = None
            self.sample()
            self.stop.set()
            self.thread.join()

    @property
    def written(self) -> int:
        return sum(w - self.writes_base.get(p, 0) for p, w in self.writes.items())
