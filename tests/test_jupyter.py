"""Shoal where people work: the dashboard behind a real `jupyter server`
with jupyter-server-proxy (at a JupyterHub-style path prefix, the link
made from SHOAL_DASHBOARD_LINK), loaded by Chromium with every panel
filling; and the example notebooks in examples/, run by nbclient."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from _browser import ARTIFACTS, Workload, node_driver
from _helpers import free_port, wait_for

import shoal

EXAMPLES = Path(__file__).parent.parent / "examples"
PREFIX = "/user/alice/"  # as JupyterHub serves a user's server


@pytest.fixture
def jupyter(tmp_path):
    """A real `jupyter server` (with jupyter-server-proxy, which its package
    enables) at PREFIX, with a token; yields (origin, token)."""
    port, token = free_port(), "jupyter-secret-token"
    env = {
        **os.environ,
        # Nothing from the user's own Jupyter set-up.
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    log = open(tmp_path / "jupyter.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "server", "--no-browser", f"--ServerApp.port={port}"]
        + ["--ServerApp.ip=127.0.0.1", f"--ServerApp.base_url={PREFIX}"]
        + [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"]
        + ["--ServerApp.port_retries=0", *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    origin = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "jupyter.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{origin}{PREFIX}api/status?token={token}", timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_for(up, 60, "jupyter server to answer")
        yield origin, token
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_dashboard_works_behind_jupyter_server_proxy_in_chromium(jupyter, monkeypatch):
    origin, jtoken = jupyter
    # What JupyterHub sets in a user's server, and the template its users
    # would put in their settings file.
    with shoal.Client(n_workers=2, dashboard_address="127.0.0.1:0") as c:
        port = urllib.parse.urlsplit(c.dashboard_link).port
        monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
        monkeypatch.setenv("SHOAL_DASHBOARD_LINK", "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/")
        link = c.dashboard_link
        assert link.startswith(f"{PREFIX}proxy/{port}/?token="), link
        assert f'href="{link}"' in c._repr_html_()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shots = ARTIFACTS / "jupyter-proxy"
        shots.mkdir(exist_ok=True)
        with Workload(c):
            time.sleep(2)
            login = f"{origin}{PREFIX}?token={jtoken}"
            seen = node_driver("live", origin + link, str(shots), env={"LOGIN_URL": login})
    assert seen["errors"] == [], seen["errors"]
    # The proxy itself refuses a browser that has not logged in to Jupyter.
    assert seen["anonymous_status"] in (302, 401, 403), seen["anonymous_status"]
    assert seen["login_status"] == 200 and seen["page_status"] == 200
    # Every panel filled through the proxy: the live stream (server-sent
    # events), progress, a task's detail, workers, graph, profile, logs.
    f0, f1 = seen["finished"]
    assert f1 > f0 > 0, "the finished-task counter did not move through the proxy"
    assert int(seen["stream"]["tasks"]) > 0 and int(seen["stream"]["lanes"]) >= 2
    assert {"load", "combine"} <= set(seen["progress_groups"])
    assert "exploded on purpose" in seen.get("detail", ""), seen.get("detail")
    assert len(seen["worker_rows"]) == 2 and seen["workers_changed"]
    assert {"load", "combine"} <= set(seen["graph_nodes"])
    assert any("spin" in f for f in seen["flame_frames"]), seen["flame_frames"][:10]
    assert "says hello" in seen["logs"]
    for shot in ("status", "task-detail", "workers", "graph", "profile", "logs"):
        assert (shots / f"{shot}.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(p.name for p in (EXAMPLES / "notebooks").glob("*.ipynb")))
def test_example_notebook_runs(name, tmp_path):
    """Each example notebook runs top to bottom in a real kernel (nbclient,
    ipykernel); its cells assert what they claim."""
    import nbclient
    import nbformat

    nb = nbformat.read(EXAMPLES / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name} is committed with outputs: clear them"
    )
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if name == "01-quickstart.ipynb":
        # The webinar's flow: the client's HTML summary, live progress
        # widgets, the dashboard link shown.
        html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
        assert any("workers" in h and "dashboard" in h for h in html), html
        assert any(
            "application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs
        ), "progress() drew no widget"
        assert any("Open the dashboard" in h and "?token=" in h for h in html)
