"""Shared by the benchmark scripts: which runners can run here, and the
memory state a first run meets."""

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
