"""What an idle cluster costs: CPU time per second of wall time, of the
client process (which runs the embedded scheduler) and of its workers,
while nothing is submitted; with ``--busy``, while every worker thread runs
a long sleeping task and one more waits queued on each worker (the
scheduler has work in flight but nothing to do).

    python benches/bench_idle.py [-s SECONDS] [-w WORKERS] [-r REPEATS] [--busy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wakeups(pid: int, name: str) -> int:
    """Context switches of the threads of ``pid`` called ``name`` (each
    wake-up from a sleep is one)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                if fh.read().strip() != name:
                    continue
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
        except OSError:
            continue
    return n


def main() -> None:
    import shoal

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-s", "--seconds", type=float, default=10.0)
    ap.add_argument("-w", "--workers", type=int, default=2)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--busy", action="store_true", help="long tasks running and queued")
    ns = ap.parse_args()
    with shoal.Client(n_workers=ns.workers) as client:
        client.wait_for_workers(ns.workers, timeout=60)
        client.submit(int, 1).result()
        busy = []
        if ns.busy:
            span = ns.seconds * ns.repeats + 30
            threads = sum(client.nthreads().values())
            busy = [client.submit(time.sleep, span) for _ in range(threads + ns.workers)]
        time.sleep(2.0)  # start-up and the first task's aftermath settle
        pids = client.worker_pids
        own, workers, wakes = [], [], []
        me = os.getpid()
        for _ in range(ns.repeats):
            c0, w0, t0 = cpu_seconds(me), sum(map(cpu_seconds, pids)), time.monotonic()
            k0 = wakeups(me, "shoal-io")
            time.sleep(ns.seconds)
            wall = time.monotonic() - t0
            own.append((cpu_seconds(me) - c0) / wall)
            workers.append((sum(map(cpu_seconds, pids)) - w0) / wall / len(pids))
            wakes.append((wakeups(me, "shoal-io") - k0) / wall)
        client.cancel(busy)
    state = "busy (long tasks running and queued)" if ns.busy else "idle"
    print(f"{state}, medians of {ns.repeats} x {ns.seconds:g} s:")
    for what, v in (
        ("client process (embedded scheduler)", statistics.median(own)),
        ("each worker process", statistics.median(workers)),
    ):
        print(f"  {what:<36} {v * 100:6.3f} % of a core")
    print(f"  the I/O thread (scheduler) wakes     {statistics.median(wakes):6.1f} times a second")


if __name__ == "__main__":
    main()
