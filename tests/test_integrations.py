"""joblib, concurrent.futures and the Ray-style API on a real cluster."""

import ast
import concurrent.futures as cf
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _helpers import wait_for

import shoal


def inc(x):
    return x + 1


def slow_inc(x, delay=0.2):
    time.sleep(delay)
    return x + 1


def fail(x):
    raise ValueError(f"bad {x}")


# ----------------------------------------------------------------- joblib


def test_joblib_backend_is_registered_and_runs_on_workers(client):
    joblib = pytest.importorskip("joblib")
    from joblib.parallel import BACKENDS

    assert "shoal" in BACKENDS
    with joblib.parallel_config(backend="shoal"):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(inc)(i) for i in range(1000))
        pids = set(joblib.Parallel(n_jobs=2)(joblib.delayed(os.getpid)() for _ in range(50)))
    assert out == list(range(1, 1001))
    assert pids <= set(client.worker_pids) and os.getpid() not in pids


def test_joblib_errors_and_generators(client):
    joblib = pytest.importorskip("joblib")
    with joblib.parallel_config(backend="shoal"):
        with pytest.raises(ValueError, match="bad [345]"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(fail)(i) for i in range(3, 6))
        gen = joblib.Parallel(n_jobs=2, return_as="generator_unordered")(
            joblib.delayed(slow_inc)(i, 0.3 if i == 0 else 0.0) for i in range(4)
        )
        got = list(gen)
    assert sorted(got) == [1, 2, 3, 4]


def test_sklearn_style_nested_calls_run_sequentially_on_workers(client):
    joblib = pytest.importorskip("joblib")

    def outer(i):
        return sum(joblib.Parallel(n_jobs=2)(joblib.delayed(inc)(j) for j in range(i)))

    with joblib.parallel_config(backend="shoal"):
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(outer)(i) for i in range(5)) == [
            0,
            1,
            3,
            6,
            10,
        ]


# ------------------------------------------------------- concurrent.futures


def test_executor_is_a_concurrent_futures_executor(client):
    with shoal.Executor(client) as ex:
        assert isinstance(ex, cf.Executor)
        fs = [ex.submit(inc, i) for i in range(20)]
        assert all(isinstance(f, cf.Future) for f in fs)
        done, _ = cf.wait(fs)
        assert len(done) == 20
        assert sorted(f.result() for f in cf.as_completed(fs)) == list(range(1, 21))
        assert list(ex.map(inc, range(10), chunksize=3)) == list(range(1, 11))
        bad = ex.submit(fail, 1)
        assert isinstance(bad.exception(), ValueError)
        with pytest.raises(TimeoutError):
            list(ex.map(slow_inc, [1, 2], [2.0, 2.0], timeout=0.2))
    assert not client._session.closed  # a given client stays open
    with pytest.raises(RuntimeError):
        ex.submit(inc, 1)


def started_then_inc(flag: str, x: int, delay: float) -> int:
    """slow_inc that says it has started (a file) before it sleeps."""
    open(flag, "w").close()
    time.sleep(delay)
    return x + 1


def test_executor_cancel_and_shutdown_cancel_futures(tmp_path):
    ex = shoal.Executor(n_workers=1)
    client = ex.client
    block = ex.submit(slow_inc, 0, 1.0)
    flags = [str(tmp_path / f"started-{i}") for i in range(3)]
    queued = [ex.submit(started_then_inc, flags[i], i, 1.0) for i in range(3)]
    assert queued[0].cancel() and queued[0].cancelled()
    with pytest.raises(cf.CancelledError):
        queued[0].result()
    assert block.result() == 1
    # queued[1] starts once block ends (waited for: the client may hear
    # of block's end before the scheduler hears that queued[1] started, and
    # a call not yet started is cancelled, as in CPython); started, it runs
    # on, and the calls not started are cancelled.
    wait_for(lambda: os.path.exists(flags[1]), 30, "queued[1] to start")
    queued.append(ex.submit(slow_inc, 5, 1.0))
    ex.shutdown(wait=True, cancel_futures=True)
    assert queued[1].result() == 2
    assert [f.cancelled() for f in queued] == [True, False, True, True]
    assert client._session.closed  # an executor's own client closes at shutdown


def capture(*args, **kwargs):
    return args, kwargs


def test_executor_submit_passes_every_keyword_to_the_function(client):
    with shoal.Executor(client) as ex:
        kw = dict(fn=1, key=2, pure=3, priority=4, retries=5, resources=6, self=7)
        assert ex.submit(capture, 0, **kw).result() == ((0,), kw)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        shoal.Executor(max_workers=0)


def test_an_executor_submit_that_raises_leaves_nothing_pending(client):
    ex = shoal.Executor(client)
    with pytest.raises(TypeError, match="pickle"):
        ex.submit(inc, threading.Lock())
    t0 = time.monotonic()
    ex.shutdown(wait=True)  # hung for ever: the failed call stayed pending
    assert time.monotonic() - t0 < 5


