"""A big job's cost to everyone else: `shoal scheduler`, one `shoal worker`,
and `shoal submit --array 1-N -- true` while a probe client runs a tiny
task every 10 ms. Prints the submission's time, the scheduler loop's worst
lag, the probe's worst and median latency and the scheduler's memory.

    python benches/bench_bigjob.py N        (e.g. 1000000, 5000000)
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import shoal

n = int(sys.argv[1])
d = tempfile.mkdtemp()
sfile = os.path.join(d, "s.json")
env = dict(os.environ)
sched = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "shoal",
        "scheduler",
        "--port",
        "0",
        "--scheduler-file",
        sfile,
        "--no-dashboard",
    ],
    env=env,
)
while not os.path.exists(sfile):
    time.sleep(0.05)
time.sleep(0.3)
worker = subprocess.Popen(
    [sys.executable, "-m", "shoal", "worker", "--scheduler-file", sfile, "--nthreads", "1"], env=env
)
c = shoal.Client(scheduler_file=sfile)
c.wait_for_workers(1, timeout=60)


def inc(x):
    return x + 1


c.submit(inc, 1).result()
lat = []
stop = threading.Event()


def probe():
    while not stop.is_set():
        t = time.perf_counter()
        c.submit(inc, 1).result(timeout=120)
        lat.append((time.perf_counter() - t, time.time()))
        time.sleep(0.01)


th = threading.Thread(target=probe)
th.start()
time.sleep(1)
t0 = time.time()
p = subprocess.run(
    [
        sys.executable,
        "-m",
        "shoal",
        "submit",
        "--scheduler-file",
        sfile,
        "--array",
        f"1-{n}",
        "--",
        "true",
    ],
    capture_output=True,
    text=True,
)
t1 = time.time()
print(
    "submit rc",
    p.returncode,
    f"took {t1 - t0:.2f}s",
    p.stdout.strip()[-200:],
    p.stderr.strip()[-300:],
)
# The largest of this process's children so far: the submitting client
# (the scheduler and worker are still running, so not counted yet).
print(f"client max RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
time.sleep(3)
stop.set()
th.join()
during = [d for d, t in lat if t >= t0 - 0.5]
st = json.loads(c._session.check().query("/api/status", 10.0))


def find(d, k):
    if isinstance(d, dict):
        for kk, v in d.items():
            if kk == k:
                return v
            r = find(v, k)
            if r is not None:
                return r


print(f"scheduler loop lag max {find(st, 'lag_max_us') / 1e6:.3f}s")
print(
    f"probe latency: max {max(during):.3f}s, median {sorted(during)[len(during) // 2]:.4f}s "
    f"over {len(during)} probes"
)
rss = int(open(f"/proc/{sched.pid}/statm").read().split()[1]) * 4096
print(f"scheduler RSS {rss / 2**20:.0f} MiB")
print("worker alive:", worker.poll() is None)
c.close()
worker.terminate()
sched.terminate()
worker.wait()
sched.wait()
