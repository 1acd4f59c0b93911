"""Workers as batch jobs: ``SLURMCluster`` and ``PBSCluster``.

Names follow dask-jobqueue, so a site's script changes only its import::

    from shoal import SLURMCluster, Client

    cluster = SLURMCluster(cores=8, memory="16GB", walltime="01:00:00", queue="normal")
    cluster.scale(jobs=4)               # or cluster.adapt(minimum_jobs=1, maximum_jobs=10)
    client = Client(cluster)

The cluster starts a ``shoal scheduler`` on this host (listening on every
interface, or on ``interface=``) whose scheduler file and token file (mode
0600) live under ``~/.shoal/jobqueue/``: batch jobs on the compute nodes
read them there, so the home directory must be shared, as it is on most
sites. Each job runs ``shoal worker`` with ``processes`` processes of
``cores // processes`` threads and ``memory // processes`` each. Workers
retire before the job's walltime (the lifetime ``shoal worker`` takes from
Slurm), handing their results over; ``adapt`` submits a replacement for a
job that ended, and never cancels a job it submitted less than
``wait_before_scale_down`` seconds ago, so it cannot loop submitting and
cancelling.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import deploy
from .deploy import ClusterBase, read_scheduler_file

__all__ = ["SLURMCluster", "PBSCluster", "JobQueueCluster"]

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(memory: str | int | float) -> int:
    """``"16GB"``, ``"512MiB"``, ``"2G"`` or a number of bytes."""
    if isinstance(memory, int | float):
        return int(memory)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", str(memory).upper())
    if not m:
        raise ValueError(f"memory {memory!r} is not a size such as '16GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


# A job gone this soon after its submission did no useful work: several in a
# row make adapt back off instead of submitting the same again and again.
QUICK_END = 60.0


class JobQueueCluster(ClusterBase):
    """What Slurm and PBS clusters share; see the module docs. Subclasses
    say how a job is written, submitted, cancelled and looked up."""

    directive = ""  # "#SBATCH" or "#PBS"
    submit_command: list[str] = []
    cancel_command: list[str] = []

    def __init__(
        self,
        cores: int = 1,
        memory: str | int | None = None,
        processes: int = 1,
        walltime: str = "00:30:00",
        queue: str | None = None,
        account: str | None = None,
        job_name: str = "shoal-worker",
        job_extra_directives: Iterable[str] = (),
        job_directives_skip: Iterable[str] = (),
        job_script_prologue: Iterable[str] = (),
        worker_extra_args: Iterable[str] = (),
        interface: str | None = None,
        log_directory: str | None = None,
        python: str | None = None,
        wait_before_scale_down: float = 60.0,
        dashboard_address: str | None = ":8787",
        start: bool = True,
    ):
        if cores < 1 or processes < 1 or processes > cores:
            raise ValueError(
                f"cores ({cores}) and processes ({processes}) must be at least 1, "
                "with no more processes than cores"
            )
        self.cores, self.processes = cores, processes
        self._threads_per_worker = max(1, cores // processes)
        self.memory = None if memory is None else _bytes(memory)
        self.walltime, self.queue, self.account = walltime, queue, account
        self.job_name = job_name
        self.job_extra_directives = list(job_extra_directives)
        self.job_directives_skip = list(job_directives_skip)
        self.job_script_prologue = list(job_script_prologue)
        self.worker_extra_args = list(worker_extra_args)
        self.interface = interface
        self.log_directory = log_directory
        self.python = python or sys.executable
        self.wait_before_scale_down = wait_before_scale_down
        self._jobs: dict[str, float] = {}  # job id -> when submitted
        self._submitted = 0
        # Jobs in a row that ended soon after their submission, and until
        # when adapt submits none (see `_forget_ended`).
        self._quick_ends = 0
        self._backoff_until = 0.0
        self._lock = threading.Lock()
        self._scheduler: subprocess.Popen | None = None
        self._log: Any = None
        home = os.path.expanduser("~")
        base = os.path.join(home, ".shoal", "jobqueue")
        os.makedirs(base, mode=0o700, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix="cluster-", dir=base)
        self.scheduler_file = os.path.join(self._dir, "scheduler.json")
        self._dashboard_address = dashboard_address
        if start:
            self._start_scheduler()

    # ------------------------------------------------------------ scheduler

    def _start_scheduler(self) -> None:
        args = [self.python, "-m", "shoal", "scheduler", "--port", "0"]
        args += ["--scheduler-file", self.scheduler_file]
        args += ["--interface", self.interface] if self.interface else ["--host", "0.0.0.0"]
        if self._dashboard_address is None:
            args.append("--no-dashboard")
        else:
            args += ["--dashboard-address", self._dashboard_address]
        self._log = open(os.path.join(self._dir, "scheduler.log"), "ab")
        # Ends with this process, as Dask's in-process scheduler does.
        self._scheduler = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=deploy.tied_env(os.environ)
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(self.scheduler_file):
            if self._scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the scheduler did not start; see {os.path.join(self._dir, 'scheduler.log')}"
                )
            time.sleep(0.05)
        with open(self.scheduler_file) as fh:
            self.scheduler_address: str = json.load(fh)["address"]

    # ------------------------------------------------------------ the job

    def _directives(self) -> list[str]:
        raise NotImplementedError

    def job_script(self) -> str:
        """The batch script each job runs."""
        skip = self.job_directives_skip
        lines = ["#!/usr/bin/env bash", ""]
        for d in self._directives() + self.job_extra_directives:
            if not any(s in d for s in skip):
                lines.append(f"{self.directive} {d}")
        lines += [""] + self.job_script_prologue
        threads = max(1, self.cores // self.processes)
        cmd = [self.python, "-m", "shoal", "worker", "--scheduler-file", self.scheduler_file]
        cmd += ["--nworkers", str(self.processes), "--nthreads", str(threads)]
        if self.memory is not None:
            cmd += ["--memory-limit", str(self.memory // self.processes)]
        if self.interface:
            cmd += ["--interface", self.interface]
        cmd += self.worker_extra_args
        lines.append(" ".join(shlex.quote(c) for c in cmd))
        return "\n".join(lines) + "\n"

    def _submit_job(self) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".sh", dir=self._dir, delete=False) as fh:
            fh.write(self.job_script())
        try:
            r = subprocess.run(
                [*self.submit_command, fh.name], capture_output=True, text=True, timeout=60
            )
        finally:
            os.unlink(fh.name)
        if r.returncode != 0:
            raise RuntimeError(
                f"{self.submit_command[0]} refused the job (status {r.returncode}): "
                f"{r.stderr.strip() or r.stdout.strip()}"
            )
        return self._job_id(r.stdout)

    def _job_id(self, out: str) -> str:
        return out.strip().split(";")[0].split(".")[0]

    def _cancel(self, ids: list[str]) -> None:
        if ids:
            subprocess.run([*self.cancel_command, *ids], capture_output=True, timeout=60)

    def _alive(self, ids: list[str]) -> set[str]:
        """Of these jobs, those queued or running."""
        raise NotImplementedError

    # ------------------------------------------------------------ scaling

    @property
    def jobs(self) -> list[str]:
        """Ids of the jobs this cluster submitted that are queued or running."""
        self._forget_ended()
        with self._lock:
            return list(self._jobs)

    def _forget_ended(self) -> None:
        with self._lock:
            ids = list(self._jobs)
        if not ids:
            return
        alive = self._alive(ids)
        now = time.time()
        lived: list[float] = []
        with self._lock:
            for j in ids:
                # A job just submitted may not be listed yet.
                if j not in alive and now - self._jobs.get(j, now) > 10:
                    lived.append(now - self._jobs.pop(j))
        for t in lived:
            self._quick_ends = self._quick_ends + 1 if t < QUICK_END else 0
        if lived and self._quick_ends >= 2:
            # Submitting again would end the same way: back off, and say why.
            wait = min(300.0, 10.0 * 2 ** (self._quick_ends - 2))
            self._backoff_until = now + wait
            print(
                f"shoal adapt: {self._quick_ends} jobs in a row ended within "
                f"{QUICK_END:.0f}s of their submission (a walltime shorter than the workers "
                "need, or workers that fail at start: see the jobs' output); submitting "
                f"none for {wait:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def scale(self, n: int | None = None, *, jobs: int | None = None) -> None:
        """Runs ``jobs`` jobs (or enough for ``n`` worker processes):
        submits more, or cancels the newest."""
        if jobs is None:
            if n is None:
                raise ValueError("scale(n) takes a number of workers, or jobs=")
            jobs = math.ceil(n / self.processes)
        if jobs < 0:
            raise ValueError(f"jobs must be 0 or more, not {jobs}")
        have = self.jobs
        for _ in range(jobs - len(have)):
            j = self._submit_job()
            with self._lock:
                self._jobs[j] = time.time()
                self._submitted += 1
        if len(have) > jobs:
            newest = sorted(have, key=lambda j: self._jobs.get(j, 0))[jobs:]
            self._cancel(newest)
            with self._lock:
                for j in newest:
                    self._jobs.pop(j, None)

    def adapt(
        self,
        minimum: int | None = None,
        maximum: int | None = None,
        interval: float = 2.0,
        *,
        minimum_jobs: int | None = None,
        maximum_jobs: int | None = None,
    ) -> None:
        """Keeps between ``minimum_jobs`` and ``maximum_jobs`` jobs (or enough
        for ``minimum`` to ``maximum`` worker processes, as dask-jobqueue
        takes them; default 0 to 10 jobs): enough for the tasks waiting (one
        thread each), at least the minimum; jobs that end (walltime) are
        replaced. Scaling down waits ``wait_before_scale_down`` seconds of
        less demand."""
        if minimum_jobs is None:
            minimum_jobs = 0 if minimum is None else math.ceil(minimum / self.processes)
        if maximum_jobs is None:
            maximum_jobs = 10 if maximum is None else math.ceil(maximum / self.processes)
        if not 0 <= minimum_jobs <= maximum_jobs:
            raise ValueError("need 0 <= minimum_jobs <= maximum_jobs")
        self._stop_adapting()
        stop = threading.Event()
        thread = threading.Thread(
            target=self._adapt_jobs,
            args=(stop, minimum_jobs, maximum_jobs, interval),
            name="shoal-adapt",
            daemon=True,
        )
        self._adapting = (stop, thread)
        thread.start()

    def stop_adapting(self) -> None:
        self._stop_adapting()

    def _connection(self) -> tuple[str, str | None]:
        return read_scheduler_file(self.scheduler_file, None, None)

    def _scale_workers(self, n: int) -> None:
        self.scale(jobs=math.ceil(n / self.processes))

    def _worker_count(self) -> int:
        return len(self.jobs) * self.processes

    def _adapt_jobs(self, stop: threading.Event, lo: int, hi: int, interval: float) -> None:
        low_since: float | None = None
        while not stop.wait(interval):
            try:
                tasks = self._waiting_tasks()
                if tasks < 0:
                    continue
                target = max(lo, min(hi, math.ceil(tasks / self.cores)))
                have = len(self.jobs)
                if target > have and time.time() < self._backoff_until:
                    continue  # jobs end as soon as they start (see _forget_ended)
                if target > have:
                    low_since = None
                    self.scale(jobs=target)
                elif target < have:
                    now = time.time()
                    low_since = low_since or now
                    with self._lock:
                        young = any(
                            now - t < self.wait_before_scale_down for t in self._jobs.values()
                        )
                    if now - low_since >= self.wait_before_scale_down and not young:
                        self.scale(jobs=target)
                        low_since = None
                else:
                    low_since = None
            except Exception as e:  # noqa: BLE001 - adapt must not die of one bad step
                print(f"shoal adapt: {e}", file=sys.stderr, flush=True)

    @property
    def submitted(self) -> int:
        """Jobs submitted so far, in all."""
        return self._submitted

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Cancels its jobs, stops its scheduler and removes its directory
        under ``~/.shoal/jobqueue`` (job logs too, unless they went to
        ``log_directory``)."""
        import shutil

        if self._closed:
            return
        self._closed = True
        self._stop_adapting()
        self._close_core()
        with self._lock:
            ids = list(self._jobs)
            self._jobs.clear()
        self._cancel(ids)
        if self._scheduler is not None and self._scheduler.poll() is None:
            self._scheduler.terminate()
            try:
                self._scheduler.wait(30)
            except subprocess.TimeoutExpired:
                self._scheduler.kill()
                self._scheduler.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> JobQueueCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheduler_address!r}, jobs={len(self._jobs)})"


