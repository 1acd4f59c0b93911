"""Small helpers the test modules share."""

from __future__ import annotations

import socket
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
