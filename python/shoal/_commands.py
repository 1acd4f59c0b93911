"""Command tasks and time limits: what the client and the worker share.

The program itself is started, watched and stopped by the Rust runtime
(``WorkerCore.run_command``: its own process group, a pidfd wait, SIGTERM
then SIGKILL); this module turns options into what it takes and its outcome
into a result or an error.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

from .errors import CommandError, TaskTimeoutError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")


def parse_duration(value: Any, what: str = "time_limit") -> float | None:
    """Seconds from a number of seconds or a string such as ``"90s"``,
    ``"10m"``, ``"1h30m"``, ``"2.5"`` (seconds); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be seconds or a duration such as '10m', not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos, seconds = 0, 0.0
        for m in _PART.finditer(text):
            # A bare number only alone: "1h30" could mean 30 s or 30 min.
            if m.start() != pos or (m.group(2) is None and (pos or m.end() != len(text))):
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2) or "s"]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(
                f"{what} {value!r} is not a duration: use seconds (90) or units "
                "ms, s, m, h, d ('90s', '10m', '1h30m')"
            )
    else:
        raise TypeError(f"{what} must be seconds or a duration such as '10m', not {value!r}")
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"{what} must be a positive, finite duration, not {value!r}")
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
