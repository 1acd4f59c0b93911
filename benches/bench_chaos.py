"""Faults during real work: random workers are SIGKILLed (or SIGSTOPped,
then SIGCONTed) 2 to 5 times a second while a workload runs, on Shoal and
on Dask distributed side by side where Dask has the feature. Reports, per
runtime, workload and fault: whether the result was right, how many faults
were dealt, how many tasks failed (``KilledWorker``, or ``ActorDiedError``
for the actor call that was running when its actor died), and the time
against the same run without faults.

    python benches/bench_chaos.py [-n TASKS] [-r REPEATS] [--faults kill,stop]
        [--workloads map,tree,array,actors,commands] [--runtimes shoal,dask]

Workloads (``-n`` tasks each; two worker processes of one thread):

- ``map``: ``client.map`` of short tasks (default batching) summed by a
  tree of ``submit(add)``;
- ``tree``: ``-n`` leaves submitted one by one, summed the same way;
- ``array``: a Dask array of ``-n`` blocks, ``(x + 1).sum()``;
- ``actors``: ``-n`` calls on two actors with ``max_restarts``; faults hit
  the actors' processes too. Right means every call that returned is right
  and no more calls failed than actor processes were killed (a call
  running when its actor dies fails, as in Ray). Shoal only: Dask's actors
  do not restart;
- ``commands``: ``shoal submit --array 1-N -- true`` on `shoal scheduler
  --journal` with `shoal worker --nworkers 2 --reconnect`; with the
  ``kill`` fault the scheduler is also SIGKILLed and started again from its
  journal twice during the job. Right means the job ends with all ``N``
  tasks finished. Shoal only: Dask has no command arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SHOAL = [sys.executable, "-m", "shoal"]
TASK_S = 0.0002  # each task's work


def slow_inc(x):
    time.sleep(TASK_S)
    return x + 1


def add(a, b):
    return a + b


def slow_block(b):
    time.sleep(TASK_S)
    return b + 1


class Doubler:
    """An actor: its state (the factor) is rebuilt when it restarts."""

    def __init__(self):
        self.factor = 2

    def double(self, x):
        time.sleep(TASK_S)
        return self.factor * x


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return out


class Faults:
    """Deals one fault every 0.2 to 0.5 s to a random worker process."""

    def __init__(self, pids, kind: str, seed: int):
        self.pids, self.kind = pids, kind
        self.rng = random.Random(seed)
        self.dealt = 0
        self.hit: list[int] = []  # the processes dealt a fault, in order
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
                self.hit.append(pid)
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


def tree_sum(submit, fs):
    while len(fs) > 1:
        fs = [
            submit(add, fs[i], fs[i + 1]) if i + 1 < len(fs) else fs[i]
            for i in range(0, len(fs), 2)
        ]
    return fs[0]


def workload_map(client, n: int, timeout: float) -> dict:
    total = tree_sum(client.submit, client.map(slow_inc, range(n)))
    return {"ok": total.result(timeout=timeout) == sum(range(1, n + 1))}


def workload_tree(client, n: int, timeout: float) -> dict:
    leaves = [client.submit(slow_inc, i) for i in range(n)]
    total = tree_sum(client.submit, leaves)
    return {"ok": total.result(timeout=timeout) == sum(range(1, n + 1))}


def workload_array(client, n: int, timeout: float) -> dict:
    import dask
    import dask.array as da

    side = int(n**0.5)
    x = da.ones((side * 10, side * 10), chunks=10).map_blocks(slow_block, dtype=float)
    (total,) = dask.compute(x.sum(), scheduler=client.get)
    return {"ok": total == 2.0 * (side * 10) ** 2}


def workload_actors(client, n: int, timeout: float, actors: list) -> dict:
    from shoal import ActorDiedError

    calls = [actors[i % len(actors)].double.remote(i) for i in range(n)]
    failed = wrong = 0
    for i, f in enumerate(calls):
        try:
            wrong += f.result(timeout=timeout) != 2 * i
        except ActorDiedError:
            failed += 1
    return {"ok": wrong == 0, "failed": failed}


def job_info(sfile: str, job: str) -> dict:
    """The job's summary, or {} while the scheduler is restarting."""
    import shoal

    try:
        with shoal.Client(scheduler_file=sfile, timeout=5, dashboard_address=None) as c:
            return c.query(f"/api/jobs/{job}")
    except Exception:  # noqa: BLE001 - not up yet: asked again
        return {}


