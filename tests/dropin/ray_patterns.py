"""Ray's documented core patterns, written with ``shoal`` in place of ``ray``.

    python tests/dropin/ray_patterns.py

Each pattern below is what Ray's core guide shows for one feature (tasks,
object refs, nested tasks, tasks returning refs, actors, actor handles,
``wait``, ``num_returns``, cancellation, named and detached actors, errors,
resources), in the form a user would write it; the only change is the
import. Prints one line per pattern; exits non-zero if any fails. Where
Shoal's names differ from Ray's (its exceptions), the mapping is in
``RAY_NAMES`` and the pattern uses Shoal's.
"""

from __future__ import annotations

import sys
import time
import traceback

import shoal as ray  # the only change a Ray user makes

# Ray's exception -> what Shoal raises there.
RAY_NAMES = {
    "ray.exceptions.GetTimeoutError": "TimeoutError",
    "ray.exceptions.TaskCancelledError": "shoal.FutureCancelledError",
    "ray.exceptions.RayActorError": "shoal.ActorDiedError",
    "ray.exceptions.RayTaskError(ValueError)": "ValueError, the task's own type",
}
# Where Shoal's model differs: Ray's `num_cpus=N` is a logical count on a
# node; Shoal's is N threads of one worker process, so a task asking for
# more threads than any worker has fails as unsatisfiable, saying how to
# start bigger workers (`shoal.init(threads_per_worker=N)`).

PATTERNS = []


def pattern(fn):
    PATTERNS.append(fn)
    return fn


@ray.remote
def square(x):
    return x * x


@ray.remote
def slow(x, seconds=0.3):
    time.sleep(seconds)
    return x


@pattern
def tasks_run_in_parallel():
    refs = [square.remote(i) for i in range(8)]
    assert ray.get(refs) == [i * i for i in range(8)]
    t0 = time.monotonic()
    ray.get([slow.remote(i, 0.5) for i in range(2)])
    assert time.monotonic() - t0 < 0.95, "two tasks ran one after the other"


@pattern
def object_refs_put_and_get():
    import numpy as np

    data = np.arange(1_000_000)
    ref = ray.put(data)  # stored once, passed to many tasks by reference
    assert ray.get(ref).sum() == data.sum()

    @ray.remote
    def total(a):
        return int(a.sum())

    assert ray.get([total.remote(ref) for _ in range(3)]) == [int(data.sum())] * 3
    # Refs passed as arguments are resolved before the task runs.
    assert ray.get(square.remote(square.remote(3))) == 81


@pattern
def get_with_timeout():
    ref = slow.remote(1, 2.0)
    try:
        ray.get(ref, timeout=0.2)
    except TimeoutError:  # Ray: GetTimeoutError, a TimeoutError
        pass
    else:
        raise AssertionError("no timeout")
    assert ray.get(ref) == 1


@ray.remote
def fan_out(n):
    # A task that launches tasks and waits for them.
    return sum(ray.get([square.remote(i) for i in range(n)]))


@pattern
def nested_tasks():
    assert ray.get(fan_out.remote(10)) == sum(i * i for i in range(10))
    # More nested waiting tasks than workers: no deadlock.
    assert ray.get([fan_out.remote(3) for _ in range(6)]) == [5] * 6


@ray.remote
def make_refs(n):
    return [square.remote(i) for i in range(n)]


@pattern
def tasks_returning_refs():
    inner = ray.get(make_refs.remote(4))  # a list of refs made inside the task
    assert ray.get(inner) == [0, 1, 4, 9]


@pattern
def wait_for_the_first_results():
    refs = [slow.remote(i, 0.6 - 0.3 * i) for i in range(2)]
    ready, not_ready = ray.wait(refs, num_returns=1)
    assert len(ready) == 1 and len(not_ready) == 1
    assert ray.get(ready[0]) == 1  # the fastest
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=10)
    assert len(ready) == 2 and not not_ready


@pattern
def process_results_as_they_finish():
    pending = [slow.remote(i, 0.05 * (i % 3)) for i in range(9)]
    seen = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        seen.append(ray.get(done[0]))
    assert sorted(seen) == list(range(9))