def set_global(x):
    global INITIALIZED
    INITIALIZED = x


def get_global():
    return globals().get("INITIALIZED")


def fail_init():
    raise ValueError("no init for you")


def test_executor_initializer_runs_once_per_worker_process_and_a_failing_one_breaks_it():
    with shoal.Executor(max_workers=2, initializer=set_global, initargs=("ready",)) as ex:
        assert set(ex.map(lambda _: get_global(), range(20))) == {"ready"}
        assert {ex.submit(get_global).result() for _ in range(10)} == {"ready"}
    with shoal.Executor(max_workers=1, initializer=fail_init) as ex:
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(get_global).result(timeout=30)
        assert ex._broken
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(get_global)


PENDING_AT_EXIT = textwrap.dedent(
    """
    import time
    import shoal

    def say(msg):
        time.sleep(0.5)
        print(msg, flush=True)

    if __name__ == "__main__":
        a = shoal.Executor(max_workers=1)
        a.submit(say, "left running")
        b = shoal.Executor(max_workers=1)
        b.submit(say, "after shutdown(wait=False)")
        b.shutdown(wait=False)
    """
)


def test_executor_calls_pending_at_exit_or_after_shutdown_without_wait_run(tmp_path):
    # CPython runs them; they were dropped.
    script = tmp_path / "pending.py"
    script.write_text(PENDING_AT_EXIT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:2]) == ["after shutdown(wait=False)", "left running"]


def test_dask_accepts_the_executor_as_scheduler(client):
    dask = pytest.importorskip("dask")
    with shoal.Executor(client) as ex:
        assert dask.delayed(inc)(dask.delayed(inc)(1)).compute(scheduler=ex) == 3


# ------------------------------------------------------------ Ray-style API


@shoal.remote
def square(x):
    return x * x


@shoal.remote(retries=1)
def total(*xs):
    return sum(xs)


def test_remote_functions_get_and_wait(client):
    assert shoal.get_client() is client
    refs = [square.remote(i) for i in range(10)]
    assert shoal.get(refs) == [i * i for i in range(10)]
    assert shoal.get(total.remote(*refs)) == sum(i * i for i in range(10))
    with pytest.raises(TypeError, match="remote"):
        square(3)
    slow = shoal.remote(slow_inc)
    refs = [slow.remote(0, 1.5), square.remote(2)]
    ready, not_ready = shoal.wait(refs, num_returns=1, timeout=10)
    assert ready == [refs[1]] and not_ready == [refs[0]]
    ready, not_ready = shoal.wait(refs, num_returns=2, timeout=0.05)
    assert len(ready) == 1
    with pytest.raises(TimeoutError):
        shoal.get(slow.remote(0, 2.0), timeout=0.1)
    with pytest.raises(ValueError):
        shoal.wait(refs, num_returns=3)


def test_remote_options_and_what_is_not_there(client):
    assert shoal.get(square.options(priority=5).remote(4)) == 16
    with pytest.raises(TypeError, match="unknown remote options"):
        square.options(colour="red")
    with pytest.raises(ValueError, match="num_cpus"):
        square.options(num_cpus=0)


# --------------------------------------------------------------- fork safety


def _child_uses_inherited_and_new_client(q):
    try:
        shoal.get_client()
        q.put("inherited client still visible")
        return
    except ValueError:
        pass
    with shoal.Client(n_workers=1) as c:
        q.put(c.submit(inc, 1).result(timeout=60))


def test_forked_child_does_not_hang_on_inherited_client(client):
    assert client.submit(inc, 1).result() == 2
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_uses_inherited_and_new_client, args=(q,))
    p.start()
    assert q.get(timeout=90) == 2
    p.join(30)
    assert p.exitcode == 0
    # The parent's cluster is untouched.
    assert client.submit(inc, 2).result() == 3


# ------------------------------------------------------- tasks submit tasks


def fib(n):
    if n < 2:
        return n
    client = shoal.get_client()
    a = client.submit(fib, n - 1)
    b = client.submit(fib, n - 2)
    return a.result() + b.result()  # waiting lends this task's thread


def test_tasks_submit_tasks_recursively_without_deadlock():
    # One worker with one thread: every waiting task must lend its thread.
    with shoal.Client(n_workers=1) as c:
        assert c.submit(fib, 8).result(timeout=120) == 21
        # After all that lending, the worker is back to one thread's worth.
        assert c.gather(c.map(inc, range(100))) == list(range(1, 101))


def test_secede_and_rejoin_outside_a_task_are_clear():
    with pytest.raises(RuntimeError, match="inside a task"):
        shoal.secede()
    shoal.rejoin()  # a no-op outside tasks


