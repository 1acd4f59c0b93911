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
  q1 q3 q6 q12  analytical queries in the manner of TPC-H's over Parquet
            tables made here (lineitem 4,000,000 rows in 16 files, orders
            1,000,000, customer 100,000): q1 filter and group by two keys,
            q3 two joins, a group-by and the 10 largest, q6 a scan, filter
            and sum, q12 a join, filter and group-by

--first-use: Client(), then the first compute() (at once, and one second
later as in a notebook) against the second (workers import Dask and NumPy
on first use unless they preloaded them).

Each workload's first run on its cluster is reported apart ("first"; the
first workload's on a fresh cluster), not among its repeats (workers
import pandas and dask on first use). Before each runner's first run,
--warm GiB (default 2) are filled and freed, so that every runner meets
the same memory: on a virtual machine that hands freed memory back to its
host (see bench_data.py) a runner that follows another draws the pages the
other just freed, warm, and the one that went first fills cold ones
(4.5 ms per 2 MiB huge page against 0.1 ms warm). A fresh cluster's first
run follows its start at once, its memory prepared before the start: it
still pays the workers' start-up (their preload: --first-use).
--cold-first: each first run after 5 s idle instead, all memory cold, as
a user meets it after a pause on such a machine. --interleave: all runners are started at
once and take turns, one repeat each in a rotating order, so that a shared
machine's slow minutes fall on all of them alike (runners measured one
after the other were minutes apart; a 0.85 there was 1.26 interleaved).

Shuffles (q3, q12, shuffle): without a distributed client Dask picks its
disk shuffle for every runner here. In other processes its store is a bare
file that each task appends to under a file lock (threads share one
buffered in memory), so processes pay more for it; a Shoal client set as
Dask's default picks the "tasks" shuffle instead. --shuffle tasks (or disk)
runs every runner with the one method.

Memory (unless --no-memory), once every time is measured: each runner
runs each workload in a process of its own (--memory-of), twice, and its
memory is sampled over the second run (_peers.Sampler, as in
bench_data.py: that process and all below it, every 20 ms). "pss" is the
peak of their summed proportional set size: the process's own data and
imports included, as a user's program has them; the ratio is the
runner's over Shoal's (>1: Shoal holds less). Runners that take turns in
one process cannot be told apart this way: that process holds what each
of them left behind (Dask's threads' freed heap, Shoal's client's).

Runners, each with 2 workers of one thread: shoal (client.get), Dask
distributed (LocalCluster, processes), Dask's threaded scheduler, Ray's Dask
scheduler (ray.util.dask) when Ray is installed. Figures are seconds, medians.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from _peers import Sampler, warm

N_WORKERS = 2
# Seconds idle before a cold first run: free page reporting hands memory
# freed before back to the host within 2 s.
COLD_IDLE = 5.0


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


def make_tables(folder: str, small: bool) -> dict[str, str]:
    """Parquet tables shaped like TPC-H's lineitem, orders and customer
    (made once per size)."""
    n_line = 250_000 if small else 4_000_000
    n_orders, n_cust = n_line // 4, n_line // 40
    where = os.path.join(folder, f"tables-{n_line}")
    paths = {t: os.path.join(where, t) for t in ("lineitem", "orders", "customer")}
    if os.path.exists(os.path.join(where, "done")):
        return paths
    rng = np.random.default_rng(3)
    day0 = np.datetime64("1992-01-01")
    days = lambda n: day0 + rng.integers(0, 2500, n).astype("timedelta64[D]")  # noqa: E731
    lineitem = pd.DataFrame(
        {
            "l_orderkey": rng.integers(0, n_orders, n_line),
            "l_quantity": rng.integers(1, 51, n_line).astype("float64"),
            "l_extendedprice": rng.random(n_line) * 100_000,
            "l_discount": rng.integers(0, 11, n_line) / 100,
            "l_tax": rng.integers(0, 9, n_line) / 100,
            "l_returnflag": rng.choice(["A", "N", "R"], n_line),
            "l_linestatus": rng.choice(["F", "O"], n_line),
            "l_shipdate": days(n_line),
            "l_shipmode": rng.choice(
                ["AIR", "FOB", "MAIL", "RAIL", "REG AIR", "SHIP", "TRUCK"], n_line
            ),
        }
    )
    orders = pd.DataFrame(
        {
            "o_orderkey": np.arange(n_orders),
            "o_custkey": rng.integers(0, n_cust, n_orders),
            "o_orderdate": days(n_orders),
            "o_shippriority": rng.integers(0, 2, n_orders),
            "o_orderpriority": rng.choice(
                ["1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECIFIED", "5-LOW"], n_orders
            ),
        }
    )
    customer = pd.DataFrame(
        {
            "c_custkey": np.arange(n_cust),
            "c_mktsegment": rng.choice(
                ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"], n_cust
            ),
        }
    )
    for name, df, parts in (
        ("lineitem", lineitem, 16),
        ("orders", orders, 4),
        ("customer", customer, 1),
    ):
        os.makedirs(paths[name], exist_ok=True)
        for i, chunk in enumerate(np.array_split(np.arange(len(df)), parts)):
            df.iloc[chunk].to_parquet(
                os.path.join(paths[name], f"part-{i:02d}.parquet"), index=False
            )
    open(os.path.join(where, "done"), "w").close()
    return paths


