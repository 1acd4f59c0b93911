"""Command tasks beside the shell's own parallel runner, in one run.

    python benches/bench_commands.py                 # 20,000 `true`, 3 repeats
    python benches/bench_commands.py -n 100000 -r 1

Runs the same program N times with two at a time:

* ``xargs``: ``xargs -P 2 -n 1 true`` (the shell's answer; no scheduler);
* ``shoal-submit``: ``shoal submit --array 1-N -- true`` on a ``shoal
  scheduler`` + ``shoal worker --nworkers 2`` cluster, then ``shoal job
  wait``; the submission alone is reported too;
* ``shoal-journal``: the same with ``shoal scheduler --journal`` (the
  cost of journaling every job and task end);
* ``shoal-python``: ``client.submit_command(["true"])`` N times on the
  embedded cluster (2 workers), gathered.

Figures: tasks/s (higher is better), medians of the repeats, and the ratio
of each to ``xargs``. Output files are off (``--stdout none``) as for xargs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHOAL = [sys.executable, "-m", "shoal"]


def run_xargs(n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        f"seq {n} | xargs -P 2 -n 1 true", shell=True, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


class Cluster:
    def __init__(self, d: Path, journal: bool = False):
        d.mkdir(parents=True, exist_ok=True)
        self.sfile = d / "s.json"
        self.env = {**os.environ, "SHOAL_SCHEDULER_FILE": str(self.sfile)}
        extra = ["--journal", str(d / "journal")] if journal else []
        self.procs = [
            subprocess.Popen(
                [*SHOAL, "scheduler", "--port", "0", "--no-dashboard", *extra]
                + ["--scheduler-file", str(self.sfile)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
        while not self.sfile.exists():
            time.sleep(0.05)
        self.procs.append(
            subprocess.Popen(
                [*SHOAL, "worker", "--nworkers", "2"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        import shoal

        with shoal.Client(scheduler_file=str(self.sfile)) as c:
            c.wait_for_workers(2, timeout=60)

    def shoal(self, *args: str) -> str:
        return subprocess.run(
            [*SHOAL, *args], env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            p.wait()


def run_submit(c: Cluster, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = c.shoal(
        "submit", "--array", f"1-{n}", "--stdout", "none", "--stderr", "none", "--", "true"
    )
    submitted = time.perf_counter() - t0
    job = out.split()[1]
    c.shoal("job", "wait", job)
    return submitted, time.perf_counter() - t0


def run_python(n: int) -> float:
    import shoal

    with shoal.Client(n_workers=2) as c:
        c.submit_command(["true"]).result()
        t0 = time.perf_counter()
        fs = [c.submit_command(["true"], stdout=subprocess.DEVNULL) for _ in range(n)]
        c.gather(fs)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="commands per run")
    ap.add_argument("-r", "--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    ns = ap.parse_args()
    n = ns.n
    runs: dict[str, list[float]] = {
        "xargs": [],
        "shoal-submit": [],
        "shoal-journal": [],
        "shoal-python": [],
    }
    submit_s: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        c = Cluster(Path(d) / "plain")
        cj = Cluster(Path(d) / "journal", journal=True)
        try:
            for _ in range(ns.repeat):
                runs["xargs"].append(n / run_xargs(n))
                s, total = run_submit(c, n)
                submit_s.append(s)
                runs["shoal-submit"].append(n / total)
                runs["shoal-journal"].append(n / run_submit(cj, n)[1])
                runs["shoal-python"].append(n / run_python(n))
        finally:
            c.close()
            cj.close()
    base = statistics.median(runs["xargs"])
    print(f"{n} x `true`, 2 at a time, median of {ns.repeat}:")
    for name, xs in runs.items():
        m = statistics.median(xs)
        print(f"  {name:<13} {m:>9.0f} tasks/s   {m / base:5.2f}x xargs")
    print(f"  shoal submit of {n} tasks: {statistics.median(submit_s) * 1000:.0f} ms (median)")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"n": n, "runs": runs, "submit_s": submit_s}))


if __name__ == "__main__":
    main()