def run_commands(fault: str, n: int, seed: int, timeout: float) -> dict:
    """A command array on a journaled scheduler and reconnecting workers."""
    d = tempfile.mkdtemp(prefix="chaos-")
    sfile, journal = os.path.join(d, "s.json"), os.path.join(d, "journal")
    env = {**os.environ, "SHOAL_SCHEDULER_FILE": sfile}
    log = open(os.path.join(d, "log"), "ab")
    port = "0"

    def scheduler():
        return subprocess.Popen(
            [*SHOAL, "scheduler", "--port", port, "--no-dashboard"]
            + ["--scheduler-file", sfile, "--journal", journal],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def cli(*args):
        return subprocess.run(
            [*SHOAL, *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    sched = scheduler()
    while not os.path.exists(sfile):
        time.sleep(0.05)
    with open(sfile) as fh:
        port = json.load(fh)["address"].rsplit(":", 1)[1]  # a restart takes it again
    worker = subprocess.Popen(
        [*SHOAL, "worker", "--nworkers", "2", "--reconnect"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    restarts = 0
    try:
        cli("submit", "--wait", "--", "true")  # warm: workers up
        with Faults(lambda: children(worker.pid), fault, seed) as faults:
            t0 = time.perf_counter()
            out = cli(
                "submit", "--array", f"1-{n}", "--stdout", "none", "--stderr", "none", "--", "true"
            )
            job = out.stdout.split()[1]
            if fault == "kill":
                rng = random.Random(seed)
                for _ in range(2):
                    time.sleep(rng.uniform(0.5, 2))
                    sched.kill()
                    sched.wait()
                    sched = scheduler()
                    restarts += 1
            info = job_info(sfile, job)
            while info.get("state") not in ("finished", "failed", "cancelled"):
                if time.perf_counter() - t0 > timeout:
                    break
                time.sleep(0.25)
                info = job_info(sfile, job)
            elapsed = time.perf_counter() - t0
        ok = info.get("state") == "finished" and info.get("finished") == n
        return {
            "ok": ok,
            "killed": n - info.get("finished", 0),
            "faults": faults.dealt + restarts,
            "time": elapsed,
        }
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait()
        sched.terminate()
        sched.wait()


def run_one(runtime: str, workload: str, fault: str, n: int, seed: int, timeout: float) -> dict:
    if workload == "commands":
        return run_commands(fault, n, seed, timeout)
    actors: list = []
    actor_pids: set[int] = set()  # every process an actor has had
    if runtime == "shoal":
        import shoal

        client = shoal.Client(n_workers=2, threads_per_worker=1, dashboard_address=None)
        killed_error: type = shoal.KilledWorker
        if workload == "actors":
            from shoal import actor

            cls = shoal.remote(Doubler).options(max_restarts=10**6)
            actors = [cls.remote() for _ in range(2)]
            for a in actors:
                a.double.remote(0).result()

        def pids():
            extra = [actor._supervisors[a._actor_id].proc.pid for a in actors]
            actor_pids.update(extra)
            return client.worker_pids + extra
    else:
        from distributed import Client, KilledWorker, LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)

        def pids():  # the worker processes under the nannies
            return [p for w in list(cluster.workers.values()) if (p := getattr(w, "pid", None))]

        killed_error = KilledWorker
    run = {
        "map": workload_map,
        "tree": workload_tree,
        "array": workload_array,
        "actors": lambda c, n, t: workload_actors(c, n, t, actors),
    }[workload]
    try:
        client.submit(slow_inc, 1).result()  # warm: workers up
        got: dict = {"ok": False}
        with Faults(pids, fault, seed) as faults:
            t0 = time.perf_counter()
            try:
                got = run(client, n, timeout)
            except killed_error:
                got = {"ok": False, "failed": 1}
            except TimeoutError:
                got = {"ok": False, "error": "timeout"}
            except Exception as e:  # noqa: BLE001 - a runtime's own failure is a result
                got = {"ok": False, "error": type(e).__name__}
            elapsed = time.perf_counter() - t0
        failed = got.get("failed", 0)
        # A call that was running when its actor died fails (as in Ray): no
        # more of those than actor processes killed.
        actor_kills = sum(p in actor_pids for p in faults.hit) if fault == "kill" else 0
        ok = got["ok"] and (workload != "actors" or failed <= actor_kills)
        return {
            "ok": ok,
            "killed": failed,
            "faults": faults.dealt,
            "time": elapsed,
            "error": got.get("error", ""),
        }
    finally:
        client.close()
        if runtime != "shoal":
            cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="tasks (elements, blocks, calls) per run")
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--faults", default="kill,stop")
    ap.add_argument("--workloads", default="map,tree,array,actors,commands")
    ap.add_argument("--runtimes", default="shoal,dask")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    a = ap.parse_args()
    faults = ["none", *a.faults.split(",")]
    head = (
        "runtime",
        "workload",
        "fault",
        "right",
        "failed",
        "faults",
        "time s",
        "lost s",
        "errors",
    )
    print("{:8} {:8} {:6} {:>7} {:>7} {:>7} {:>8} {:>7}  {}".format(*head))
    for workload in a.workloads.split(","):
        for runtime in a.runtimes.split(","):
            if runtime != "shoal" and workload in ("actors", "commands"):
                continue  # Dask has no restarting actors, no command arrays
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
                    f"{t - (base or t):>7.2f}  "
                    + ",".join(sorted({r["error"] for r in rows if r.get("error")})),
                    flush=True,
                )


if __name__ == "__main__":
    main()
