"""Shoal beside its peers, in one run: medians and ratios.

    python benches/bench.py                  # all workloads, 3 repeats
    python benches/bench.py -w tiny tree -r 5

Peers: concurrent.futures.ProcessPoolExecutor, multiprocessing.Pool, Dask
distributed (LocalCluster, processes) and Ray, each when installed (optional:
``pip install shoal[bench]``). ``shoal-tcp`` is Shoal as a multi-host
cluster on this host: ``shoal scheduler`` on loopback TCP and ``shoal
worker`` processes (the cost of TCP, authentication and heartbeats against
the embedded cluster's Unix sockets); ``shoal-tls`` the same with TLS;
``shoal-journal`` the same with ``shoal scheduler --journal``.
Every runner uses 2 worker processes with one thread each. Figures are
tasks/s (higher is better) or seconds (lower is better).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

from _peers import available

N_WORKERS = 2


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def spin(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


# Each runner: name -> {workload: fn() -> (measured value)}; setup is excluded
# except for `startup`.


class Shoal:
    name = "shoal"

    def __enter__(self):
        import shoal

        self.shoal = shoal
        self.c = shoal.Client(n_workers=N_WORKERS)
        self.c.submit(inc, 1).result()
        return self

    def __exit__(self, *a):
        self.c.close()

    def tiny(self, n):
        fs = [self.c.submit(inc, i) for i in range(n)]
        self.c.gather(fs)

    def map(self, n):
        self.c.gather(self.c.map(inc, range(n)))

    def tree(self, leaves):
        level = [self.c.submit(inc, i) for i in range(leaves)]
        while len(level) > 1:
            level = [self.c.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
        level[0].result()

    def gil(self, k, s):
        self.c.gather([self.c.submit(spin, s) for _ in range(k)])

    @staticmethod
    def startup():
        import shoal

        with shoal.Client(n_workers=N_WORKERS) as c:
            c.submit(inc, 1).result()


class ShoalTCP(Shoal):
    name = "shoal-tcp"
    tls = False
    journal = False

    def __enter__(self):
        import json
        import os
        import subprocess
        import sys
        import tempfile

        import shoal

        self.shoal = shoal
        self.dir = tempfile.mkdtemp(prefix="shoal-bench-")
        sfile = os.path.join(self.dir, "scheduler.json")
        cmd = [sys.executable, "-m", "shoal"]
        extra = []
        if self.tls:
            certs = os.path.join(self.dir, "certs")
            subprocess.run([*cmd, "certs", certs], check=True, stdout=subprocess.DEVNULL)
            for flag, name in [("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem")]:
                extra += [f"--tls-{flag}", os.path.join(certs, name)]
        if self.journal:
            extra += ["--journal", os.path.join(self.dir, "journal")]
        self.procs = [
            subprocess.Popen(
                [*cmd, "scheduler", "--port", "0", "--scheduler-file", sfile, *extra],
                stdout=subprocess.DEVNULL,
            )
        ]
        while not os.path.exists(sfile):
            time.sleep(0.05)
        self.procs.append(
            subprocess.Popen(
                [*cmd, "worker", "--scheduler-file", sfile, "--nworkers", str(N_WORKERS)],
                stdout=subprocess.DEVNULL,
            )
        )
        self.c = shoal.Client(scheduler_file=sfile, set_as_default=False)
        while len(self.c.scheduler_info()["workers"]) < N_WORKERS:
            time.sleep(0.05)
        scheme = "tls://" if self.tls else "tcp://"
        assert json.load(open(sfile))["address"].startswith(scheme)
        self.c.submit(inc, 1).result()
        return self

    def __exit__(self, *a):
        import shutil

        self.c.close()
        for p in reversed(self.procs):
            p.terminate()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    startup = None


class ShoalTLS(ShoalTCP):
    name = "shoal-tls"
    tls = True


class ShoalJournal(ShoalTCP):
    """``shoal-tcp`` with ``shoal scheduler --journal``."""

    name = "shoal-journal"
    journal = True


class PPE:
    name = "ProcessPoolExecutor"

    def __enter__(self):
        self.ex = cf.ProcessPoolExecutor(N_WORKERS)
        self.ex.submit(inc, 1).result()
        return self

    def __exit__(self, *a):
        self.ex.shutdown()

    def tiny(self, n):
        fs = [self.ex.submit(inc, i) for i in range(n)]
        [f.result() for f in fs]

    def map(self, n):
        list(self.ex.map(inc, range(n), chunksize=max(1, n // (4 * N_WORKERS))))

    tree = None

    def gil(self, k, s):
        [f.result() for f in [self.ex.submit(spin, s) for _ in range(k)]]

    @staticmethod
    def startup():
        with cf.ProcessPoolExecutor(N_WORKERS) as ex:
            ex.submit(inc, 1).result()


class Pool:
    name = "multiprocessing.Pool"

    def __enter__(self):
        self.p = mp.Pool(N_WORKERS)
        self.p.apply(inc, (1,))
        return self

    def __exit__(self, *a):
        self.p.terminate()

    def tiny(self, n):
        rs = [self.p.apply_async(inc, (i,)) for i in range(n)]
        [r.get() for r in rs]

    def map(self, n):
        self.p.map(inc, range(n))

    tree = None

    def gil(self, k, s):
        self.p.map(spin, [s] * k, chunksize=1)

    @staticmethod
    def startup():
        with mp.Pool(N_WORKERS) as p:
            p.apply(inc, (1,))


class Dask:
    name = "dask.distributed"

    def __enter__(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.c = Client(self.cluster)
        self.c.submit(inc, 1).result()
        return self

    def __exit__(self, *a):
        self.c.close()
        self.cluster.close()

    def tiny(self, n):
        self.c.gather([self.c.submit(inc, i, pure=False) for i in range(n)])

    def map(self, n):
        # distributed's client.map makes one task per element; a bag is
        # Dask's batched idiom for a large map (4 partitions per worker).
        import dask.bag as db

        db.from_sequence(range(n), npartitions=4 * N_WORKERS).map(inc).compute(scheduler=self.c.get)

    def tree(self, leaves):
        level = [self.c.submit(inc, i, pure=False) for i in range(leaves)]
        while len(level) > 1:
            level = [
                self.c.submit(add, level[i], level[i + 1], pure=False)
                for i in range(0, len(level), 2)
            ]
        level[0].result()

    def gil(self, k, s):
        self.c.gather([self.c.submit(spin, s, pure=False) for _ in range(k)])

    @staticmethod
    def startup():
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cl,
            Client(cl) as c,
        ):
            c.submit(inc, 1).result()


class Ray:
    name = "ray"

    def __enter__(self):
        import ray

        self.ray = ray
        ray.init(num_cpus=N_WORKERS, include_dashboard=False, log_to_driver=False)
        self.inc = ray.remote(inc)
        self.add = ray.remote(add)
        self.spin = ray.remote(spin)
        ray.get(self.inc.remote(1))
        return self

    def __exit__(self, *a):
        self.ray.shutdown()

    def tiny(self, n):
        self.ray.get([self.inc.remote(i) for i in range(n)])

    map = None

    def tree(self, leaves):
        level = [self.inc.remote(i) for i in range(leaves)]
        while len(level) > 1:
            level = [self.add.remote(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        self.ray.get(level[0])

    def gil(self, k, s):
        self.ray.get([self.spin.remote(s) for _ in range(k)])

    startup = None


WORKLOADS: dict[str, tuple[str, Callable]] = {
    # name: (unit, how to measure one repeat on a started runner)
    "tiny": ("tasks/s", lambda r: 20_000 / _time(lambda: r.tiny(20_000))),
    "map": ("s", lambda r: _time(lambda: r.map(200_000))),
    "tree": ("tasks/s", lambda r: (2 * 2**14 - 1) / _time(lambda: r.tree(2**14))),
    "gil": ("s", lambda r: _time(lambda: r.gil(4, 1.0))),
    "startup": ("s", lambda r: _time(type(r).startup)),
}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _available():
    return available(
        [Shoal, ShoalTCP, ShoalTLS, ShoalJournal, PPE, Pool],
        [(Dask, "distributed"), (Ray, "ray")],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument(
        "--only", nargs="*", help="runner names to run (e.g. shoal multiprocessing.Pool)"
    )
    ns = ap.parse_args()
    results: dict[str, dict[str, float]] = {w: {} for w in ns.workloads}
    for cls in _available():
        if ns.only and cls.name not in ns.only:
            continue
        with cls() as runner:
            for w in ns.workloads:
                method = getattr(cls, w, None)
                if method is None:
                    continue
                unit, measure = WORKLOADS[w]
                vals = [measure(runner) for _ in range(ns.repeats)]
                results[w][cls.name] = statistics.median(vals)
                print(f"  {cls.name:22s} {w:8s} {statistics.median(vals):12.3f} {unit}", flush=True)
    print("\nmedians of", ns.repeats, "repeats; ratio = shoal's advantage (>1: shoal better)")
    print(f"{'workload':9s} {'runner':22s} {'median':>12s} {'unit':8s} {'ratio':>7s}")
    for w, per in results.items():
        unit = WORKLOADS[w][0]
        base = per.get("shoal")
        for name, v in per.items():
            if base is None:
                ratio = float("nan")
            else:
                ratio = base / v if unit == "tasks/s" else v / base
            print(f"{w:9s} {name:22s} {v:12.3f} {unit:8s} {ratio:7.2f}")


if __name__ == "__main__":
    main()
