"""Dask collections on Shoal beside Dask's own schedulers and Ray's, in one run.

    python benches/bench_dask.py               # all workloads, 3 repeats
    python benches/bench_dask.py -w mean -r 5
    python benches/bench_dask.py --small       # quick check: arrays 1/16 the size

Workloads (from issue 5):
  mean      da.random.random((40000, 40000), chunks=(2000, 2000)).mean()
  transpose (x + x.T).mean(axis=0).sum(), x 20000² in 1000² chunks
  groupby   dask.dataframe groupby-mean over 16 CSV files of 500,000 rows
  from_array the webinar's example: a 4000x8000 NumPy array made in this
            process, da.from_array, an elementwise expression, compute()
            (the 256 MB result comes back)
  shuffle   df.shuffle("key") of an 8,000,000-row pandas frame (from_pandas,
            16 partitions), then each partition's sum of one column

--first-use: Client(), then the first compute() (at once, and one second
later as in a notebook) against the second (workers import Dask and NumPy
on first use unless they preloaded them).

Each workload runs once untimed before its timed repeats (workers import
pandas and dask on first use). Runners, each with 2 workers of one thread: shoal (client.get), Dask
distributed (LocalCluster, processes), Dask's threaded scheduler, Ray's Dask
scheduler (ray.util.dask) when Ray is installed. Figures are seconds, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd

N_WORKERS = 2


def make_csvs(folder: str, files: int = 16, rows: int = 500_000) -> str:
    rng = np.random.default_rng(0)
    for i in range(files):
        path = os.path.join(folder, f"part-{i:02d}.csv")
        if not os.path.exists(path):
            pd.DataFrame(
                {
                    "key": rng.integers(0, 1000, rows),
                    "a": rng.random(rows),
                    "b": rng.integers(0, 100, rows),
                }
            ).to_csv(path, index=False)
    return os.path.join(folder, "part-*.csv")


def workloads(small: bool, csvs: str) -> dict:
    n1, c1 = (10_000, 500) if small else (40_000, 2_000)
    n2, c2 = (5_000, 250) if small else (20_000, 1_000)

    def mean():
        return da.random.random((n1, n1), chunks=(c1, c1)).mean()

    def transpose():
        x = da.random.random((n2, n2), chunks=(c2, c2))
        return (x + x.T).mean(axis=0).sum()

    def groupby():
        return dd.read_csv(csvs).groupby("key").a.mean()

    rows, cols = (1000, 2000) if small else (4000, 8000)
    x = np.random.default_rng(1).random((rows, cols))

    def from_array():
        dx = da.from_array(x)
        return da.sin(dx) ** 2 + da.cos(dx) ** 2 + dx

    n = 500_000 if small else 8_000_000
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"key": rng.integers(0, 10_000, n), "a": rng.random(n)})

    def shuffle():
        df = dd.from_pandas(frame, npartitions=16).shuffle("key")
        return df.map_partitions(lambda p: p.a.sum()).sum()

    return {
        "mean": mean,
        "transpose": transpose,
        "groupby": groupby,
        "from_array": from_array,
        "shuffle": shuffle,
    }


class Shoal:
    name = "shoal"

    def __enter__(self):
        import shoal

        self.c = shoal.Client(n_workers=N_WORKERS, set_as_default=False)
        return self

    def run(self, coll):
        return dask.compute(coll, scheduler=self.c.get)[0]

    def __exit__(self, *a):
        self.c.close()


class Distributed:
    name = "dask.distributed"

    def __enter__(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.c = Client(self.cluster, set_as_default=False)
        return self

    def run(self, coll):
        return dask.compute(coll, scheduler=self.c.get)[0]

    def __exit__(self, *a):
        self.c.close()
        self.cluster.close()


class Threads:
    name = "dask threads"

    def __enter__(self):
        return self

    def run(self, coll):
        return dask.compute(coll, scheduler="threads", num_workers=N_WORKERS)[0]

    def __exit__(self, *a):
        pass


class RayDask:
    name = "ray (dask scheduler)"

    def __enter__(self):
        import ray
        from ray.util.dask import ray_dask_get

        self.ray = ray
        ray.init(num_cpus=N_WORKERS, include_dashboard=False, log_to_driver=False)
        self.get = ray_dask_get
        return self

    def run(self, coll):
        return dask.compute(coll, scheduler=self.get)[0]

    def __exit__(self, *a):
        self.ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workloads", nargs="*", default=["mean", "transpose", "groupby"])
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", nargs="*", help="runner names to run (e.g. shoal 'dask threads')")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "shoal-bench-csv"))
    ap.add_argument("--first-use", action="store_true", help="only the first-use measurement")
    ns = ap.parse_args()
    if ns.first_use:
        first_use(ns.repeats)
        return
    os.makedirs(ns.data, exist_ok=True)
    wl = workloads(ns.small, make_csvs(ns.data, rows=50_000 if ns.small else 500_000))
    runners = [Shoal, Distributed, Threads]
    try:
        import ray.util.dask  # noqa: F401

        runners.append(RayDask)
    except ImportError:
        print("(ray not installed: skipped)")
    results: dict[str, dict[str, float]] = {w: {} for w in ns.workloads}
    reference: dict[str, object] = {}
    for cls in runners:
        if ns.only and cls.name not in ns.only:
            continue
        try:
            with cls() as r:
                for w in ns.workloads:
                    # One untimed run first: workers import pandas/dask on
                    # first use (seconds), which no repeat should measure.
                    r.run(wl[w]())
                    times = []
                    for _ in range(ns.repeats):
                        t = time.perf_counter()
                        value = r.run(wl[w]())
                        times.append(time.perf_counter() - t)
                    if w in reference:
                        _check(reference[w], value, f"{cls.name} {w}")
                    else:
                        reference[w] = value
                    results[w][cls.name] = statistics.median(times)
                    print(f"  {cls.name:22s} {w:10s} {statistics.median(times):8.3f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            print(f"  {cls.name}: failed: {type(e).__name__}: {e}")
    print(f"\nmedians of {ns.repeats} repeats; ratio = runner's time / shoal's (>1: shoal faster)")
    for w, per in results.items():
        base = per.get("shoal")
        for name, v in per.items():
            ratio = v / base if base else float("nan")
            print(f"{w:10s} {name:22s} {v:8.3f} s {ratio:7.2f}")


def first_use(repeats: int) -> None:
    """Seconds of the first and the second compute() right after Client()."""
    import subprocess
    import sys

    code = """
