"""What watching costs: the engine's `tiny` and `tree` workloads with the
dashboard open in headless Chromium and the profiler on, against no
dashboard and no profiler.

    python benches/bench_dashboard.py            # 2 rounds x 5 repeats
    python benches/bench_dashboard.py -r 7 --rounds 3
    python benches/bench_dashboard.py --flight 100000   # smoothness

Each round runs the plain cluster, then the watched one (fresh clusters,
2 workers of one thread each), so drift on a shared machine hits both.
The browser is Debian's chromium driven by tests/browser/dashboard.mjs
(`npm ci` there first); it holds the live Status page open, which redraws
the task stream and progress every second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench import add, inc

import shoal

N_WORKERS = 2
DRIVER = Path(__file__).resolve().parent.parent / "tests" / "browser" / "dashboard.mjs"


def tiny(c: shoal.Client, n: int = 20_000) -> float:
    t = time.perf_counter()
    c.gather([c.submit(inc, i) for i in range(n)])
    return n / (time.perf_counter() - t)


def tree(c: shoal.Client, leaves: int = 2**14) -> float:
    t = time.perf_counter()
    level = [c.submit(inc, i) for i in range(leaves)]
    while len(level) > 1:
        level = [c.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
    level[0].result()
    return (2 * leaves - 1) / (time.perf_counter() - t)


WORKLOADS = {"tiny": tiny, "tree": tree}


def run(
    watched: bool, repeats: int, workloads: list[str], profile: bool = True, browser: bool = True
) -> dict[str, list[float]]:
    # The profiler at its default interval, or off.
    os.environ.pop("SHOAL_PROFILE_INTERVAL", None)
    if not (watched and profile):
        os.environ["SHOAL_PROFILE_INTERVAL"] = "0"
    dashboard = "127.0.0.1:0" if watched else None
    out: dict[str, list[float]] = {w: [] for w in workloads}
    with shoal.Client(n_workers=N_WORKERS, dashboard_address=dashboard) as c:
        c.submit(inc, 1).result()
        if watched and browser:
            browser = subprocess.Popen(
                ["node", str(DRIVER), "hold", c.dashboard_link, "3600"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            line = browser.stderr.readline()  # "dashboard open", or why not
            if "dashboard open" not in line:
                raise SystemExit(f"the browser did not open the dashboard: {line}")
        else:
            browser = None
        try:
            for w in workloads:
                WORKLOADS[w](c)  # warm-up (first task group durations)
                for _ in range(repeats):
                    out[w].append(WORKLOADS[w](c))
        finally:
            if browser is not None:
                browser.terminate()  # the driver prints its redraw figures
                seen = json.loads(browser.communicate(timeout=30)[0].strip().splitlines()[-1])
                print(
                    f"  browser: {seen.get('renders')} redraws, slowest "
                    f"{seen.get('render_max_ms', 0):.1f} ms, {seen.get('blocks')} blocks kept",
                    flush=True,
                )
    return out


def in_flight(n: int) -> None:
    """`n` tasks submitted at once with the dashboard open: how long the
    page's redraws and the scheduler's answers take meanwhile."""
    os.environ.pop("SHOAL_PROFILE_INTERVAL", None)  # the default
    with shoal.Client(n_workers=N_WORKERS, dashboard_address="127.0.0.1:0") as c:
        c.submit(inc, 1).result()
        browser = subprocess.Popen(
            ["node", str(DRIVER), "hold", c.dashboard_link, "3600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "dashboard open" in browser.stderr.readline()
        t = time.perf_counter()
        fs = c.map(spin_tiny, range(n), batch_size=1)
        sizes, answers = [], []
        while not all(f.done() for f in fs[-10:]):
            a = time.perf_counter()
            body = json.dumps(c.query("/api/status?since=0"))
            answers.append(time.perf_counter() - a)
            sizes.append(len(body))
            time.sleep(0.5)
        c.gather(fs)
        took = time.perf_counter() - t
        browser.terminate()
        seen = json.loads(browser.communicate(timeout=30)[0].strip().splitlines()[-1])
    print(
        f"{n} tasks in flight, done in {took:.1f} s: page redraws {seen['renders']}, slowest "
        f"{seen['render_max_ms']:.1f} ms; /api/status from the start: up to "
        f"{max(sizes) / 1e6:.2f} MB, slowest answer {1e3 * max(answers):.0f} ms"
    )


def spin_tiny(i: int) -> int:
    end = time.perf_counter() + 0.0002
    while time.perf_counter() < end:
        pass
    return i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-w", "--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--no-profile", action="store_true", help="watched: profiler off")
    ap.add_argument("--no-browser", action="store_true", help="watched: no browser")
    ap.add_argument("--flight", type=int, default=0, help="only: N tasks in flight at once")
    ns = ap.parse_args()
    if ns.flight:
        in_flight(ns.flight)
        return
    plain: dict[str, list[float]] = {w: [] for w in ns.workloads}
    watched: dict[str, list[float]] = {w: [] for w in ns.workloads}
    for r in range(ns.rounds):
        for w, vals in run(False, ns.repeats, ns.workloads).items():
            plain[w] += vals
        got = run(True, ns.repeats, ns.workloads, not ns.no_profile, not ns.no_browser)
        for w, vals in got.items():
            watched[w] += vals
        print(f"round {r + 1}/{ns.rounds} done", flush=True)
    n = ns.rounds * ns.repeats
    print(f"\nmedians of {n} runs (tasks/s); overhead = plain/watched - 1")
    print(f"{'workload':9s} {'plain':>10s} {'watched':>10s} {'overhead':>9s}")
    for w in ns.workloads:
        p, q = statistics.median(plain[w]), statistics.median(watched[w])
        print(f"{w:9s} {p:10.0f} {q:10.0f} {100 * (p / q - 1):8.1f}%")


if __name__ == "__main__":
    main()
