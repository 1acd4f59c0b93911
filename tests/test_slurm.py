"""Shoal under real Slurm (Debian's slurm-wlm, one node, started by
scripts/slurm-up.sh): batch jobs of workers with their walltime as their
lifetime, and `srun ... shoal run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from _helpers import wait_for

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


def test_sbatch_workers_join_retire_before_their_walltime_and_compute(slurm, tmp_path):
    """A site's script: the scheduler outside the job, `srun shoal worker`
    inside it; the workers' lifetime is the job's end less a tenth of its
    walltime (at most 2 minutes)."""
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
            # 10 minutes of walltime less the minute kept for handing over.
            for end in ends:
                assert end is not None
                assert abs(end - (submitted + 540)) < 30, end - submitted
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


# ------------------------------------------------------- SLURMCluster


def test_slurm_and_pbs_job_scripts(tmp_path, monkeypatch):
    """Golden job scripts (no batch system needed)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for cls, want in [
        (
            shoal.SLURMCluster,
            [
                "#!/usr/bin/env bash",
                "",
                "#SBATCH -J shoal-worker",
                "#SBATCH -n 1",
                "#SBATCH --cpus-per-task=8",
                "#SBATCH --mem=16384M",
                "#SBATCH -t 01:00:00",
                "#SBATCH -p normal",
                "#SBATCH -A proj42",
                "#SBATCH --exclusive",
                "",
                "module load python",
            ],
        ),
        (
            shoal.PBSCluster,
            [
                "#!/usr/bin/env bash",
                "",
                "#PBS -N shoal-worker",
                "#PBS -l select=1:ncpus=8:mem=16384MB",
                "#PBS -l walltime=01:00:00",
                "#PBS -q normal",
                "#PBS -A proj42",
                "#PBS -j oe",
                "#PBS --exclusive",
                "",
                "module load python",
            ],
        ),
    ]:
        c = cls(
            cores=8,
            memory="16GB",
            processes=2,
            walltime="01:00:00",
            queue="normal",
            account="proj42",
            job_extra_directives=["--exclusive"],
            job_directives_skip=["-o "],  # the log directive, site-specific
            job_script_prologue=["module load python"],
            worker_extra_args=["--lifetime-stagger", "4m"],
            start=False,
        )
        lines = c.job_script().splitlines()
        assert lines[:-1] == want, lines
        assert lines[-1] == (
            f"{sys.executable} -m shoal worker --scheduler-file {c.scheduler_file} "
            "--nworkers 2 --nthreads 4 --memory-limit 8589934592 --lifetime-stagger 4m"
        )
    with pytest.raises(ValueError, match="processes"):
        shoal.SLURMCluster(cores=2, processes=4, start=False)
    with pytest.raises(ValueError, match="not a size"):
        shoal.SLURMCluster(memory="lots", start=False)


def test_slurm_cluster_scales_computes_and_closes(slurm):
    da = pytest.importorskip("dask.array")
    with shoal.SLURMCluster(cores=1, walltime="00:05:00", dashboard_address=None) as cluster:
        cluster.scale(jobs=2)
        assert len(cluster.jobs) == 2
        with shoal.Client(cluster) as c:
            c.wait_for_workers(2, timeout=120)
            x = da.arange(1_000_000, chunks=100_000)
            assert x.sum().compute() == 999_999 * 1_000_000 // 2
            jobs = cluster.jobs
        cluster.scale(jobs=1)
        assert len(cluster.jobs) == 1
    # close() cancelled what was left.
    out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True)
    assert not [ln for ln in out.stdout.splitlines() if " R " in ln or " PD " in ln]


def test_adapt_replaces_workers_lost_to_their_walltime_and_does_not_loop(slurm):
    """Workers that retire at their lifetime (as before a walltime) end
    their jobs; adapt submits replacements while work remains, then keeps
    the minimum, without submitting and cancelling in a loop."""
    with shoal.SLURMCluster(
        cores=1,
        walltime="00:05:00",
        worker_extra_args=["--lifetime", "8s"],
        wait_before_scale_down=5,
        dashboard_address=None,
    ) as cluster:
        cluster.adapt(minimum_jobs=1, maximum_jobs=2, interval=0.5)
        with shoal.Client(cluster) as c:
            t0 = time.time()
            fs = c.map(time.sleep, [0.5] * 50, batch_size=1)
            c.gather(fs)
            took = time.time() - t0
        # 25 s of work on at most 2 workers that live 8 s each.
        assert cluster.submitted >= 3, cluster.submitted
        assert cluster.submitted <= 12, f"{cluster.submitted} jobs in {took:.0f} s: a loop?"


def test_a_one_minute_walltime_keeps_its_workers_and_adapt_backs_off(slurm, capfd):
    """Before: workers retired as they joined (a fixed 2-minute margin
    past a 1-minute walltime) and adapt submitted job after job."""
    with shoal.SLURMCluster(cores=1, walltime="00:01:00", dashboard_address=None) as cluster:
        cluster.adapt(minimum_jobs=1, maximum_jobs=2, interval=0.5)
        with shoal.Client(cluster) as c:
            c.wait_for_workers(1, timeout=120)
            (end,) = [w["lifetime_end"] for w in c.scheduler_info()["workers"].values()]
            assert end - time.time() > 30, "the worker retires at once"
            for i in range(10):  # a small task every 2 s: the worker stays
                assert c.submit(abs, -i).result(timeout=60) == i
                time.sleep(2)
        assert cluster.submitted <= 2, cluster.submitted
    # Workers that fail at start (here, a bad option): jobs end at once;
    # adapt backs off after two and says why, instead of a job every beat.
    with shoal.SLURMCluster(
        cores=1,
        walltime="00:05:00",
        worker_extra_args=["--nthreads", "0"],
        dashboard_address=None,
    ) as cluster:
        cluster.adapt(minimum_jobs=1, maximum_jobs=1, interval=0.5)
        # Without backing off: a job every ~10 s (the time an ended job
        # takes to be taken as gone), 6 or more in 60 s.
        time.sleep(60)
        assert 2 <= cluster.submitted <= 4, cluster.submitted
    assert "jobs in a row ended within 60s" in capfd.readouterr().err


def test_the_workers_sbatch_example_runs_as_documented(slurm, tmp_path):
    example = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "examples", "hpc", "workers.sbatch"
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    sfile = tmp_path / "shoal.json"
    sched = subprocess.Popen(
        [PY, "-m", "shoal", "scheduler", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(sfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    job = None
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        job = subprocess.run(
            ["sbatch", "--parsable", f"--output={tmp_path}/job.out", example],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=tmp_path,
        ).stdout.strip()
        with shoal.Client(scheduler_file=str(sfile)) as c:
            c.wait_for_workers(2, timeout=120)
            assert c.submit(sum, range(10)).result(timeout=60) == 45
    finally:
        if job:
            subprocess.run(["scancel", job])
        sched.terminate()
        sched.wait(30)
