"""The client API on a real embedded cluster (processes, sockets)."""

import operator
import os
import pickle
import threading
import time

import pytest

import shoal


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def slow_inc(x, delay=0.2):
    time.sleep(delay)
    return x + 1


def test_submit_result(client):
    assert client.submit(pow, 2, 10).result(timeout=30) == 1024
    assert client.submit(add, 1, b=2).result() == 3


def test_map_gather_and_futures_as_arguments(client):
    fs = client.map(lambda x: x + 1, range(10_000))
    assert len(fs) == 10_000
    assert client.gather(fs) == list(range(1, 10_001))
    total = client.submit(sum, fs)
    assert total.result() == sum(range(1, 10_001))
    one = client.map(inc, range(5), batch_size=1)
    assert client.gather(one) == [1, 2, 3, 4, 5]
    assert fs[7].result() == 8
    assert client.submit(add, fs[3], one[4]).result() == 4 + 5


def test_map_returns_a_lazy_sequence_of_futures(client):
    fs = client.map(inc, range(10), batch_size=3)
    assert isinstance(fs, shoal.FutureList) and len(fs) == 10
    assert fs[2] is fs[2] and fs[-1] is fs[9]
    assert [f.result() for f in fs[8:]] == [9, 10]
    assert [f.key for f in fs][:4] == [f"inc-{fs._ids[0]:x}[{i}]" for i in range(3)] + [
        f"inc-{fs._ids[1]:x}[0]"
    ]
    with pytest.raises(IndexError):
        fs[10]
    both = fs + client.map(inc, [100], batch_size=1)
    assert isinstance(both, list) and client.gather(both)[-2:] == [10, 101]
    assert client.gather({"a": fs, "b": (fs[0],)}) == {"a": list(range(1, 11)), "b": (1,)}
    done, not_done = shoal.wait(fs)
    assert len(done) == 10 and not not_done
    with pytest.raises(TypeError, match="FutureList"):
        pickle.dumps(fs)
    # An element outlives its list and keeps its batch.
    last = fs[9]
    ids = list(fs._ids)
    del fs, both, done
    assert set(client._session.refs) & set(ids) == {ids[-1]}
    assert last.result() == 10


def test_gather_of_a_map_with_failures(client):
    for batch_size in (1, 2):
        fs = client.map(lambda x: 1 / x, [1, 0, 2, 4], batch_size=batch_size)
        with pytest.raises(ZeroDivisionError):
            client.gather(fs)
        assert client.gather(fs, errors="skip") == [1.0, 0.5, 0.25]
        assert client.submit(len, fs[2:]).result() == 2


def test_map_several_iterables_and_kwargs(client):
    fs = client.map(slow_inc, range(4), [0.0] * 4)
    assert client.gather(fs) == [1, 2, 3, 4]
    fs = client.map(add, range(3), b=10)
    assert client.gather(fs) == [10, 11, 12]


def keywords_of(x, **kw):
    return sorted(kw)


def test_dask_s_scheduling_keywords_are_taken_never_passed_to_the_function(client):
    # Dask's submit and map take these; they used to reach the function.
    dask_kw = {"fifo_timeout": "100 ms", "allow_other_workers": False}
    assert client.submit(keywords_of, 1, pure=False, **dask_kw).result(timeout=30) == []
    fs = client.map(keywords_of, [1, 2], pure=False, **dask_kw)
    assert client.gather(fs) == [[], []]
    assert client.submit(keywords_of, 1, own=2).result(timeout=30) == ["own"]
    for call in (
        lambda: client.submit(keywords_of, 1, workers=["w1"]),
        lambda: client.map(keywords_of, [1], workers="w1"),
    ):
        with pytest.raises(ValueError, match=r"workers=\.\.\.\) is not supported.*resources="):
            call()
    with pytest.raises(ValueError, match=r"map\(key=\.\.\.\) is not supported"):
        client.map(keywords_of, [1], key="mine")
    with pytest.raises(ValueError, match="@shoal.remote"):
        client.submit(keywords_of, 1, actor=True)
    assert client.submit(keywords_of, 2).result(timeout=30) == []


