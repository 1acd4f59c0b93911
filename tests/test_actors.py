"""Ray-style actors: a dedicated process per actor, ordered calls, state,
handles passed to tasks, death and restarts."""

import contextlib
import os
import subprocess
import sys
import time

import pytest
from _helpers import alive, wait_for

import shoal


@shoal.remote
class Counter:
    def __init__(self, start=0):
        self.n = start

    def incr(self, by=1):
        self.n += by
        return self.n

    def pid(self):
        return os.getpid()

    def crash(self):
        os._exit(3)

    def boom(self):
        raise ValueError("boom")


@shoal.remote(max_restarts=1)
class Phoenix:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n

    def crash(self):
        os._exit(3)


def use_counter(counter, k):
    return shoal.get([counter.incr.remote() for _ in range(k)])[-1]


def test_calls_run_in_order_in_one_process_with_state(client):
    c = Counter.remote(10)
    refs = [c.incr.remote() for _ in range(50)]
    assert shoal.get(refs) == list(range(11, 61))
    pid = shoal.get(c.pid.remote())
    assert pid != os.getpid() and pid not in client.worker_pids
    # Futures as arguments, and errors that keep the actor alive.
    assert shoal.get(c.incr.remote(client.submit(lambda: 5))) == 65
    with pytest.raises(ValueError, match="boom"):
        shoal.get(c.boom.remote())
    assert shoal.get(c.incr.remote()) == 66
    # A handle passed to a task calls the same actor.
    assert client.submit(use_counter, c, 4).result(timeout=60) == 70
    with pytest.raises(TypeError, match="remote"):
        c.incr(1)
    with pytest.raises(AttributeError):
        c.nope.remote()


def test_actor_death_is_reported_and_restarts_rebuild_state(client):
    c = Counter.remote()
    assert shoal.get(c.incr.remote()) == 1
    crash = c.crash.remote()
    later = c.incr.remote()
    with pytest.raises(shoal.ActorDiedError, match="no restarts left"):
        shoal.get(crash, timeout=30)
    with pytest.raises(shoal.ActorDiedError):
        shoal.get(later, timeout=30)
    with pytest.raises(shoal.ActorDiedError):
        c.incr.remote()
    # A task that calls the dead actor fails instead of waiting forever.
    with pytest.raises(Exception, match="actor"):
        client.submit(use_counter, c, 1).result(timeout=30)

    p = Phoenix.remote()
    assert shoal.get(p.incr.remote()) == 1
    crash = p.crash.remote()
    after = p.incr.remote()
    # The call that killed it fails; the actor restarts once with fresh
    # state (the constructor runs again) and later calls go on.
    with pytest.raises(shoal.ActorDiedError, match="restarted"):
        shoal.get(crash, timeout=30)
    assert shoal.get(after, timeout=30) == 1
    assert shoal.get(p.incr.remote(), timeout=30) == 2


def test_constructor_errors_and_bad_options(client):
    @shoal.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("no")

        def f(self):
            return 1

    b = Broken.remote()
    with pytest.raises(RuntimeError, match="no"):
        shoal.get(b.f.remote(), timeout=60)
    with pytest.raises(TypeError, match="unknown actor options"):
        Counter.options(colour=1)
    with pytest.raises(ValueError, match="max_restarts"):
        Counter.options(max_restarts=-1)
    with pytest.raises(TypeError, match="remote"):
        Counter()
    shoal.kill(b)