class SLURMCluster(JobQueueCluster):
    """Workers as Slurm jobs (``sbatch``, ``scancel``, ``squeue``)."""

    directive = "#SBATCH"
    submit_command = ["sbatch", "--parsable"]
    cancel_command = ["scancel"]

    def _directives(self) -> list[str]:
        d = [f"-J {self.job_name}", "-n 1", f"--cpus-per-task={self.cores}"]
        if self.memory is not None:
            d.append(f"--mem={max(1, self.memory // 2**20)}M")
        d.append(f"-t {self.walltime}")
        if self.queue:
            d.append(f"-p {self.queue}")
        if self.account:
            d.append(f"-A {self.account}")
        log = self.log_directory or self._dir
        d.append(f"-o {os.path.join(log, self.job_name + '-%j.out')}")
        return d

    def _alive(self, ids: list[str]) -> set[str]:
        r = subprocess.run(
            ["squeue", "-h", "-o", "%i %t", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        alive = set()
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] in {"PD", "R", "CF", "RQ", "RS", "S"}:
                alive.add(parts[0])
        return alive


class PBSCluster(JobQueueCluster):
    """Workers as PBS jobs (``qsub``, ``qdel``, ``qstat``)."""

    directive = "#PBS"
    submit_command = ["qsub"]
    cancel_command = ["qdel"]

    def _directives(self) -> list[str]:
        resources = f"select=1:ncpus={self.cores}"
        if self.memory is not None:
            resources += f":mem={max(1, self.memory // 2**20)}MB"
        d = [f"-N {self.job_name}", f"-l {resources}", f"-l walltime={self.walltime}"]
        if self.queue:
            d.append(f"-q {self.queue}")
        if self.account:
            d.append(f"-A {self.account}")
        log = self.log_directory or self._dir
        d.append(f"-o {log}")
        d.append("-j oe")
        return d

    def _alive(self, ids: list[str]) -> set[str]:
        r = subprocess.run(["qstat", *ids], capture_output=True, text=True, timeout=60)
        alive = set()
        for line in r.stdout.splitlines():
            parts = line.split()
            if parts and parts[0].split(".")[0] in ids and "C" not in parts[4:5]:
                alive.add(parts[0].split(".")[0])
        return alive
