"""Command tasks, task arrays, jobs, time limits and stopping running tasks:
`client.submit_command` on the embedded cluster, `shoal submit` / `shoal job`
on a `shoal scheduler` + `shoal worker` cluster. Real programs, real
process groups, real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import alive, free_port, wait_for

import shoal
from shoal import wait

SHOAL = [sys.executable, "-m", "shoal"]
GRACE = 1.0  # SHOAL_STOP_GRACE for these clusters


def worker_pids(client) -> list[int]:
    return sorted(w["pid"] for w in client.scheduler_info()["workers"].values())


@pytest.fixture(scope="module")
def client():
    os.environ["SHOAL_STOP_GRACE"] = str(GRACE)
    try:
        with shoal.Client(n_workers=2) as c:
            yield c
    finally:
        os.environ.pop("SHOAL_STOP_GRACE", None)


# ------------------------------------------------------------ command tasks


def test_a_command_task_returns_its_output_and_sees_its_environment(client, tmp_path):
    f = client.submit_command(
        ["sh", "-c", 'echo "$SHOAL_CPUS $GREETING $PWD"; echo note >&2'],
        env={"GREETING": "hello"},
        cwd=tmp_path,
    )
    r = f.result(timeout=60)
    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode == 0
    assert r.stdout.decode() == f"1 hello {tmp_path}\n"
    assert r.stderr == b"note\n"
    # SHOAL_TASK_ID is set (the task's own id when not part of a job).
    tid = client.submit_command(["sh", "-c", "echo $SHOAL_TASK_ID"]).result(timeout=60)
    assert int(tid.stdout) > 0


def test_a_failing_command_raises_with_its_status_and_stderr_tail(client):
    f = client.submit_command(["sh", "-c", "echo first >&2; echo 'it broke' >&2; exit 3"])
    with pytest.raises(
        shoal.CommandError, match=r"(?s)exited with status 3.*\nfirst\nit broke"
    ) as e:
        f.result(timeout=60)
    assert e.value.returncode == 3
    assert e.value.cmd[0] == "sh"
    assert "it broke" in e.value.stderr
    killed = client.submit_command(["sh", "-c", "kill -SEGV $$"])
    with pytest.raises(shoal.CommandError, match="killed by SIGSEGV") as e:
        killed.result(timeout=60)
    assert e.value.returncode == -signal.SIGSEGV
    missing = client.submit_command(["no-such-program-for-shoal", "x"])
    with pytest.raises(shoal.CommandError, match="cannot start.*no-such-program-for-shoal"):
        missing.result(timeout=60)


def test_command_output_files_expand_placeholders(client, tmp_path):
    f = client.submit_command(
        ["sh", "-c", "echo out; echo err >&2"],
        cwd=tmp_path,
        stdout="logs/%{TASK_ID}.out",
        stderr=subprocess.DEVNULL,
        key="with-files",
    )
    r = f.result(timeout=60)
    assert r.stdout is None and r.stderr is None
    (out,) = (tmp_path / "logs").iterdir()
    assert out.read_text() == "out\n"
    assert out.name.endswith(".out") and out.name[:-4].isdigit()


def test_bad_command_arguments_are_clear_errors(client):
    with pytest.raises(TypeError, match="list of arguments"):
        client.submit_command("ls -l")
    with pytest.raises(ValueError, match="needs a program"):
        client.submit_command([])
    with pytest.raises(TypeError, match="stdout must be"):
        client.submit_command(["true"], stdout=3)
    extremes = ("99999999999999999999d", 1e400, 2**64, 10**400, "", "ß", float("-inf"))
    for bad in ("ten", "-1", 0, "1h30", float("nan"), *extremes):
        with pytest.raises(ValueError, match="time_limit"):
            client.submit_command(["true"], time_limit=bad)
    with pytest.raises(TypeError, match="time_limit"):
        client.submit(int, time_limit=[1])
    assert client.submit_command(["true"]).result(timeout=60).returncode == 0


# ------------------------------------------------------------ time limits


def test_a_command_that_ignores_sigterm_is_killed_at_its_limit(client, tmp_path):
    pidfile = tmp_path / "pid"
    script = f"trap '' TERM; sleep 300 & echo $! > {pidfile}; wait; sleep 300"
    t0 = time.time()
    f = client.submit_command(["sh", "-c", script], time_limit=1)
    with pytest.raises(shoal.TaskTimeoutError, match="time limit of 1s.*SIGKILL"):
        f.result(timeout=60)
    took = time.time() - t0
    assert took < 1 + GRACE + 3, took
    # The program's own children went with it (the whole process group).
    child = int(pidfile.read_text())
    wait_for(lambda: not alive(child), 5, "the group's other process to die")
    assert client.submit(pow, 2, 5).result(timeout=30) == 32


def loop_forever(path):
    n = 0
    while True:
        n += 1
        if n % 100_000 == 0:
            with open(path, "w") as fh:
                fh.write(str(n))


def test_a_python_loop_is_interrupted_at_its_time_limit(client, tmp_path):
    t0 = time.time()
    f = client.submit(loop_forever, str(tmp_path / "n"), time_limit="500ms")
    with pytest.raises(shoal.TaskTimeoutError, match="time limit of 0.5s"):
        f.result(timeout=60)
    assert time.time() - t0 < 0.5 + 3
    # Interrupted, not restarted: the same processes go on.
    pids = worker_pids(client)
    fs = client.map(pow, [2] * 8, range(8), time_limit=5)
    assert client.gather(fs) == [2**i for i in range(8)]
    assert worker_pids(client) == pids


def test_a_task_stuck_in_c_restarts_its_worker_and_the_others_go_on(client):
    pids = worker_pids(client)
    t0 = time.time()
    # time.sleep holds no bytecode boundary: no interrupt can land.
    f = client.submit(time.sleep, 300, time_limit=1)
    with pytest.raises(shoal.TaskTimeoutError, match="did not stop .* its worker process restarts"):
        f.result(timeout=60)
    assert time.time() - t0 < 1 + GRACE + 5
    # The stuck process is replaced by a fresh one.
    wait_for(lambda: len(now := worker_pids(client)) == 2 and now != pids, 60, "a fresh worker")
    assert client.submit(pow, 3, 3).result(timeout=60) == 27


# ------------------------------------------------------- stopping on cancel


def test_cancelling_a_running_python_task_stops_it(client, tmp_path):
    marker = tmp_path / "n"
    f = client.submit(loop_forever, str(marker))
    wait_for(marker.exists, 30, "the loop to start")
    f.cancel()
    time.sleep(0.5)
    before = marker.read_text()
    time.sleep(0.5)
    assert marker.read_text() == before, "the loop still runs"
    # Both workers are free again: two tasks that wait for each other finish.
    assert client.gather([client.submit(pow, 2, i) for i in range(4)]) == [1, 2, 4, 8]


def import_then_loop(d):
    sys.path.insert(0, d)
    import slow_to_import  # noqa: F401

    while True:
        pass


def test_an_interrupt_waits_until_an_import_is_done(client, tmp_path):
    """A cancel that comes while the task imports a module lands after the
    import: a module cut short halfway would stay broken for every later
    task of that worker (joblib's own tests met this)."""
    (tmp_path / "slow_to_import.py").write_text(
        "import time, pathlib\n"
        "t = time.time()\n"
        "while time.time() - t < 1.0:\n"
        "    pass\n"
        f"pathlib.Path({str(tmp_path / 'imported')!r}).write_text('done')\n"
    )
    f = client.submit(import_then_loop, str(tmp_path))
    time.sleep(0.4)  # inside the import
    f.cancel()
    wait_for((tmp_path / "imported").exists, 10, "the import to finish")
    # The loop after it was stopped: both workers take work again.
    assert client.gather([client.submit(pow, 2, i) for i in range(4)]) == [1, 2, 4, 8]


def test_cancelling_a_running_command_stops_its_process_group(client, tmp_path):
    pidfile = tmp_path / "pid"
    f = client.submit_command(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 300"])
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "pid"))
    assert alive(pid)
    f.cancel()
    wait_for(lambda: not alive(pid), 10, "the command to be stopped")
    with pytest.raises(shoal.FutureCancelledError):
        f.result(timeout=10)


