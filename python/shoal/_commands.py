"""Command tasks and time limits: what the client and the worker share.

The program itself is started, watched and stopped by the Rust runtime
(``WorkerCore.run_command``: its own process group, a pidfd wait, SIGTERM
then SIGKILL); this module turns options into what it takes and its outcome
into a result or an error.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from . import _core
from .errors import CommandError, TaskTimeoutError


def parse_duration(value: Any, what: str = "time_limit") -> float | None:
    """Seconds from a number of seconds or a string such as ``"90s"``,
    ``"10m"``, ``"1h30m"``, ``"2.5"`` (seconds; the CLI's parser,
    ``_core.parse_duration``); None stays None. At most 100 years."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be seconds or a duration such as '10m', not {value!r}")
    if isinstance(value, str):
        try:
            return _core.parse_duration(value)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if not isinstance(value, int | float):
        raise TypeError(f"{what} must be seconds or a duration such as '10m', not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int past a float's range
        seconds = float("inf")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{what} must be a positive, finite duration, not {value!r}")
    if seconds > _core.MAX_DURATION:
        raise ValueError(f"{what} {value!r} is longer than the longest duration taken (100 years)")
    return seconds


def limit_ms(value: Any, what: str = "time_limit") -> int:
    """``time_limit=`` (or ``time_request=``) as the protocol's
    milliseconds (0: none)."""
    s = parse_duration(value, what)
    return 0 if s is None else max(1, round(s * 1000))


def output_target(value: Any, what: str) -> tuple[int, str]:
    """``stdout=``/``stderr=`` of ``submit_command``: ``subprocess.PIPE``
    (kept, returned), ``subprocess.DEVNULL`` (dropped) or a path (a file on
    the worker's host; ``%{JOB_ID}``, ``%{TASK_ID}``, ``%{CWD}`` expand)."""
    if value is None or value is subprocess.PIPE:
        return (0, "")
    if value is subprocess.DEVNULL:
        return (1, "")
    if isinstance(value, str | os.PathLike):
        return (2, os.fspath(value))
    raise TypeError(
        f"{what} must be subprocess.PIPE, subprocess.DEVNULL or a file path, not {value!r}"
    )


def run(core: Any, tid: int, name: str, args: bytes, job: int, resources: Any, limit: Any) -> Any:
    """Worker side: runs command task ``tid``; returns a
    ``subprocess.CompletedProcess`` or raises ``CommandError`` /
    ``TaskTimeoutError``."""
    cpus = 1
    extra: list[tuple[str, str]] = []
    for k, v in resources or ():
        if k == "CPU":
            cpus = max(1, int(-(-v // 1)))
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus is not None and any(k == "GPU" for k, _ in resources or ()):
        extra.append(("CUDA_VISIBLE_DEVICES", gpus))
    try:
        ending, code, out, err, tail, killed, argv = core.run_command(
            tid, args, job, cpus, extra, limit
        )
    except OSError as e:
        raise CommandError(f"command task {name!r}: {e}", [], None) from None
    if ending == "exited" and code == 0:
        return subprocess.CompletedProcess(argv, 0, out, err)
    quoted = " ".join(argv)
    said = f"; its standard error ends with:\n{tail.rstrip()}" if tail.strip() else ""
    if ending == "timeout":
        how = (
            f"SIGTERM, then SIGKILL after {core.stop_grace:g}s as it did not exit"
            if killed
            else "SIGTERM"
        )
        raise TaskTimeoutError(
            f"command {quoted!r} ran past its time limit of {limit:g}s "
            f"and was stopped ({how}){said}"
        )
    if ending == "stopped":
        raise CommandError(f"command {quoted!r} was stopped (cancelled)", argv, None, tail)
    if ending == "signaled":
        sig = core.signal_name(code)
        raise CommandError(f"command {quoted!r} was killed by {sig}{said}", argv, -code, tail)
    raise CommandError(f"command {quoted!r} exited with status {code}{said}", argv, code, tail)
