"""Ctrl-C during any wait raises KeyboardInterrupt, every time.

The window found: CPython runs a signal's handler in whichever frame checks
first, and when that frame is a finalizer (a ``__del__`` run by the garbage
collector, or by pyo3 dropping deferred references as a wait wakes up), the
``KeyboardInterrupt`` is "ignored" and the wait goes on for ever. Shoal's
``sys.unraisablehook`` wrapper trips SIGINT again after such a report.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import threading
import time

import pytest
from _helpers import Background, stopped

import shoal

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def inc(x):
    return x + 1


def block(mib):
    return bytes(mib << 20)


class SlowFinalizer:
    """Garbage whose finalizer sleeps: a Ctrl-C then lands inside it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.me = self  # a cycle: only the garbage collector frees it

    def __del__(self):
        time.sleep(self.seconds)


def test_a_ctrl_c_that_a_finalizer_swallows_still_stops_the_next_wait():
    # Before: the KeyboardInterrupt died in __del__ ("Exception ignored")
    # and result() waited out its timeout.
    with shoal.Client(n_workers=1, dashboard_address=None) as c:
        f = c.submit(time.sleep, 60, pure=False)
        main = threading.get_ident()
        SlowFinalizer(0.5)
        timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGINT))
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            gc.collect()  # runs the finalizer, which swallows the Ctrl-C
            f.result(timeout=10)
        timer.join()
        assert time.monotonic() - t0 < 5
        f.cancel()


class Litter(Background):
    """Garbage made in another thread so that collections, and these
    finalizers, run in the main thread at random moments of its waits."""

    def __init__(self, client: shoal.Client):
        super().__init__(0.001)
        self.client = client

    def step(self):
        for _ in range(4):
            f = self.client.submit(inc, 1)
            cycle = [f]
            cycle.append(cycle)
            del f, cycle


@pytest.mark.timeout(600)
def test_thousands_of_ctrl_c_at_random_moments_each_raise_keyboard_interrupt():
    # 1,500 SIGINTs, each 0 to 30 ms into a wait of one kind (result,
    # exception, wait, gather, as_completed, a fetch from a frozen holder),
    # while garbage futures are collected in the main thread.
    rng = random.Random(29)
    main = threading.get_ident()
    old = gc.get_threshold()
    gc.set_threshold(50, 2, 2)
    caught: dict[str, int] = {}
    lost: list[str] = []
    try:
        with shoal.Client(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:
            slow = c.submit(time.sleep, 3600, pure=False)

            def frozen_fetch():
                big = c.submit(block, 4, pure=False)  # fresh: not fetched yet
                shoal.wait([big])
                pids = c.worker_pids
                try:
                    for p in pids:
                        os.kill(p, signal.SIGSTOP)
                    while not all(stopped(p) for p in pids):
                        time.sleep(0.0005)
                    return big.result(timeout=8)
                finally:
                    for p in pids:
                        os.kill(p, signal.SIGCONT)

            waits = {
                "result": lambda: slow.result(timeout=8),
                "exception": lambda: slow.exception(timeout=8),
                "wait": lambda: shoal.wait([slow], timeout=8),
                "gather": lambda: c.gather([slow]),
                "as_completed": lambda: next(iter(shoal.as_completed([slow], timeout=8))),
            }
            with Litter(c):
                for i in range(1500):
                    name = rng.choice(list(waits)) if i % 50 else "frozen_fetch"
                    op = frozen_fetch if name == "frozen_fetch" else waits[name]
                    timer = threading.Timer(
                        rng.uniform(0, 0.03), signal.pthread_kill, (main, signal.SIGINT)
                    )
                    # A Ctrl-C lost on a wait: the watchdog says so after
                    # 4 s and delivers another, so that every wait ends.
                    hung: list[str] = []
                    watchdog = threading.Timer(
                        4,
                        lambda h=hung: (h.append("hung"), signal.pthread_kill(main, signal.SIGINT)),
                    )
                    outcome = "returned"
                    try:
                        watchdog.start()
                        timer.start()
                        op()
                    except KeyboardInterrupt:
                        outcome = "raised"
                    except TimeoutError:
                        outcome = "timed out"
                    while True:  # the watchdog's late Ctrl-C must not escape
                        try:
                            watchdog.cancel()
                            watchdog.join()
                            timer.join()
                            break
                        except KeyboardInterrupt:
                            pass
                    if outcome == "raised" and not hung:
                        caught[name] = caught.get(name, 0) + 1
                    else:
                        lost.append(f"{name} ({outcome}{', hung' if hung else ''})")
            slow.cancel()
    finally:
        gc.set_threshold(*old)
    assert not lost, f"Ctrl-C lost in {lost}; caught {caught}"
    assert sum(caught.values()) == 1500, caught
