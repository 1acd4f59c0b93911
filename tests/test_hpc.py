"""The HPC front door: a site's Dask-on-a-cluster scripts with `dask`
replaced by `shoal` (CLI forms, logs, finding the token), interfaces,
walltimes. Real `shoal scheduler` and `shoal worker` processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import shoal

SHOAL = [sys.executable, "-m", "shoal"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_dask_style_site_script_runs_with_shoal(tmp_path, monkeypatch):
    """As a site's script does it: `scheduler --scheduler-file F
    --dashboard-address :PORT --host IP`, `worker --scheduler-file F
    --memory-limit B --nworkers 1 --nthreads 2`, then `Client("IP:PORT")`
    with no token. Joins and departures are in the scheduler's log."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the per-user cluster notes
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)
    sfile = tmp_path / "dask_scheduler.json"
    port, dash = free_port(), free_port()
    slog = open(tmp_path / "scheduler.log", "w+b")
    env = {**os.environ, "HOME": str(tmp_path)}
    sched = subprocess.Popen(
        [*SHOAL, "scheduler", "--scheduler-file", str(sfile), "--dashboard-address", f":{dash}"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=slog,
        stderr=subprocess.STDOUT,
        env=env,
    )
    worker = None
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        worker = subprocess.Popen(
            [*SHOAL, "worker", "--scheduler-file", str(sfile), "--memory-limit", "2GB"]
            + ["--nworkers", "1", "--nthreads", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

        # `:PORT` is every interface: reachable on loopback (it asks for
        # the token).
        def dashboard_answers():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/", timeout=2)
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False
            return True

        wait_for(dashboard_answers, 30, "the dashboard on :PORT")
        with shoal.Client(f"127.0.0.1:{port}") as c:  # no token given
            c.wait_for_workers(1, timeout=60)
            assert c.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        worker.terminate()
        worker.wait(30)
        worker = None

        def logged():
            slog.seek(0)
            return slog.read().decode()

        wait_for(lambda: "joined with 2 threads" in logged(), 10, "the join in the log")
        wait_for(lambda: "left" in logged().split("joined with 2 threads", 1)[1], 30, "the leave")
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        sched.terminate()
        sched.wait(30)
        slog.close()
    # The scheduler's note is gone with it.
    assert not list((tmp_path / ".shoal" / "clusters").glob("*.json"))


def test_without_a_token_the_error_says_where_to_find_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"token file: PATH.*~/.shoal/clusters"):
        shoal.Client(f"127.0.0.1:{free_port()}")


def test_interfaces_name_the_address_to_listen_on(tmp_path):
    sfile = tmp_path / "s.json"
    sched = subprocess.Popen(
        [*SHOAL, "scheduler", "--interface", "lo", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(sfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        import json

        assert json.loads(sfile.read_text())["address"].startswith("tcp://127.0.0.1:")
        r = subprocess.run(
            [*SHOAL, "worker", "--scheduler-file", str(sfile), "--interface", "nosuch0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0
        assert 'no network interface "nosuch0"' in r.stderr and "lo" in r.stderr, r.stderr
    finally:
        sched.terminate()
        sched.wait(30)
    r = subprocess.run(
        [*SHOAL, "scheduler", "--interface", "nosuch0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "nosuch0" in r.stderr
