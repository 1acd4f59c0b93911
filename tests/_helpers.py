"""Small helpers the test modules share."""

from __future__ import annotations

import os
import socket
import threading
import time


def wait_for(pred, timeout: float, what: str):
    """Polls ``pred`` until it returns something true (which is returned);
    fails the test saying ``what`` was awaited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: the process was reaped between open and read.
        return False


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` has stopped. ``kill(SIGSTOP)``
    returns once the signal is queued: the thread chosen to take it starts
    the group stop only when it next runs, and until then the others (a
    data server woken by a request) go on."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except FileNotFoundError:  # the thread ended
            continue
        if state not in ("T", "t"):
            return False
    return True


class Background:
    """Calls ``step()`` in a thread every ``every`` seconds while inside a
    ``with`` block (fault injectors, garbage makers)."""

    def __init__(self, every: float):
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def step(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.step()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
