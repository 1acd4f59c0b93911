"""Scale (issue 16): big submissions, and what each task costs in memory.

    python benches/bench_scale.py                    # everything, N = 1,000,000
    python benches/bench_scale.py -n 200000 -w map chains
    python benches/bench_scale.py --peers            # + Dask distributed, smaller N

Workloads:

* ``map``: ``client.map(inc, range(N), batch_size=1)`` then ``gather`` on
  the embedded cluster (2 workers): tasks/s end to end, and the scheduler
  event loop's worst lag over the run (``/api/status`` ``lag_max_us``).
* ``chains``: N tasks as 1,000 chains of ``inc`` submitted as futures, all
  held, on a ``shoal scheduler`` + ``shoal worker --nworkers 2`` cluster
  (separate processes, so each one's memory is its own): tasks/s, and
  bytes per task in the scheduler, the client and the workers (resident
  memory after the run with every future held, less before).
* ``workers``: N tiny tasks on 2, then on 1,000 light workers (``shoal
  noop-workers``: real connections and heartbeats in one process, each
  task answered at once): tasks/s of both and their ratio, the workers
  still live afterwards, any falsely declared lost (heartbeats late), and
  the event loop's worst lag; then 1,000 workers with 4 clients (processes)
  submitting at once: messages in and out per second.
* ``tree``: N/2 leaves reduced pairwise to one sum, level by level (a
  graph of futures where only the root is kept), on a scheduler and
  workers of their own: tasks/s, and the scheduler's and the client's peak
  memory per task (resident high-water mark over the run, less before).
* ``delayed``: a ``dask.delayed`` graph of 1,000 chains of ``inc``, N
  tasks in all, computed with Shoal's ``get``: tasks/s of the compute
  phase (``dask.compute`` to results; building the delayed objects is not
  counted), and peak memory per task as for ``tree``.

``--peers`` runs ``map`` and ``delayed`` on Dask distributed too, with N
capped at 20,000 (it manages about a thousand tasks a second).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

N_WORKERS = 2


def inc(x):
    return x + 1


def rss(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A process's resident memory (or another ``/proc`` status field);
    0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Peaks:
    """Peak resident memory of processes over a run, less their resident
    memory before it (the kernel's high-water mark, reset at the start:
    ``clear_refs`` 5), per task."""

    def __init__(self, **pids: int | str):
        self.pids = pids
        self.before = {k: rss(p) for k, p in pids.items()}
        for p in pids.values():
            with open(f"/proc/{p}/clear_refs", "w") as fh:
                fh.write("5")

    def per_task(self, tasks: int) -> dict:
        return {
            f"{k} peak B/task": (rss(p, "VmHWM") - self.before[k]) / tasks
            for k, p in self.pids.items()
        }


def shoal_map(n: int) -> dict:
    import shoal

    with shoal.Client(n_workers=N_WORKERS) as c:
        c.submit(inc, 1).result()
        t = time.perf_counter()
        fs = c.map(inc, range(n), batch_size=1)
        out = c.gather(fs)
        dt = time.perf_counter() - t
        assert out[-1] == n
        lag = c.query("/api/status?since=0")["counters"]["lag_max_us"]
    return {"tasks/s": n / dt, "lag max ms": lag / 1000}


def dask_map(n: int) -> dict:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1) as lc, Client(lc) as c:
        c.submit(inc, 1).result()
        t = time.perf_counter()
        out = c.gather(c.map(inc, range(n)))
        dt = time.perf_counter() - t
        assert out[-1] == n
    return {"tasks/s": n / dt}


class Cluster:
    """``shoal scheduler`` and ``shoal worker`` processes on this host."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="shoal-scale-")
        self.sfile = os.path.join(self.dir, "scheduler.json")
        cmd = [sys.executable, "-m", "shoal"]
        log = open(os.path.join(self.dir, "log"), "ab")
        self.sched = subprocess.Popen(
            [*cmd, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", self.sfile],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        while not os.path.exists(self.sfile):
            time.sleep(0.05)
        self.worker = subprocess.Popen(
            [*cmd, "worker", "--scheduler-file", self.sfile, "--nworkers", str(N_WORKERS)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def worker_pids(self, client) -> list[int]:
        return [w["pid"] for w in client.scheduler_info()["workers"].values()]

    def __exit__(self, *exc):
        for p in (self.worker, self.sched):
            p.terminate()
            p.wait()


def shoal_chains(n: int) -> dict:
    import shoal

    chains = 1000
    with Cluster() as cl, shoal.Client(scheduler_file=cl.sfile) as c:
        c.wait_for_workers(N_WORKERS, timeout=60)
        c.submit(inc, 1).result()
        workers = cl.worker_pids(c)
        before = (rss(cl.sched.pid), rss(), sum(rss(p) for p in workers))
        t = time.perf_counter()
        heads = c.map(inc, range(chains), batch_size=1)
        held = list(heads)
        for _ in range(n // chains - 1):
            heads = c.map(inc, heads, batch_size=1)
            held.extend(heads)
        out = c.gather(heads)
        dt = time.perf_counter() - t
        assert out[0] == n // chains
        after = (rss(cl.sched.pid), rss(), sum(rss(p) for p in workers))
        per = [(a - b) / len(held) for a, b in zip(after, before, strict=True)]
        del held, heads
    return {
        "tasks/s": n / dt,
        "scheduler B/task": per[0],
        "client B/task": per[1],
        "workers B/task": per[2],
    }


def add(a, b):
    return a + b


def shoal_tree(n: int) -> dict:
    """N/2 leaves reduced pairwise, level by level, to one sum (about N
    tasks), on a scheduler and workers of their own; only the root's future
    is kept at the end."""
    import shoal

    with Cluster() as cl, shoal.Client(scheduler_file=cl.sfile) as c:
        c.wait_for_workers(N_WORKERS, timeout=60)
        c.submit(inc, 1).result()
        peaks = Peaks(scheduler=cl.sched.pid, client="self")
        t = time.perf_counter()
        level = list(c.map(inc, range(n // 2), batch_size=1))
        tasks = len(level)
        while len(level) > 1:
            if len(level) % 2:
                level.append(c.submit(inc, -1))
                tasks += 1
            level = list(c.map(add, level[0::2], level[1::2], batch_size=1))
            tasks += len(level)
        total = level[0].result()
        dt = time.perf_counter() - t
        assert total >= n // 2
        mem = peaks.per_task(tasks)
    return {"tasks/s": tasks / dt, "tasks": tasks, **mem}


def build_delayed(n: int):
    import dask

    chains = 1000
    ends = []
    for i in range(chains):
        x = dask.delayed(inc)(i)
        for _ in range(n // chains - 1):
            x = dask.delayed(inc)(x)
        ends.append(x)
    return ends


def shoal_delayed(n: int) -> dict:
    import dask

    import shoal

    ends = build_delayed(n)
    with Cluster() as cl, shoal.Client(scheduler_file=cl.sfile) as c:
        c.wait_for_workers(N_WORKERS, timeout=60)
        c.submit(inc, 1).result()
        peaks = Peaks(scheduler=cl.sched.pid, client="self")
        t = time.perf_counter()
        out = dask.compute(*ends, scheduler=c.get)
        dt = time.perf_counter() - t
        mem = peaks.per_task(n)
    assert out[0] == n // 1000
    return {"tasks/s": n / dt, **mem}


def dask_delayed(n: int) -> dict:
    import dask
    from distributed import Client, LocalCluster

    ends = build_delayed(n)
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1) as lc, Client(lc) as c:
        c.submit(inc, 1).result()
        t = time.perf_counter()
        out = dask.compute(*ends, scheduler=c.get)
        dt = time.perf_counter() - t
    assert out[0] == n // 1000
    return {"tasks/s": n / dt}


def _map_in_process(sfile: str, n: int) -> None:
    """One more client (``light_workers``' ``clients``), in a process of
    its own: N tiny tasks."""
    import shoal

    with shoal.Client(scheduler_file=sfile) as c:
        assert len(c.gather(c.map(inc, range(n), batch_size=1))) == n


def light_workers(n: int, count: int, clients: int = 1) -> dict:
    """Tiny tasks on ``count`` light workers (``shoal noop-workers``: real
    connections and heartbeats, each task answered at once), submitted by
    ``clients`` clients at once (each its own process), N in all."""
    import multiprocessing

    import shoal

    d = tempfile.mkdtemp(prefix="shoal-scale-")
    sfile = os.path.join(d, "scheduler.json")
    log_path = os.path.join(d, "log")
    log = open(log_path, "ab")
    cmd = [sys.executable, "-m", "shoal"]
    sched = subprocess.Popen(
        [*cmd, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", sfile],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while not os.path.exists(sfile):
            time.sleep(0.05)
        noop = subprocess.Popen(
            [*cmd, "noop-workers", "--scheduler-file", sfile, "--count", str(count)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        with shoal.Client(scheduler_file=sfile) as c:
            c.wait_for_workers(count, timeout=120)
            c0 = c.query("/api/status?since=0")["counters"]
            each = n // clients
            ctx = multiprocessing.get_context("spawn")
            others = [
                ctx.Process(target=_map_in_process, args=(sfile, each)) for _ in range(clients - 1)
            ]
            t = time.perf_counter()
            for p in others:
                p.start()
            out = c.gather(c.map(inc, range(n - each * (clients - 1)), batch_size=1))
            for p in others:
                p.join()
                assert p.exitcode == 0, "a client failed"
            dt = time.perf_counter() - t
            c1 = c.query("/api/status?since=0")["counters"]
            msgs = c1["messages_in"] - c0["messages_in"]
            msgs_out = c1["messages_out"] - c0["messages_out"]
            assert len(out) == n - each * (clients - 1)
            time.sleep(3)  # heartbeats keep coming after the burst
            live = len(c.scheduler_info()["workers"])
            lag = c.query("/api/status?since=0")["counters"]["lag_max_us"]
        noop.terminate()
        noop.wait()
    finally:
        sched.terminate()
        sched.wait()
        log.close()
    lost = open(log_path, errors="replace").read().count("sent nothing")
    return {
        "tasks/s": n / dt,
        "messages in/s": msgs / dt,
        "messages out/s": msgs_out / dt,
        "workers live": live,
        "lost": lost,
        "lag max ms": lag / 1000,
    }


def shoal_workers(n: int) -> dict:
    two = light_workers(n, 2)
    many = light_workers(n, 1000)
    several = light_workers(n, 1000, clients=4)
    return {
        "2 workers tasks/s": two["tasks/s"],
        "1000 workers tasks/s": many["tasks/s"],
        "ratio": many["tasks/s"] / two["tasks/s"],
        "1000 workers messages in/s": many["messages in/s"],
        "1000 workers messages out/s": many["messages out/s"],
        "1000 live after": many["workers live"],
        "falsely lost": many["lost"],
        "lag max ms": many["lag max ms"],
        "4 clients tasks/s": several["tasks/s"],
        "4 clients messages in/s": several["messages in/s"],
        "4 clients messages out/s": several["messages out/s"],
        "4 clients falsely lost": several["lost"],
        "4 clients lag max ms": several["lag max ms"],
    }


RUNS = {
    "map": [("shoal", shoal_map), ("distributed", dask_map)],
    "chains": [("shoal", shoal_chains)],
    "tree": [("shoal", shoal_tree)],
    "delayed": [("shoal", shoal_delayed), ("distributed", dask_delayed)],
    "workers": [("shoal", shoal_workers)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="tasks per workload")
    ap.add_argument("-w", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--peers", action="store_true", help="Dask distributed too (N <= 20,000)")
    args = ap.parse_args()
    for w in args.w:
        shoal_rate = None
        for name, fn in RUNS[w]:
            if name != "shoal" and not args.peers:
                continue
            n = args.n if name == "shoal" else min(args.n, 20_000)
            res = fn(n)
            shown = ", ".join(
                f"{k} {v:,.2f}" if isinstance(v, float) and v < 10 else f"{k} {v:,.0f}"
                for k, v in res.items()
            )
            if name == "shoal":
                shoal_rate = res.get("tasks/s")
            elif shoal_rate:
                shown += f"  (shoal {shoal_rate / res['tasks/s']:.0f}x)"
            print(f"{w:8} {name:12} N={n:<9,} {shown}", flush=True)


if __name__ == "__main__":
    main()