def test_nested_futures_and_gather_shapes(client):
    a = client.submit(inc, 1)
    b = client.submit(inc, 2)
    nested = client.submit(lambda d: d["x"][0] + d["y"], {"x": [a], "y": b})
    assert nested.result() == 5
    assert client.gather({"a": a, "l": [a, (b,)]}) == {"a": 2, "l": [2, (3,)]}


def test_tree_reduction(client):
    level = [client.submit(inc, i) for i in range(256)]
    while len(level) > 1:
        level = [client.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
    assert level[0].result() == sum(range(1, 257))


def test_large_results_stay_on_workers_and_are_fetched(client):
    big = client.submit(lambda n: bytes(range(256)) * n, 4096)  # 1 MiB: not inline
    length = client.submit(len, big)
    assert length.result() == 1 << 20
    assert big.result() == bytes(range(256)) * 4096


def test_wait_and_as_completed(client):
    fs = [client.submit(slow_inc, i, 0.05 * (3 - i)) for i in range(3)]
    done, not_done = shoal.wait(fs)
    assert done == set(fs) and not not_done
    fs = [client.submit(slow_inc, i, 0.3 * i) for i in range(3)]
    done, _ = shoal.wait(fs, return_when=shoal.FIRST_COMPLETED)
    assert fs[0] in done
    seen = [f.result() for f in shoal.as_completed(fs)]
    assert sorted(seen) == [1, 2, 3]
    pairs = list(shoal.as_completed(client.map(inc, range(20)), with_results=True))
    assert sorted(r for _, r in pairs) == list(range(1, 21))


def test_done_callbacks(client):
    got = []
    f = client.submit(slow_inc, 1, 0.1)
    f.add_done_callback(lambda fut: got.append(fut.result()))
    f.result()
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        time.sleep(0.01)
    assert got == [2]
    f.add_done_callback(lambda fut: got.append("again"))  # already done: runs now
    assert got[-1] == "again"


def test_map_of_ranges_sends_ranges_and_gets_every_element_right(client):
    # A range is batched as range slices (a few bytes each, not lists):
    # steps, negative steps, empty and one-element batches all come out right.
    for r in (range(5, 1000, 7), range(1000, -3, -9), range(0), range(1)):
        for batch_size in (None, 1, 13):
            assert client.gather(client.map(inc, r, batch_size=batch_size)) == [x + 1 for x in r]
    # A failing element of a range batch fails alone.
    fs = client.map(lambda x: 1 / (x - 50), range(100), batch_size=30)
    assert isinstance(fs[50].exception(), ZeroDivisionError)
    assert fs[51].result() == 1.0 and fs[49].result() == -1.0


def raise_timeout(message: str) -> None:
    raise TimeoutError(message)


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_exception_returns_a_tasks_own_timeout_and_raises_the_waits(client):
    # A task's TimeoutError (TaskTimeoutError is one) is its outcome: returned.
    f = client.submit(raise_timeout, "the task's own")
    assert isinstance(f.exception(), TimeoutError) and "the task's own" in str(f.exception())
    spin = client.submit(busy, 5, time_limit=0.3)
    assert isinstance(spin.exception(timeout=30), shoal.TaskTimeoutError)
    # The wait's own timeout is raised, not returned.
    slow = client.submit(time.sleep, 3)
    with pytest.raises(TimeoutError):
        slow.exception(timeout=0.05)
    assert slow.exception() is None


def test_exception_keeps_type_and_remote_traceback(client):
    f = client.submit(operator.truediv, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        f.result()
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "truediv" in notes and "Traceback" in notes
    assert isinstance(f.exception(), ZeroDivisionError)
    assert f.status == "error"
    # Dependents fail with the same error.
    g = client.submit(inc, f)
    with pytest.raises(ZeroDivisionError):
        g.result()
    # One failing element of a map batch fails that element only.
    fs = client.map(lambda x: 1 / x, [1, 0, 2], batch_size=3)
    assert fs[0].result() == 1.0 and fs[2].result() == 0.5
    with pytest.raises(ZeroDivisionError):
        fs[1].result()


def test_retries(client, tmp_path):
    marker = tmp_path / "attempts"

    def flaky():
        n = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(n + 1))
        if n < 2:
            raise OSError("transient")
        return n

    assert client.submit(flaky, retries=2).result() == 2


def test_timeout_raises_on_time(client):
    f = client.submit(slow_inc, 1, 2.0)
    t = time.perf_counter()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.2)
    assert time.perf_counter() - t < 1.5
    assert f.result() == 2


