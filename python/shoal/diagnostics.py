"""Seeing what runs: progress bars, performance reports and traces.

* :func:`progress` draws one bar per task group (done/total, rate, ETA) in
  a terminal or, in Jupyter, as HTML that updates in place.
* :class:`performance_report` writes one self-contained HTML file: the task
  stream, task group summary, worker memory over time and the profile of
  what ran inside the ``with`` block. It opens offline (the dashboard's
  script and data are inlined).
* :func:`write_trace` (``Client.trace``) writes the task stream in the Chrome
  trace event format (``chrome://tracing``, Perfetto).
"""

from __future__ import annotations

import html
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _context, _core
from ._futures import Future, FutureList

__all__ = ["progress", "performance_report", "write_trace"]

# Task stream entries: [seq, task, group, worker, thread, start_us,
# duration_us, kind, bytes, count]; kinds as the scheduler numbers them.
KINDS = {0: "task", 1: "error", 2: "transfer", 3: "spill"}
ACTIVITY_LANE = 1_000_000  # thread id of transfers and spills in a trace


# ---------------------------------------------------------------- progress


def _collect(obj: Any, out: list[tuple[Any, str, list[int], int]]) -> None:
    """Appends ``(client, group, task ids, elements per task)`` for every
    future in ``obj`` (futures, ``map`` results, containers, Dask
    collections holding futures)."""
    if isinstance(obj, Future):
        out.append((obj._client, obj._group, [obj._id], 1))
    elif isinstance(obj, FutureList):
        per = obj._batch or 1
        out.append((obj._client, obj._group, list(obj._ids), per))
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _collect(v, out)
    elif hasattr(obj, "__dask_graph__"):
        graph = obj.__dask_graph__() or {}
        found = [v for v in graph.values() if isinstance(v, Future)]
        if not found:
            raise TypeError(
                "progress() needs futures: persist the collection first "
                "(client.persist(x)), then pass what persist returned"
            )
        _collect(found, out)
    else:
        raise TypeError(
            f"progress() takes futures, map results, Dask collections holding futures, "
            f"or containers of them, not {type(obj).__name__}"
        )


