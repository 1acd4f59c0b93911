"""Moving data between hosts: Shoal beside Dask distributed and a plain socket.

    python benches/bench_hosts.py            # needs root (network namespaces)
    python benches/bench_hosts.py -r 5 --only shoal shoal-tls

Three "hosts" are network namespaces on a bridge, joined by veth pairs:
the scheduler in one, a worker process in each of the two others (each
told it is on a host of its own, so that no shared memory is used between
them); the client is in the root namespace. Workloads:

  large   a task on host A makes a 512 MiB float64 array; a task on host B
          sums it: GiB/s of that transfer (from the consumer's submission,
          once the array is made, to its result).
  small   2,000 tasks on host A each make a 256 KiB array; one task on
          host B takes all of them: GiB/s, and transfers per second.
  shuffle all to all: 16 pieces of 2 MiB from each of 16 producers, the
          producers alternating between hosts A and B, and 16 consumers,
          alternating too, each taking its piece of every producer (half
          of it from the other host): GiB/s of what crosses between hosts.

With each runner: the worker hosts' peak memory over its whole run (the
resident high-water marks of every process on hosts A and B, summed, less
what they held before, once each worker had run a small NumPy task; the
kernel's mark is reset at the start), and each phase's peak on its own.

The limit: a plain TCP socket (and a TLS one, with the same certificates)
sending 2 GiB from host A to host B, in 4 MiB writes. Figures are medians.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
from bench_scale import rss  # this directory: benches share their helpers

NS = ["shoal-bh0", "shoal-bh1", "shoal-bh2"]
BRIDGE = "shoalbhbr"
NET = "10.79.0"
LARGE = 512 * 2**20
SMALL, N_SMALL = 256 * 2**10, 2000


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _clean() -> None:
    for i, ns in enumerate(NS):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"bhv{i}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@contextmanager
def hosts():
    """The namespaces; yields each one's command prefix and address."""
    if os.geteuid() != 0:
        sys.exit("bench_hosts needs root: it makes network namespaces")
    _clean()
    try:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        out = []
        for i, ns in enumerate(NS):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", f"bhv{i}", "type", "veth", "peer", "name", f"bhp{i}")
            _sh("ip", "link", "set", f"bhp{i}", "netns", ns)
            _sh("ip", "link", "set", f"bhv{i}", "master", BRIDGE)
            _sh("ip", "link", "set", f"bhv{i}", "up")
            ex = ["ip", "netns", "exec", ns]
            _sh(*ex, "ip", "addr", "add", f"{NET}.{10 + i}/24", "dev", f"bhp{i}")
            _sh(*ex, "ip", "link", "set", f"bhp{i}", "up")
            _sh(*ex, "ip", "link", "set", "lo", "up")
            out.append((ex, f"{NET}.{10 + i}"))
        yield out
    finally:
        _clean()


# ------------------------------------------------------------- the limit

RECEIVER = """
import socket, ssl, sys, time
port, n, ca, cert, key = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
s = socket.create_server(("0.0.0.0", port))
print("ready", flush=True)
c, _ = s.accept()
if cert != "-":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    c = ctx.wrap_socket(c, server_side=True)
buf = bytearray(4 << 20)
got = 0
while got < n:
    k = c.recv_into(buf)
    if not k:
        break
    got += k
c.sendall(b"k")
print(got, flush=True)
"""