def test_cancel(client):
    blocker = [client.submit(slow_inc, i, 1.0) for i in range(2)]
    f = client.submit(inc, 1)
    g = client.submit(inc, f)
    f.cancel()
    with pytest.raises(shoal.FutureCancelledError):
        f.result(timeout=10)
    with pytest.raises(shoal.FutureCancelledError):
        g.result(timeout=10)
    assert f.cancelled()
    assert client.gather(blocker) == [1, 2]


def test_keys_and_pure(client):
    a = client.submit(inc, 1, key="one")
    assert a.key == "one"
    assert client.submit(inc, 100, key="one").result() == 2  # same key, same task
    p1 = client.submit(inc, 5, pure=True)
    p2 = client.submit(inc, 5, pure=True)
    assert p1.key == p2.key
    assert client.submit(inc, 5).key != client.submit(inc, 5).key


def test_a_task_whose_one_argument_is_a_future_carries_no_pickle(client):
    """The chain shape travels as an empty payload; pure keys still tell
    different inputs apart, and the input arrives as the argument."""
    a, b = client.submit(inc, 1), client.submit(inc, 10)
    payload, deps, _ = client._session.pack_args(((a,), None), "x")
    assert (payload, deps) == (b"", [a._id])
    pa, pb = client.submit(inc, a, pure=True), client.submit(inc, b, pure=True)
    assert pa.key != pb.key
    assert pa.key == client.submit(inc, a, pure=True).key
    assert (pa.result(), pb.result()) == (3, 12)
    # A keyword, or an element of a map batch, still pickles.
    assert client._session.pack_args(((a,), {"k": 1}), "x")[0] != b""
    batch = client.map(inc, range(4), batch_size=2)
    assert batch[3]._index is not None
    assert client._session.pack_args(((batch[3],), None), "x")[0] != b""
    assert client.submit(inc, batch[3]).result() == 5


def test_released_futures_free_results(client):
    fs = client.map(inc, range(100), batch_size=1)
    ids = {f._id for f in fs}
    del fs
    assert not ids & set(client._session.refs)


def test_priority_runs_first():
    with shoal.Client(n_workers=1) as c:
        block = c.submit(slow_inc, 0, 0.5)
        order = []
        low = [c.submit(slow_inc, i, 0.01, priority=0) for i in range(3)]
        high = c.submit(slow_inc, 99, 0.01, priority=10)
        for f in shoal.as_completed([*low, high]):
            order.append(f.result())
        assert order[0] == 100
        assert block.result() == 1


def test_threads_per_worker():
    with shoal.Client(n_workers=1, threads_per_worker=3) as c:
        # Started and warm first: its preloads (the heavy libraries this
        # process imported) take a second or more, and are not the point.
        assert c.submit(inc, 1).result(timeout=60) == 2
        t = time.perf_counter()
        assert c.gather([c.submit(slow_inc, i, 0.5) for i in range(3)]) == [1, 2, 3]
        assert time.perf_counter() - t < 1.4  # sleeps overlap on 3 threads


