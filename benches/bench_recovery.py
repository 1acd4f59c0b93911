"""Recovery: time from a worker's SIGKILL to a 10,000-task graph completing.

    python benches/bench_recovery.py -r 3

The graph: 5,000 leaf tasks of 1 ms each, then a reduction tree of 4,999
additions (9,999 tasks). Each repeat runs it twice on a fresh cluster of 2
worker processes: undisturbed, and with one worker SIGKILLed when half the
leaves are done. Reported: the undisturbed run's time, the time from the
kill to the result, the time the undisturbed run took for the same
remainder (from its halfway point), and the difference (what the failure
cost: detection, re-running lost tasks, the replacement's start). Runs on
the embedded cluster and on `shoal scheduler`/`shoal worker` over TCP.
Medians of the repeats.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import shoal

LEAVES = 5000


def leaf(i):
    time.sleep(0.001)
    return i


def add(a, b):
    return a + b


def run(c: shoal.Client, kill: bool) -> tuple[float, float, float]:
    """Returns (total, halfway -> done, halfway time)."""
    t0 = time.perf_counter()
    leaves = list(c.map(leaf, range(LEAVES), batch_size=1))
    level = leaves
    while len(level) > 1:
        level = [
            c.submit(add, level[i], level[i + 1]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    done = 0
    for _ in shoal.as_completed(leaves):
        done += 1
        if done == LEAVES // 2:
            break
    half = time.perf_counter()
    if kill:
        victim = max(w["pid"] for w in c.scheduler_info()["workers"].values())
        os.kill(victim, signal.SIGKILL)
    assert level[0].result(timeout=600) == sum(range(LEAVES))
    end = time.perf_counter()
    return end - t0, end - half, half - t0


class Embedded:
    name = "embedded"

    def __enter__(self):
        self.c = shoal.Client(n_workers=2, set_as_default=False)
        return self.c

    def __exit__(self, *a):
        self.c.close()


class TCP:
    name = "tcp"

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="shoal-bench-")
        sfile = os.path.join(self.dir, "s.json")
        cmd = [sys.executable, "-m", "shoal"]
        self.procs = [
            subprocess.Popen(
                [*cmd, "scheduler", "--port", "0", "--scheduler-file", sfile],
                stdout=subprocess.DEVNULL,
            )
        ]
        while not os.path.exists(sfile):
            time.sleep(0.05)
        self.procs.append(
            subprocess.Popen(
                [*cmd, "worker", "--scheduler-file", sfile, "--nworkers", "2"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.c = shoal.Client(scheduler_file=sfile, set_as_default=False)
        while len(self.c.scheduler_info()["workers"]) < 2:
            time.sleep(0.05)
        return self.c

    def __exit__(self, *a):
        self.c.close()
        for p in reversed(self.procs):
            p.terminate()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ns = ap.parse_args()
    head = ("cluster", "undisturbed", "kill->done", "same, no kill", "cost")
    print("{:9s} {:>12s} {:>11s} {:>14s} {:>7s}".format(*head))
    for kind in (Embedded, TCP):
        rows = []
        for _ in range(ns.repeats):
            with kind() as c:
                run(c, False)  # warm-up: imports, duration estimates
                total, rest, _ = run(c, False)
            with kind() as c:
                run(c, False)
                _, after_kill, _ = run(c, True)
            rows.append((total, after_kill, rest))
        total = statistics.median(r[0] for r in rows)
        after = statistics.median(r[1] for r in rows)
        rest = statistics.median(r[2] for r in rows)
        print(f"{kind.name:9s} {total:11.2f}s {after:10.2f}s {rest:13.2f}s {after - rest:6.2f}s")


if __name__ == "__main__":
    main()
