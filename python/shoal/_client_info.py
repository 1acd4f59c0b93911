"""What a client can ask of its cluster: workers, the dashboard, the
scheduler's story of tasks, profiles and logs, retiring and restarting
workers, and the names of ``distributed`` that Shoal does otherwise. A
mixin of ``Client``."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

from . import deploy, diagnostics
from ._futures import Future
from .deploy import LocalCluster

# distributed.Client's methods that Shoal does another way (an attribute
# error names it; docs/coming-from-dask.md has the table).
_DISTRIBUTED_ONLY = {
    "run": "submit tasks; for set-up on every worker, preload= (Client, LocalCluster, "
    "`shoal worker --preload`)",
    "run_on_scheduler": "the scheduler is Rust code; ask it with client.query('/api/status')",
    "upload_file": "put the module where the workers import from (PYTHONPATH; an "
    "embedded cluster's workers inherit this process's sys.path)",
    "register_plugin": "preload= imports a module on every worker as it starts",
    "register_worker_plugin": "preload= imports a module on every worker as it starts",
    "register_scheduler_plugin": "the scheduler is Rust code and takes no plugins",
    "who_has": "data moves on demand; client.story(future) shows where a task ran",
    "has_what": "client.scheduler_info()['workers'] gives each worker's held results",
    "processing": "client.scheduler_info()['workers'] gives each worker's processing count",
    "rebalance": "data moves on demand; scatter(..., broadcast=True) shares one copy per host",
    "replicate": "data moves on demand; scatter(..., broadcast=True) shares one copy per host",
    "publish_dataset": "hold the futures (or use a named actor) and pass them on",
    "get_dataset": "hold the futures (or use a named actor) and pass them on",
    "list_datasets": "hold the futures (or use a named actor) and pass them on",
    "unpublish_dataset": "hold the futures (or use a named actor) and pass them on",
    "datasets": "hold the futures (or use a named actor) and pass them on",
    "get_task_stream": "client.trace('trace.json') writes it; the dashboard shows it live",
    "call_stack": "client.profile() or the dashboard's flame graph",
    "forward_logging": "client.get_worker_logs(), or the dashboard's log panel",
    "get_scheduler_logs": "the scheduler logs to its stderr (SHOAL_LOG=info)",
    "get_events": "client.story(*futures) and client.get_worker_logs()",
    "log_event": "logging in the task: client.get_worker_logs() collects it",
    "set_metadata": "keep it in a named actor",
    "get_metadata": "keep it in a named actor",
    "write_scheduler_file": "`shoal scheduler --scheduler-file FILE`",
    "dump_cluster_state": "client.story(*futures), client.scheduler_info(), client.trace(path)",
    "benchmark_hardware": "python benches/bench_data.py measures this host",
    "get_versions": "shoal.__version__ and `shoal info`",
    "get_executor": "shoal.Executor(client)",
    "amm": "data moves on demand; retire_workers() hands a worker's data over",
    "loop": "Shoal's client is synchronous; it has no event loop",
}


class ClusterQueries:
    asynchronous = False  # Dask asks before using a client as scheduler

    def scheduler_info(self, timeout: float = 10.0) -> dict[str, Any]:
        """What the cluster looks like now: ``{"address", "clients", "tasks",
        "workers": {address: {"name", "pid", "nthreads", "resources",
        "processing", "held", "memory", "managed", "spilled", "memory_limit",
        "paused", "last_seen", "lifetime_end"}}}`` (bytes and seconds;
        ``lifetime_end``: Unix time it retires at, or None; memory figures are
        from each worker's last heartbeat, at most a second old).

        Raises ``TimeoutError`` if the scheduler does not answer within
        ``timeout`` seconds (the connection stays), ``SchedulerLostError`` if
        the connection is gone."""
        info = self._session.check().cluster_info(timeout)
        info["workers"] = {w.pop("address"): w for w in info["workers"]}
        return info

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> None:
        """Blocks until at least ``n_workers`` workers have joined (as Dask's
        ``Client.wait_for_workers``). Raises ``TimeoutError`` after
        ``timeout`` seconds (None: wait for ever)."""
        if n_workers < 0:
            raise ValueError(f"n_workers must be 0 or more, not {n_workers}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while (have := len(self.scheduler_info()["workers"])) < n_workers:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"only {have} of {n_workers} workers joined within {timeout} s: "
                    "are the worker processes started, with this cluster's address and token?"
                )
            time.sleep(0.05)

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL with its access token (None: no dashboard)."""
        if self._cluster is not None:
            return self._cluster.dashboard_link
        url = self._session.check().cluster_info(10.0)["dashboard"] or None
        return deploy.dashboard_link(url, self._session.token)

    def query(self, path: str, timeout: float = 10.0) -> Any:
        """The scheduler's answer to a dashboard API path (``/api/status``,
        ``/api/profile?group=inc``, ``/metrics``, ...), decoded from JSON.
        Unknown paths raise ``ValueError``; no answer within ``timeout``
        seconds raises ``TimeoutError`` (the connection stays)."""
        answer = json.loads(self._session.check().query(path, timeout))
        if isinstance(answer, dict) and set(answer) == {"error"}:
            raise ValueError(answer["error"])
        return answer

    def _sync(self) -> None:
        """Makes every worker send what it has to report (profile samples,
        log lines, transfers) before this returns: tens of milliseconds."""
        self.query("/api/sync")

    def story(self, *futures: Future) -> list[dict[str, Any]]:
        """What happened to these tasks, oldest first, from the scheduler and
        from the workers they were sent to. The scheduler's transitions are
        ``{"task", "at": "scheduler", "from", "to", "worker", "stimulus",
        "time_us"}``, where ``stimulus`` names the event that caused it
        (``submit``, ``task-finished``, ``worker-lost``, ``cancel``, ...); a
        worker's steps are ``{"task", "at": "worker", "worker", "event",
        "phase", "attempt", "time_us"}`` (``fetch``, ``fetched``, ``start``,
        ``done``, ``cancel``, ``stolen``, ``missing``, ...; ``attempt``
        numbers the orders it got for the task). The scheduler keeps its
        last 100,000 transitions, each worker its last 8,192 steps; a worker
        that does not answer within half a second is left out."""
        out: list[dict[str, Any]] = []
        for f in futures:
            if not isinstance(f, Future):
                raise TypeError(f"story() takes futures, not {type(f).__name__}")
            self._session.own([f])
            detail = self.query(f"/api/task/{f._id}")
            for step in detail["story"]:
                out.append({"task": f.key, "at": "scheduler", **step})
            for worker, steps in detail.get("worker_story", {}).items():
                for step in steps:
                    t = step.pop("at_us")
                    out.append(
                        {"task": f.key, "at": "worker", "worker": worker, **step, "time_us": t}
                    )
        out.sort(key=lambda s: s["time_us"])
        return out

    def profile(self, group: str | None = None) -> dict[str, int]:
        """The profiler's samples since the cluster started, as folded
        stacks (``"f (file:line);g (file:line)"`` -> count): all task groups
        together, or only ``group``. Workers sample the stacks of running
        tasks every ``SHOAL_PROFILE_INTERVAL`` (default 20 ms; 0: off).
        Workers hand over their latest samples first."""
        self._sync()
        q = "/api/profile" + (f"?group={urllib.parse.quote(group)}" if group else "")
        return dict(self.query(q)["stacks"])

    def get_worker_logs(self, n: int | None = None) -> dict[str, list[str]]:
        """Recent log lines of each worker (its ``logging`` records and
        Shoal's own, filtered by ``SHOAL_LOG``), by worker name; the last
        ``n`` of each if given. Workers hand over their latest lines first."""
        self._sync()
        out: dict[str, list[str]] = {}
        for w in self.query("/api/logs")["workers"]:
            lines = w["lines"]
            out[w["name"] or str(w["id"])] = lines[-n:] if n else lines
        return out

    def trace(self, filename: str | os.PathLike) -> str:
        """Writes the task stream (tasks, transfers, spills the scheduler
        still remembers: the last 100,000) as a Chrome trace / Perfetto JSON
        file; open it in ``chrome://tracing`` or ui.perfetto.dev. Returns the
        path."""
        return diagnostics.write_trace(self.query("/api/report?since_us=0&merge=0"), filename)

    def retire_workers(
        self,
        workers: Iterable[str] | None = None,
        n: int | None = None,
        timeout: float = 60.0,
    ) -> list[str]:
        """Removes workers gracefully: they get no new work, the results
        they hold that are still needed move to other workers, then they
        stop (an embedded cluster does not replace them). ``workers``:
        addresses, names or pids (``scheduler_info()``); or ``n``: that many.
        Returns the addresses retired, once they are gone; ``TimeoutError``
        after ``timeout`` seconds."""
        info = self.scheduler_info()["workers"]
        if workers is None:
            if n is None:
                raise ValueError("give the workers to retire, or n=")
            chosen = sorted(info, key=lambda a: info[a]["id"])[-n:] if n > 0 else []
        else:
            wanted = {str(w) for w in workers}

            def ids(a: str) -> set[str]:
                return {a, info[a]["name"], str(info[a]["pid"])}

            chosen = [a for a in info if ids(a) & wanted]
            unknown = wanted - set().union(*(ids(a) for a in chosen))
            if unknown:
                raise ValueError(f"no such workers: {sorted(unknown)}; see scheduler_info()")
        if not chosen:
            return []
        self._session.check().retire(chosen)
        deadline = time.monotonic() + timeout
        while set(chosen) & set(self.scheduler_info()["workers"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {chosen} did not retire within {timeout} s")
            time.sleep(0.05)
        return chosen

    def restart(self, timeout: float = 60.0) -> None:
        """Restarts every worker process (their nannies: the embedded
        cluster, ``shoal worker``, start fresh ones) and cancels this
        client's futures, as distributed does. Waits until as many workers
        as before are back."""
        core = self._session.check()
        if isinstance(self.cluster, LocalCluster) and not self.cluster.processes:
            raise RuntimeError(
                "restart() needs worker processes: workers running as threads of this "
                "process cannot be restarted (use LocalCluster(processes=True))"
            )
        deadline = time.monotonic() + timeout
        expected = len(self.worker_pids)  # embedded: the processes started
        while True:
            before = {w["pid"] for w in self.scheduler_info()["workers"].values()}
            if len(before) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # still joining
        self._session.cancel(self._session.live_ids())
        core.restart()
        while True:
            now = {w["pid"] for w in self.scheduler_info()["workers"].values()}
            if len(now) >= len(before) and not (now & before):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not come back within {timeout} s")
            time.sleep(0.05)

    def nthreads(self) -> dict[str, int]:
        """Execution threads per worker, by address (as Dask's)."""
        return {a: w["nthreads"] for a, w in self.scheduler_info()["workers"].items()}

    ncores = nthreads

    @property
    def status(self) -> str:
        """``"running"`` or ``"closed"``."""
        return "closed" if self._session.closed else "running"

    @property
    def id(self) -> str:
        """This client's id on its scheduler."""
        return f"Client-{self._session.check().id:x}"

    asynchronous = False  # Shoal's client is synchronous

    def shutdown(self) -> None:
        """Closes this client and its cluster (workers and scheduler) when
        it has one (``Client()``, ``Client(cluster)``); a scheduler started
        elsewhere is left running (stop ``shoal scheduler`` there)."""
        cluster = self.cluster
        self.close()
        if cluster is not None:
            cluster.close()

    def __getattr__(self, name: str) -> Any:
        why = _DISTRIBUTED_ONLY.get(name)
        if why is None:
            raise AttributeError(f"'Client' object has no attribute {name!r}")
        raise AttributeError(f"Client.{name} is not provided by Shoal: {why}")

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the embedded cluster's workers (empty when remote)."""
        cluster = self.cluster
        return cluster.worker_pids if isinstance(cluster, LocalCluster) else []

    def _repr_html_(self) -> str:
        """Jupyter: the scheduler, its workers and a dashboard link."""
        kind = "embedded" if self._cluster is not None else "remote"
        where = f"{kind}: {self.scheduler_address}"
        return deploy.html_summary("shoal.Client", where, self, self._session.closed)

    def __repr__(self) -> str:
        kind = "embedded" if self._cluster is not None else "remote"
        state = "closed" if self._session.closed else self.scheduler_address
        return f"<shoal.Client {kind}: {state}>"