def test_second_client_connects_to_the_same_scheduler(client):
    with shoal.Client(client.scheduler_address) as other:
        assert other.submit(inc, 41).result(timeout=30) == 42
    assert client.submit(inc, 1).result() == 2


def test_cli_version_and_info(capfd):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "shoal", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"shoal {shoal.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "protocol version" in out and "python: 3." in out


def test_every_setting_is_documented_and_shown_with_its_effective_value():
    import pathlib
    import subprocess
    import sys

    from shoal import _core

    docs = (pathlib.Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    env = {**os.environ, "SHOAL_STOP_GRACE": "7", "SHOAL_TOKEN": "secret-token"}
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "info"], capture_output=True, text=True, check=True, env=env
    ).stdout
    for name, _value, _default, meaning, origin in _core.settings():
        assert f"`{name}`" in docs and meaning in docs, name
        if origin == "user":
            assert name in out, name
    assert "*SHOAL_STOP_GRACE" in out and " 7" in out
    assert "secret-token" not in out  # a token is never printed
    assert _core.setting("SHOAL_STOP_GRACE") == os.environ.get("SHOAL_STOP_GRACE", "5")
    with pytest.raises(KeyError, match="not one of Shoal's settings"):
        _core.setting("SHOAL_NOTHING")


def test_tasks_queued_behind_a_slow_one_move_to_an_idle_worker():
    """Work stealing: tiny tasks pipelined behind a task far slower than its
    group's estimate are taken back and run on the idle worker."""

    def maybe_slow(i, delay):
        time.sleep(delay if i == 0 else 0.0)
        return i

    with shoal.Client(n_workers=2) as c:
        c.gather(c.map(maybe_slow, range(200), [0.0] * 200, batch_size=1))  # learn: tiny
        fs = c.map(maybe_slow, range(200), [20.0] + [0.0] * 199, batch_size=1)
        t = time.perf_counter()
        done = [f.result(timeout=60) for f in fs[1:]]
        elapsed = time.perf_counter() - t
        assert done == list(range(1, 200))
        assert elapsed < 10, f"tiny tasks waited {elapsed:.1f}s behind the slow one"
        c.cancel([fs[0]])


def test_results_do_not_wait_for_the_task_run_after_them():
    """Reports travel in batches, but a batch waits at most milliseconds:
    not until the next task (here 3 s long) ends."""

    def maybe_slow(i, delay):
        time.sleep(delay if i == 199 else 0.0)
        return i

    with shoal.Client(n_workers=2) as c:
        c.gather(c.map(maybe_slow, range(200), [0.0] * 200, batch_size=1))  # learn: tiny
        fs = c.map(maybe_slow, range(200), [0.0] * 199 + [3.0], batch_size=1)
        t = time.perf_counter()
        done = [f.result(timeout=60) for f in fs[:199]]
        elapsed = time.perf_counter() - t
        assert done == list(range(199))
        assert elapsed < 2, f"results waited {elapsed:.1f}s for the task after them"
        assert fs[199].result(timeout=60) == 199


def test_large_array_results_move_between_workers_and_to_the_client():
    np = pytest.importorskip("numpy")

    def make(seed, delay):
        time.sleep(delay)
        return np.random.default_rng(seed).random(200_000)  # 1.6 MB: kept unpickled

    def combine(a, b):
        return a + b

    with shoal.Client(n_workers=2) as c:
        a = c.submit(make, 1, 0.5)
        b = c.submit(make, 2, 0.5)  # runs beside a: on the other worker
        s = c.submit(combine, a, b)
        expected = np.random.default_rng(1).random(200_000) + np.random.default_rng(2).random(
            200_000
        )
        np.testing.assert_array_equal(s.result(), expected)
        np.testing.assert_array_equal(a.result(), np.random.default_rng(1).random(200_000))
        # Object arrays are pickled at once, so an unpicklable one fails its task.
        bad = c.submit(lambda: np.array([threading.Lock()] * 20_000, dtype=object))
        with pytest.raises(TypeError, match="could not be pickled"):
            bad.result()


