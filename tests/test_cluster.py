"""Clusters across hosts: `shoal scheduler`, `shoal worker`, `shoal status`,
authentication, heartbeats and recovery. Real processes and real TCP; the
"hosts" are network namespaces with their own addresses when this machine
permits them (root with `ip netns`), else distinct loopback addresses."""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _helpers import wait_for

import shoal

SHOAL = [sys.executable, "-m", "shoal"]


class Proc:
    """A command in its own process group, killed with the group."""

    def __init__(self, args: list[str], prefix: list[str] | None = None, env=None, log=None):
        self.log = log
        self.p = subprocess.Popen(
            (prefix or []) + args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.p.wait()


@contextmanager
def cluster(
    tmp_path,
    n_workers: int = 2,
    hosts: list[list[str]] | None = None,
    tls: list[str] | None = None,
    worker_args: list[list[str]] | None = None,
    **env,
) -> Iterator:
    """A scheduler and `n_workers` `shoal worker` commands, each of one
    process; `hosts`: command prefixes (network namespaces) for the
    scheduler and each worker; `tls`: the scheduler's --tls-* options."""
    sfile = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "ab")
    hosts = hosts or [[]] * (n_workers + 1)
    host0 = "127.0.0.1"
    if hosts[0]:
        host0 = hosts[0][-1]
        hosts = [hosts[0][:-1], *hosts[1:]]
    env = {"SHOAL_HEARTBEAT_TIMEOUT": "3", **env}
    procs = [
        Proc(
            [*SHOAL, "scheduler", "--host", host0, "--port", "0", "--scheduler-file", str(sfile)]
            + (tls or []),
            hosts[0],
            env,
            log,
        )
    ]
    try:
        wait_for(sfile.exists, 20, "the scheduler file")
        for i in range(n_workers):
            wenv = {**env, "SHOAL_HOST_KEY": f"host-{i}"}
            procs.append(
                Proc(
                    [*SHOAL, "worker", "--scheduler-file", str(sfile), "--name", f"w{i}-{{pid}}"]
                    + (worker_args[i] if worker_args else []),
                    hosts[i + 1],
                    wenv,
                    log,
                )
            )
        yield sfile, procs
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


def n_workers(client: shoal.Client) -> int:
    return len(client.scheduler_info()["workers"])


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def slow_inc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


def where(_):
    time.sleep(0.05)
    return os.getpid()