class _Group:
    def __init__(self, name: str):
        self.name = name
        self.pending: list[tuple[Any, int, int]] = []  # (client, task id, elements)
        self.total = 0
        self.done = 0
        self.erred = 0
        self.start = time.monotonic()
        self.end: float | None = None

    def poll(self) -> None:
        still = []
        for client, tid, n in self.pending:
            session = client._session
            s = session.status(tid)
            if tid in session.cancelled or s != "pending":
                self.done += n
                if s != "finished" or tid in session.cancelled:
                    self.erred += n
            else:
                still.append((client, tid, n))
        self.pending = still
        if not still and self.end is None:
            self.end = time.monotonic()

    def rate(self) -> float:
        elapsed = (self.end or time.monotonic()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        left = self.total - self.done
        return left / r if r > 0 and left else (0.0 if not left else None)


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _bar_line(g: _Group, width: int, name_width: int) -> str:
    frac = g.done / g.total if g.total else 1.0
    filled = int(frac * width)
    bar = "#" * filled + " " * (width - filled)
    err = f"  {g.erred} erred" if g.erred else ""
    return (
        f"{g.name[:name_width]:<{name_width}} [{bar}] {g.done}/{g.total} "
        f"{frac:4.0%}  {g.rate():,.0f}/s  ETA {_fmt_time(g.eta())}{err}"
    )


def _html(groups: list[_Group]) -> str:
    rows = []
    for g in groups:
        frac = g.done / g.total if g.total else 1.0
        colour = "#c0392b" if g.erred else "#2a9d8f"
        rows.append(
            f"<tr><td style='padding-right:8px'>{html.escape(g.name)}</td>"
            f"<td style='width:300px'><div style='background:#eee;width:300px;height:12px'>"
            f"<div style='background:{colour};width:{frac * 100:.1f}%;height:12px'></div>"
            f"</div></td><td style='padding-left:8px'>{g.done}/{g.total} "
            f"({g.rate():,.0f}/s, ETA {_fmt_time(g.eta())})"
            f"{f', {g.erred} erred' if g.erred else ''}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress(
    *futures: Any,
    notebook: bool | None = None,
    interval: float = 0.2,
    file: Any = None,
) -> Any:
    """Draws a progress bar per task group until every given future is done.

    Takes futures, ``map`` results, containers of them, or Dask collections
    that hold futures (what ``client.persist`` returns). In a terminal it
    redraws in place and returns when all are done; in Jupyter
    (``notebook=None`` detects it) it shows ipywidgets progress bars (HTML
    where ipywidgets is not installed) that a background thread updates,
    and returns at once (the thread, to ``join`` if wanted).
    Failed and cancelled tasks count as done and are shown as erred.
    """
    if not (interval > 0):
        raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
    found: list[tuple[Any, str, list[int], int]] = []
    _collect(list(futures), found)
    groups: dict[str, _Group] = {}
    for client, name, ids, per in found:
        g = groups.setdefault(name, _Group(name))
        for tid in dict.fromkeys(ids):
            g.pending.append((client, tid, per))
            g.total += per
    ordered = list(groups.values())
    if notebook is None:
        notebook = _in_notebook()
    if notebook:
        return _progress_notebook(ordered, interval)
    _progress_terminal(ordered, interval, file or sys.stdout)
    return None


def _progress_terminal(groups: list[_Group], interval: float, out: Any) -> None:
    tty = hasattr(out, "isatty") and out.isatty()
    name_width = max([len(g.name) for g in groups] + [4])
    name_width = min(name_width, 30)
    drawn = 0
    last_print = 0.0
    while True:
        for g in groups:
            g.poll()
        finished = all(not g.pending for g in groups)
        lines = [_bar_line(g, 30, name_width) for g in groups]
        now = time.monotonic()
        if tty:
            if drawn:
                out.write(f"\x1b[{drawn}F")  # back to the first bar
            out.write("".join(f"\x1b[2K{line}\n" for line in lines))
            drawn = len(lines)
        elif finished or now - last_print >= 5.0:
            # Not a terminal (a log file): a snapshot every few seconds.
            out.write("".join(line + "\n" for line in lines))
            last_print = now
        out.flush()
        if finished:
            return
        time.sleep(interval)


class _Widgets:
    """One ipywidgets bar and label per group, in a box: Jupyter draws
    them live, with no HTML redrawn per update."""

    def __init__(self, groups: list[_Group]):
        import ipywidgets  # type: ignore[import-not-found]

        self.bars = [
            ipywidgets.IntProgress(value=0, min=0, max=max(g.total, 1), description=g.name[:20])
            for g in groups
        ]
        self.labels = [ipywidgets.Label() for _ in groups]
        rows = [ipywidgets.HBox([b, t]) for b, t in zip(self.bars, self.labels, strict=True)]
        self.box = ipywidgets.VBox(rows)

    def update(self, groups: list[_Group]) -> None:
        for g, bar, label in zip(groups, self.bars, self.labels, strict=True):
            bar.value = g.done
            bar.bar_style = "danger" if g.erred else ("success" if not g.pending else "")
            label.value = f"{g.done}/{g.total} ({g.rate():,.0f}/s, ETA {_fmt_time(g.eta())})" + (
                f", {g.erred} erred" if g.erred else ""
            )


def _progress_notebook(groups: list[_Group], interval: float) -> threading.Thread:
    from IPython.display import HTML, display  # type: ignore[import-not-found]

    try:
        widgets: _Widgets | None = _Widgets(groups)
    except ImportError:  # no ipywidgets: HTML, redrawn
        widgets = None
    if widgets is not None:
        display(widgets.box)
        show: Callable[[], None] = lambda: widgets.update(groups)  # noqa: E731
    else:
        handle = display(HTML(_html(groups)), display_id=True)
        show = lambda: handle.update(HTML(_html(groups)))  # noqa: E731

    def update() -> None:
        while True:
            for g in groups:
                g.poll()
            show()
            if all(not g.pending for g in groups):
                return
            time.sleep(interval)

    t = threading.Thread(target=update, name="shoal-progress", daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------ trace


def _trace_events(report: dict[str, Any]) -> list[dict[str, Any]]:
    names = {g["id"]: g["name"] for g in report["groups"]}
    workers = report.get("worker_names", {})
    events: list[dict[str, Any]] = []
    lanes: set[tuple[int, int]] = set()
    for seq, task, group, worker, thread, start, dur, kind, nbytes, count in report["stream"]:
        k = KINDS.get(kind, "task")
        tid = ACTIVITY_LANE if thread >= 2**32 - 1 else thread
        lanes.add((worker, tid))
        events.append(
            {
                "name": k if k in ("transfer", "spill") else names.get(group, "task"),
                "cat": k,
                "ph": "X",
                "ts": start,
                "dur": max(dur, 1),
                "pid": worker,
                "tid": tid,
                "args": {"task": task, "bytes": nbytes, "count": count, "seq": seq},
            }
        )
    for worker, tid in sorted(lanes):
        name = workers.get(str(worker), f"worker {worker}")
        events.append(
            {"name": "process_name", "ph": "M", "pid": worker, "tid": 0, "args": {"name": name}}
        )
        lane = "transfers & spills" if tid == ACTIVITY_LANE else f"thread {tid}"
        events.append(
            {"name": "thread_name", "ph": "M", "pid": worker, "tid": tid, "args": {"name": lane}}
        )
    return events


def write_trace(report: dict[str, Any], filename: str | os.PathLike) -> str:
    """Writes a Chrome trace JSON (object form) of a ``/api/report`` answer."""
    doc = {
        "traceEvents": _trace_events(report),
        "displayTimeUnit": "ms",
        "otherData": {"producer": f"shoal {_core.__version__}"},
    }
    path = os.fspath(filename)
    with open(path, "w") as fh:
        json.dump(doc, fh)
    return path


# ------------------------------------------------------ performance report


def _profile_diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def _summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task group: tasks run, errors, total and mean duration, bytes
    transferred (by fetches of its results) in the report's window."""
    names = {g["id"]: g["name"] for g in report["groups"]}
    rows: dict[str, dict[str, Any]] = {}
    for _seq, _task, group, _w, _t, _start, dur, kind, nbytes, count in report["stream"]:
        name = names.get(group, "(unknown)")
        r = rows.setdefault(
            name, {"group": name, "tasks": 0, "erred": 0, "total_s": 0.0, "transfer_bytes": 0}
        )
        if kind == 0:
            r["tasks"] += count
            r["total_s"] += dur / 1e6
        elif kind == 1:
            r["erred"] += count
        elif kind == 2:
            r["transfer_bytes"] += nbytes
    for r in rows.values():
        r["mean_ms"] = r["total_s"] * 1e3 / r["tasks"] if r["tasks"] else 0.0
    return sorted(rows.values(), key=lambda r: -r["total_s"])


def render_report(data: dict[str, Any], title: str) -> str:
    """The report's HTML: the dashboard's page, script and style inlined,
    with ``data`` in place of the live API."""
    page = _core.dashboard_asset("index.html")
    css = _core.dashboard_asset("app.css")
    js = _core.dashboard_asset("app.js")
    blob = json.dumps(data).replace("</", "<\\/")
    page = page.replace('<link rel="stylesheet" href="app.css">', f"<style>{css}</style>")
    page = page.replace(
        '<script src="app.js"></script>',
        f"<script>window.SHOAL_REPORT = {blob};</script>\n<script>{js}</script>",
    )
    return page.replace("<title>Shoal dashboard</title>", f"<title>{html.escape(title)}</title>")


class performance_report:  # noqa: N801 - named like distributed.performance_report
    """``with performance_report("report.html"):`` records what the cluster
    does inside the block and writes one self-contained HTML file (opens
    offline): task stream, task group summary (count, total and mean
    duration, bytes transferred), progress by group, worker memory and CPU
    over time, and the profile of the block.

    Closing asks every worker for its last figures (profile samples,
    transfers) and waits for them, a few tens of milliseconds."""

    def __init__(self, filename: str | os.PathLike = "shoal-report.html", client: Any = None):
        self.filename = os.fspath(filename)
        self.client = client

    def __enter__(self) -> performance_report:
        if self.client is None:
            self.client = _context.get_client()  # ValueError when none is open
        self.start = time.time()
        self.start_us = int(self.start * 1e6)
        self.profile_before = self.client.profile()
        return self

    def __exit__(self, *exc: Any) -> None:
        c = self.client
        c.query("/api/sync")  # every worker's last transfers, spills, samples
        data = c.query(f"/api/report?since_us={self.start_us}")
        data["profile"] = _profile_diff(c.profile(), self.profile_before)
        data["summary"] = _summary(data)
        data["title"] = f"Shoal performance report: {time.ctime(self.start)}"
        data["duration_s"] = time.time() - self.start
        with open(self.filename, "w") as fh:
            fh.write(render_report(data, data["title"]))