@shoal.remote
def append_line(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def _lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def test_calls_whose_refs_are_dropped_still_run(client, tmp_path):
    # Defect 8: a dropped ref cancelled its call; Ray runs every call.
    c = Counter.remote()
    for _ in range(20):
        c.incr.remote()  # a statement: the ref is dropped at once
    assert shoal.get(c.incr.remote(0)) == 20
    path = str(tmp_path / "out")
    for i in range(5):
        append_line.remote(path, str(i))
    deadline = time.monotonic() + 30
    while len(_lines(path)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(_lines(path)) == [str(i) for i in range(5)]


def test_fire_and_forget_runs_released_work_and_then_drops_it(client, tmp_path):
    path = str(tmp_path / "out")
    slow = client.submit(time.sleep, 0.5)
    # Work downstream of a released input, detached: all of it runs.
    shoal.fire_and_forget([client.submit(lambda _, p: append_line._fn(p, "a"), slow, path)])
    shoal.fire_and_forget({"m": client.map(append_line._fn, [path] * 3, "bcd", batch_size=2)})
    del slow
    deadline = time.monotonic() + 30
    while len(_lines(path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(_lines(path)) == ["a", "b", "c", "d"]
    with pytest.raises(TypeError, match="futures"):
        shoal.fire_and_forget(42)


def test_a_handle_collected_while_the_watcher_holds_its_lock_does_not_deadlock():
    # Found by the suite: a garbage collection inside the actor watcher's
    # locked section ran a handle's finalizer, which took the same lock.
    import threading

    from shoal import actor

    done = threading.Event()

    def watcher_collects():
        with actor._watch_lock:
            actor._forget("not-an-actor", "/nonexistent")  # what the finalizer runs
        done.set()

    threading.Thread(target=watcher_collects, daemon=True).start()
    assert done.wait(5), "deadlocked"


@shoal.remote
class Pair:
    def __init__(self):
        self.n = 0

    @shoal.method(num_returns=2)
    def both(self, x):
        self.n += 1
        return x, self.n


@shoal.remote(num_returns=3)
def three(x):
    return x, x + 1, x + 2


@shoal.remote(num_returns=2)
def wrong_count():
    return 1, 2, 3


@shoal.remote
def slow(x):
    time.sleep(x)
    return x


def test_a_temporary_handle_keeps_its_actor_until_its_calls_are_done(client):
    # Found: the handle went at once and its actor with it; the call failed
    # with a misleading UnsatisfiableError.
    assert shoal.get(Counter.remote(5).incr.remote(), timeout=60) == 6
    ref = Counter.remote(1).incr.remote(2)
    assert shoal.get(ref, timeout=60) == 3


def test_num_returns_cancel_shutdown_and_is_initialized(client):
    assert shoal.is_initialized()
    a, b, c = three.remote(10)
    assert shoal.get([a, b, c]) == [10, 11, 12]
    assert shoal.get(three.options(num_returns=1).remote(1)) == (1, 2, 3)
    assert three.options(num_returns=0).remote(1) is None
    x, y = wrong_count.remote()
    with pytest.raises(ValueError, match="num_returns=2 but returned 3 values"):
        shoal.get(x)
    p = Pair.remote()
    assert shoal.get(p.both.remote("a")) == ["a", 1]
    ref = slow.remote(1)
    queued = [slow.remote(1) for _ in range(8)]
    shoal.cancel(queued[-1])
    with pytest.raises(shoal.FutureCancelledError):
        shoal.get(queued[-1], timeout=30)
    shoal.cancel(ref)
    for q in queued:
        shoal.cancel(q)
    with pytest.raises(ValueError, match="num_returns"):
        three.options(num_returns=-1)


@shoal.remote
def blob(i):
    return bytes([i]) * 200_000  # held on a worker, not inline


@shoal.remote
def make_refs(n):
    # Ray's nested tasks: return refs made here; this task's client (the
    # worker's) drops them as soon as the result is pickled.
    return [blob.remote(i) for i in range(n)]


@shoal.remote
def make_ref_of_refs():
    return make_refs.remote(2)


@shoal.remote
def total(refs):
    return sum(len(b) for b in shoal.get(refs))


def test_a_task_returns_refs_it_made():
    with shoal.Client(n_workers=2) as c:
        outer = make_refs.remote(3)
        refs = shoal.get(outer, timeout=60)
        time.sleep(0.5)  # the worker's client has let its futures go by now
        assert [b[:1] for b in shoal.get(refs, timeout=60)] == [b"\0", b"\1", b"\2"]
        # The list of refs as a task argument: claimed there.
        assert shoal.get(total.remote(outer), timeout=60) == 600_000
        # Refs inside refs.
        inner = shoal.get(shoal.get(make_ref_of_refs.remote(), timeout=60), timeout=60)
        assert [len(b) for b in shoal.get(inner, timeout=60)] == [200_000] * 2
        # The driver drops its refs first: the outer result still holds them.
        del refs, inner
        time.sleep(0.3)
        refs = shoal.get(outer, timeout=60)
        assert len(shoal.get(refs[2], timeout=60)) == 200_000
        # Everything dropped: nothing stays on the cluster.
        del outer, refs
        deadline = time.time() + 20
        while c.scheduler_info()["tasks"] and time.time() < deadline:
            time.sleep(0.1)
        assert c.scheduler_info()["tasks"] == 0, "held refs outlived their holders"


SHUTDOWN = """
import shoal

@shoal.remote
def double(x):
    return 2 * x

assert not shoal.is_initialized()
assert shoal.get(double.remote(21)) == 42  # starts a cluster, as ray.init()
assert shoal.is_initialized()
shoal.shutdown()
assert not shoal.is_initialized()
shoal.init(n_workers=1)
assert shoal.get(double.remote(1)) == 2
shoal.shutdown()
assert not shoal.is_initialized()
print("ok")
"""


def test_shutdown_closes_what_ray_style_calls_started():
    out = subprocess.run(
        [sys.executable, "-c", SHUTDOWN], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "ok", out.stderr


NAMED_ELSEWHERE = """
import sys
import shoal

c = shoal.Client(scheduler_file=sys.argv[1])
counter = shoal.get_actor("the-counter")
print(shoal.get(counter.incr.remote(10)))
try:
    shoal.get_actor("nobody")
except ValueError as e:
    print("ValueError:", e)
"""


@contextlib.contextmanager
def standalone(tmp_path):
    """A `shoal scheduler` and a `shoal worker`; yields the scheduler file."""
    sfile = tmp_path / "s.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    sched = subprocess.Popen(
        [sys.executable, "-m", "shoal", "scheduler", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(sfile)],
        **quiet,
    )
    try:
        wait_for(sfile.exists, 30, "the scheduler file")
        workers = subprocess.Popen(
            [sys.executable, "-m", "shoal", "worker", "--scheduler-file", str(sfile)], **quiet
        )
        try:
            yield str(sfile)
        finally:
            workers.terminate()
            workers.wait(30)
    finally:
        sched.terminate()
        sched.wait(30)


def run_elsewhere(code: str, sfile: str) -> list[str]:
    """Runs ``code`` in another Python process (argv[1]: the scheduler
    file); its output lines."""
    out = subprocess.run(
        [sys.executable, "-c", code, sfile],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def name_is_gone(name: str) -> bool:
    try:
        shoal.get_actor(name)
    except ValueError:
        return True
    return False


def test_named_actors_are_found_from_other_clients(tmp_path):
    with standalone(tmp_path) as sfile, shoal.Client(scheduler_file=sfile):
        counter = Counter.options(name="the-counter").remote(1)
        assert shoal.get(counter.incr.remote()) == 2
        with pytest.raises(ValueError, match="already exists"):
            Counter.options(name="the-counter").remote(5)
        assert run_elsewhere(NAMED_ELSEWHERE, sfile)[:2] == [
            "12",
            "ValueError: no actor named 'nobody' in this cluster",
        ]
        assert shoal.get_actor("the-counter")._actor_id == counter._actor_id
        shoal.kill(counter)
        wait_for(lambda: name_is_gone("the-counter"), 15, "a killed actor's name to go")


DETACHED_CREATOR = """
import sys
import shoal
from test_actors import Counter

c = shoal.Client(scheduler_file=sys.argv[1])
keeper = Counter.options(name="keeper", lifetime="detached", max_restarts=1).remote(100)
print(shoal.get(keeper.incr.remote()))
print(shoal.get(keeper.pid.remote()))
"""


def test_a_detached_actor_outlives_its_creator_until_killed(tmp_path):
    with pytest.raises(ValueError, match="must be named"):
        Counter.options(lifetime="detached")
    with pytest.raises(ValueError, match="lifetime"):
        Counter.options(name="x", lifetime="forever")
    with standalone(tmp_path) as sfile, shoal.Client(scheduler_file=sfile):
        # Its creator's process is gone when this goes on.
        first, pid = run_elsewhere(DETACHED_CREATOR, sfile)[:2]
        assert first == "101"
        keeper = shoal.get_actor("keeper")
        assert shoal.get(keeper.incr.remote(), timeout=60) == 102  # its state lives on
        with pytest.raises(ValueError, match="already exists"):
            Counter.options(name="keeper", lifetime="detached").remote()
        # Restarted by its own supervisor (max_restarts=1): state rebuilt.
        crash = keeper.crash.remote()
        with pytest.raises(shoal.ActorDiedError, match="not run again"):
            shoal.get(crash, timeout=60)
        # The error comes when its socket closes; os._exit closes files before
        # the process turns zombie, so on a busy machine it lingers a moment.
        wait_for(lambda: not alive(int(pid)), 30, "the crashed actor's process to exit")
        assert shoal.get(keeper.incr.remote(), timeout=60) == 101
        new_pid = shoal.get(keeper.pid.remote(), timeout=60)
        # Killed from a client that did not make it: not restarted, name gone.
        shoal.kill(keeper)
        wait_for(lambda: name_is_gone("keeper"), 30, "a killed detached actor's name to go")
        wait_for(lambda: not alive(new_pid), 30, "the killed actor's process to exit")
        # The name is free again.
        again = Counter.options(name="keeper").remote(7)
        assert shoal.get(again.incr.remote(), timeout=60) == 8
