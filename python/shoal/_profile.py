"""The worker's statistical profiler and log capture.

A daemon thread wakes every ``SHOAL_PROFILE_INTERVAL`` (default 20 ms; ``0``
turns it off), reads the stacks of the threads running tasks
(``sys._current_frames``), and counts each stack under its task's group.
Counts travel to the scheduler once a second with the heartbeat, as folded
stacks (``"f (file:line);g (file:line)"``, the flame graph format), so a
sample costs a dictionary increment and the network sees a few hundred
bytes a second. Only frames below the worker's own ``_execute`` are kept:
the profile shows the user's code, not Shoal's.

A task shorter than the GIL's switch interval (5 ms) would never be seen
when the worker waits between tasks: the sampler waits for the GIL, which
the task's thread gives up only once the task has ended. So a tick falls due
(in Rust) before the sampler asks for the GIL, and a task that ends after
the tick leaves itself behind; a sampler that then finds no task running
counts that one (its function as the stack: its frames are gone by then).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

from . import _core

DEFAULT_INTERVAL = 0.02  # seconds (Dask samples every 10 ms; see bench_dashboard.py)
FLUSH_EVERY = 1.0  # seconds
MAX_DEPTH = 64  # frames kept per stack (the innermost ones)


def parse_interval(text: str) -> float:
    """``"10ms"``, ``"0.01"``, ``"0"``/``"off"`` (off) -> seconds."""
    t = text.strip().lower()
    if t in ("", "0", "off", "false", "no", "none"):
        return 0.0
    scale = 1.0
    for suffix, factor in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], factor
            break
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(
            f"SHOAL_PROFILE_INTERVAL must be a duration such as '10ms' or '0.01', or 0 "
            f"to turn the profiler off, not {text!r}"
        ) from None
    if value < 0 or value != value:
        raise ValueError(f"SHOAL_PROFILE_INTERVAL must not be negative, not {text!r}")
    return max(value, 1e-4)


def interval_from_env() -> float:
    return parse_interval(_core.setting("SHOAL_PROFILE_INTERVAL"))


def _frame_name(code: Any) -> str:
    filename = code.co_filename
    short = filename.rsplit("/", 2)
    short_name = "/".join(short[-2:]) if len(short) > 1 else filename
    return f"{code.co_name} ({short_name}:{code.co_firstlineno})"


class Sampler:
    """Samples the stacks of threads that run tasks (``groups``: thread id
    -> task group, maintained by the executor)."""

    def __init__(self, core: Any, groups: dict[int, str], interval: float, stop_code: Any):
        self.core = core
        self.groups = groups
        self.interval = interval
        self.counts: Counter[tuple[str, str]] = Counter()
        self.names: dict[Any, str] = {}  # code object -> frame name (cache)
        # Frames from the worker's task runner up are Shoal's, not the task's.
        self.stop_code = stop_code
        # The last tick handled, and the last task that ended after a tick
        # not handled yet: (group, function, tick).
        self.handled = 0
        self.ended: tuple[str, Any, int] | None = None
        self.stopped = threading.Event()  # a worker in a client's process closed

    def task_ended(self, group: str, func: Any, started: int) -> None:
        """A task of ``group`` running ``func`` ended (``started``: the tick
        count when it began): if a tick fell due while it ran that the
        sampler has not handled, it is left for the sampler."""
        tick = self.core.ticks()
        if tick > started and tick > self.handled:
            self.ended = (group, func, tick)

    def _count_ended(self) -> None:
        group, func, tick = self.ended
        if tick > self.handled:
            code = getattr(func, "__code__", None)
            if code is not None:
                name = _frame_name(code)
            else:
                name = func if isinstance(func, str) else getattr(func, "__name__", repr(func))
            self.counts[(group, name)] += 1

    def sample(self) -> bool:
        """Counts the stacks of the tasks running now; False if none was."""
        seen = False
        frames = sys._current_frames()
        try:
            for ident, group in list(self.groups.items()):
                frame = frames.get(ident)
                stack: list[str] = []
                while frame is not None and frame.f_code is not self.stop_code:
                    code = frame.f_code
                    name = self.names.get(code)
                    if name is None:
                        name = self.names[code] = _frame_name(code)
                    stack.append(name)
                    frame = frame.f_back
                if frame is None or not stack:
                    continue  # between tasks, or inside Shoal's own code
                self.counts[(group, ";".join(reversed(stack[:MAX_DEPTH])))] += 1
                seen = True
        finally:
            # The dict holds this very frame: a reference cycle that would
            # keep every sampled frame, and the locals of the tasks they
            # ran (their results), alive until the garbage collector runs.
            frames.clear()
        return seen

    def flush(self) -> None:
        if self.counts:
            items = [(g, s, n) for (g, s), n in self.counts.items()]
            self.counts.clear()
            self.core.add_profile(items)

    def run(self) -> None:
        last = time.monotonic()
        epoch = self.core.sync_epoch()
        self.core.set_sampler(True)
        core = self.core
        while not self.stopped.is_set():
            core.sampler_sleep(self.interval)
            try:
                if not self.sample() and self.ended is not None:
                    self._count_ended()  # a short task that ran at the tick
                self.ended, self.handled = None, core.ticks()
                now = time.monotonic()
                synced = self.core.sync_epoch()
                if synced != epoch:
                    # A client asked for everything up to now (a report).
                    epoch, last = synced, now
                    self.flush()
                    self.core.synced()
                elif now - last >= FLUSH_EVERY:
                    last = now
                    self.flush()
            except Exception as e:  # noqa: BLE001 - profiling must never stop a worker
                logging.getLogger("shoal.profile").warning("profiler stopped: %s", e)
                self.core.set_sampler(False)
                self.core.synced()
                return


class _RingHandler(logging.Handler):
    """Copies log records into the worker's log ring (``get_worker_logs``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _core.log_line(self.format(record))
        except Exception:  # noqa: BLE001
            self.handleError(record)


_installed = threading.Lock()
_handler: _RingHandler | None = None


def capture_logging() -> None:
    """Sends this process's ``logging`` records (at the levels its loggers
    let through: WARNING by default) to the log ring as well. Idempotent."""
    global _handler
    with _installed:
        if _handler is not None:
            return
        root = logging.getLogger()
        if not root.handlers:
            # A handler on the root logger turns off logging's last-resort
            # printing to stderr: keep printing there, as before.
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.addHandler(console)
        _handler = _RingHandler()
        _handler.setFormatter(
            logging.Formatter("%(created).3f %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(_handler)