# ------------------------------------------------------- the CLI and jobs


class Cluster:
    """`shoal scheduler` + one `shoal worker` of two processes."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None):
        self.dir = tmp_path
        self.sfile = tmp_path / "scheduler.json"
        self.env = {
            **os.environ,
            "SHOAL_SCHEDULER_FILE": str(self.sfile),
            "SHOAL_STOP_GRACE": str(GRACE),
            **(env or {}),
        }
        self.log = open(tmp_path / "cluster.log", "ab")
        self.procs = [
            subprocess.Popen(
                [*SHOAL, "scheduler", "--port", "0", "--no-dashboard"]
                + ["--scheduler-file", str(self.sfile)],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        ]
        wait_for(self.sfile.exists, 30, "the scheduler file")
        self.procs.append(
            subprocess.Popen(
                [
                    *SHOAL,
                    "worker",
                    "--nworkers",
                    "2",
                    "--nthreads",
                    "2",
                    "--resources",
                    "licence=1",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        )
        with shoal.Client(scheduler_file=str(self.sfile)) as c:
            c.wait_for_workers(2, timeout=60)

    def shoal(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [*SHOAL, *args],
            capture_output=True,
            text=True,
            cwd=self.dir,
            env=self.env,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"shoal {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, *args: str) -> int:
        out = self.shoal("submit", *args).stdout
        assert out.startswith("job "), out
        return int(out.split()[1])

    def info(self, job: int) -> dict:
        with shoal.Client(scheduler_file=str(self.sfile)) as c:
            return c.query(f"/api/jobs/{job}")

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.log.close()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("jobs"))
    try:
        yield c
    finally:
        c.close()


def test_an_array_runs_every_id_with_its_outputs_and_reports_failures(jobs):
    script = (
        'echo "task $SHOAL_TASK_ID of job $SHOAL_JOB_ID"; '
        "[ $SHOAL_TASK_ID -ne 7 ] || { echo seven fails >&2; exit 4; }"
    )
    job = jobs.submit("--array", "1-10,20-30:5", "--name", "sweep", "--", "sh", "-c", script)
    r = jobs.shoal("job", "wait", str(job), check=False)
    assert r.returncode == 1, r.stderr
    assert "task 7: CommandError" in r.stdout and "seven fails" in r.stdout
    ids = [*range(1, 11), 20, 25, 30]
    for i in ids:
        out = jobs.dir / f"job-{job}" / f"{i}.stdout"
        assert out.read_text() == f"task {i} of job {job}\n"
    info = jobs.info(job)
    assert (info["finished"], info["failed"], info["state"]) == (12, 1, "failed")
    assert info["errors"][0]["task"] == 7
    failed = jobs.shoal("job", "task-ids", str(job), "--filter", "failed").stdout.strip()
    assert failed == "7"
    assert jobs.shoal("job", "task-ids", str(job)).stdout.strip() == "1-10,20,25,30"
    # Resubmitting the failed ids with a fix.
    again = jobs.submit("--array", failed, "--", "sh", "-c", "echo fixed $SHOAL_TASK_ID")
    jobs.shoal("job", "wait", str(again))
    assert (jobs.dir / f"job-{again}" / "7.stdout").read_text() == "fixed 7\n"
    listing = jobs.shoal("job", "list").stdout
    assert f"{job:>5}  sweep" in listing and "failed" in listing
    assert "sweep" in jobs.shoal("job", "info", str(job)).stdout


def test_entries_from_lines_and_json_reach_the_tasks(jobs):
    (jobs.dir / "params.txt").write_text("alpha 1\nbeta 2\ngamma 3\n")
    job = jobs.submit(
        "--each-line",
        "params.txt",
        "--stdout",
        "lines/%{TASK_ID}.txt",
        "--wait",
        "--",
        "sh",
        "-c",
        'echo "$SHOAL_ENTRY"',
    )
    got = [(jobs.dir / "lines" / f"{i}.txt").read_text() for i in range(3)]
    assert got == ["alpha 1\n", "beta 2\n", "gamma 3\n"]
    (jobs.dir / "tasks.json").write_text(json.dumps([{"x": 1}, [2, 3], "four"]))
    job = jobs.submit(
        "--from-json",
        "tasks.json",
        "--array",
        "1-2",
        "--wait",
        "--",
        "sh",
        "-c",
        'echo "$SHOAL_ENTRY"',
    )
    assert (jobs.dir / f"job-{job}" / "1.stdout").read_text() == "[2,3]\n"
    assert (jobs.dir / f"job-{job}" / "2.stdout").read_text() == '"four"\n'
    assert not (jobs.dir / f"job-{job}" / "0.stdout").exists()


def test_resources_env_and_cpus_reach_the_program(jobs):
    job = jobs.submit(
        "--resource",
        "licence=1",
        "--cpus",
        "2",
        "--env",
        "MODE=fast",
        "--stdout",
        "env.txt",
        "--stderr",
        "none",
        "--wait",
        "--",
        "sh",
        "-c",
        'echo "$SHOAL_CPUS $MODE"',
    )
    assert (jobs.dir / "env.txt").read_text() == "2 fast\n"
    # More of a resource than any worker has: the job fails, saying so.
    job = jobs.submit("--resource", "licence=5", "--", "true")
    r = jobs.shoal("job", "wait", str(job), check=False)
    assert r.returncode == 1 and "licence" in r.stdout, r.stdout


def test_max_fails_cancels_the_rest_of_the_job(jobs):
    job = jobs.submit(
        "--array",
        "1-40",
        "--max-fails",
        "2",
        "--stdout",
        "none",
        "--stderr",
        "none",
        "--",
        "sh",
        "-c",
        "sleep 0.05; exit 1",
    )
    r = jobs.shoal("job", "wait", str(job), check=False)
    assert r.returncode == 1
    info = jobs.info(job)
    assert info["state"] == "cancelled"
    assert info["failed"] >= 2 and info["cancelled"] > 0
    assert info["failed"] + info["cancelled"] == 40


def test_cancelling_a_running_array_stops_its_programs(jobs):
    job = jobs.submit(
        "--array",
        "1-20",
        "--stdout",
        "pids/%{TASK_ID}",
        "--",
        "sh",
        "-c",
        "echo $$; exec sleep 300",
    )
    pids_dir = jobs.dir / "pids"

    def running():
        files = list(pids_dir.glob("*")) if pids_dir.exists() else []
        return [int(f.read_text()) for f in files if f.read_text().strip()]

    pids = wait_for(lambda: len(running()) >= 2 and running(), 30, "two running tasks")
    out = jobs.shoal("job", "cancel", str(job)).stdout
    assert "20 task(s) cancelled" in out
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 10, f"process {pid} to stop")
    info = jobs.info(job)
    assert (info["cancelled"], info["state"]) == (20, "cancelled")


def test_a_time_limit_on_a_job_task(jobs):
    job = jobs.submit("--time-limit", "1s", "--", "sh", "-c", "trap '' TERM; sleep 300")
    t0 = time.time()
    r = jobs.shoal("job", "wait", str(job), check=False)
    assert r.returncode == 1
    assert "TaskTimeoutError" in r.stdout and "time limit of 1s" in r.stdout
    assert time.time() - t0 < 1 + GRACE + 5


def test_bad_job_requests_are_clear_errors_and_the_cluster_goes_on(jobs):
    cases = [
        (["submit", "--array", "5-1", "--", "true"], "ends before it starts"),
        (["submit", "--array", "x", "--", "true"], "not an id or a range"),
        (["submit", "--each-line", "nope.txt", "--", "true"], "cannot read --each-line"),
        (["submit", "--time-limit", "soon", "--", "true"], "not a duration"),
        # Once a panic (Duration overflow) that killed the command.
        (["submit", "--time-limit", "99999999999999999999d", "--", "true"], "longest duration"),
        (["submit", "--time-limit", "1e400", "--", "true"], "not a duration"),
        (["submit", "--env", "NOEQUALS", "--", "true"], "NAME=VALUE"),
        (["submit", "true"], "PROGRAM"),
        (["job", "info", "999"], "no job 999"),
        (["job", "cancel", "999"], "no job 999"),
        (["job", "task-ids", "1", "--filter", "weird"], "filter must be"),
    ]
    for args, said in cases:
        r = jobs.shoal(*args, check=False)
        assert r.returncode != 0, args
        assert said in r.stderr, (args, r.stderr)
    (jobs.dir / "empty.json").write_text("{}")
    r = jobs.shoal("submit", "--from-json", "empty.json", "--", "true", check=False)
    assert r.returncode != 0 and "JSON array" in r.stderr
    job = jobs.submit("--wait", "--", "true")
    assert jobs.info(job)["state"] == "finished"


def test_job_tasks_form_one_task_group_per_job(jobs):
    job = jobs.submit(
        "--array", "1-50", "--name", "grouped", "--stdout", "none", "--wait", "--", "true"
    )
    with shoal.Client(scheduler_file=str(jobs.sfile)) as c:
        groups = {g["name"]: g for g in c.query("/api/status")["groups"]}
    assert groups[f"job {job}: grouped"]["submitted"] == 50


def test_a_crash_limit_fails_a_task_that_kills_its_worker(jobs):
    # The program kills the worker process that runs it (its parent).
    job = jobs.submit("--crash-limit", "1", "--", "sh", "-c", "kill -9 $PPID; sleep 5")
    r = jobs.shoal("job", "wait", str(job), check=False)
    assert r.returncode == 1
    assert "1 workers that died (KilledWorker)" in r.stdout, r.stdout
    with shoal.Client(scheduler_file=str(jobs.sfile)) as c:
        c.wait_for_workers(2, timeout=60)  # replaced by `shoal worker`
    ok = jobs.submit("--wait", "--", "true")
    assert jobs.info(ok)["state"] == "finished"


# ------------------------------------------------------------ the journal


def journaled_scheduler(port: str, sfile: Path, journal: Path, env: dict, log) -> subprocess.Popen:
    """`shoal scheduler --journal` on a fixed port (a restart takes it again)."""
    return subprocess.Popen(
        [*SHOAL, "scheduler", "--port", port, "--no-dashboard"]
        + ["--scheduler-file", str(sfile), "--journal", str(journal)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def reconnecting_workers(env: dict, log) -> subprocess.Popen:
    """`shoal worker --nworkers 2 --reconnect` in its own session (killed
    as a group)."""
    return subprocess.Popen(
        [*SHOAL, "worker", "--nworkers", "2", "--reconnect"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _step(path: str, i: int, *inputs: int) -> int:
    time.sleep(0.03)
    with open(path, "a") as fh:
        fh.write(f"{i}\n")
    return i + sum(inputs)


def test_the_journal_restores_jobs_after_the_scheduler_is_killed(tmp_path, monkeypatch):
    """SIGKILL the scheduler three times while an array of 2,000 commands
    and a Python graph run; started again with its journal (same port,
    same token), it restores the job. `--reconnect` workers keep running
    their tasks and rejoin with what they finished meanwhile (and what the
    lost scheduler had not acknowledged); the restored scheduler adopts
    those and runs only the rest; the graph's client (`reconnect=`)
    resumes and resubmits it: every task's side effect happens exactly
    once."""
    port = str(free_port())
    sfile = tmp_path / "s.json"
    journal = tmp_path / "journal"
    env = {**os.environ, "SHOAL_SCHEDULER_FILE": str(sfile), "SHOAL_HEARTBEAT_TIMEOUT": "3"}
    log = open(tmp_path / "log", "ab")

    def scheduler():
        return journaled_scheduler(port, sfile, journal, env, log)

    def shoal_cli(*args, check=True):
        r = subprocess.run(
            [*SHOAL, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
        )
        assert not check or r.returncode == 0, r.stderr
        return r

    sched = scheduler()
    wait_for(sfile.exists, 30, "the scheduler file")
    worker = reconnecting_workers(env, log)
    done = tmp_path / "done.txt"
    steps = tmp_path / "steps.txt"
    monkeypatch.setenv("SHOAL_HEARTBEAT_TIMEOUT", "3")
    client = None
    try:
        client = shoal.Client(scheduler_file=str(sfile), reconnect=120)
        # 150 leaves, then 150 tasks on pairs of them: a graph that runs
        # beside the array, through the kills.
        leaves = [client.submit(_step, str(steps), i, pure=False) for i in range(150)]
        pairs = [
            client.submit(_step, str(steps), 1000 + i, leaves[i], leaves[(i + 1) % 150], pure=False)
            for i in range(150)
        ]
        out = shoal_cli(
            "submit",
            "--array",
            "0-1999",
            "--stdout",
            "none",
            "--stderr",
            "none",
            "--",
            "sh",
            "-c",
            f"sleep 0.005; echo $SHOAL_TASK_ID >> {done}",
        ).stdout
        job = out.split()[1]
        finished_before = []
        for _ in range(3):
            # Kill it at a random point of the run.
            n = len(done.read_text().split()) if done.exists() else 0
            wait_for(
                lambda n=n: done.exists() and len(done.read_text().split()) > n + 150,
                60,
                "progress",
            )
            time.sleep(random.random() * 0.3)
            sched.kill()
            sched.wait()
            finished_before.append(len(done.read_text().split()))
            time.sleep(0.5)
            sched = scheduler()
        r = shoal_cli("job", "wait", job)
        want = [1000 + i + i + (i + 1) % 150 for i in range(150)]
        assert [f.result(timeout=120) for f in pairs] == want
        graph_runs = [int(x) for x in steps.read_text().split()]
        assert sorted(graph_runs) == [*range(150), *range(1000, 1150)], "graph: once each"
        with shoal.Client(scheduler_file=str(sfile)) as c:
            info = c.query(f"/api/jobs/{job}")
        assert (info["finished"], info["state"]) == (2000, "finished"), (info, r.stderr)
        ids = [int(x) for x in done.read_text().split()]
        assert set(ids) == set(range(2000)), "every task's side effect happened"
        dupes = sorted(i for i in set(ids) if ids.count(i) > 1)
        print(f"kills after {finished_before} tasks; run twice: {dupes}")
        assert not dupes, "exactly once per task id"
        # A new job after the restarts gets a new id; the old one is listed.
        again = shoal_cli("submit", "--wait", "--", "true").stdout.split()[1]
        assert int(again) == int(job) + 1
        assert f"{job:>5}" in shoal_cli("job", "list").stdout
        # Killed while writing: a journal cut at any byte still loads.
        sched.kill()
        sched.wait()
        data = journal.read_bytes()
        journal.write_bytes(data[: random.randrange(8, len(data))])
        sched = scheduler()
        wait_for(lambda: shoal_cli("job", "list", check=False).returncode == 0, 30, "the restart")
    finally:
        if client is not None:
            client.close()
        sched.kill()
        sched.wait()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        log.close()


def _mark(path: str, i: int, size: int):
    """A side effect to count runs by, then a result: `size` bytes (kept
    on the worker) or the int itself (small: it travels inline)."""
    with open(path, "a") as fh:
        fh.write(f"{i}\n")
    return bytes(size) if size else i


def _slow_mark(path: str, i: int):
    time.sleep(1.5)
    return _mark(path, i, 0)


def _total(xs):
    return sum(len(x) if isinstance(x, bytes) else x for x in xs)


def test_a_python_graph_survives_the_scheduler_being_killed(tmp_path, monkeypatch):
    """A client with `reconnect=` keeps its futures across a SIGKILL
    of a journaled scheduler: it connects again, resumes its id and
    resubmits what it holds. Results that rejoined workers still hold, and
    values the client had inline, are kept (their tasks do not run again);
    tasks running at the kill that their worker finishes and reports
    before the recovery wait ends are kept too; the rest would run again.
    New work on the old futures runs after the restart."""
    port = str(free_port())
    sfile = tmp_path / "s.json"
    journal = tmp_path / "journal"
    done = tmp_path / "done.txt"
    env = {**os.environ, "SHOAL_SCHEDULER_FILE": str(sfile), "SHOAL_HEARTBEAT_TIMEOUT": "3"}
    log = open(tmp_path / "log", "ab")

    def scheduler():
        return journaled_scheduler(port, sfile, journal, env, log)

    sched = scheduler()
    wait_for(sfile.exists, 30, "the scheduler file")
    worker = reconnecting_workers(env, log)
    monkeypatch.setenv("SHOAL_HEARTBEAT_TIMEOUT", "3")
    try:
        with shoal.Client(scheduler_file=str(sfile), reconnect=60) as c:
            c.wait_for_workers(2, timeout=60)
            # Odd ones return 100 kB (held by their worker), even ones an
            # int (inline: the client has the value).
            first = [
                c.submit(_mark, str(done), i, 100_000 * (i % 2), pure=False) for i in range(20)
            ]
            wait(first)
            # Running when the scheduler dies.
            slow = [c.submit(_slow_mark, str(done), 100 + i, pure=False) for i in range(2)]
            wait_for(lambda: c.query("/api/status?since=0")["counters"]["tasks"] >= 22, 30, "slow")
            sched.kill()
            sched.wait()
            time.sleep(1)
            sched = scheduler()
            # New work on the old futures, after the restart.
            total = c.submit(_total, first)
            assert total.result(timeout=120) == 10 * 100_000 + sum(range(0, 20, 2))
            assert c.gather(slow) == [100, 101]
            assert [f.result() for f in first[:4]] == [0, bytes(100_000), 2, bytes(100_000)]
        # Each ran once: the finished ones were kept, and the two running at
        # the kill finished on their rejoined worker, which reported them.
        runs = [int(x) for x in done.read_text().split()]
        assert sorted(runs) == [*range(20), 100, 101], runs
    finally:
        sched.kill()
        sched.wait()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        log.close()
    text = (tmp_path / "log").read_text(errors="replace")
    assert "20 of its" in text or "kept their results" in text, text[-3000:]


def test_time_requests_avoid_workers_whose_lifetime_ends_first_and_those_retire(tmp_path):
    """`shoal worker --lifetime`: the worker retires on time (gracefully: it
    is not replaced); tasks with a `--time-request` longer than what it has
    left go to the worker without a lifetime."""
    sfile = tmp_path / "s.json"
    env = {**os.environ, "SHOAL_SCHEDULER_FILE": str(sfile)}
    log = open(tmp_path / "log", "ab")
    procs = [
        subprocess.Popen(
            [*SHOAL, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", str(sfile)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    ]
    wait_for(sfile.exists, 30, "the scheduler file")
    for name, extra in [("short", ["--lifetime", "6s"]), ("long", [])]:
        procs.append(
            subprocess.Popen(
                [*SHOAL, "worker", "--name", f"{name}-{{pid}}", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
    try:
        with shoal.Client(scheduler_file=str(sfile)) as c:
            c.wait_for_workers(2, timeout=60)
            names = {w["pid"]: w["name"] for w in c.scheduler_info()["workers"].values()}
            t0 = time.time()
            r = subprocess.run(
                [*SHOAL, "submit", "--array", "1-6", "--time-request", "1m", "--wait",
                 "--stdout", "ran/%{TASK_ID}", "--", "sh", "-c", "echo $PPID; sleep 0.2"],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            ran_on = {names[int((tmp_path / "ran" / str(i)).read_text())] for i in range(1, 7)}
            assert all(n.startswith("long-") for n in ran_on), ran_on
            # The same for Python tasks.
            pids = c.gather([c.submit(os.getpid, time_request="1m") for _ in range(6)])
            assert {names[p] for p in pids} <= {n for n in names.values() if n.startswith("long-")}
            with pytest.raises(ValueError, match="time_request"):
                c.submit(os.getpid, time_request="soon")
            # The short-lived worker retires at its lifetime and is not replaced.
            wait_for(lambda: len(c.scheduler_info()["workers"]) == 1, 30, "the retirement")
            assert time.time() - t0 < 20
            (left,) = c.scheduler_info()["workers"].values()
            assert left["name"].startswith("long-")
            assert procs[1].wait(30) == 0, "its `shoal worker` ends when its process retires"
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
        log.close()


def test_a_million_task_array_is_taken_in_without_stopping_the_scheduler(tmp_path):
    # Before: the scheduler took a job in one go, its loop stopped for about
    # 2 s a million tasks (at 5 M its worker gave up on it). Here peers give
    # up after 1 s of silence, and a client's tasks run meanwhile.
    c = Cluster(tmp_path, {"SHOAL_HEARTBEAT_TIMEOUT": "1"})
    try:
        with shoal.Client(scheduler_file=str(c.sfile)) as probe:
            latencies = []
            done = False

            def ping():
                while not done:
                    t = time.perf_counter()
                    probe.submit(abs, -1).result(timeout=60)
                    latencies.append(time.perf_counter() - t)
                    time.sleep(0.01)

            import threading

            th = threading.Thread(target=ping)
            th.start()
            try:
                job = c.submit(
                    "--array", "1-1000000", "--stdout", "none", "--stderr", "none", "--", "true"
                )
                time.sleep(2)
            finally:
                done = True
                th.join()
            assert max(latencies) < 1.0, max(latencies)
            assert len(probe.scheduler_info()["workers"]) == 2, "a worker was dropped"
            assert c.info(job)["tasks"] == 1_000_000
            # Cancelled while much of it waits: every task ends, once.
            c.shoal("job", "cancel", str(job))
            info = wait_for(
                lambda: (i := c.info(job))["state"] == "cancelled" and i, 60, "the cancel"
            )
            assert info["finished"] + info["failed"] + info["cancelled"] == 1_000_000
    finally:
        c.close()
