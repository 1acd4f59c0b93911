"""Faults during real work: random workers are SIGKILLed (or SIGSTOPped,
then SIGCONTed) 2 to 5 times a second while a workload runs, on Shoal and
on Dask distributed side by side. Reports, per runtime, workload and fault:
whether the result was right, how many faults were dealt, how many tasks
failed as ``KilledWorker``, and the time against the same run without
faults.

    python benches/bench_chaos.py [-n TASKS] [-r REPEATS] [--faults kill,stop]
        [--workloads map,array] [--runtimes shoal,dask]

Workloads: ``map`` (``client.map`` of 1 ms tasks, default batching, summed
by a tree of ``submit(add)``), ``array`` (a Dask array of 1 ms blocks,
``(x + 1).sum()``). Two worker processes of one thread each.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import threading
import time


def slow_inc(x):
    time.sleep(0.001)
    return x + 1


def add(a, b):
    return a + b


def slow_block(b):
    time.sleep(0.001)
    return b + 1


class Faults:
    """Deals one fault every 0.2 to 0.5 s to a random worker process."""

    def __init__(self, pids, kind: str, seed: int):
        self.pids, self.kind = pids, kind
        self.rng = random.Random(seed)
        self.dealt = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(self.rng.uniform(0.2, 0.5)):
            try:
                pids = self.pids()
            except Exception:  # noqa: BLE001 - a client busy recovering
                continue
            if not pids:
                continue
            pid = self.rng.choice(pids)
            try:
                if self.kind == "kill":
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(self.rng.uniform(0.1, 1.5))
                    os.kill(pid, signal.SIGCONT)
                self.dealt += 1
            except ProcessLookupError:
                pass

    def __enter__(self):
        if self.kind != "none":
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def workload_map(client, n: int, submit_tree, timeout: float) -> bool:
    fs = client.map(slow_inc, range(n))
    while len(fs) > 1:
        fs = [
            submit_tree(add, fs[i], fs[i + 1]) if i + 1 < len(fs) else fs[i]
            for i in range(0, len(fs), 2)
        ]
    return fs[0].result(timeout=timeout) == sum(range(1, n + 1))


def workload_array(client, n: int) -> bool:
    import dask
    import dask.array as da

    side = int(n**0.5)
    x = da.ones((side * 10, side * 10), chunks=10).map_blocks(slow_block, dtype=float)
    (total,) = dask.compute(x.sum(), scheduler=client.get)
    return total == 2.0 * (side * 10) ** 2


def run_one(runtime: str, workload: str, fault: str, n: int, seed: int, timeout: float) -> dict:
    if runtime == "shoal":
        import shoal

        client = shoal.Client(n_workers=2, threads_per_worker=1, dashboard_address=None)
        pids = lambda: client.worker_pids  # noqa: E731
        killed_error: type = shoal.KilledWorker
    else:
        from distributed import Client, KilledWorker, LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)

        def pids():  # the worker processes under the nannies
            return [p for w in list(cluster.workers.values()) if (p := getattr(w, "pid", None))]

        killed_error = KilledWorker
    try:
        client.submit(slow_inc, 1).result()  # warm: workers up
        ok, killed = False, 0
        with Faults(pids, fault, seed) as faults:
            t0 = time.perf_counter()
            try:
                if workload == "map":
                    ok = workload_map(client, n, client.submit, timeout)
                else:
                    ok = workload_array(client, n)
            except killed_error:
                killed = 1
            except TimeoutError:
                ok = False  # did not finish within the timeout
            elapsed = time.perf_counter() - t0
        return {"ok": ok, "killed": killed, "faults": faults.dealt, "time": elapsed}
    finally:
        client.close()
        if runtime != "shoal":
            cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=8192, help="tasks (elements or blocks) per run")
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--faults", default="kill,stop")
    ap.add_argument("--workloads", default="map,array")
    ap.add_argument("--runtimes", default="shoal,dask")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a map run may take")
    a = ap.parse_args()
    faults = ["none", *a.faults.split(",")]
    head = ("runtime", "workload", "fault", "right", "Killed", "faults", "time s", "lost s")
    print("{:8} {:8} {:6} {:>7} {:>7} {:>7} {:>8} {:>7}".format(*head))
    for workload in a.workloads.split(","):
        for runtime in a.runtimes.split(","):
            base = None
            for fault in faults:
                rows = [
                    run_one(runtime, workload, fault, a.n, seed, a.timeout)
                    for seed in range(a.repeats)
                ]
                t = statistics.median(r["time"] for r in rows)
                if fault == "none":
                    base = t
                right = sum(r["ok"] for r in rows)
                print(
                    f"{runtime:8} {workload:8} {fault:6} {right:>3}/{len(rows):<3} "
                    f"{sum(r['killed'] for r in rows):>7} "
                    f"{statistics.median(r['faults'] for r in rows):>7} {t:>8.2f} "
                    f"{t - (base or t):>7.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