def queries(t: dict[str, str]) -> dict:
    day = lambda s: pd.Timestamp(s)  # noqa: E731

    def q1():
        li = dd.read_parquet(t["lineitem"])
        li = li[li.l_shipdate <= day("1998-09-02")]
        li["disc_price"] = li.l_extendedprice * (1 - li.l_discount)
        li["charge"] = li.disc_price * (1 + li.l_tax)
        return li.groupby(["l_returnflag", "l_linestatus"]).agg(
            {
                "l_quantity": ["sum", "mean"],
                "disc_price": "sum",
                "charge": "sum",
                "l_discount": ["mean", "count"],
            }
        )

    def q3():
        c = dd.read_parquet(t["customer"])
        o = dd.read_parquet(t["orders"])
        li = dd.read_parquet(t["lineitem"])
        c = c[c.c_mktsegment == "BUILDING"]
        o = o[o.o_orderdate < day("1995-03-15")]
        li = li[li.l_shipdate > day("1995-03-15")]
        j = c.merge(o, left_on="c_custkey", right_on="o_custkey").merge(
            li, left_on="o_orderkey", right_on="l_orderkey"
        )
        j["revenue"] = j.l_extendedprice * (1 - j.l_discount)
        g = j.groupby(["l_orderkey", "o_orderdate", "o_shippriority"]).revenue.sum()
        return g.nlargest(10)

    def q6():
        li = dd.read_parquet(t["lineitem"])
        sel = (
            (li.l_shipdate >= day("1994-01-01"))
            & (li.l_shipdate < day("1995-01-01"))
            & (li.l_discount >= 0.05)
            & (li.l_discount <= 0.07)
            & (li.l_quantity < 24)
        )
        li = li[sel]
        return (li.l_extendedprice * li.l_discount).sum()

    def q12():
        o = dd.read_parquet(t["orders"])
        li = dd.read_parquet(t["lineitem"])
        li = li[li.l_shipmode.isin(["MAIL", "SHIP"]) & (li.l_shipdate >= day("1994-01-01"))]
        j = o.merge(li, left_on="o_orderkey", right_on="l_orderkey")
        j["high"] = j.o_orderpriority.isin(["1-URGENT", "2-HIGH"]).astype("int64")
        return j.groupby("l_shipmode").high.agg(["sum", "count"])

    return {"q1": q1, "q3": q3, "q6": q6, "q12": q12}


def workloads(
    small: bool, csvs: str, tables: dict[str, str] | None = None, names: list[str] | None = None
) -> dict:
    """The workloads; the inputs made in this process only for those in
    ``names`` (None: all), so that a process measuring one holds no other's."""
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
    if names is None or "from_array" in names:
        x = np.random.default_rng(1).random((rows, cols))

    def from_array():
        dx = da.from_array(x)
        return da.sin(dx) ** 2 + da.cos(dx) ** 2 + dx

    n = 500_000 if small else 8_000_000
    if names is None or "shuffle" in names:
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
        **(queries(tables) if tables else {}),
    }


