"""The settings file: defaults set once (TOML), the environment over it,
`shoal info` showing each effective value and where it came from, and a
bad file refused with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse

import pytest

SHOAL = [sys.executable, "-m", "shoal"]


def run(args, env, **kw):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, **kw)


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["HOME"] = str(tmp_path)
    env.pop("XDG_CONFIG_HOME", None)
    env.update(extra)
    return env


def setting_line(info: str, name: str) -> str:
    return next(line for line in info.splitlines() if line[3:].startswith(name + " "))


def test_the_file_in_the_config_directory_sets_defaults_and_the_environment_wins(tmp_path):
    cfg = tmp_path / ".config" / "shoal"
    cfg.mkdir(parents=True)
    (cfg / "shoal.toml").write_text(
        '# my defaults\nheartbeat-timeout = 7\nlog = "info"\nshm-huge = false\n'
    )
    env = clean_env(tmp_path)
    info = run([*SHOAL, "info"], env).stdout
    assert f"settings file: {cfg / 'shoal.toml'}" in info
    assert setting_line(info, "SHOAL_HEARTBEAT_TIMEOUT").split() == [
        "fSHOAL_HEARTBEAT_TIMEOUT",
        "7",
    ]
    assert setting_line(info, "SHOAL_SHM_HUGE").split() == ["fSHOAL_SHM_HUGE", "0"]
    assert setting_line(info, "SHOAL_RECOVERY_WAIT").split() == ["SHOAL_RECOVERY_WAIT", "3"]
    # The environment over the file.
    info = run([*SHOAL, "info"], {**env, "SHOAL_HEARTBEAT_TIMEOUT": "9"}).stdout
    assert setting_line(info, "SHOAL_HEARTBEAT_TIMEOUT").split() == [
        "*SHOAL_HEARTBEAT_TIMEOUT",
        "9",
    ]
    # It reaches the components: `log = "info"` makes the embedded cluster
    # say what it does, which the default (warnings only) does not.
    script = (
        "import shoal\n"
        "from shoal import _core\n"
        "assert _core.setting('SHOAL_HEARTBEAT_TIMEOUT') == '7'\n"
        "with shoal.Client(n_workers=1, dashboard_address=None) as c:\n"
        "    assert c.submit(pow, 2, 5).result() == 32\n"
    )
    r = run([sys.executable, "-c", script], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert " INFO " in r.stderr, r.stderr
    r = run([sys.executable, "-c", script.replace("'7'", "'5'")], clean_env(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    assert " INFO " not in r.stderr, r.stderr


def test_shoal_config_names_the_file_and_xdg_config_home_moves_it(tmp_path):
    named = tmp_path / "site.toml"
    named.write_text("recovery-wait = 11\n")
    env = clean_env(tmp_path, SHOAL_CONFIG=str(named))
    info = run([*SHOAL, "info"], env).stdout
    assert setting_line(info, "SHOAL_RECOVERY_WAIT").split() == ["fSHOAL_RECOVERY_WAIT", "11"]
    xdg = tmp_path / "xdg"
    (xdg / "shoal").mkdir(parents=True)
    (xdg / "shoal" / "shoal.toml").write_text("stop-grace = 2.5\n")
    info = run([*SHOAL, "info"], clean_env(tmp_path, XDG_CONFIG_HOME=str(xdg))).stdout
    assert setting_line(info, "SHOAL_STOP_GRACE").split() == ["fSHOAL_STOP_GRACE", "2.5"]
    # A file someone named must exist.
    r = run([*SHOAL, "status"], clean_env(tmp_path, SHOAL_CONFIG=str(tmp_path / "missing.toml")))
    assert r.returncode == 2
    assert "cannot read the settings file" in r.stderr and "missing.toml" in r.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("heartbeat-timout = 7\n", "`heartbeat-timout` is not a Shoal setting"),
        ("task-id = 3\n", "`task-id` is not a Shoal setting"),
        ("log = [1, 2]\n", "must be a string, a number or true/false"),
        ("log = \n", "not valid TOML"),
    ],
)
def test_a_bad_settings_file_is_refused_saying_why(tmp_path, text, says):
    (tmp_path / "bad.toml").write_text(text)
    env = clean_env(tmp_path, SHOAL_CONFIG=str(tmp_path / "bad.toml"))
    # `shoal info` still runs and shows it; other commands refuse to start.
    info = run([*SHOAL, "info"], env)
    assert info.returncode == 0
    assert "settings file: NOT USED" in info.stdout and says in info.stdout
    r = run([*SHOAL, "submit", "--", "true"], env)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    r = run([sys.executable, "-c", "import shoal; shoal.Client(n_workers=1)"], env, cwd=tmp_path)
    assert r.returncode == 1
    assert "ValueError" in r.stderr and says in r.stderr, r.stderr


def test_the_dashboard_link_follows_a_template_like_dask_s(client, monkeypatch):
    plain = client.dashboard_link
    assert plain is not None, "the embedded cluster serves a dashboard by default"
    parts = urllib.parse.urlsplit(plain)
    port, token = parts.port, plain.split("?token=", 1)[1]
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    monkeypatch.setenv("SHOAL_DASHBOARD_LINK", "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/")
    assert client.dashboard_link == f"/user/ada/proxy/{port}/?token={token}"
    monkeypatch.setenv("SHOAL_DASHBOARD_LINK", "{scheme}://{host}:{port}/")
    assert client.dashboard_link == f"{parts.scheme}://{parts.hostname}:{port}/?token={token}"
    monkeypatch.setenv("SHOAL_DASHBOARD_LINK", "{NO_SUCH_VARIABLE}proxy/{port}/")
    with pytest.raises(ValueError, match="NO_SUCH_VARIABLE"):
        client.dashboard_link  # noqa: B018


def test_a_future_shows_its_group_status_and_key_in_jupyter(client):
    f = client.submit(pow, 2, 8, key="power<8>")
    f.result()
    shown = f._repr_html_()
    assert "<strong>Future: pow</strong>" in shown
    assert "status: finished" in shown
    assert "power&lt;8&gt;" in shown  # escaped
