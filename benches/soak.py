"""A soak under faults: work runs without pause on an embedded cluster
while a random worker is SIGKILLed (or SIGSTOPped for a moment) every few
seconds; every ``--every`` seconds the client process (which runs the
scheduler) and the workers are sampled: resident memory, open files and
threads. Prints the samples and, after the warm-up, how much each grew.

    python benches/soak.py [--minutes 30] [--every 30] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import threading
import time

import shoal


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def proc_stats(pid: int) -> tuple[int, int, int]:
    """(resident bytes, open files, threads) of a process; zeros if gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
        return rss, fds, threads
    except OSError:
        return 0, 0, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=30, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=3, help="minutes before growth counts")
    a = ap.parse_args()
    rng = random.Random(7)
    stop = threading.Event()
    faults = {"kill": 0, "stop": 0}
    runs = {"right": 0, "wrong": 0, "failed": 0}
    with shoal.Client(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:

        def fault() -> None:
            while not stop.wait(rng.uniform(2, 5)):
                pids = c.worker_pids
                if not pids:
                    continue
                pid = rng.choice(pids)
                try:
                    if rng.random() < 0.7:
                        os.kill(pid, signal.SIGKILL)
                        faults["kill"] += 1
                    else:
                        os.kill(pid, signal.SIGSTOP)
                        time.sleep(rng.uniform(0.2, 2))
                        os.kill(pid, signal.SIGCONT)
                        faults["stop"] += 1
                except ProcessLookupError:
                    pass

        def work() -> None:
            while not stop.is_set():
                n = rng.randint(100, 3000)
                try:
                    fs = c.map(inc, range(n))
                    while len(fs) > 1:
                        fs = [
                            c.submit(add, fs[i], fs[i + 1]) if i + 1 < len(fs) else fs[i]
                            for i in range(0, len(fs), 2)
                        ]
                    ok = fs[0].result(timeout=120) == n * (n + 1) // 2
                    runs["right" if ok else "wrong"] += 1
                except Exception as e:  # noqa: BLE001 - counted and shown
                    runs["failed"] += 1
                    print(f"  run failed: {type(e).__name__}: {e}", flush=True)

        threads = [threading.Thread(target=f, daemon=True) for f in (fault, work)]
        for t in threads:
            t.start()
        me = os.getpid()
        samples = []
        t0 = time.time()
        print("   t s  sched MiB  fds thr | workers MiB  fds thr | kills stops right wrong failed")
        while time.time() - t0 < a.minutes * 60:
            time.sleep(a.every)
            s = proc_stats(me)
            w = [proc_stats(p) for p in c.worker_pids]
            wsum = tuple(sum(x[i] for x in w) for i in range(3))
            samples.append((time.time() - t0, s, wsum))
            print(
                f"{time.time() - t0:6.0f} {s[0] / 2**20:10.1f} {s[1]:4} {s[2]:3} | "
                f"{wsum[0] / 2**20:11.1f} {wsum[1]:4} {wsum[2]:3} | "
                f"{faults['kill']:5} {faults['stop']:5} {runs['right']:5} {runs['wrong']:5} "
                f"{runs['failed']:6}",
                flush=True,
            )
        stop.set()
        for t in threads:
            t.join(timeout=130)
    after = [x for x in samples if x[0] >= a.warmup * 60]
    if len(after) >= 2:
        first, last = after[0], after[-1]
        # Workers are killed and replaced, so theirs is the sum over whoever is alive.
        for who, k in (("scheduler", 1), ("workers", 2)):
            for name, i in (("RSS", 0), ("open files", 1), ("threads", 2)):
                a0, a1 = first[k][i], last[k][i]
                g = (a1 - a0) / max(a0, 1) * 100
                print(f"{who} {name} after warm-up: {a0} -> {a1} ({g:+.1f} %)")


if __name__ == "__main__":
    main()