def socket_limit(hosts, n: int, certs: str | None) -> float:
    """GiB/s of one TCP (or TLS) stream from host A to host B."""
    (ex_b, addr_b) = hosts[2]
    (ex_a, _) = hosts[1]
    files = [f"{certs}/ca.pem", f"{certs}/cert.pem", f"{certs}/key.pem"] if certs else ["-"] * 3
    recv = subprocess.Popen(
        [*ex_b, sys.executable, "-c", RECEIVER, "7711", str(n), *files],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == "ready"
    sender = f"""
import socket, ssl, sys, time
s = socket.create_connection(("{addr_b}", 7711))
if {bool(certs)!r}:
    ctx = ssl.create_default_context(cafile="{files[0]}")
    ctx.check_hostname = False
    s = ctx.wrap_socket(s)
buf = memoryview(bytearray(4 << 20))
t = time.perf_counter()
left = {n}
while left > 0:
    k = min(left, len(buf))
    s.sendall(buf[:k])
    left -= k
s.recv(1)
print(time.perf_counter() - t)
"""
    out = subprocess.run(
        [*ex_a, sys.executable, "-c", sender], capture_output=True, text=True, check=True
    )
    recv.wait(30)
    return n / 2**30 / float(out.stdout)


# ------------------------------------------------------------- workloads


def make(n_bytes):
    return np.full(n_bytes // 8, 1.0)


def piece(n_bytes, i, j):
    return np.full(n_bytes // 8, float(i * 100 + j))


def take_pieces(pieces):
    return float(sum(p[0] for p in pieces))


N_SHUFFLE, SHUFFLE_PIECE = 16, 2 * 2**20


def total(a):
    return float(a.sum())


def total_all(arrays):
    return float(sum(a.sum() for a in arrays))


class Runner:
    """A scheduler on host 0 and one worker on each of hosts A and B (that
    offers resource hA or hB); the workloads, timed from the consumer's
    submission once its inputs are made."""

    name = ""

    def start(self, scheduler: list[str], sfile: str, workers: list[list[str]]) -> None:
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.procs = [subprocess.Popen(scheduler, **quiet)]
        while not os.path.exists(sfile):
            time.sleep(0.05)
        self.procs += [subprocess.Popen(w, **quiet) for w in workers]

    def wait(self, futures) -> None:
        raise NotImplementedError

    def close(self):
        self.c.close()
        for p in reversed(self.procs):
            p.terminate()
            p.wait(30)

    def _timed(self, inputs, fn):
        self.wait(inputs if isinstance(inputs, list) else [inputs])
        t = time.perf_counter()
        v = self.c.submit(fn, inputs, resources={"hB": 1}, pure=False).result()
        return time.perf_counter() - t, v

    def warm(self) -> None:
        """A small task on each host first: what a worker holds once it
        has run NumPy is what it held before, not the workloads' memory."""
        xs = [self.c.submit(make, 1 << 16, resources={h: 1}, pure=False) for h in ("hA", "hB")]
        self.wait(xs)
        self._timed(xs, total_all)

    def large(self):
        return self._timed(self.c.submit(make, LARGE, resources={"hA": 1}, pure=False), total)

    def small(self):
        xs = [self.c.submit(make, SMALL, resources={"hA": 1}, pure=False) for _ in range(N_SMALL)]
        return self._timed(xs, total_all)

    def shuffle(self):
        """Seconds of the all-to-all exchange, and whether it was right."""
        host = ["hA", "hB"]
        pieces = [
            [
                self.c.submit(piece, SHUFFLE_PIECE, i, j, resources={host[i % 2]: 1}, pure=False)
                for j in range(N_SHUFFLE)
            ]
            for i in range(N_SHUFFLE)
        ]
        self.wait([p for row in pieces for p in row])
        t = time.perf_counter()
        outs = [
            self.c.submit(
                take_pieces,
                [pieces[i][j] for i in range(N_SHUFFLE)],
                resources={host[j % 2]: 1},
                pure=False,
            )
            for j in range(N_SHUFFLE)
        ]
        got = [o.result() for o in outs]
        dt = time.perf_counter() - t
        want = [float(sum(i * 100 + j for i in range(N_SHUFFLE))) for j in range(N_SHUFFLE)]
        return dt, got == want


class Shoal(Runner):
    name = "shoal"
    tls = False

    def __init__(self, hosts, tmp: str):
        import shoal

        sfile = os.path.join(tmp, f"{self.name}.json")
        ex0, addr0 = hosts[0]
        tls = [x for k in ("ca", "cert", "key") for x in (f"--tls-{k}", f"{tmp}/{k}.pem")]
        cmd = [sys.executable, "-m", "shoal"]
        self.start(
            [*ex0, *cmd, "scheduler", "--host", addr0, "--port", "0", "--no-dashboard"]
            + ["--scheduler-file", sfile, *(tls if self.tls else [])],
            sfile,
            [
                [*hosts[i][0], "env", f"SHOAL_HOST_KEY=bench-host-{i}", *cmd, "worker"]
                + ["--scheduler-file", sfile, "--resources", res]
                for i, res in ((1, "hA=1"), (2, "hB=1"))
            ],
        )
        self.c = shoal.Client(scheduler_file=sfile, set_as_default=False)
        self.c.wait_for_workers(2, timeout=60)

    def wait(self, futures) -> None:
        import shoal

        shoal.wait(futures)


class ShoalTLS(Shoal):
    name = "shoal-tls"
    tls = True


class Dask(Runner):
    name = "dask.distributed"

    def __init__(self, hosts, tmp: str):
        from distributed import Client

        sfile = os.path.join(tmp, "dask.json")
        ex0, addr0 = hosts[0]
        self.start(
            [*ex0, sys.executable, "-m", "distributed.cli.dask_scheduler"]
            + ["--host", addr0, "--scheduler-file", sfile, "--dashboard-address", ":0"],
            sfile,
            [
                [*hosts[i][0], sys.executable, "-m", "distributed.cli.dask_worker"]
                + ["--scheduler-file", sfile, "--nworkers", "1", "--nthreads", "1"]
                + ["--resources", res, "--host", hosts[i][1], "--no-dashboard"]
                for i, res in ((1, "hA=1"), (2, "hB=1"))
            ],
        )
        self.c = Client(scheduler_file=sfile)  # distributed.wait needs a default client
        self.c.wait_for_workers(2, timeout=60)

    def wait(self, futures) -> None:
        from distributed import wait

        wait(futures)


def host_pids(hosts) -> list[int]:
    """Processes on the worker hosts (A and B)."""
    out = []
    for ns in NS[1:]:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        out += [int(p) for p in pids.stdout.split()]
    return out


def reset_peaks(pids: list[int]) -> None:
    for p in pids:
        with open(f"/proc/{p}/clear_refs", "w") as fh:
            fh.write("5")  # resets the resident high-water mark


def take_peaks(hosts, highest: dict[int, int]) -> int:
    """The worker hosts' summed peak since the last call (resetting it);
    ``highest`` keeps each process's peak over all calls."""
    pids = host_pids(hosts)
    peaks = {p: rss(p, "VmHWM") for p in pids}
    for p, v in peaks.items():
        highest[p] = max(highest.get(p, 0), v)
    reset_peaks(pids)
    return sum(peaks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="runner names (shoal, shoal-tls, dask.distributed)")
    ns = ap.parse_args()
    gib = 2**30
    with hosts() as hs, tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "shoal", "certs", tmp], check=True, capture_output=True
        )
        for certs, what in ((None, "TCP"), (tmp, "TLS")):
            rates = [socket_limit(hs, 2 * gib, certs) for _ in range(ns.repeats)]
            print(f"  plain socket ({what}): {statistics.median(rates):.2f} GiB/s", flush=True)
        runners = [Shoal, ShoalTLS]
        try:
            import distributed  # noqa: F401

            runners.append(Dask)
        except ImportError:
            print("(distributed not installed: skipped)")
        for cls in runners:
            if ns.only and cls.name not in ns.only:
                continue
            r = cls(hs, tmp)
            try:
                r.warm()
                pids = host_pids(hs)
                base = sum(rss(p) for p in pids)
                reset_peaks(pids)
                # Each process's peak over the whole run; and each phase's
                # peak (summed over processes) on its own.
                highest: dict[int, int] = {}
                phases = []
                large = [r.large() for _ in range(ns.repeats)]
                phases.append(take_peaks(hs, highest) - base)
                small = [r.small() for _ in range(ns.repeats)]
                phases.append(take_peaks(hs, highest) - base)
                shuffle = [r.shuffle() for _ in range(ns.repeats)]
                phases.append(take_peaks(hs, highest) - base)
                peak = sum(highest.values()) - base
            finally:
                r.close()
            assert all(v == LARGE // 8 for _, v in large), "wrong large result"
            assert all(v == N_SMALL * SMALL // 8 for _, v in small), "wrong small result"
            assert all(ok for _, ok in shuffle), "wrong shuffle result"
            tl = statistics.median(t for t, _ in large)
            ts = statistics.median(t for t, _ in small)
            tx = statistics.median(t for t, _ in shuffle)
            crossing = N_SHUFFLE * N_SHUFFLE * SHUFFLE_PIECE / 2
            print(
                f"  {cls.name:18s} large {LARGE / gib / tl:6.2f} GiB/s   small "
                f"{N_SMALL * SMALL / gib / ts:6.2f} GiB/s ({N_SMALL / ts:7.0f} transfers/s)   "
                f"shuffle {crossing / gib / tx:6.2f} GiB/s   peak {peak / 2**20:6.0f} MiB "
                f"(phases: {' '.join(f'{x / 2**20:.0f}' for x in phases)})",
                flush=True,
            )
    print(f"medians of {ns.repeats} repeats")


if __name__ == "__main__":
    main()
