"""A local cluster's workers forked from a zygote (``shoal._zygote``), or
started anew: each in a fresh client process, where nothing else runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _helpers import alive, wait_for

import shoal

CLIENT = r"""
import json, os, sys, time
import colorsys  # stands for the client's libraries: nothing of Shoal's imports it
import numpy as np
import pandas as pd
import shoal

def facts(_):
    import sys, numpy as np
    time.sleep(0.2)  # both workers get one
    return os.getpid(), os.getppid(), "colorsys" in sys.modules, float(np.random.rand())

def private_mib():
    pd.DataFrame({"k": np.arange(100_000) % 7, "v": 1.0}).groupby("k").v.sum()
    with open("/proc/self/smaps_rollup") as fh:
        rows = dict(line.split()[:2] for line in fh if line.split()[0].endswith(":"))
    return (int(rows["Private_Clean:"]) + int(rows["Private_Dirty:"])) // 1024

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])

with shoal.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
    with shoal.Client(cluster) as c:
        c.wait_for_workers(2, timeout=60)
        got = c.gather(c.map(facts, range(2), batch_size=1))
        mem = c.gather(c.map(lambda _: private_mib(), range(2), batch_size=1))
        out = {
            "start": cluster.worker_start,
            "facts": got,
            "parents": [parent_of(ppid) for _, ppid, _, _ in got],
            "private": max(mem),
            "client": os.getpid(),
        }
        if sys.argv[1] == "kill":
            pids = cluster._cluster.worker_pids()
            os.kill(pids[0], 9)
            deadline = time.time() + 30
            while len(set(cluster._cluster.worker_pids()) - set(pids)) < 1:
                assert time.time() < deadline, "no replacement"
                time.sleep(0.05)
            c.wait_for_workers(2, timeout=60)
            out["after_kill"] = c.gather(c.map(facts, range(4), batch_size=1))
            # Its task-slot page reached it: a task that ends its worker
            # before saying anything is still blamed, by name.
            try:
                c.submit(os._exit, 3, key="instant").result(timeout=60)
                out["blamed"] = "no error"
            except shoal.KilledWorker as e:
                out["blamed"] = str(e)
print(json.dumps(out), flush=True)
"""


def run_client(mode: str, arg: str = "-") -> dict:
    env = {**os.environ, "SHOAL_WORKER_START": mode}
    p = subprocess.run(
        [sys.executable, "-c", CLIENT, arg], capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def test_forked_workers_have_the_client_s_libraries_and_share_their_memory():
    forked = run_client("auto", "kill")
    assert forked["start"] == "fork", forked["start"]
    pids = {pid for pid, _, _, _ in forked["facts"]}
    assert len(pids) == 2, forked["facts"]
    # Children of one zygote, itself a child of the client.
    zygotes = {ppid for _, ppid, _, _ in forked["facts"]}
    assert len(zygotes) == 1 and forked["client"] not in zygotes, forked
    assert forked["parents"] == [forked["client"]] * 2, forked
    # The client's libraries are there before any task imports them.
    assert all(has for _, _, has, _ in forked["facts"]), forked["facts"]
    # Each worker draws its own random numbers, not a copy of the client's.
    draws = [r for _, _, _, r in forked["facts"]]
    assert draws[0] != draws[1], draws
    # A killed worker is replaced by another fork of the same zygote.
    after = forked["after_kill"]
    assert {ppid for _, ppid, _, _ in after} == zygotes, after
    assert len({pid for pid, _, _, _ in after} - pids) >= 1, after
    assert "instant" in forked["blamed"], forked["blamed"]

    spawned = run_client("spawn")
    assert spawned["start"] == "spawn (SHOAL_WORKER_START=spawn)", spawned["start"]
    assert not any(has for _, _, has, _ in spawned["facts"]), spawned["facts"]
    # A forked worker's own memory, after a pandas task, is a fraction of
    # a started one's (NumPy and pandas imported in each: about 50 MiB).
    assert forked["private"] * 2 < spawned["private"], (forked["private"], spawned["private"])


KILLED = r"""
import os, shoal
c = shoal.Client(n_workers=2, dashboard_address=None)
c.wait_for_workers(2, timeout=60)
pids = c.cluster._cluster.worker_pids()
print(c.cluster.worker_start, *pids, flush=True)
import time; time.sleep(120)
"""


def zygote_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_a_sigkilled_client_leaves_neither_its_zygote_nor_its_workers():
    p = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True)
    try:
        start, *pids = p.stdout.readline().split()
        assert start == "fork", start
        workers = [int(x) for x in pids]
        zygote = zygote_of(workers[0])
        assert zygote_of(zygote) == p.pid
    finally:
        p.kill()
        p.wait(timeout=30)
        p.stdout.close()
    for pid in [zygote, *workers]:
        wait_for(lambda pid=pid: not alive(pid), 30, f"process {pid} to end")


def test_a_bad_worker_start_setting_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("SHOAL_WORKER_START", "vfork")
    with pytest.raises(ValueError, match="SHOAL_WORKER_START must be auto, fork or spawn"):
        shoal.LocalCluster(n_workers=1, dashboard_address=None)


THREADED = r"""
import threading, time, shoal
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
with shoal.Client(n_workers=1, dashboard_address=None) as c:
    print(c.cluster.worker_start, c.submit(sum, [1, 2]).result(timeout=60), flush=True)
"""


def test_a_client_running_other_threads_starts_its_workers_anew():
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_WORKER_START"}
    out = subprocess.run(
        [sys.executable, "-c", THREADED], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("spawn (other threads run in this process"), out.stdout
    assert out.stdout.rstrip().endswith(" 3"), out.stdout


def test_workers_stopped_with_their_cluster_leave_no_process():
    # In this (test) process: forked if nothing else runs here, else
    # started; either way nothing is left after close.
    cluster = shoal.LocalCluster(n_workers=2, dashboard_address=None)
    with shoal.Client(cluster) as c:
        c.wait_for_workers(2, timeout=60)
        pids = cluster._cluster.worker_pids()
        parents = {zygote_of(pid) for pid in pids}
    cluster.close()
    for pid in [*pids, *parents - {os.getpid()}]:
        wait_for(lambda pid=pid: not alive(pid), 30, f"process {pid} to end")
    if cluster.worker_start == "fork":
        assert os.getpid() not in parents, parents