def test_scheduler_worker_client_status_across_processes(tmp_path):
    with cluster(tmp_path, 2) as (sfile, _):
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 2, 30, "two workers")
            # A graph spanning both workers.
            pids = set(c.gather(c.map(where, range(20), batch_size=1)))
            assert len(pids) == 2
            level = c.map(inc, range(64), batch_size=1)
            level = list(level)
            while len(level) > 1:
                level = [c.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
            assert level[0].result() == sum(range(1, 65))
            # `shoal task ID`: the scheduler's transitions and the worker's steps.
            out = subprocess.run(
                [*SHOAL, "task", str(level[0].id), "--scheduler-file", str(sfile)],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr
            assert ": memory, held by " in out.stdout, out.stdout
            assert "processing -> memory" in out.stdout and "(task-finished)" in out.stdout
            assert "start -> running (order " in out.stdout, out.stdout
            out = subprocess.run(
                [*SHOAL, "task", "1", "--scheduler-file", str(sfile)],
                capture_output=True,
                text=True,
            )
            assert out.returncode != 0 and "task 1: task 1 is not known" in out.stderr, out
            # Large results travel between the "hosts" over TCP.
            import numpy as np

            a = c.submit(np.arange, 1_000_000)
            b = c.submit(np.ones, 1_000_000)
            assert c.submit(np.dot, a, b).result() == sum(range(1_000_000))
            # Memory figures arrive with heartbeats (every second).
            wait_for(
                lambda: all(w["memory"] > 0 for w in c.scheduler_info()["workers"].values()),
                5,
                "memory figures",
            )
        out = subprocess.run(
            [*SHOAL, "status", "--scheduler-file", str(sfile)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert "2 worker(s)" in out.stdout
        assert out.stdout.count(" w0-") + out.stdout.count(" w1-") == 2, out.stdout


def test_workers_and_clients_wait_for_a_scheduler_file_not_there_yet(tmp_path):
    # As a batch script starts them: the workers and the client before the
    # scheduler has written its file.
    sfile = tmp_path / "later.json"
    log = open(tmp_path / "cluster.log", "ab")
    worker = Proc([*SHOAL, "worker", "--scheduler-file", str(sfile)], log=log)
    procs = [worker]
    try:
        time.sleep(1.5)
        assert worker.p.poll() is None, "the worker gave up on a scheduler file to come"
        procs.append(
            Proc(
                [*SHOAL, "scheduler", "--port", "0", "--scheduler-file", str(sfile)]
                + ["--dashboard-address", "127.0.0.1:0"],
                log=log,
            )
        )
        with shoal.Client(scheduler_file=sfile, timeout=30) as c:
            wait_for(lambda: n_workers(c) == 1, 30, "the worker that waited")
            assert c.submit(inc, 1).result() == 2
        log.flush()
        assert "waiting for the scheduler file" in (tmp_path / "cluster.log").read_text()
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()
    # One that never comes: a clear error, after the client's timeout.
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="did not appear in 0.5 s"):
        shoal.Client(scheduler_file=tmp_path / "never.json", timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_wrong_credentials_are_refused_and_the_cluster_goes_on(tmp_path):
    with cluster(tmp_path, 1) as (sfile, _):
        address = json.loads(sfile.read_text())["address"]
        with pytest.raises(ConnectionError, match="token"):
            shoal.Client(address, token="not-the-token")
        # Garbage on a raw socket is dropped.
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"\x00\x00\x00\x0eGET / HTTP/1.1")
            s.settimeout(10)
            assert s.recv(100) == b"", "the scheduler answered garbage"
        # A worker with the wrong token cannot join.
        bad = subprocess.run(
            [*SHOAL, "worker", address, "--token-file", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and "token" in bad.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "shoal._worker", address],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SHOAL_TOKEN": "wrong"},
        )
        assert bad.returncode != 0 and "token" in bad.stderr, bad.stderr
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 1, 30, "the worker")
            assert c.submit(inc, 1).result() == 2
            # A worker's data server refuses an unauthenticated fetch too.
            data_addr = next(iter(c.scheduler_info()["workers"]))
            h, p = data_addr.removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((h, int(p))) as s:
                s.sendall(b"\x00\x00\x00\x04junk")
                s.settimeout(10)
                assert s.recv(100) == b""
    log = (tmp_path / "cluster.log").read_text(errors="replace")
    assert "authentication failed" in log


def test_one_clients_exit_never_affects_anothers_work(tmp_path):
    with cluster(tmp_path, 2) as (sfile, _):
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 2, 30, "two workers")
            fs = c.map(slow_inc, range(40), batch_size=1)
            other = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import shoal, time, os, sys\n"
                    f"c = shoal.Client(scheduler_file={str(sfile)!r})\n"
                    "fs = [c.submit(time.sleep, 0.2) for _ in range(20)]\n"
                    "time.sleep(0.3)\n"
                    "os._exit(1)\n",
                ]
            )
            other.wait(60)
            assert c.gather(fs) == list(range(1, 41))


def test_a_frozen_worker_is_detected_by_heartbeat_and_its_work_rerun(tmp_path):
    with cluster(tmp_path, 2) as (sfile, _):
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 2, 30, "two workers")
            pids = [w["pid"] for w in c.scheduler_info()["workers"].values()]
            fs = c.map(slow_inc, range(60), batch_size=1)
            time.sleep(0.5)
            t = time.time()
            os.kill(pids[0], signal.SIGSTOP)  # hung: alive, connected, silent
            try:
                assert c.gather(fs) == list(range(1, 61))
                took = time.time() - t
                # Detected within the 3 s timeout (plus a heartbeat).
                wait_for(lambda: n_workers(c) == 1, 10, "the frozen worker to be dropped")
            finally:
                os.kill(pids[0], signal.SIGCONT)
            assert took < 30


def test_scheduler_death_fails_clients_fast_and_workers_exit(tmp_path):
    with cluster(tmp_path, 1) as (sfile, procs):
        c = shoal.Client(scheduler_file=sfile)
        wait_for(lambda: n_workers(c) == 1, 30, "the worker")
        worker_pid = next(iter(c.scheduler_info()["workers"].values()))["pid"]
        f = c.submit(time.sleep, 30)
        procs[0].signal(signal.SIGKILL)
        t = time.time()
        with pytest.raises(shoal.SchedulerLostError):
            f.result(timeout=60)
        assert time.time() - t < 10
        wait_for(lambda: not os.path.exists(f"/proc/{worker_pid}"), 20, "the worker to exit")
        c.close()