import sys, time
import dask, dask.array as da
runner, pause = sys.argv[1], float(sys.argv[2])
t = time.perf_counter()
if runner == "shoal":
    import shoal
    c = shoal.Client(n_workers=2, set_as_default=False)
else:
    from distributed import Client, LocalCluster
    c = Client(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None))
out = [time.perf_counter() - t]
time.sleep(pause)  # a notebook: the next cell comes a moment later
x = da.random.random((4000, 4000), chunks=(1000, 1000))
for _ in range(2):
    t = time.perf_counter()
    dask.compute((x + x.T).mean(), scheduler=c.get)
    out.append(time.perf_counter() - t)
print(*out)
c.close()
"""
    for pause in (0.0, 1.0):
        for runner in ("shoal", "distributed"):
            starts, firsts, seconds = [], [], []
            for _ in range(repeats):
                out = subprocess.run(
                    [sys.executable, "-c", code, runner, str(pause)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                s, a, b = map(float, out.stdout.split())
                starts.append(s)
                firsts.append(a)
                seconds.append(b)
            print(
                f"  {runner:12s} pause {pause:.0f} s: Client() {statistics.median(starts):.3f} s, "
                f"first compute {statistics.median(firsts):.3f} s, "
                f"second {statistics.median(seconds):.3f} s",
                flush=True,
            )


def _check(expected, got, what):
    if isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(expected.sort_index(), got.sort_index(), rtol=1e-9)
    elif isinstance(expected, np.ndarray) and expected.ndim:
        np.testing.assert_allclose(expected, got, rtol=1e-12)
    else:  # random arrays differ per run; their statistics do not
        assert np.isclose(expected, got, rtol=1e-2), (what, expected, got)


if __name__ == "__main__":
    main()