# ---------------------------------------------------------------- resources


def _interval(delay):
    start = time.monotonic()
    time.sleep(delay)
    return os.getpid(), start, time.monotonic(), os.environ.get("CUDA_VISIBLE_DEVICES")


def _assert_no_overlap_per_worker(runs):
    """``runs``: ``_interval`` results; no two ran at once in one process."""
    spans: dict[int, list] = {}
    for pid, start, end, _ in runs:
        spans.setdefault(pid, []).append((start, end))
    for s in spans.values():
        s.sort()
        for (_, end), (start, _) in zip(s, s[1:], strict=False):
            assert start >= end - 1e-3, f"tasks overlapped on one worker: {s}"


def test_resources_are_never_overcommitted():
    # Two threads per worker, but one "slot" each: slot tasks never overlap
    # on a worker, while other tasks still use the second thread.
    with shoal.Client(n_workers=2, threads_per_worker=2, resources={"slot": 1}) as c:
        fs = [c.submit(_interval, 0.3, resources={"slot": 1}) for _ in range(6)]
        free = [c.submit(_interval, 0.0) for _ in range(4)]
        runs = c.gather(fs)
        c.gather(free)
        _assert_no_overlap_per_worker(runs)
        # No worker has 5 GPUs: a clear error at once, and the cluster goes on.
        t = time.monotonic()
        with pytest.raises(shoal.UnsatisfiableError, match="GPU=5"):
            c.submit(inc, 1, resources={"GPU": 5}).result(timeout=30)
        assert time.monotonic() - t < 5
        assert c.submit(inc, 1).result() == 2


def test_gpu_tasks_get_their_devices_pinned():
    with shoal.Client(n_workers=1, resources={"GPU": 2}) as c:
        pinned = c.gather([c.submit(_interval, 0.0, resources={"GPU": 1}) for _ in range(4)])
        assert {p[3] for p in pinned} <= {"0", "1"}
        both = c.submit(_interval, 0.0, resources={"GPU": 2}).result()
        assert both[3] == "0,1"
        assert c.submit(_interval, 0.0).result()[3] is None
        gpu_square = square.options(num_gpus=1)
        assert shoal.get(gpu_square.remote(3)) == 9


def test_bad_resources_are_clear_errors(client):
    with pytest.raises(ValueError, match="positive"):
        client.submit(inc, 1, resources={"GPU": -1})
    with pytest.raises(TypeError, match="dict"):
        client.submit(inc, 1, resources="GPU")
    with pytest.raises(TypeError, match="number"):
        client.map(inc, [1], resources={"GPU": "many"})
    assert client.submit(inc, 1).result() == 2


def test_scikit_learn_n_jobs_runs_on_the_cluster(client):
    pytest.importorskip("sklearn")
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}
    local = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="shoal"):
        search = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=-1)
        search.fit(X, y)
    assert search.best_params_ == local.best_params_
    assert search.cv_results_["mean_test_score"].tolist() == pytest.approx(
        local.cv_results_["mean_test_score"].tolist()
    )


def test_tasks_taking_several_threads(client):
    # Workers have 2 threads: a 2-CPU task runs alone on its worker.
    with shoal.Client(n_workers=2, threads_per_worker=2) as c:
        wide = shoal.remote(_interval).options(num_cpus=2)
        _assert_no_overlap_per_worker(shoal.get([wide.remote(0.3) for _ in range(4)]))
        with pytest.raises(shoal.UnsatisfiableError, match="CPU=3"):
            c.submit(inc, 1, resources={"CPU": 3}).result(timeout=30)
    with pytest.raises(ValueError, match="threads_per_worker"):
        shoal.Client(n_workers=1, resources={"CPU": 4})


NESTED_UNDER_LOKY = textwrap.dedent(
    """
    from joblib import Parallel, delayed

    def inner(n):
        import sys
        from joblib import Parallel, delayed

        before = "shoal" in sys.modules
        return before, sum(Parallel(n_jobs=1, backend="shoal")(delayed(abs)(-i) for i in range(n)))

    if __name__ == "__main__":
        print(Parallel(n_jobs=2, backend="loky")(delayed(inner)(n) for n in (3, 4)))
    """
)


def test_the_shoal_backend_is_known_in_processes_that_never_imported_shoal(tmp_path):
    # A loky worker never imports shoal: "Invalid backend" there before. The
    # wheel's .pth adds the backend to joblib wherever joblib is imported.
    pytest.importorskip("joblib")
    script = tmp_path / "nested.py"
    script.write_text(NESTED_UNDER_LOKY)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = ast.literal_eval(out.stdout.strip())
    assert [total for _, total in results] == [3, 6]
    # At least one call ran in a loky worker where shoal had never been
    # imported (both, unless loky gave both calls to one worker).
    assert not all(imported for imported, _ in results), results
