"""Starting a Shoal cluster from an MPI launcher (``mpirun``, ``srun``).

As in dask-mpi, one program runs on every rank and each rank takes a role::

    import shoal.mpi
    shoal.mpi.initialize()          # rank 0: scheduler; 2..: workers
    client = shoal.Client()         # rank 1 only gets here: joins that cluster

Rank 0 runs the scheduler and ranks 2 and up run a worker process each; none
of them returns from ``initialize``. Rank 1 returns and runs the rest of the
program (``Client()`` joins the cluster through ``SHOAL_SCHEDULER_ADDRESS``).
When rank 1's program ends, normally or by an exception, it tells every
other rank, the scheduler and workers stop, and every rank exits with rank
1's exit status: no rank is left waiting.

``shoal mpi --scheduler-file F`` (under ``mpirun``/``srun``) starts only the
cluster (rank 0 scheduler, the rest workers) and writes the scheduler file
for clients elsewhere; it runs until the job is cancelled.

``shoal run -- python script.py`` (under ``srun``/``mpirun``) needs no MPI
library: rank 0 runs the scheduler and the command, the other ranks a
worker each, found through the launcher's rank variables
(``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ``PMIX_RANK``).
They meet through a scheduler file in a directory of their own job
(``--dir``, default ``./.shoal-run/JOB``); ports are chosen free, so two
jobs on one node never collide. The cluster stops when the command ends,
and every rank exits with its status.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .deploy import tied_env

__all__ = ["initialize"]

SHOAL = [sys.executable, "-m", "shoal"]

# Messages from rank 1 to the others (MPI tag).
_STOP_TAG = 71


def _comm(comm: Any) -> Any:
    if comm is not None:
        return comm
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "shoal.mpi.initialize needs mpi4py (pip install mpi4py) and an MPI library; "
            "`shoal run` under srun/mpirun needs neither"
        ) from e
    return MPI.COMM_WORLD


def _start_scheduler(
    directory: str, dashboard: bool, dashboard_address: str, interface: str | None, host: str
) -> tuple[subprocess.Popen, dict]:
    """`shoal scheduler` on a free port; its scheduler file's contents."""
    os.makedirs(directory, exist_ok=True)
    sfile = os.path.join(directory, "scheduler.json")
    args = [*SHOAL, "scheduler", "--port", "0", "--scheduler-file", sfile]
    args += ["--interface", interface] if interface else ["--host", host]
    args += ["--dashboard-address", dashboard_address] if dashboard else ["--no-dashboard"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, env=tied_env(os.environ))
    deadline = time.monotonic() + 60
    while not os.path.exists(sfile):
        if proc.poll() is not None:
            raise RuntimeError(f"the scheduler exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the scheduler did not start within 60 s")
        time.sleep(0.05)
    with open(sfile) as fh:
        info = json.load(fh)
    with open(info["token_file"]) as fh:
        info["token"] = fh.read().strip()
    info["scheduler_file"] = sfile
    return proc, info


