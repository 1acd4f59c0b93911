"""Every number that becomes a duration, a size or a count is checked where
it enters: extremes on the command line and in Python keyword arguments end
in a clear error (never a panic, a hang or a dead cluster)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import shoal

EXTREMES = ["-1", "NaN", "1e400", "1e300", "18446744073709551616", "", "ünï", "inf"]

# (command, option, extra arguments it needs to get that far)
CLI_OPTIONS = [
    ("scheduler", "--heartbeat-timeout", []),
    ("top", "--interval", []),
    ("top", "--iterations", []),
    ("worker", "--nworkers", []),
    ("worker", "--nthreads", []),
    ("worker", "--heartbeat-timeout", []),
    ("worker", "--grace", []),
    ("worker", "--lifetime", []),
    ("worker", "--lifetime-stagger", []),
    ("worker", "--memory-limit", []),
    ("worker", "--resources", []),
    ("submit", "--cpus", ["--", "true"]),
    ("submit", "--max-fails", ["--", "true"]),
    ("submit", "--crash-limit", ["--", "true"]),
    ("submit", "--time-limit", ["--", "true"]),
    ("submit", "--time-request", ["--", "true"]),
    ("submit", "--priority", ["--", "true"]),
    ("submit", "--array", ["--", "true"]),
    ("submit", "--resource", ["--", "true"]),
]


@pytest.mark.parametrize(("command", "option", "rest"), CLI_OPTIONS)
def test_cli_numeric_options_refuse_extremes_clearly(command, option, rest, tmp_path):
    # No scheduler (a scheduler file naming a port nobody listens on): a
    # value that is (oddly) valid still ends in an error, "cannot reach the
    # scheduler", which is as clear. What must never happen is a panic, a
    # traceback or a hang.
    missing = str(tmp_path / "no-such-scheduler.json")
    gone = tmp_path / "gone.json"
    (tmp_path / "gone.json.token").write_text("0" * 64)
    gone.write_text(
        json.dumps({"address": "tcp://127.0.0.1:1", "token_file": f"{gone}.token", "pid": 0})
    )
    for value in EXTREMES:
        args = [sys.executable, "-m", "shoal", command, f"{option}={value}"]
        if command == "scheduler":
            args += ["--port", "0", "--scheduler-file", missing, "--no-dashboard"]
            timeout = 5  # a valid value starts it: that is fine too
        else:
            args += ["--scheduler-file", str(gone)]
            timeout = 30
        args += rest
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            assert command == "scheduler", f"{option}={value!r} hung"
            continue
        what = f"shoal {command} {option}={value!r}: {p.stderr[-600:]}"
        assert "panicked" not in p.stderr and "Traceback" not in p.stderr, what
        assert p.returncode != 0, what
        assert p.stderr.strip(), what


def test_shoal_worker_says_once_what_is_wrong_before_starting_processes(tmp_path):
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps({"address": "tcp://127.0.0.1:1", "token_file": None, "pid": 0}))
    env = {**os.environ, "SHOAL_TOKEN": "0" * 64}
    base = [sys.executable, "-m", "shoal", "worker", "--scheduler-file", str(gone)]
    cases = [
        (["--memory-limit", "lots"], "memory limit 'lots' is not understood"),
        (["--resources", "GPU=x"], "resource 'GPU' needs a number"),
        ([], "cannot join the scheduler at tcp://127.0.0.1:1"),  # nobody there
    ]
    for extra, said in cases:
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode != 0 and said in p.stderr, p.stderr
        assert "Traceback" not in p.stderr, p.stderr
        # One process tried (or none): not twenty, each dying of it.
        assert p.stderr.count(said) <= 1, p.stderr


PY_EXTREMES = [-1, math.nan, math.inf, -math.inf, 1e300, 2**64, "", "ünï", None]


def test_python_keyword_arguments_refuse_extremes_clearly(client):
    def inc(x):
        return x + 1

    calls = {
        "submit(time_limit=)": lambda v: client.submit(inc, 1, time_limit=v),
        "submit(time_request=)": lambda v: client.submit(inc, 1, time_request=v),
        "submit(priority=)": lambda v: client.submit(inc, 1, priority=v),
        "submit(retries=)": lambda v: client.submit(inc, 1, retries=v),
        "submit(resources=)": lambda v: client.submit(inc, 1, resources={"GPU": v}),
        "map(batch_size=)": lambda v: client.map(inc, [1, 2], batch_size=v),
        "map(time_limit=)": lambda v: client.map(inc, [1, 2], time_limit=v),
        "result(timeout=)": lambda v: client.submit(inc, 1).result(timeout=v),
        "gather(timeout=)": lambda v: client.gather([client.submit(inc, 1)], timeout=v),
        "wait(timeout=)": lambda v: shoal.wait([client.submit(inc, 1)], timeout=v),
        "submit_command(time_limit=)": lambda v: client.submit_command(["true"], time_limit=v),
        "scale()": lambda v: client.cluster.scale(v),
    }
    for name, call in calls.items():
        for v in PY_EXTREMES:
            if v is None and name != "submit(resources=)":
                continue  # None means "the default" for these
            try:
                out = call(v)
            except (ValueError, TypeError, OverflowError) as e:
                assert str(e), f"{name} {v!r}: an empty message"
                assert "panic" not in type(e).__name__.lower(), f"{name} {v!r}: {e!r}"
                continue
            except TimeoutError:
                continue  # a timeout of -1 or 0: expired, said plainly
            except BaseException as e:  # noqa: BLE001 - a panic is a BaseException
                raise AssertionError(f"{name} {v!r} raised {type(e).__name__}: {e}") from e
            # Accepted (a priority of -1, a huge timeout): it must also work.
            if isinstance(out, shoal.Future):
                try:
                    assert out.result(timeout=60) == 2, f"{name} {v!r}"
                except shoal.UnsatisfiableError as e:
                    assert "needs GPU" in str(e), e  # more than any worker has
    client.cluster.scale(2)
    # The cluster took all of that and goes on.
    assert client.submit(inc, 1).result(timeout=60) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_workers": 2**64},
        {"n_workers": -1},
        {"n_workers": math.nan},
        {"threads_per_worker": 2**40},
        {"threads_per_worker": 0},
        {"memory_limit": -1},
        {"memory_limit": math.nan},
        {"memory_limit": "1e400GB"},
        {"memory_limit": "ünï"},
        {"timeout": math.nan},
        {"timeout": -1},
        {"reconnect": math.inf},
    ],
)
def test_client_arguments_refuse_extremes_clearly(kwargs):
    with pytest.raises((ValueError, TypeError, OverflowError)) as e:
        shoal.Client(**kwargs)
    assert str(e.value)
