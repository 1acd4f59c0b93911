"""Scale (issue 16): big submissions never hold the scheduler's event loop
long enough for a heartbeat to be missed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _helpers import wait_for

import shoal


def inc(x):
    return x + 1


def test_a_million_task_map_keeps_heartbeats_on_time_under_a_one_second_timeout(monkeypatch, capfd):
    # Clients, workers and the scheduler all take this timeout (and beat
    # four times per timeout): one stall of a second loses the cluster.
    monkeypatch.setenv("SHOAL_HEARTBEAT_TIMEOUT", "1")
    n = 1_000_000
    with shoal.Client(n_workers=2) as c:
        fs = c.map(inc, range(n), batch_size=1)
        assert sum(c.gather(fs)) == n * (n + 1) // 2
        counters = c.query("/api/status?since=0")["counters"]
        assert counters["finished"] >= n
        # The owner task's longest stall (its tick's lateness) stayed far
        # below the timeout; a 1M-task message once held it for seconds.
        assert counters["lag_max_us"] < 1_000_000, counters
        # The million futures go in one release, worked through in pieces.
        del fs
        assert c.submit(inc, 1).result() == 2
        assert len(c.scheduler_info()["workers"]) == 2
    err = capfd.readouterr().err
    assert "sent nothing" not in err, err


def test_three_hundred_light_workers_share_the_work_and_none_is_falsely_lost(tmp_path):
    """`shoal noop-workers`: each light worker is a real connection with the
    real handshake and heartbeats. With 300 of them, a burst of tiny tasks
    completes and every worker is still there afterwards (heartbeats on
    time), and the work was spread over many of them."""
    sfile = tmp_path / "s.json"
    log = open(tmp_path / "log", "ab")
    cmd = [sys.executable, "-m", "shoal"]
    env = {**os.environ, "SHOAL_HEARTBEAT_TIMEOUT": "2"}
    sched = subprocess.Popen(
        [*cmd, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", str(sfile)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    noop = None
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        noop = subprocess.Popen(
            [*cmd, "noop-workers", "--scheduler-file", str(sfile), "--count", "300"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        with shoal.Client(scheduler_file=str(sfile)) as c:
            c.wait_for_workers(300, timeout=60)
            # Light workers answer None whatever the task.
            assert c.gather(c.map(inc, range(20_000), batch_size=1)) == [None] * 20_000
            time.sleep(4)  # two heartbeat timeouts after the burst
            workers = c.scheduler_info()["workers"]
            assert len(workers) == 300
            stream = c.query("/api/status?since=0")["stream"]
            # Rows: [seq, task, group, worker, ...].
            assert len({r[3] for r in stream}) > 100, "the work was spread"
    finally:
        if noop is not None:
            noop.terminate()
            noop.wait()
        sched.terminate()
        sched.wait()
        log.close()
    text = (tmp_path / "log").read_text(errors="replace")
    assert "sent nothing" not in text, text[-2000:]
