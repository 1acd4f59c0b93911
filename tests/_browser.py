"""What the browser tests share: a workload that keeps a cluster busy
(two dependent groups, a failing one, logs) and the Chromium driver
(`tests/browser/dashboard.mjs`, Debian's chromium through playwright-core)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import shoal

HERE = Path(__file__).parent
BROWSER = HERE / "browser"
ARTIFACTS = Path(os.environ.get("SHOAL_ARTIFACTS", HERE / "artifacts"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def spin(seconds: float) -> float:
    """CPU work the profiler can see."""
    end = time.perf_counter() + seconds
    x = 0.0
    while time.perf_counter() < end:
        x += 1.0
    return x


def load(i: int) -> int:
    spin(0.004)
    if i % 50 == 0:
        logging.getLogger("shoal.test").warning("load %d says hello", i)
    return i


def combine(a: int, b: int) -> int:
    spin(0.002)
    return a + b


def explode(i: int) -> int:
    raise ValueError(f"task {i} exploded on purpose")


class Workload:
    """Keeps the cluster busy (two dependent groups, a failing one, logs)
    until stopped, so a browser sees live data change."""

    def __init__(self, client: shoal.Client):
        self.client = client
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        c, i = self.client, 0
        # Held, as a user holds a failed future: its error stays. Enough of
        # them that the one the browser clicks is still held however slowly
        # a loaded machine zooms to it.
        failed = []
        while not self.stop.is_set():
            xs = c.map(load, range(i, i + 40), batch_size=1)
            ys = [c.submit(combine, xs[j], xs[j + 1]) for j in range(0, 40, 2)]
            failed = [*failed[-500:], c.submit(explode, i)]
            c.gather(ys)
            shoal.wait(failed)
            i += 40

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def node_driver(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> dict:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is not at {CHROMIUM}: run scripts/setup-dev.sh (installs Debian's "
            "chromium) or set CHROMIUM"
        )
    if not (BROWSER / "node_modules" / "playwright-core").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER, check=True)
    out = subprocess.run(
        ["node", str(BROWSER / "dashboard.mjs"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CHROMIUM": CHROMIUM, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
