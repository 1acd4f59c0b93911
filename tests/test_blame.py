"""Exact blame for worker deaths: a worker's supervisor reads which task
(and which element of a batch) each of its threads ran when it died, so
only a task that really kills its workers ends as ``KilledWorker``."""

import os
import random
import signal
import time

import pytest
from _helpers import Background, wait_for

import shoal


def slow_inc(x):
    time.sleep(0.001)
    return x + 1


def add(a, b):
    return a + b


def die_at(x, bad):
    if x == bad:
        os._exit(7)
    return x


class Killer(Background):
    """SIGKILLs a random worker process of ``client`` every ``every`` s."""

    def __init__(self, client, every):
        super().__init__(every)
        self.client, self.kills = client, 0
        self.rng = random.Random(1)

    def step(self):
        pids = self.client.worker_pids
        if pids:
            try:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass


def test_random_worker_deaths_cost_no_correct_work():
    # The batches of a default map run about half a second each here: more
    # than workers live. Before exact blame, a batch was held to account for
    # every death it ran through (KilledWorker after three), and the
    # supervisor gave up after 20 deaths in 30 s.
    n = 4096
    with shoal.Client(n_workers=2) as c:
        c.submit(slow_inc, 1).result(timeout=30)
        with Killer(c, 0.4) as killer:
            fs = c.map(slow_inc, range(n))
            while len(fs) > 1:
                fs = [
                    c.submit(add, fs[i], fs[i + 1]) if i + 1 < len(fs) else fs[i]
                    for i in range(0, len(fs), 2)
                ]
            assert fs[0].result(timeout=240) == sum(range(1, n + 1))
        assert killer.kills >= 5, killer.kills
        # The cluster lives on.
        assert wait_for(lambda: len(c.worker_pids) == 2, 30, "two workers again")
        assert c.submit(slow_inc, 1).result(timeout=30) == 2


def test_a_worker_killed_before_it_runs_anything_blames_no_task(tmp_path, monkeypatch):
    # Workers that import something slow at start join the scheduler and are
    # given the task before they can run it; killed then, three times over,
    # they never ran it (before: KilledWorker, as no start report came).
    (tmp_path / "slow_start.py").write_text("import time\ntime.sleep(1.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # workers get the client's path
    with (
        shoal.LocalCluster(n_workers=1, preload=["slow_start"]) as cluster,
        shoal.Client(cluster) as c,
    ):
        f = c.submit(slow_inc, 1, key="innocent")
        for _ in range(4):
            pid = wait_for(
                lambda: [w["pid"] for w in c.scheduler_info()["workers"].values()],
                30,
                "a worker to join",
            )[0]
            time.sleep(0.3)  # it holds the task, still importing
            assert not f.done()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: p not in c.worker_pids, 10, "the worker to die")
        assert f.result(timeout=60) == 2


def test_an_element_that_kills_its_worker_still_fails_its_batch():
    with shoal.Client(n_workers=2) as c:
        fs = c.map(die_at, range(40), bad=25, batch_size=40)
        with pytest.raises(shoal.KilledWorker, match="die_at"):
            fs[0].result(timeout=120)
        assert c.submit(slow_inc, 1).result(timeout=30) == 2


def test_a_task_that_kills_its_worker_at_once_is_still_caught():
    # os._exit before any report can leave: its slot says it ran.
    with shoal.Client(n_workers=1) as c:
        f = c.submit(die_at, 1, bad=1, key="instant")
        with pytest.raises(shoal.KilledWorker, match="instant"):
            f.result(timeout=60)