def imported(name):
    import sys

    return name in sys.modules


def array_sum(a):
    return float(a.sum())


def imported_each(names):
    import sys

    return [n in sys.modules for n in names]


def test_a_one_thread_worker_imports_the_client_s_libraries_when_no_task_waits(monkeypatch):
    # Two stand-ins for heavy libraries this process imported (at once
    # here), each 2 s to import in the workers.
    import _slow_import_a  # noqa: F401
    import _slow_import_b  # noqa: F401

    from shoal import deploy

    slow = ["_slow_import_a", "_slow_import_b"]
    monkeypatch.setattr(deploy, "_HEAVY", (*deploy._HEAVY, *slow))
    monkeypatch.setenv("SHOAL_TEST_SLOW_IMPORT", "2")
    # Started anew: forked workers have every library the client has.
    monkeypatch.setenv("SHOAL_WORKER_START", "spawn")
    with shoal.Client(n_workers=1, preload=["colorsys"]) as c:
        t = time.perf_counter()
        # A named preload comes before any task; the client's libraries
        # after this task, which waits for one import at most, not both.
        first = c.submit(imported_each, ["colorsys", *slow], pure=False).result(timeout=60)
        took = time.perf_counter() - t
        assert first[0] and not all(first[1:]), first
        assert took < 3.5, f"the first task waited {took:.1f} s"
        deadline = time.time() + 30
        while not all(c.submit(imported_each, slow, pure=False).result(timeout=30)):
            assert time.time() < deadline, "the client's libraries were never imported"
            time.sleep(0.2)


def test_workers_preload_modules_in_the_background(capfd):
    import numpy as np

    # Tasks whose arguments import NumPy as they are unpickled, at once:
    # they wait for the preload (importing NumPy in two threads at once
    # leaves one with a half-initialized module; this failed about one
    # cluster in five before).
    for _ in range(8):
        with shoal.Client(n_workers=2, threads_per_worker=2, preload=["numpy", "dask.array"]) as c:
            assert c.gather(c.map(array_sum, [np.ones(10)] * 8, batch_size=1)) == [10.0] * 8
    # colorsys: a module nothing of Shoal's imports. A name that cannot be
    # imported is reported by the worker, which serves on.
    with shoal.Client(n_workers=1, preload=["colorsys", "no_such_module_here"]) as c:
        deadline = time.time() + 30
        while not c.submit(imported, "colorsys", pure=False).result(timeout=30):
            assert time.time() < deadline, "colorsys was never preloaded"
            time.sleep(0.1)
    deadline = time.time() + 10
    err = ""
    while "no_such_module_here" not in err and time.time() < deadline:
        err += capfd.readouterr().err
        time.sleep(0.1)
    assert "--preload no_such_module_here: ModuleNotFoundError" in err
    with shoal.Client(n_workers=1, preload=None) as c:
        assert not c.submit(imported, "colorsys").result(timeout=30)
    with pytest.raises(ValueError, match="module names"):
        shoal.Client(n_workers=1, preload=["a,b"])
    with pytest.raises(ValueError, match="shoal worker --preload"):
        shoal.Client("tcp://127.0.0.1:1", preload=["numpy"])


def test_a_question_unanswered_in_time_is_a_timeout_not_a_lost_scheduler(client):
    # Defect: a slow answer raised SchedulerLostError ("lost the connection
    # to the scheduler: the scheduler did not answer ..."), though the
    # connection was fine. The client keeps working after it.
    for ask in (lambda: client.query("/api/status", timeout=0), lambda: client.scheduler_info(0)):
        with pytest.raises(TimeoutError, match="did not answer within") as e:
            ask()
        assert not isinstance(e.value, shoal.SchedulerLostError)
    assert client.submit(operator.add, 1, 2).result(timeout=30) == 3
    assert client.query("/api/status")["workers"]