@pattern
def limit_pending_tasks():
    max_in_flight = 3
    in_flight, results = [], []
    for i in range(12):
        if len(in_flight) >= max_in_flight:
            done, in_flight = ray.wait(in_flight, num_returns=1)
            results += ray.get(done)
        in_flight.append(square.remote(i))
    results += ray.get(in_flight)
    assert sorted(results) == sorted(i * i for i in range(12))


@ray.remote(num_returns=3)
def three(x):
    return x, x + 1, x + 2


@pattern
def multiple_returns():
    a, b, c = three.remote(1)
    assert ray.get([a, b, c]) == [1, 2, 3]
    whole = three.options(num_returns=1).remote(0)  # one ref to the tuple
    assert ray.get(whole) == (0, 1, 2)


@pattern
def tree_reduction():
    @ray.remote
    def add(x, y):
        return x + y

    refs = [ray.put(i) for i in range(16)]
    while len(refs) > 1:
        refs = [add.remote(refs[i], refs[i + 1]) for i in range(0, len(refs), 2)]
    assert ray.get(refs[0]) == sum(range(16))


@pattern
def cancel_a_task():
    blockers = [slow.remote(i, 1.0) for i in range(4)]
    ref = slow.remote("never", 0.1)
    ray.cancel(ref)
    try:
        ray.get(ref, timeout=30)
    except ray.FutureCancelledError:  # Ray: TaskCancelledError
        pass
    else:
        raise AssertionError("a cancelled task returned")
    ray.get(blockers)


@pattern
def errors_are_raised_with_their_type():
    @ray.remote
    def fails():
        raise ValueError("bad input")

    try:
        ray.get(fails.remote())
    except ValueError as e:  # Ray: RayTaskError(ValueError), a ValueError
        assert "bad input" in str(e)
    else:
        raise AssertionError("no error")


@pattern
def resources_per_task():
    @ray.remote(num_cpus=2)
    def two_threads():
        return "ok"

    assert ray.get(two_threads.remote()) == "ok"
    assert ray.get(square.options(num_cpus=1).remote(4)) == 16


@ray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def get(self):
        return self.value

    @ray.method(num_returns=2)
    def pair(self):
        return self.value, -self.value


@pattern
def actors_keep_state():
    counter = Counter.remote()
    refs = [counter.increment.remote() for _ in range(5)]
    assert ray.get(refs) == [1, 2, 3, 4, 5]  # in call order
    a, b = counter.pair.remote()
    assert ray.get([a, b]) == [5, -5]
    # A temporary handle: its calls still run.
    assert ray.get(Counter.remote(10).increment.remote()) == 11


@ray.remote
def use_counter(counter, n):
    for _ in range(n):
        counter.increment.remote()
    return ray.get(counter.get.remote())


@pattern
def actor_handles_passed_to_tasks():
    counter = Counter.remote()
    ray.get([use_counter.remote(counter, 10) for _ in range(3)])
    # A task's calls run before the task's own `get`, and all 30 ran.
    assert ray.get(counter.get.remote()) == 30


@pattern
def named_and_detached_actors():
    Counter.options(name="registry").remote(100)
    assert ray.get(ray.get_actor("registry").increment.remote()) == 101
    keeper = Counter.options(name="keeper", lifetime="detached").remote(1)
    assert ray.get(keeper.get.remote()) == 1
    ray.kill(keeper)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor("keeper")
        except ValueError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a killed actor stayed reachable")


@pattern
def killing_an_actor():
    counter = Counter.remote()
    ray.get(counter.increment.remote())
    ray.kill(counter)
    try:
        ray.get(counter.increment.remote(), timeout=30)
    except ray.ActorDiedError:  # Ray: RayActorError
        pass
    else:
        raise AssertionError("a killed actor answered")


def main() -> int:
    # Ray's `num_cpus=2` is a task that runs parallel code of its own: in
    # Shoal it needs a worker with two threads.
    ray.init(n_workers=2, threads_per_worker=2)
    failed = 0
    for p in PATTERNS:
        t0 = time.monotonic()
        try:
            p()
            print(f"ok    {p.__name__} ({time.monotonic() - t0:.2f} s)", flush=True)
        except Exception:  # noqa: BLE001 - reported, and counted
            failed += 1
            print(f"FAIL  {p.__name__}\n{traceback.format_exc()}", flush=True)
    ray.shutdown()
    print(f"{len(PATTERNS) - failed} of {len(PATTERNS)} of Ray's core patterns ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