class Shoal:
    name = "shoal"

    def __enter__(self):
        import shoal

        self.c = shoal.Client(n_workers=N_WORKERS, set_as_default=False)
        # Started, as LocalCluster returns them (their start-up and first
        # compute together: --first-use).
        self.c.wait_for_workers(N_WORKERS, timeout=60)
        print(f"  (shoal's workers: {self.c.cluster.worker_start})", flush=True)
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
    ap.add_argument("--interleave", action="store_true", help="runners take turns, one repeat each")
    ap.add_argument(
        "--warm",
        type=float,
        default=2.0,
        help="GiB filled and freed before each runner's first run of a workload (default 2)",
    )
    ap.add_argument(
        "--cold-first",
        action="store_true",
        help=f"first runs after {COLD_IDLE:g} s idle instead (memory the host took back)",
    )
    ap.add_argument("--no-memory", action="store_true", help="no memory measurement")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # a runner's memory, in this process
    ap.add_argument(
        "--shuffle",
        choices=["disk", "tasks"],
        help="one shuffle method for every runner (default: Dask's choice, disk here)",
    )
    ns = ap.parse_args()
    if ns.first_use:
        first_use(ns.repeats)
        return
    if ns.shuffle:
        dask.config.set({"dataframe.shuffle.method": ns.shuffle})
    os.makedirs(ns.data, exist_ok=True)
    csvs = make_csvs(ns.data, rows=50_000 if ns.small else 500_000)
    tables = (
        make_tables(ns.data, ns.small) if any(w.startswith("q") for w in ns.workloads) else None
    )
    wl = workloads(ns.small, csvs, tables, ns.workloads)
    runners = [Shoal, Distributed, Threads]
    try:
        import ray.util.dask  # noqa: F401

        runners.append(RayDask)
    except ImportError:
        print("(ray not installed: skipped)")
    if ns.memory_of:
        memory_of(next(c for c in runners if c.name == ns.memory_of), wl[ns.workloads[0]])
        return
    results: dict[str, dict[str, float]] = {w: {} for w in ns.workloads}
    firsts: dict[str, dict[str, float]] = {w: {} for w in ns.workloads}
    peaks: dict[str, dict[str, int]] = {w: {} for w in ns.workloads}
    reference: dict[str, object] = {}

    def record(name: str, w: str, first: float, times: list[float], value: object) -> None:
        if w in reference:
            _check(reference[w], value, f"{name} {w}")
        else:
            reference[w] = value
        results[w][name] = statistics.median(times)
        firsts[w][name] = first
        print(
            f"  {name:22s} {w:10s} {statistics.median(times):8.3f} s (first {first:.3f} s)",
            flush=True,
        )

    def timed(r, w: str) -> tuple[float, object]:
        t = time.perf_counter()
        value = r.run(wl[w]())
        return time.perf_counter() - t, value

    def prepare_memory() -> None:
        # Each runner's first run meets the same memory (see above).
        if ns.cold_first:
            time.sleep(COLD_IDLE)
        else:
            warm(ns.warm, N_WORKERS)

    def timed_first(r, w: str, prepared: bool = False) -> float:
        # A fresh cluster's first run follows its start at once (prepared
        # before it), so that its start-up is not hidden in the warm-up.
        if not prepared:
            prepare_memory()
        return timed(r, w)[0]

    # Dask's disk shuffle leaves its partd directory behind (192 MB each
    # here, threads and processes alike): 1,416 of them filled this
    # machine's disk. Each workload's are removed once it is measured.
    tmp = tempfile.gettempdir()
    partds = set(glob.glob(os.path.join(tmp, "*.partd")))

    def drop_partds() -> None:
        for d in set(glob.glob(os.path.join(tmp, "*.partd"))) - partds:
            shutil.rmtree(d, ignore_errors=True)

    active = [cls for cls in runners if not ns.only or cls.name in ns.only]
    if ns.interleave:
        prepare_memory()
        with contextlib.ExitStack() as stack:
            started = []
            for cls in active:
                try:
                    started.append(stack.enter_context(cls()))
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
                    print(f"  {cls.name}: failed: {type(e).__name__}: {e}")
            for w in ns.workloads if started else []:
                # The first run apart: first use (see above).
                first = {
                    r.name: timed_first(r, w, prepared=r is started[0] and w == ns.workloads[0])
                    for r in started
                }
                times: dict[str, list[float]] = {r.name: [] for r in started}
                values: dict[str, object] = {}
                for i in range(ns.repeats):
                    k = i % len(started)
                    for r in started[k:] + started[:k]:
                        dt, values[r.name] = timed(r, w)
                        times[r.name].append(dt)
                for r in started:
                    record(r.name, w, first[r.name], times[r.name], values[r.name])
                drop_partds()
    for cls in active if not ns.interleave else []:
        try:
            prepare_memory()
            with cls() as r:
                for w in ns.workloads:
                    # The first run apart: workers import pandas/dask on
                    # first use (seconds), which no repeat should measure.
                    first = timed_first(r, w, prepared=w == ns.workloads[0])
                    times = []
                    for _ in range(ns.repeats):
                        dt, value = timed(r, w)
                        times.append(dt)
                    record(cls.name, w, first, times, value)
                    drop_partds()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            print(f"  {cls.name}: failed: {type(e).__name__}: {e}")
    for w in ns.workloads if not ns.no_memory else []:
        for cls in active:
            peak = measure_memory(cls.name, w, ns)
            drop_partds()
            if peak is not None:
                peaks[w][cls.name] = peak
                print(f"  {cls.name:22s} {w:10s} peak pss {peak / 2**30:6.2f} GiB", flush=True)
    print(
        f"\nmedians of {ns.repeats} repeats, and the first run of each workload on its "
        "cluster (the first workload's on a fresh one); ratio = runner's time / shoal's "
        "(>1: shoal faster); pss = peak memory of a run, GiB (ratio >1: shoal holds less)"
    )
    print(
        f"{'workload':10s} {'runner':22s} {'median':>8s} {'ratio':>7s} {'first':>8s} {'ratio':>7s}"
        + (f" {'pss':>7s} {'ratio':>7s}" if any(peaks.values()) else "")
    )
    for w, per in results.items():
        base = per.get("shoal")
        first_base = firsts[w].get("shoal")
        for name, v in per.items():
            ratio = v / base if base else float("nan")
            f = firsts[w][name]
            f_ratio = f / first_base if first_base else float("nan")
            pss, pss_base = peaks[w].get(name), peaks[w].get("shoal")
            mem = (
                f" {pss / 2**30:7.2f} {pss / pss_base if pss_base else float('nan'):7.2f}"
                if pss
                else ""
            )
            print(f"{w:10s} {name:22s} {v:8.3f} {ratio:7.2f} {f:8.3f} {f_ratio:7.2f}{mem}")