def _worker_args(
    nthreads: int, memory_limit: str, local_directory: str | None, interface: str | None
) -> list[str]:
    """`shoal worker` with these options (the address comes last)."""
    args = [*SHOAL, "worker", "--nthreads", str(nthreads), "--memory-limit", str(memory_limit)]
    if local_directory:
        args += ["--local-directory", local_directory]
    if interface:
        args += ["--interface", interface]
    return args


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def initialize(
    *,
    nthreads: int = 1,
    memory_limit: str = "auto",
    local_directory: str | None = None,
    interface: str | None = None,
    dashboard: bool = True,
    dashboard_address: str = ":8787",
    exit: bool = True,
    comm: Any = None,
) -> bool:
    """Turns this MPI job into a Shoal cluster (see the module docs).

    Returns True on rank 1 (the client), after which ``shoal.Client()``
    joins the cluster. The other ranks serve until rank 1's program ends,
    then exit with its status (``exit=False``: return False instead, for
    code that runs after ``initialize`` on every rank). Raises
    ``RuntimeError`` on every rank with fewer than 3 ranks.
    """
    comm = _comm(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        raise RuntimeError(
            f"shoal.mpi.initialize needs at least 3 MPI ranks (0: the scheduler, 1: this "
            f"program, 2 and up: workers); this job has {size}. Run it with `mpirun -n 3` "
            "or more"
        )
    directory = os.path.join(
        local_directory or os.environ.get("TMPDIR", "/tmp"), f"shoal-mpi-{os.getpid()}"
    )
    proc = None
    info: dict | None = None
    error = None
    if rank == 0:
        try:
            proc, info = _start_scheduler(
                directory, dashboard, dashboard_address, interface, "0.0.0.0"
            )
        except Exception as e:  # noqa: BLE001 - every rank hears of it
            error = f"rank 0 could not start the scheduler: {e}"
    info, error = comm.bcast((info, error), root=0)
    if error:
        raise RuntimeError(error)
    assert info is not None
    if rank == 1:
        os.environ["SHOAL_SCHEDULER_ADDRESS"] = info["address"]
        os.environ["SHOAL_TOKEN"] = info["token"]
        _client_exit_hook(comm, size)
        return True
    if rank >= 2:
        # Ends with this rank: a launcher that kills the job (a rank's
        # `Abort`, a failed run) leaves no scheduler or worker behind.
        env = tied_env({**os.environ, "SHOAL_TOKEN": info["token"]})
        # The scheduler file is on rank 0's node: the worker is given the
        # address itself (the token travels in the environment).
        args = _worker_args(nthreads, memory_limit, local_directory, interface)
        proc = subprocess.Popen([*args, info["address"]], env=env, stdout=subprocess.DEVNULL)
    status = _serve_until_stopped(comm, proc)
    _stop(proc)
    if exit:
        sys.stdout.flush()
        _finalize()
        os._exit(status)
    return False


def _finalize() -> None:
    """MPI_Finalize before leaving: a rank that exits without it makes
    the launcher report an abnormal end."""
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass


def _client_exit_hook(comm: Any, size: int) -> None:
    """When rank 1's program ends, every other rank hears its status."""
    failed = []
    previous = sys.excepthook

    def hook(*exc: Any) -> None:
        failed.append(True)
        previous(*exc)

    sys.excepthook = hook

    def tell_others() -> None:
        # An exception that ended the program: 1 (as Python's own status).
        status = 1 if failed else 0
        # Clients first: their connections close before the scheduler stops.
        from . import _context

        for ref in list(_context.recent_clients):
            c = ref()
            try:
                if c is not None:
                    c.close()
            except Exception:  # noqa: BLE001
                pass
        reqs = [comm.isend(status, dest=r, tag=_STOP_TAG) for r in range(size) if r != 1]
        for r in reqs:
            r.wait()

    atexit.register(tell_others)


def _serve_until_stopped(comm: Any, proc: subprocess.Popen | None) -> int:
    """Waits (without spinning on MPI) for rank 1's status; also ends if
    this rank's own process dies, taking the job down."""
    req = comm.irecv(source=1, tag=_STOP_TAG)
    while True:
        done, status = req.test()
        if done:
            return int(status)
        if proc is not None and proc.poll() is not None:
            print(
                f"shoal.mpi: rank {comm.Get_rank()}'s {proc.args[3]} exited with status "
                f"{proc.returncode}; aborting the job",
                file=sys.stderr,
                flush=True,
            )
            comm.Abort(1)
        time.sleep(0.1)


# ------------------------------------------------------------ without MPI


_RANK_VARS = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_JOB_VARS = (
    ("SLURM_JOB_ID", "SLURM_STEP_ID"),
    ("OMPI_MCA_ess_base_jobid",),
    ("PMIX_NAMESPACE",),
)


def _env_first(names: tuple[str, ...]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def launch_rank() -> tuple[int, int, str]:
    """This process's rank, the job's size, and a name unique to the job
    step, from the launcher's environment."""
    rank, size = _env_first(_RANK_VARS), _env_first(_SIZE_VARS)
    if rank is None or size is None:
        raise SystemExit(
            "shoal: no launcher rank found (SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK, "
            "PMIX_RANK): start it with `srun -n N shoal ...` or `mpirun -n N shoal ...`"
        )
    for names in _JOB_VARS:
        parts = [os.environ.get(n) for n in names]
        if all(parts):
            job = "-".join(p for p in parts if p).replace("/", "_")
            break
    else:
        job = "job"
    return int(rank), int(size), job


def _wait_for_file(path: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"shoal: rank 0's scheduler file {path} did not appear within {timeout:.0f} s "
                    "(is the directory shared between the job's nodes?)"
                ) from None
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """``shoal mpi`` and ``shoal run`` (the ``shoal`` command hands these
    over to Python)."""
    ap = argparse.ArgumentParser(prog="shoal")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, what in [
        ("mpi", "start a cluster under mpirun/srun (rank 0: scheduler, others: workers)"),
        ("run", "run a command on rank 0 with a cluster on the job's ranks, then stop"),
    ]:
        p = sub.add_parser(name, help=what)
        p.add_argument("--nthreads", type=int, default=1, help="threads per worker")
        p.add_argument("--memory-limit", default="auto", help="per worker")
        p.add_argument("--local-directory", help="where workers spill")
        p.add_argument("--interface", help="network interface to listen on (e.g. ib0)")
        p.add_argument("--dashboard-address", default=":8787")
        p.add_argument("--no-dashboard", action="store_true")
        p.add_argument("--dir", help="a directory of this job's own (default: ./.shoal-run/JOB)")
        if name == "mpi":
            p.add_argument("--scheduler-file", required=True, help="written by rank 0")
        else:
            p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- program args...")
    ns = ap.parse_args(argv)
    rank, size, job = launch_rank()
    directory = ns.dir or os.path.join(os.getcwd(), ".shoal-run", job)
    if ns.command == "run":
        cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
        if not cmd:
            ap.error("shoal run needs a command: shoal run -- python script.py")
        if size < 2:
            raise SystemExit(
                f"shoal run needs at least 2 ranks (0: scheduler and command, others: "
                f"workers); this job has {size}"
            )
    sfile = os.path.join(directory, "scheduler.json")
    if rank == 0:
        proc, info = _start_scheduler(
            directory,
            not ns.no_dashboard,
            ns.dashboard_address,
            ns.interface,
            "0.0.0.0",
        )
        if ns.command == "mpi":
            tmp = ns.scheduler_file + ".tmp"
            with open(sfile) as fh, open(tmp, "w") as out:
                out.write(fh.read())
            os.replace(tmp, ns.scheduler_file)
            print(f"shoal mpi: scheduler at {info['address']}", flush=True)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        try:
            if ns.command == "mpi":
                return proc.wait()
            env = {
                **os.environ,
                "SHOAL_SCHEDULER_ADDRESS": info["address"],
                "SHOAL_TOKEN": info["token"],
                "SHOAL_SCHEDULER_FILE": sfile,
            }
            return subprocess.run(cmd, env=env).returncode
        finally:
            # The scheduler tells the workers to stop as it exits.
            _stop(proc)
    _wait_for_file(sfile, 120)
    args = _worker_args(ns.nthreads, ns.memory_limit, ns.local_directory, ns.interface)
    # `shoal worker` exits 0 once the scheduler has stopped its processes.
    return subprocess.run([*args, "--scheduler-file", sfile]).returncode


if __name__ == "__main__":
    sys.exit(main())
