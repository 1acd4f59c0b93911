"""The dashboard, metrics, profiles, logs, progress bars, performance
reports and traces, checked with real parsers and a real browser (Debian's
headless Chromium driven by playwright-core; `tests/browser/`).

Screenshots land in tests/artifacts/ (or $SHOAL_ARTIFACTS)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _browser import ARTIFACTS, Workload, combine, explode, load, node_driver, spin

import shoal


@pytest.fixture(scope="module")
def dash():
    with shoal.Client(n_workers=2, dashboard_address="127.0.0.1:0") as c:
        yield c


def test_dashboard_pages_render_live_data_in_chromium(dash):
    link = dash.dashboard_link
    assert link and link.startswith("http://127.0.0.1:") and "?token=" in link
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Workload(dash):
        time.sleep(2)  # some history, and profile samples, before the browser looks
        seen = node_driver("live", link, str(ARTIFACTS))
    assert seen["errors"] == [], seen["errors"]
    assert seen["anonymous_status"] == 401
    f0, f1 = seen["finished"]
    assert f1 > f0 > 0, "the finished-task counter did not move"
    assert int(seen["stream"]["tasks"]) > 0 and int(seen["stream"]["lanes"]) >= 2
    assert {"load", "combine"} <= set(seen["progress_groups"])
    assert "exploded on purpose" in seen.get("detail", ""), seen.get("detail")
    assert "ValueError" in seen["detail"]
    # Its story: the scheduler's transitions, with what caused them.
    assert "processing \u2192 erred" in seen["detail"] and "task-failed" in seen["detail"]
    # And its worker's own steps.
    assert "start \u2192 running" in seen["detail"] and "order " in seen["detail"], seen["detail"]
    assert len(seen["worker_rows"]) == 2
    assert seen["workers_changed"], "the workers table did not change in 2.5 s"
    assert {"load", "combine"} <= set(seen["graph_nodes"])
    assert any("spin" in f for f in seen["flame_frames"]), seen["flame_frames"][:10]
    assert "says hello" in seen["logs"]
    for shot in ("status", "task-detail", "workers", "graph", "profile", "logs"):
        assert (ARTIFACTS / f"{shot}.png").stat().st_size > 1000


def test_performance_report_opens_offline_in_chromium(dash, tmp_path):
    report = tmp_path / "report.html"
    with shoal.performance_report(report, client=dash):
        xs = dash.map(load, range(200), batch_size=1)
        dash.gather([dash.submit(combine, xs[i], xs[i + 1]) for i in range(0, 200, 2)])
    text = report.read_text()
    assert "SHOAL_REPORT" in text and "<script src=" not in text  # self-contained
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(report, ARTIFACTS / "report.html")
    seen = node_driver("report", str(report), str(ARTIFACTS))
    assert seen["errors"] == [], seen["errors"]
    assert seen["requests"] == [], "the report fetched something"
    assert seen["connection"] == "report"
    groups = {row[0]: row for row in seen["summary"]}
    assert groups["load"][1] == "200" and groups["combine"][1] == "100"
    assert int(seen["stream"]["tasks"]) >= 300
    assert seen["memory_series"] == 2
    assert seen["flame_frames"] > 0


def test_client_html_repr_links_the_dashboard(dash):
    deadline = time.time() + 20
    while len(dash.scheduler_info()["workers"]) < 2 and time.time() < deadline:
        time.sleep(0.05)
    page = dash._repr_html_()
    assert "workers" in page and "2 (2 threads)" in page
    assert f'href="{dash.dashboard_link}"' in page


def test_metrics_parse_as_openmetrics_text(dash):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    dash.gather(dash.map(load, range(20)))
    url = dash.dashboard_link.split("?")[0] + "metrics"
    token = dash.dashboard_link.split("token=")[1]
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    states = {s.labels["state"]: s.value for s in families["shoal_tasks"].samples}
    assert set(states) == {"waiting", "ready", "processing", "memory", "erred", "released"}
    # Counter families are named without their samples' _total suffix.
    assert families["shoal_tasks_finished"].samples[0].value >= 20
    assert families["shoal_tasks_finished"].type == "counter"
    assert len(families["shoal_worker_memory_bytes"].samples) == 2
    assert all(s.value > 0 for s in families["shoal_worker_memory_bytes"].samples)
    assert "shoal_scheduler_event_loop_lag_seconds" in families
    # Without the token, or with a wrong one: refused, and the server goes on.
    for headers in ({}, {"Authorization": "Bearer nope"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers))
        assert e.value.code == 401
        assert "token" in e.value.read().decode()
    with urllib.request.urlopen(req) as r:
        assert r.status == 200


def test_bad_queries_get_clear_errors_and_the_cluster_goes_on(dash):
    with pytest.raises(ValueError, match="no such page"):
        dash.query("/api/nothing")
    with pytest.raises(ValueError, match="whole number"):
        dash.query("/api/status?since=abc")
    with pytest.raises(ValueError, match="not known"):
        dash.query("/api/task/12345")
    base = dash.dashboard_link.replace("?token=", "api/task/xyz?token=")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base)
    assert e.value.code == 400 and "whole numbers" in e.value.read().decode()
    assert dash.submit(combine, 1, 2).result() == 3


def test_trace_is_chrome_trace_event_format(dash, tmp_path):
    dash.gather(dash.map(load, range(30), batch_size=1))
    bad = dash.submit(explode, 7)
    shoal.wait([bad])
    path = dash.trace(tmp_path / "trace.json")
    doc = json.loads(Path(path).read_text())
    events = doc["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    assert len(complete) >= 31
    for e in complete:  # the "complete event" fields, with their types
        assert isinstance(e["name"], str) and isinstance(e["cat"], str)
        assert isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] >= 1
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["args"], dict)
    for e in meta:
        assert e["name"] in ("process_name", "thread_name") and "name" in e["args"]
    pids = {e["pid"] for e in complete}
    assert pids <= {e["pid"] for e in meta if e["name"] == "process_name"}
    assert {"load", "explode"} <= {e["name"] for e in complete}
    assert any(e["cat"] == "error" for e in complete)
    assert doc["displayTimeUnit"] in ("ms", "ns")


def test_profile_and_worker_logs(dash):
    dash.gather(dash.map(load, range(300), batch_size=1))
    # No waiting: profile() has the workers hand over their samples first.
    stacks = dash.profile(group="load")
    assert stacks, "no profile samples for group 'load'"
    assert all("load (" in s for s in stacks), list(stacks)[:3]
    assert any(s.endswith(")") and "spin (" in s for s in stacks)
    assert dash.profile(group="no-such-group") == {}
    logs = dash.get_worker_logs()
    assert len(logs) >= 1
    lines = [line for ls in logs.values() for line in ls]
    assert any("WARNING shoal.test: load 0 says hello" in line for line in lines)
    assert all(len(ls) <= 1 for ls in dash.get_worker_logs(n=1).values())


def test_progress_bar_in_a_terminal_stream(dash):
    out = io.StringIO()
    xs = dash.map(load, range(100), batch_size=1)
    ys = [dash.submit(combine, xs[i], xs[i + 1]) for i in range(0, 100, 2)]
    bad = dash.submit(explode, 1)
    shoal.progress(xs, ys, bad, file=out, interval=0.05)
    text = out.getvalue()
    assert "load" in text and "100/100" in text
    assert "combine" in text and "50/50" in text
    assert "explode" in text and "1 erred" in text
    with pytest.raises(TypeError, match="progress"):
        shoal.progress(42)


def test_progress_bar_in_jupyter_updates_html_in_place(dash, monkeypatch):
    # A real IPython shell; its display publisher is captured as Jupyter's
    # front end would receive it. Without ipywidgets: HTML, redrawn.
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    InteractiveShell.instance()
    xs = dash.map(load, range(60), batch_size=1)
    with capture_output() as cap:
        t = shoal.progress(xs, notebook=True, interval=0.05)
        assert t.is_alive() or xs[-1].done()  # returns at once; a thread updates
        t.join(60)
    html = [o.data["text/html"] for o in cap.outputs if "text/html" in o.data]
    assert len(html) >= 2, "the bar was not updated"
    assert "60/60" in html[-1] and "load" in html[-1]
    assert "60/60" not in html[0]


def test_progress_bar_in_jupyter_is_a_live_widget_where_ipywidgets_is_installed(dash, monkeypatch):
    import ipywidgets
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from shoal import diagnostics

    made = []

    class Seen(diagnostics._Widgets):
        def __init__(self, groups):
            super().__init__(groups)
            made.append(self)

    monkeypatch.setattr(diagnostics, "_Widgets", Seen)
    InteractiveShell.instance()
    xs = dash.map(load, range(60), batch_size=1)
    bad = dash.submit(explode, 1)
    with capture_output() as cap:
        t = shoal.progress(xs, bad, notebook=True, interval=0.05)
        t.join(60)
    views = [o.data for o in cap.outputs if "application/vnd.jupyter.widget-view+json" in o.data]
    assert len(views) == 1, cap.outputs  # shown once, then updated in place
    (w,) = made
    assert isinstance(w.box, ipywidgets.VBox)
    load_bar, explode_bar = w.bars
    assert (load_bar.value, load_bar.max, load_bar.bar_style) == (60, 60, "success")
    assert "60/60" in w.labels[0].value
    assert explode_bar.bar_style == "danger" and "1 erred" in w.labels[1].value


def test_shoal_top_shows_workers_and_groups(tmp_path):
    sfile = tmp_path / "s.json"
    sched = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(sfile),
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = None
    try:
        deadline = time.time() + 20
        while not sfile.exists() and time.time() < deadline:
            time.sleep(0.05)
        info = json.loads(sfile.read_text())
        assert info["dashboard"].startswith("http://127.0.0.1:")
        worker = subprocess.Popen(
            [sys.executable, "-m", "shoal", "worker", "--scheduler-file", str(sfile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with shoal.Client(scheduler_file=sfile, set_as_default=False) as c:
            link = c.dashboard_link
            assert link.startswith(info["dashboard"] + "?token=")
            with urllib.request.urlopen(link) as r:
                assert b"Shoal dashboard" in r.read()
            c.gather(c.map(combine, range(10), range(10)))
            keep = c.submit(combine, 1, 1)
            keep.result()
            top = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "shoal",
                    "top",
                    "--scheduler-file",
                    str(sfile),
                    "--iterations",
                    "2",
                    "--interval",
                    "0.2",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert top.returncode == 0, top.stderr
            assert "WORKER" in top.stdout and "TASK GROUP" in top.stdout
            assert "combine" in top.stdout and "tasks/s" in top.stdout
            bad = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "shoal",
                    "top",
                    "--scheduler-file",
                    str(sfile),
                    "--interval",
                    "0",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert bad.returncode != 0 and "--interval" in bad.stderr
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(10)
        sched.terminate()
        out, _ = sched.communicate(timeout=10)
    assert "dashboard: http://127.0.0.1:" in out


def make_big(i: int):
    import numpy as np

    a = np.full(4_000_000, float(i))  # 32 MB
    spin(0.01)  # long enough to be sampled
    return a


def frames_holding_arrays() -> list[str]:
    """Frame objects (of finished calls) whose locals keep an array alive."""
    import gc
    import types

    import numpy as np

    held = []
    for o in gc.get_objects():
        if isinstance(o, types.FrameType) and o.f_code.co_name in ("make_big", "_execute"):
            if any(isinstance(v, np.ndarray) and v.nbytes > 1_000_000 for v in o.f_locals.values()):
                held.append(o.f_code.co_name)
    return held


def test_the_profiler_keeps_no_task_frames_alive(monkeypatch):
    # A sampler that held frames would keep every sampled task's locals
    # (its result) in memory after the task, until the cyclic GC ran.
    monkeypatch.setenv("SHOAL_PROFILE_INTERVAL", "1ms")
    with shoal.Client(n_workers=1, dashboard_address=None, set_as_default=False) as c:
        xs = [c.submit(make_big, i) for i in range(8)]
        shoal.wait(xs)
        deadline = time.time() + 10  # samples travel with heartbeats
        while not c.profile(group="make_big") and time.time() < deadline:
            time.sleep(0.2)
        assert c.profile(group="make_big"), "the profiler took no samples"
        assert c.submit(frames_holding_arrays).result() == []


def test_a_bad_profiler_interval_fails_in_the_caller(monkeypatch):
    monkeypatch.setenv("SHOAL_PROFILE_INTERVAL", "sometimes")
    with pytest.raises(ValueError, match="SHOAL_PROFILE_INTERVAL"):
        shoal.Client(n_workers=1)


def test_profiler_interval_is_validated():
    from shoal._profile import parse_interval

    assert parse_interval("10ms") == pytest.approx(0.01)
    assert parse_interval("0") == 0.0 and parse_interval("off") == 0.0
    assert parse_interval("0.5") == 0.5
    with pytest.raises(ValueError, match="SHOAL_PROFILE_INTERVAL"):
        parse_interval("often")


def test_no_dashboard_and_bad_dashboard_addresses():
    with shoal.Client(n_workers=1, dashboard_address=None, set_as_default=False) as c:
        assert c.dashboard_link is None
        c.submit(combine, 1, 2).result()
        assert c.query("/api/status")["counters"]["finished"] >= 1  # the data is there
    with pytest.raises(ValueError, match="dashboard_address"):
        shoal.Client(n_workers=1, dashboard_address="localhost")
    with pytest.raises(OSError, match="dashboard"):
        shoal.Client(n_workers=1, dashboard_address="192.0.2.1:8787")  # not this host's


def test_a_task_detail_names_its_group_and_its_inputs(dash):
    a = dash.submit(combine, 1, 2)
    b = dash.submit(combine, a, 10, key="the-sum")
    assert b.result() == 13
    detail = dash.query(f"/api/task/{b._id}")
    assert (detail["name"], detail["group"], detail["state"]) == ("the-sum", "combine", "memory")
    assert [(i["id"], i["name"]) for i in detail["inputs"]] == [(a._id, a.key)]
