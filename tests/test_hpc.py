"""The HPC front door: a site's Dask-on-a-cluster scripts with `dask`
replaced by `shoal` (CLI forms, logs, finding the token), interfaces,
walltimes. Real `shoal scheduler` and `shoal worker` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from _helpers import free_port, wait_for

import shoal

SHOAL = [sys.executable, "-m", "shoal"]


def test_a_dask_style_site_script_runs_with_shoal(tmp_path, monkeypatch):
    """As a site's script does it: `scheduler --scheduler-file F
    --dashboard-address :PORT --host IP`, `worker --scheduler-file F
    --memory-limit B --nworkers 1 --nthreads 2`, then `Client("IP:PORT")`
    with no token. Joins and departures are in the scheduler's log."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the per-user cluster notes
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)
    sfile = tmp_path / "dask_scheduler.json"
    port, dash = free_port(), free_port()
    slog = open(tmp_path / "scheduler.log", "w+b")
    env = {**os.environ, "HOME": str(tmp_path)}
    sched = subprocess.Popen(
        [*SHOAL, "scheduler", "--scheduler-file", str(sfile), "--dashboard-address", f":{dash}"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=slog,
        stderr=subprocess.STDOUT,
        env=env,
    )
    worker = None
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        worker = subprocess.Popen(
            [*SHOAL, "worker", "--scheduler-file", str(sfile), "--memory-limit", "2GB"]
            + ["--nworkers", "1", "--nthreads", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

        # `:PORT` is every interface: reachable on loopback (it asks for
        # the token).
        def dashboard_answers():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/", timeout=2)
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False
            return True

        wait_for(dashboard_answers, 30, "the dashboard on :PORT")
        with shoal.Client(f"127.0.0.1:{port}") as c:  # no token given
            c.wait_for_workers(1, timeout=60)
            assert c.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        worker.terminate()
        worker.wait(30)
        worker = None

        def logged():
            slog.seek(0)
            return slog.read().decode()

        wait_for(lambda: "joined with 2 threads" in logged(), 10, "the join in the log")
        wait_for(lambda: "left" in logged().split("joined with 2 threads", 1)[1], 30, "the leave")
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        sched.terminate()
        sched.wait(30)
        slog.close()
    # The scheduler's note is gone with it.
    assert not list((tmp_path / ".shoal" / "clusters").glob("*.json"))


def test_without_a_token_the_error_says_where_to_find_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"token file: PATH.*~/.shoal/clusters"):
        shoal.Client(f"127.0.0.1:{free_port()}")


def test_interfaces_name_the_address_to_listen_on(tmp_path):
    sfile = tmp_path / "s.json"
    sched = subprocess.Popen(
        [*SHOAL, "scheduler", "--interface", "lo", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(sfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        import json

        assert json.loads(sfile.read_text())["address"].startswith("tcp://127.0.0.1:")
        r = subprocess.run(
            [*SHOAL, "worker", "--scheduler-file", str(sfile), "--interface", "nosuch0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0
        assert 'no network interface "nosuch0"' in r.stderr and "lo" in r.stderr, r.stderr
    finally:
        sched.terminate()
        sched.wait(30)
    r = subprocess.run(
        [*SHOAL, "scheduler", "--interface", "nosuch0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "nosuch0" in r.stderr


# ------------------------------------------------------- MPI launchers

MPI_ENV = {
    # As root (CI), on 2 cores, in a container: what Open MPI needs.
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def mpirun(n: int, *args: str, cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    import shutil

    assert shutil.which("mpirun"), "Open MPI's mpirun is missing: scripts/setup-dev.sh installs it"
    return subprocess.run(
        ["mpirun", "-n", str(n), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **MPI_ENV},
        timeout=timeout,
    )


def shoal_processes() -> set[int]:
    """Scheduler and worker processes of Shoal running now."""
    out = subprocess.run(
        ["pgrep", "-f", "shoal (scheduler|worker)|shoal._worker"], capture_output=True, text=True
    )
    return {int(p) for p in out.stdout.split()}


SCRIPT = """
import sys
import shoal.mpi
shoal.mpi.initialize(dashboard=False)
import shoal
with shoal.Client() as c:
    c.wait_for_workers({workers}, timeout=60)
    total = sum(c.gather(c.map(lambda x: x * x, range(100))))
    print("RESULT", total, flush=True)
    if {fail}:
        raise RuntimeError("the client's own error")
"""


def test_mpirun_with_initialize_runs_the_client_once_and_every_rank_exits(tmp_path):
    before = shoal_processes()
    (tmp_path / "ok.py").write_text(SCRIPT.format(workers=2, fail=False))
    r = mpirun(4, sys.executable, "ok.py", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("RESULT 328350") == 1, r.stdout
    # A client that raises: every rank exits, non-zero.
    (tmp_path / "fail.py").write_text(SCRIPT.format(workers=2, fail=True))
    r = mpirun(4, sys.executable, "fail.py", cwd=tmp_path)
    assert r.returncode != 0
    assert "the client's own error" in r.stderr
    assert "RESULT 328350" in r.stdout
    time.sleep(1)
    assert shoal_processes() <= before, "nothing is left running"


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan that no one reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


STARTERS = {
    "an MPI rank": "from shoal import mpi\n"
    "proc, _ = mpi._start_scheduler({dir!r}, False, ':0', None, '127.0.0.1')\n"
    "print(proc.pid, flush=True)",
    "a job-queue cluster": "import shoal\n"
    "c = shoal.SLURMCluster(cores=1, dashboard_address=None)\n"
    "print(c._scheduler.pid, flush=True)",
}


@pytest.mark.parametrize("starter", sorted(STARTERS))
def test_a_scheduler_a_program_started_ends_when_the_program_is_killed(tmp_path, starter):
    # As a launcher kills a failed job, or a user a notebook: the process
    # that started the scheduler dies at once, without stopping it; the
    # scheduler goes with it instead of running on.
    code = STARTERS[starter].format(dir=str(tmp_path)) + "\nimport time\ntime.sleep(600)\n"
    env = {**os.environ, "HOME": str(tmp_path)}  # job-queue clusters keep files there
    rank = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pid = int(rank.stdout.readline())
        assert _running(pid)
    finally:
        rank.kill()
        rank.wait()
        rank.stdout.close()
    wait_for(lambda: not _running(pid), 10, "the scheduler to end with its program")


def test_initialize_with_too_few_ranks_says_so(tmp_path):
    (tmp_path / "two.py").write_text(SCRIPT.format(workers=1, fail=False))
    r = mpirun(2, sys.executable, "two.py", cwd=tmp_path)
    assert r.returncode != 0
    assert "needs at least 3 MPI ranks" in r.stderr and "has 2" in r.stderr


RUN_SCRIPT = """
import os, shoal
with shoal.Client() as c:
    c.wait_for_workers(2, timeout=60)
    print("RESULT", os.environ["SHOAL_SCHEDULER_ADDRESS"], sum(c.gather(c.map(abs, range(-10, 0)))))
"""


def test_shoal_run_under_a_launcher_runs_the_script_once_and_two_jobs_do_not_collide(tmp_path):
    before = shoal_processes()
    (tmp_path / "script.py").write_text(RUN_SCRIPT)
    cmd = ["shoal", "run", "--no-dashboard", "--", sys.executable, "-u", "script.py"]
    shoal_cmd = [sys.executable, "-m", "shoal", *cmd[1:]]
    jobs = [
        subprocess.Popen(
            ["mpirun", "-n", "3", *shoal_cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={**os.environ, **MPI_ENV},
        )
        for _ in range(2)
    ]
    outs = [j.communicate(timeout=180) for j in jobs]
    results = []
    for j, (out, err) in zip(jobs, outs, strict=True):
        assert j.returncode == 0, out + err
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT")]
        assert line.endswith(" 55"), out
        results.append(line.split()[1])
    addresses = set(results)
    assert len(addresses) == 2, "each job has its own scheduler"
    runs = list((tmp_path / ".shoal-run").iterdir())
    assert len(runs) == 2, runs
    # The command's status is the job's.
    (tmp_path / "bad.py").write_text("raise SystemExit(3)")
    r = mpirun(2, *shoal_cmd[:-1], "bad.py", cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    time.sleep(1)
    assert shoal_processes() <= before, "nothing is left running"


def test_shoal_mpi_starts_a_cluster_and_writes_the_scheduler_file(tmp_path):
    sfile = tmp_path / "cluster.json"
    job = subprocess.Popen(
        ["mpirun", "-n", "3", sys.executable, "-m", "shoal", "mpi", "--no-dashboard"]
        + ["--scheduler-file", str(sfile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **MPI_ENV},
    )
    try:
        wait_for(sfile.exists, 60, "the scheduler file")
        with shoal.Client(scheduler_file=str(sfile)) as c:
            c.wait_for_workers(2, timeout=60)
            assert c.submit(pow, 3, 4).result(timeout=60) == 81
    finally:
        job.terminate()  # as scancel or Ctrl-C would
        out = job.communicate(timeout=60)[0]
    assert "shoal mpi: scheduler at" in out, out


def test_the_hpc_examples_run_as_documented(tmp_path):
    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "hpc")
    r = mpirun(4, sys.executable, os.path.join(examples, "mpi_dask_sum.py"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sum: 32000000" in r.stdout
    r = mpirun(
        3,
        sys.executable,
        "-m",
        "shoal",
        "run",
        "--no-dashboard",
        "--",
        sys.executable,
        os.path.join(examples, "run_script.py"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sum of squares: 332833500" in r.stdout