# ---------------------------------------------------------------- namespaces


def _netns_available() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    r = subprocess.run(["ip", "netns", "add", "shoal-probe"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "shoal-probe"], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@contextmanager
def hosts(n: int) -> Iterator[list[list[str]]]:
    """`n` network namespaces on a bridge, 10.77.0.10+i each; yields the
    command prefix of each (and, for the first, its address last). Falls
    back to distinct loopback addresses, saying so."""
    why = _netns_available()
    if why is not None:
        print(f"\nNOTE: no network namespaces ({why}): hosts are loopback addresses")
        yield [["127.0.0.2"]] + [[] for _ in range(n - 1)]
        return
    names = [f"shoal-h{i}" for i in range(n)]
    br = "shoalbr0"

    def clean() -> None:
        for i, ns in enumerate(names):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"shv{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", br], capture_output=True)

    clean()
    try:
        _sh("ip", "link", "add", br, "type", "bridge")
        _sh("ip", "addr", "add", "10.77.0.1/24", "dev", br)
        _sh("ip", "link", "set", br, "up")
        for i, ns in enumerate(names):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", f"shv{i}", "type", "veth", "peer", "name", f"shp{i}")
            _sh("ip", "link", "set", f"shp{i}", "netns", ns)
            _sh("ip", "link", "set", f"shv{i}", "master", br)
            _sh("ip", "link", "set", f"shv{i}", "up")
            ex = ["ip", "netns", "exec", ns]
            _sh(*ex, "ip", "addr", "add", f"10.77.0.{10 + i}/24", "dev", f"shp{i}")
            _sh(*ex, "ip", "link", "set", f"shp{i}", "up")
            _sh(*ex, "ip", "link", "set", "lo", "up")
        print(f"\nhosts: network namespaces {names} on bridge {br} (10.77.0.10-{9 + n})")
        prefixes = [["ip", "netns", "exec", ns] for ns in names]
        prefixes[0] = prefixes[0] + ["10.77.0.10"]
        yield prefixes
    finally:
        clean()


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> list[str]:
    """One site's certificates for the whole test process (a process
    configures TLS once)."""
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([*SHOAL, "certs", str(d)], check=True, capture_output=True)
    return [
        *("--tls-ca", str(d / "ca.pem")),
        *("--tls-cert", str(d / "cert.pem")),
        *("--tls-key", str(d / "key.pem")),
    ]


def make_floats(n):
    return np.arange(n, dtype=np.float64)


def make_list(n):
    return [str(i) for i in range(n)]


def total_of(a, words):
    return float(a.sum()) + len(words)


def test_results_go_to_another_host_from_memory_without_a_shared_memory_file(tmp_path):
    """A held result under the shared-memory block size (an array of
    256 KiB, a list), fetched by a task on another host and by a client on
    yet another: framed in memory and sent, with no file written for it
    (a peer there could not map one anyway)."""
    args = [["--resources", "hA=1"], ["--resources", "hB=1"]]
    with cluster(tmp_path, 2, worker_args=args) as (sfile, _):
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 2, 60, "two workers")
            pid_a = next(
                w["pid"] for w in c.scheduler_info()["workers"].values() if w["name"][:2] == "w0"
            )
            segments = f"/dev/shm/shoal-{os.getuid()}-{pid_a}/*"
            a = c.submit(make_floats, 32768, resources={"hA": 1})
            words = c.submit(make_list, 20_000, resources={"hA": 1})
            shoal.wait([a, words])
            before = set(glob.glob(segments))
            got = c.submit(total_of, a, words, resources={"hB": 1}).result(timeout=60)
            assert got == float(np.arange(32768).sum()) + 20_000
            assert np.array_equal(a.result(timeout=60), np.arange(32768, dtype=np.float64))
            assert words.result(timeout=60)[-1] == "19999"
            assert set(glob.glob(segments)) == before, "a file was written for a peer"


