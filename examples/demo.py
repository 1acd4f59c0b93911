"""Shoal's demo job: count the primes below a limit on the embedded cluster.

The range is split into blocks; each block is sieved by one task (``map``),
then the counts are summed by a binary tree of tasks that take futures as
arguments, so the whole reduction runs on the workers.

    python examples/demo.py --limit 5000000
"""

from __future__ import annotations

import argparse
import math
import time

import shoal


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi) by a segmented sieve."""
    if hi <= 2:
        return 0
    lo = max(lo, 2)
    small = [True] * (math.isqrt(hi) + 1)
    base = []
    for i in range(2, len(small)):
        if small[i]:
            base.append(i)
            for j in range(i * i, len(small), i):
                small[j] = False
    seg = bytearray([1]) * (hi - lo)
    for p in base:
        start = max(p * p, -(-lo // p) * p)
        seg[start - lo :: p] = bytes(len(range(start - lo, hi - lo, p)))
    return sum(seg)


def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5_000_000)
    parser.add_argument("--blocks", type=int, default=64)
    ns = parser.parse_args()
    t0 = time.perf_counter()
    with shoal.Client() as client:
        step = -(-ns.limit // ns.blocks)
        los = list(range(0, ns.limit, step))
        his = [min(lo + step, ns.limit) for lo in los]
        level = client.map(count_primes, los, his, batch_size=1)
        everything = [level]
        while len(level) > 1:
            nxt = [client.submit(add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
            everything.append(nxt)
        print(f"dashboard: {client.dashboard_link}")
        shoal.progress(everything, interval=0.1)  # a bar per task group
        total = level[0].result()
        print(f"primes below {ns.limit}: {total}")
        print(
            f"{len(los)} sieve tasks + tree reduction on {len(client.worker_pids)} workers "
            f"in {time.perf_counter() - t0:.2f}s"
        )


if __name__ == "__main__":
    main()
