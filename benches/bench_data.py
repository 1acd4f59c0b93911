"""Moving data: Shoal beside Dask distributed and Ray, in one run.

    python benches/bench_data.py                  # every workload, 3 repeats
    python benches/bench_data.py -w transfer -r 5 --only shoal ray

Workloads (from issue 4), 2 worker processes of one thread each (Dask's
threaded scheduler: 2 threads of this process, no copies at all):
  transfer  16 tasks each make a 64 MiB float64 array; 16 tasks each
            consume two of them (i and i+1): GiB consumed per second, over
            the consuming phase (after every array is made: the data
            movement itself) and over the whole run (making included).
  spill     each worker limited to 512 MiB (Ray: a 1 GiB object store);
            32 arrays of 64 MiB (2 GiB, twice the limits) are made and held,
            then each is summed: seconds, and bytes written to disk.
  handoff   a task makes a 1 GiB float64 array; once it is made, the
            client's `result()` of it: milliseconds (the array's first and
            last elements are checked).

Memory is sampled every 20 ms over this process and all its descendants,
and once more when a runner holds everything it made (a transfer's
consuming phase is shorter than the interval):
"pss" is the peak of the summed proportional set size (shared pages
divided among the processes that map them, so shared memory counts once;
a plain RSS sum would count a segment once per process mapping it), "sys"
the peak of the host's used memory (MemTotal - MemAvailable, which counts
shared memory files too) above its level before the workload. Disk bytes
are the processes' `write_bytes` (bytes dirtied for storage; tmpfs and
sockets excluded). Figures are medians of the repeats; "first" is each
runner's first repeat, on its fresh cluster.

Memory on this kind of machine. On a virtual machine whose memory the
host backs lazily and takes back (virtio-balloon free page reporting:
memory the guest frees in large pieces is handed back to the host about
2 s later), the first touch of such memory costs several times a later
one (the host faults it in again), and it falls on whichever process draws
that memory next, whatever it runs. So the memory state before a first run
is set, the same for every runner, on a fresh cluster each:
  first   right after `--warm GiB` (default 2) was filled and freed, the
          cluster already started: memory as on a machine that does not
          take it back, and what a run meets shortly after other work;
  cold    after 5 s idle on a fresh cluster: every page freed before was
          handed back, and the run pays the host's first touch for all it
          draws (on bare metal, as "first").
The warm-up prints the rates it saw, and the physical limit adds the
rates of filling cold memory (the bound of a cold first run). Without
this, a runner that follows another drew the pages the other had just
freed, and the runner that went first paid for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _peers import Sampler, available, warm

N_WORKERS = 2
N = 8 * 2**20  # float64 elements: 64 MiB
LIMIT = 512 * 2**20
# Seconds idle before a cold run: free page reporting hands memory freed
# before back to the host within 2 s.
COLD_IDLE = 5.0
MOVED_GIB = 16 * 2 * N * 8 / 2**30  # what the transfer's consumers read


def make(i):
    return np.full(N, float(i))


def consume(a, b):
    return float(a[::4096].sum() + b[::4096].sum()) + a.nbytes + b.nbytes


def total(a):
    return float(a[::4096].sum())


def make_big(n_bytes):
    a = np.empty(n_bytes // 8)
    a[:] = 7.0
    return a


BIG = 2**30


# ------------------------------------------------------------ measuring


def held() -> float:
    """A runner holds everything it made (and nothing is consumed yet):
    memory is sampled now; returns the time the consuming starts from (the
    sample's own time is left out of the whole run, ``Sampler.paused``)."""
    s = Sampler.current
    if s is not None:
        t = time.perf_counter()
        s.sample()
        s.paused += time.perf_counter() - t
    return time.perf_counter()


# ------------------------------------------------------------ runners


class Shoal:
    name = "shoal"

    def __init__(self, limited: bool):
        self.limited = limited

    def __enter__(self):
        import shoal

        self.c = shoal.Client(
            n_workers=N_WORKERS,
            set_as_default=False,
            memory_limit=LIMIT if self.limited else "auto",
        )
        self.c.submit(total, np.zeros(10)).result()
        return self

    def __exit__(self, *a):
        self.c.close()

    def transfer(self):
        import shoal

        xs = [self.c.submit(make, i) for i in range(16)]
        shoal.wait(xs)
        made = held()
        ys = [self.c.submit(consume, xs[i], xs[(i + 1) % 16]) for i in range(16)]
        return self.c.gather(ys), made

    def spill(self, n):
        import shoal

        xs = [self.c.submit(make, i) for i in range(n)]
        shoal.wait(xs)
        return self.c.gather([self.c.submit(total, x) for x in xs])

    def handoff(self):
        import shoal

        x = self.c.submit(make_big, BIG)
        shoal.wait([x])
        made = held()
        r = x.result()
        return (float(r[0]), float(r[-1]), r.nbytes), made


class Dask:
    name = "dask.distributed"

    def __init__(self, limited: bool):
        self.limited = limited

    def __enter__(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=LIMIT if self.limited else "auto",
        )
        self.c = Client(self.cluster)
        self.c.submit(total, np.zeros(10)).result()
        return self

    def __exit__(self, *a):
        self.c.close()
        self.cluster.close()

    def transfer(self):
        from distributed import wait

        xs = [self.c.submit(make, i, pure=False) for i in range(16)]
        wait(xs)
        made = held()
        ys = [self.c.submit(consume, xs[i], xs[(i + 1) % 16], pure=False) for i in range(16)]
        return self.c.gather(ys), made

    def spill(self, n):
        from distributed import wait

        xs = [self.c.submit(make, i, pure=False) for i in range(n)]
        wait(xs)
        return self.c.gather([self.c.submit(total, x, pure=False) for x in xs])

    def handoff(self):
        from distributed import wait

        x = self.c.submit(make_big, BIG, pure=False)
        wait([x])
        made = held()
        r = x.result()
        return (float(r[0]), float(r[-1]), r.nbytes), made


class Threads:
    """Dask's threaded scheduler (2 threads in this process): no copies and
    no processes, the bound a multi-process runtime is measured against
    (its tasks share one GIL, which these NumPy calls mostly release). Not
    for the spill workload: it has no memory limit to keep."""

    name = "dask-threads"

    def __init__(self, limited: bool):
        self.limited = limited

    def __enter__(self):
        import dask

        self.dask = dask
        return self

    def __exit__(self, *a):
        pass

    def _run(self, *objs):
        return self.dask.compute(*objs, scheduler="threads", num_workers=N_WORKERS)

    def transfer(self):
        from dask import delayed

        xs = self.dask.persist(
            *[delayed(make)(i) for i in range(16)], scheduler="threads", num_workers=N_WORKERS
        )
        made = held()
        ys = [delayed(consume)(xs[i], xs[(i + 1) % 16]) for i in range(16)]
        return list(self._run(*ys)), made

    def spill(self, n):
        raise NotImplementedError("the threaded scheduler has no memory limit")

    def handoff(self):
        from dask import delayed

        (x,) = self.dask.persist(delayed(make_big)(BIG), scheduler="threads")
        made = held()
        (r,) = self._run(x)
        return (float(r[0]), float(r[-1]), r.nbytes), made


def physical_limit() -> tuple[float, ...]:
    """This machine's bound for the transfer workload's making: GiB/s of
    `np.full` into fresh anonymous memory, into fresh shared memory of 4 KiB
    tmpfs pages (what /dev/shm gives on most kernels), and into fresh shared
    memory whose pages were first made huge as Shoal makes them
    (`_core.shm_reserve`: MADV_COLLAPSE), 2 threads each
    making 8 arrays as the workload does (NumPy releases the GIL while
    filling); the best of 3 each. Then, each once after idling 5 s, into
    cold anonymous memory and cold huge shared memory: the bound of a cold
    first run."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    def anon(i):
        return float(np.full(N, float(i))[-1])

    def shm(i, huge=False):
        with open(f"/dev/shm/bench-limit-{os.getpid()}-{i}", "w+b") as fh:
            os.unlink(fh.name)
            if huge:
                from shoal import _core

                _core.shm_reserve(fh.fileno(), N * 8)
            else:
                fh.truncate(N * 8)
            m = mmap.mmap(fh.fileno(), N * 8)
        a = np.frombuffer(m, dtype=np.float64)
        a[:] = float(i)
        v = float(a[-1])
        del a
        m.close()
        return v

    def huge(i):
        return shm(i, huge=True)

    def rate(fn) -> float:
        t = time.perf_counter()
        with ThreadPoolExecutor(N_WORKERS) as ex:
            list(ex.map(fn, range(16)))
        return 16 * N * 8 / 2**30 / (time.perf_counter() - t)

    out = [max(rate(fn) for _ in range(3)) for fn in (anon, shm, huge)]
    # Cold: memory the host took back (see above), drawn after idling.
    for fn in (anon, huge):
        time.sleep(COLD_IDLE)
        out.append(rate(fn))
    return tuple(out)


class Ray:
    name = "ray"

    def __init__(self, limited: bool):
        self.limited = limited

    def __enter__(self):
        import ray

        self.ray = ray
        kw = {"object_store_memory": 2 * LIMIT} if self.limited else {}
        ray.init(num_cpus=N_WORKERS, include_dashboard=False, log_to_driver=False, **kw)
        self.make = ray.remote(make)
        self.consume = ray.remote(consume)
        self.total = ray.remote(total)
        self.make_big = ray.remote(make_big)
        ray.get(self.total.remote(np.zeros(10)))
        return self

    def __exit__(self, *a):
        self.ray.shutdown()

    def transfer(self):
        xs = [self.make.remote(i) for i in range(16)]
        self.ray.wait(xs, num_returns=len(xs))
        made = held()
        ys = [self.consume.remote(xs[i], xs[(i + 1) % 16]) for i in range(16)]
        return self.ray.get(ys), made

    def spill(self, n):
        xs = [self.make.remote(i) for i in range(n)]
        self.ray.wait(xs, num_returns=n)
        return self.ray.get([self.total.remote(x) for x in xs])

    def handoff(self):
        x = self.make_big.remote(BIG)
        self.ray.wait([x])
        made = held()
        r = self.ray.get(x)
        return (float(r[0]), float(r[-1]), r.nbytes), made


def first_value(w: str, run: tuple | None) -> float:
    """A single run's figure for workload ``w`` (NaN: none was made)."""
    if run is None:
        return float("nan")
    if w == "transfer":
        return MOVED_GIB / run[1]  # the whole run, making included
    if w == "handoff":
        return run[0] * 1e3
    return run[1]


def _available():
    return available([Shoal], [(Threads, "dask"), (Dask, "distributed"), (Ray, "ray")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workloads", nargs="*", default=["transfer", "spill", "handoff"])
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="runner names to run (e.g. shoal ray)")
    ap.add_argument(
        "--no-memory",
        action="store_true",
        help="no memory sampling: reading /proc/PID/smaps_rollup locks each "
        "process's address space for milliseconds, which delays mapping files "
        "(shown as '-')",
    )
    ap.add_argument(
        "--warm",
        type=float,
        default=2.0,
        help="GiB of memory to fill and free before the physical limit and before each "
        "runner's first repeat (0: none); see above",
    )
    ap.add_argument(
        "--no-cold",
        action="store_true",
        help="no cold first run (a fresh cluster, 5 s idle, one run); see above",
    )
    ns = ap.parse_args()
    gib = 2**30
    if ns.warm > 0:
        a, h = warm(ns.warm)
        print(
            f"  warm-up: {ns.warm:g} GiB filled and freed, {a:.2f} GiB/s anonymous, "
            f"{h:.2f} GiB/s huge shared (the first touch of memory unused since boot is "
            "slower than any later one on a lazily backed virtual machine)",
            flush=True,
        )
    expected_transfer = [float(N // 4096 * (i + (i + 1) % 16)) + 2 * N * 8 for i in range(16)]
    rows = []
    if "transfer" in ns.workloads:
        anon, shm, huge, cold_anon, cold_huge = physical_limit()
        print(
            f"  physical limit of making the transfer's arrays (np.full, {N_WORKERS} threads): "
            f"{anon:.2f} GiB/s into fresh anonymous memory, {shm:.2f} GiB/s into fresh "
            f"shared memory of 4 KiB pages, {huge:.2f} GiB/s into fresh shared memory "
            f"made huge as Shoal makes it; cold (after {COLD_IDLE:g} s idle): "
            f"{cold_anon:.2f} GiB/s anonymous, {cold_huge:.2f} GiB/s huge shared",
            flush=True,
        )

    def run_once(runner, w: str, sample: bool) -> tuple[float, float, int, int, int]:
        with Sampler(sample) as s:
            t = time.perf_counter()
            made = t
            if w == "transfer":
                got, made = runner.transfer()
                assert got == expected_transfer, "wrong transfer result"
            elif w == "handoff":
                got, made = runner.handoff()
                assert got == (7.0, 7.0, BIG), "wrong handoff result"
            else:
                n = 32
                got = runner.spill(n)
                assert got == [float(N // 4096 * i) for i in range(n)], "wrong sums"
            end = time.perf_counter()
        return (end - made, end - t - s.paused, s.peak_pss, s.peak_sys, s.written)

    for w in ns.workloads:
        for cls in _available():
            if ns.only and cls.name not in ns.only:
                continue
            if cls is Threads and w == "spill":
                continue
            limited = w == "spill"
            with cls(limited=limited) as runner:
                if ns.warm > 0:
                    warm(ns.warm)  # the first run's memory state, as for every runner
                runs = [run_once(runner, w, not ns.no_memory) for _ in range(ns.repeats)]
            cold = None
            if not ns.no_cold:
                with cls(limited=limited) as runner:
                    time.sleep(COLD_IDLE)
                    cold = run_once(runner, w, False)
            phase = statistics.median(r[0] for r in runs)
            whole = statistics.median(r[1] for r in runs)
            pss = statistics.median(r[2] for r in runs)
            sysm = statistics.median(r[3] for r in runs)
            wr = statistics.median(r[4] for r in runs)
            if w == "transfer":
                value, unit = MOVED_GIB / phase, "GiB/s"
                extra = f"whole run {MOVED_GIB / whole:6.3f} GiB/s"
            elif w == "handoff":
                value, unit, extra = phase * 1e3, "ms", f"with making {whole:6.3f} s"
            else:
                value, unit, extra = whole, "s", ""

            firsts = (first_value(w, runs[0]), first_value(w, cold))
            rows.append((w, cls.name, value, unit, pss, sysm, wr, firsts))
            mem = (
                "memory not sampled"
                if ns.no_memory
                else f"pss {pss / gib:6.2f} GiB sys +{sysm / gib:6.2f} GiB disk {wr / gib:6.2f} GiB"
            )
            print(f"  {cls.name:18s} {w:9s} {value:8.3f} {unit:5s} {mem} {extra}", flush=True)
    print(f"\nmedians of {ns.repeats} repeats; ratio = shoal's advantage (>1: shoal better)")
    print(
        f"{'workload':9s} {'runner':18s} {'value':>8s} {'unit':5s} {'ratio':>6s} "
        f"{'peak pss':>9s} {'peak sys':>9s} {'disk':>8s} {'first':>8s} {'ratio':>6s} "
        f"{'cold':>8s} {'ratio':>6s}"
    )

    def advantage(mine: float, theirs: float, unit: str) -> float:
        return mine / theirs if unit == "GiB/s" else theirs / mine

    for w in ns.workloads:
        mine = [r for r in rows if r[0] == w]
        base = next((r for r in mine if r[1] == "shoal"), None)
        for _, name, value, unit, pss, sysm, wr, firsts in mine:
            ratios = [float("nan")] * 3
            if base is not None:
                ratios = [
                    advantage(b, v, unit)
                    for b, v in zip((base[2], *base[7]), (value, *firsts), strict=True)
                ]
            mem = (
                f"{'-':>9s} {'-':>9s} {'-':>8s}"
                if ns.no_memory
                else f"{pss / gib:7.2f}Gi {sysm / gib:7.2f}Gi {wr / gib:6.2f}Gi"
            )
            print(
                f"{w:9s} {name:18s} {value:8.3f} {unit:5s} {ratios[0]:6.2f} {mem} "
                f"{firsts[0]:8.3f} {ratios[1]:6.2f} {firsts[1]:8.3f} {ratios[2]:6.2f}"
            )


if __name__ == "__main__":
    main()