@pytest.mark.parametrize("use_tls", [False, True], ids=["tcp", "tls"])
def test_hosts_cut_off_and_killed_mid_graph_still_give_the_right_result(tmp_path, use_tls, certs):
    with hosts(4) as prefixes:
        netns = len(prefixes[1]) > 0
        tls = certs if use_tls else None
        with cluster(tmp_path, 3, hosts=prefixes, tls=tls) as (sfile, procs):
            scheme = json.loads(sfile.read_text())["address"].split(":")[0]
            assert scheme == ("tls" if use_tls else "tcp")
            with shoal.Client(scheduler_file=sfile) as c:
                wait_for(lambda: n_workers(c) == 3, 60, "three workers")
                assert len(set(c.gather(c.map(where, range(30), batch_size=1)))) == 3
                # About 4,000 tasks: a map, then a reduction tree.
                level = list(c.map(slow_inc, range(2000), delay=0.005, batch_size=1))
                while len(level) > 1:
                    level = [
                        c.submit(add, level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                        for i in range(0, len(level), 2)
                    ]
                time.sleep(0.5)
                assert not level[0].done(), "the graph finished before the failures"
                workers = c.scheduler_info()["workers"].values()
                by_name = {w["name"].split("-")[0]: w["pid"] for w in workers}
                if netns:
                    # Host 2's link goes down: partitioned, not dead.
                    _sh("ip", "netns", "exec", "shoal-h2", "ip", "link", "set", "shp2", "down")
                else:
                    os.kill(by_name["w1"], signal.SIGSTOP)
                os.kill(by_name["w2"], signal.SIGKILL)  # host 3's worker dies
                try:
                    assert level[0].result(timeout=240) == sum(range(1, 2001))
                    # Both were lost: the partitioned host by heartbeat.
                    assert by_name["w1"] not in {
                        w["pid"] for w in c.scheduler_info()["workers"].values()
                    }
                finally:
                    if not netns:
                        os.kill(by_name["w1"], signal.SIGCONT)


def test_tls_cluster_and_plain_tcp_refused(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([*SHOAL, "certs", str(certs)], check=True, capture_output=True)
    sfile = tmp_path / "s.json"
    tls = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "cert.pem")]
    tls += ["--tls-key", str(certs / "key.pem")]
    log = open(tmp_path / "tls.log", "ab")
    procs = [
        Proc([*SHOAL, "scheduler", "--port", "0", "--scheduler-file", str(sfile), *tls], log=log)
    ]
    try:
        wait_for(sfile.exists, 20, "the scheduler file")
        info = json.loads(sfile.read_text())
        assert info["address"].startswith("tls://") and info["tls"]["ca"].endswith("ca.pem")
        procs.append(
            Proc(
                [*SHOAL, "worker", "--scheduler-file", str(sfile), "--nworkers", "2"],
                env={"SHOAL_HOST_KEY": "elsewhere"},
                log=log,
            )
        )
        # TLS is configured once per process: the client runs in its own.
        script = (
            "import shoal, numpy as np, time\n"
            f"c = shoal.Client(scheduler_file={str(sfile)!r})\n"
            "while len(c.scheduler_info()['workers']) < 2: time.sleep(0.05)\n"
            "a = c.submit(np.arange, 1_000_000)\n"
            "print(c.submit(np.sum, a).result(), sum(c.gather(c.map(abs, range(100)))))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert out.stdout.split() == [str(sum(range(1_000_000))), str(sum(range(100)))], out.stderr
        # The same port without TLS: refused, and the cluster goes on.
        token = (tmp_path / "s.json.token").read_text()
        plain = info["address"].replace("tls://", "tcp://")
        with pytest.raises(ConnectionError):
            shoal.Client(plain, token=token)
        out = subprocess.run(
            [*SHOAL, "status", "--scheduler-file", str(sfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "2 worker(s)" in out.stdout, out.stderr
        # The dashboard speaks HTTPS with the cluster's certificate.
        assert info["dashboard"].startswith("https://127.0.0.1:")
        hostport = info["dashboard"].removeprefix("https://").rstrip("/")
        dtoken = shoal._core.dashboard_token(token)
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        host, port = hostport.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="shoal") as tls_sock:
                tls_sock.sendall(
                    f"GET /api/status?token={dtoken} HTTP/1.1\r\nHost: shoal\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                reply = b""
                while chunk := tls_sock.recv(65536):
                    reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b'"workers"' in body
        # Plain HTTP on that port gets no page.
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{hostport}/?token={dtoken}", timeout=10)
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


def counted(path: str, i: int):
    import numpy as np

    with open(path, "a") as fh:
        fh.write(f"{i}\n")
    return np.full(100_000, i)


def test_sigterm_on_a_worker_command_hands_its_data_over(tmp_path):
    log = str(tmp_path / "runs")
    with cluster(tmp_path, 2) as (sfile, procs):
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 2, 30, "two workers")
            xs = [c.submit(counted, log, i) for i in range(8)]
            shoal.wait(xs)
            assert all(w["held"] > 0 for w in c.scheduler_info()["workers"].values())
            procs[1].signal(signal.SIGTERM)  # the first `shoal worker` command
            wait_for(lambda: n_workers(c) == 1, 30, "the worker to retire")
            assert procs[1].p.wait(30) == 0
            assert [int(x.result()[0]) for x in xs] == list(range(8))
            with open(log) as fh:
                ran = sorted(int(v) for v in fh.read().split())
            assert ran == list(range(8)), "results were recomputed instead of handed over"


@pytest.mark.parametrize("token_file", ["given", "default"])
def test_reconnecting_workers_rejoin_a_restarted_scheduler(tmp_path, token_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    sfile, token = tmp_path / "s.json", tmp_path / "token"
    sched = [*SHOAL, "scheduler", "--port", port, "--scheduler-file", str(sfile)]
    if token_file == "given":
        sched += ["--token-file", str(token)]
    # "default": the token file beside the scheduler file, kept on restart.
    log = open(tmp_path / "reconnect.log", "ab")
    env = {"SHOAL_HEARTBEAT_TIMEOUT": "2"}
    procs = [Proc(sched, env=env, log=log)]
    try:
        wait_for(sfile.exists, 20, "the scheduler file")
        procs.append(
            Proc(
                [*SHOAL, "worker", "--scheduler-file", str(sfile), "--reconnect"], env=env, log=log
            )
        )
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 1, 30, "the worker")
        procs[0].signal(signal.SIGKILL)
        procs[0].p.wait()
        time.sleep(3)  # the worker is lost, the nanny keeps trying
        procs[0] = Proc(sched, env=env, log=log)  # same port, same token
        wait_for(lambda: json.loads(sfile.read_text())["pid"] == procs[0].p.pid, 20, "file")
        with shoal.Client(scheduler_file=sfile) as c:
            wait_for(lambda: n_workers(c) == 1, 60, "the worker to rejoin")
            assert c.submit(inc, 41).result(timeout=30) == 42
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


def test_a_client_that_cannot_reach_a_workers_data_port_gets_a_clear_error(tmp_path):
    # The worker joins over loopback, so its data server's address is a
    # loopback one; a client on another "host" (a network namespace) reaches
    # the scheduler but not that address: it must fail clearly, not retry
    # forever.
    why = _netns_available()
    if why is not None:
        pytest.skip(f"needs a second network namespace ({why})")
    sfile = tmp_path / "s.json"
    log = open(tmp_path / "reach.log", "ab")
    procs = [
        Proc(
            [
                *SHOAL,
                "scheduler",
                "--host",
                "0.0.0.0",
                "--port",
                "0",
                "--scheduler-file",
                str(sfile),
            ],
            log=log,
        )
    ]
    with hosts(1) as prefixes:
        try:
            wait_for(sfile.exists, 20, "the scheduler file")
            info = json.loads(sfile.read_text())
            port = info["address"].rsplit(":", 1)[1]
            procs.append(
                Proc(
                    [
                        *SHOAL,
                        "worker",
                        f"tcp://127.0.0.1:{port}",
                        "--token-file",
                        info["token_file"],
                    ],
                    log=log,
                )
            )
            token = Path(info["token_file"]).read_text().strip()
            script = (
                "import shoal, numpy as np, time, sys\n"
                f"c = shoal.Client('tcp://10.77.0.1:{port}', token={token!r})\n"
                "while not c.scheduler_info()['workers']: time.sleep(0.05)\n"
                "print('small', c.submit(sum, [1, 2]).result(), flush=True)\n"
                "t = time.time()\n"
                "try:\n"
                "    c.submit(np.arange, 1_000_000).result()\n"
                "except ConnectionError as e:\n"
                "    print('error after', round(time.time() - t, 1), e, flush=True)\n"
            )
            ns = prefixes[0][:-1]  # the namespace's command prefix
            out = subprocess.run(
                [*ns, sys.executable, "-c", script], capture_output=True, text=True, timeout=120
            )
        finally:
            for p in reversed(procs):
                p.stop()
            log.close()
    assert "small 3" in out.stdout, out.stderr
    assert "error after" in out.stdout, out.stdout + out.stderr
    assert "cannot reach it" in out.stdout and "127.0.0.1" in out.stdout
    seconds = float(out.stdout.split("error after")[1].split()[0])
    assert seconds < 30, f"gave up only after {seconds} s"
