"""Shoal under real Slurm (Debian's slurm-wlm, one node, started by
scripts/slurm-up.sh): batch jobs of workers with their walltime as their
lifetime, and `srun ... shoal run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import shoal

PY = sys.executable


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("starting Slurm's daemons needs root")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run(
        ["bash", os.path.join(here, "..", "scripts", "slurm-up.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"Slurm could not be started:\n{r.stdout}\n{r.stderr}"
    yield
    if "started" in r.stdout:  # stop what this module started
        subprocess.run(["bash", os.path.join(here, "..", "scripts", "slurm-down.sh")])


def wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sbatch_workers_join_retire_before_their_walltime_and_compute(slurm, tmp_path):
    """A site's script: the scheduler outside the job, `srun shoal worker`
    inside it; the workers' lifetime is the job's end less 2 minutes."""
    da = pytest.importorskip("dask.array")
    sfile = tmp_path / "scheduler.json"
    sched = subprocess.Popen(
        [PY, "-m", "shoal", "scheduler", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(sfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    script = tmp_path / "workers.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n#SBATCH --time=10\n"
        f"#SBATCH --output={tmp_path}/job.out\n"
        f"srun --ntasks=2 {PY} -m shoal worker --scheduler-file {sfile} --nthreads 1\n"
    )
    job = None
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        submitted = time.time()
        job = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
        ).stdout.strip()
        with shoal.Client(scheduler_file=str(sfile)) as c:
            c.wait_for_workers(2, timeout=120)
            ends = [w["lifetime_end"] for w in c.scheduler_info()["workers"].values()]
            # 10 minutes of walltime less the 2 minutes kept for handing over.
            for end in ends:
                assert end is not None
                assert abs(end - (submitted + 480)) < 60, end - submitted
            x = da.ones((2000, 2000), chunks=(500, 500))
            assert (x + 1).sum().compute() == 2 * 2000 * 2000
            # scancel: the workers retire (SIGTERM) and leave.
            subprocess.run(["scancel", job], check=True)
            job = None
            wait_for(lambda: not c.scheduler_info()["workers"], 60, "the workers to leave")
    finally:
        if job:
            subprocess.run(["scancel", job])
        sched.terminate()
        sched.wait(30)


def test_srun_shoal_run_runs_the_script_once_on_a_cluster_of_the_job(slurm, tmp_path):
    (tmp_path / "script.py").write_text(
        "import shoal\n"
        "with shoal.Client() as c:\n"
        "    c.wait_for_workers(2, timeout=60)\n"
        "    print('RESULT', sum(c.gather(c.map(abs, range(-10, 0)))), flush=True)\n"
    )
    r = subprocess.run(
        # 3 tasks on a 2-CPU node: --overcommit.
        ["srun", "--ntasks=3", "--overcommit", PY, "-m", "shoal", "run", "--no-dashboard", "--"]
        + [PY, "-u", "script.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("RESULT 55") == 1, r.stdout
    # Its own directory, named after the job step.
    (run,) = (tmp_path / ".shoal-run").iterdir()
    assert run.name[0].isdigit(), run.name