def memory_of(cls, workload) -> None:
    """In a process of its own (``--memory-of``): runs ``workload`` twice on
    a runner of ``cls`` and prints the peak memory of the second run (see
    above)."""
    with cls() as r:
        r.run(workload())  # first use: imports, a cluster's start-up
        with Sampler() as s:
            r.run(workload())
    print(f"PEAK {s.peak_pss}", flush=True)


def measure_memory(name: str, w: str, ns: argparse.Namespace) -> int | None:
    """The peak memory of runner ``name`` running workload ``w`` (bytes), from
    a process of its own; None if it could not be measured (said why)."""
    cmd = [sys.executable, __file__, "--memory-of", name, "-w", w, "--data", ns.data]
    cmd += ["--small"] if ns.small else []
    cmd += ["--shuffle", ns.shuffle] if ns.shuffle else []
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("PEAK "):
            return int(line.split()[1])
    print(f"  {name} {w}: memory not measured (exit {p.returncode}): {p.stderr.strip()[-400:]}")
    return None


def first_use(repeats: int) -> None:
    """Seconds of the first and the second compute() right after Client()."""

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
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(expected.sort_index(), got.sort_index(), rtol=1e-9)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(expected.sort_index(), got.sort_index(), rtol=1e-9)
    elif isinstance(expected, np.ndarray) and expected.ndim:
        np.testing.assert_allclose(expected, got, rtol=1e-12)
    else:  # random arrays differ per run; their statistics do not
        assert np.isclose(expected, got, rtol=1e-2), (what, expected, got)


if __name__ == "__main__":
    main()
