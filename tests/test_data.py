"""The data plane: shared memory between processes of a host, scatter/put,
memory limits, spilling, and cleanup after crashes. Real processes, real
/dev/shm, real files."""

from __future__ import annotations

import collections
import glob
import hashlib
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pytest
from _helpers import wait_for

import shoal
from shoal import _core

MiB = 2**20


def seg_dir(pid: int) -> str:
    base = os.environ.get("SHOAL_SHM_DIR") or (
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    )
    return os.path.join(base, f"shoal-{os.getuid()}-{pid}")


def spill_dir(pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"shoal-spill-{os.getuid()}-{pid}")


def rss_anon(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "*")))


def make(n_bytes: int, seed: int, delay: float = 0.0) -> np.ndarray:
    time.sleep(delay)
    return np.random.default_rng(seed).integers(0, 2**63, n_bytes // 8, dtype=np.int64)


# What a mapped file is lent as (2 MiB-aligned).
MAPPED = _core.Mapped


def is_mapped(x: np.ndarray) -> bool:
    """Whether an array's memory is a mapped file (another process's result),
    not memory of this process's own."""
    base = x
    while base is not None and not isinstance(base, memoryview | MAPPED):
        base = getattr(base, "base", None)
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, MAPPED)


def where_and_how(a: np.ndarray, b: np.ndarray) -> tuple:
    """Runs on a worker: its pid, whether each input is mapped, and how much
    private memory reading both costs (mapped inputs cost none)."""
    before = rss_anon()
    digest = hashlib.sha1(a.data).hexdigest() + hashlib.sha1(b.data).hexdigest()
    return os.getpid(), is_mapped(a), is_mapped(b), rss_anon() - before, digest


def test_a_large_array_reaches_another_worker_mapped_not_copied():
    with shoal.Client(n_workers=2) as c:
        # Two producers at once land on the two workers; the consumer runs
        # where one input is, so the other one crosses processes.
        xs = [c.submit(make, 512 * MiB, i, 0.3) for i in range(2)]
        shoal.wait(xs)
        pid, wa, wb, grew, digest = c.submit(where_and_how, xs[0], xs[1]).result()
        expected = [make(512 * MiB, i) for i in range(2)]
        assert digest == "".join(hashlib.sha1(e.data).hexdigest() for e in expected)
        # Exactly one input came from the other process: mapped.
        assert sorted([wa, wb]) == [False, True]
        assert grew < 64 * MiB, f"the consumer copied its input: +{grew / MiB:.0f} MiB"
        # The client maps results too, copy-on-write: writable, and a write
        # changes this process's page only, never what others map.
        before = rss_anon()
        r = xs[0].result()
        assert rss_anon() - before < 64 * MiB
        assert is_mapped(r) and r.flags.writeable
        assert np.array_equal(r, expected[0])
        r[0] = expected[0][0] + 1
        assert xs[0].result()[0] == expected[0][0]


def total(a: np.ndarray, i: int, delay: float) -> int:
    time.sleep(delay)
    return int(a[:: 4096 // 8].sum() % 1000) + i


def test_a_100_mib_object_passed_between_workers_many_times():
    data = np.arange(100 * MiB // 8, dtype=np.int64)
    expect = int(data[::512].sum() % 1000)
    with shoal.Client(n_workers=2) as c:
        x = c.scatter(data)
        outs = c.gather([c.submit(total, x, i, 0.02) for i in range(40)])
        assert outs == [expect + i for i in range(40)]
        # A chain whose every link makes a new 100 MiB array on whichever
        # worker is free.
        y = x
        for _ in range(6):
            y = c.submit(np.add, y, 1)
        assert np.array_equal(y.result(), data + 6)
        pids = c.worker_pids
        del x, y
        time.sleep(0.5)
        # Released: the segments are gone (the one held by nothing).
        held = sum(dir_bytes(seg_dir(p)) for p in pids)
        assert held < 8 * MiB, f"{held / MiB:.0f} MiB of segments left after release"


class LoadCounted:
    """A value whose every unpickling appends the loading process's pid to
    a file, and takes a millisecond (only slow ones are kept)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_load_counted, (self.path,))


def _load_counted(path: str) -> LoadCounted:
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(0.001)
    return LoadCounted(path)


def read_slowly(v: LoadCounted, i: int) -> tuple[int, str]:
    time.sleep(0.05)
    return os.getpid(), v.path


def test_an_input_from_a_peer_is_unpickled_once_for_the_tasks_there_that_read_it(tmp_path):
    path = str(tmp_path / "loads")
    with shoal.Client(n_workers=2) as c:
        x = c.submit(LoadCounted, path)
        shoal.wait([x])
        runs = c.gather([c.submit(read_slowly, x, i) for i in range(24)])
        assert {p for _, p in runs} == {path}
        with open(path) as fh:
            loads = [int(line) for line in fh]
        ran = collections.Counter(pid for pid, _ in runs)
        per = collections.Counter(loads)
        # Each worker unpickled it once (a small result reaches readers as
        # bytes, its holder's too), however many of its readers it ran.
        assert set(per.values()) == {1}, f"unpickled {per} for readers {ran}"
        assert any(ran[pid] >= 2 for pid in per), f"too few readers ran to tell: {ran}"


def groups(path: str) -> dict[str, object]:
    """A result pickled as soon as it is made (a dict, as a shuffle's
    groups), large enough for a shared-memory file."""
    return {"data": np.arange(100_000, dtype=np.float64), "v": LoadCounted(path)}


def read_group(g: dict[str, object], i: int) -> tuple[int, float]:
    return os.getpid(), float(g["data"][i])


def drop_copies() -> int:
    from shoal import _context

    return _context.executor.store.drop_copies()


def test_a_container_result_is_read_where_it_was_made_without_being_unpickled_again(tmp_path):
    path = str(tmp_path / "loads")

    def loads() -> list[int]:
        with open(path) as fh:
            return [int(line) for line in fh]

    with shoal.Client(n_workers=1) as c:
        (worker,) = c.worker_pids
        g = c.submit(groups, path)
        assert c.gather([c.submit(read_group, g, i) for i in range(8)]) == [
            (worker, float(i)) for i in range(8)
        ]
        # Its file was written when it was made; the tasks here took the
        # object itself (mapping the file back unpickled all of it).
        assert not os.path.exists(path), f"unpickled by {loads()}"
        assert c.gather(g)["data"][99_999] == 99_999.0  # the client maps the file
        assert loads() == [os.getpid()]
        # Memory short: the object kept beside the file goes first; a reader
        # here then maps the file (once: that view is kept).
        assert c.submit(drop_copies).result() >= 1
        for i in (5, 6):  # one after the other: the second finds the view
            assert c.submit(read_group, g, i).result() == (worker, float(i))
        assert loads() == [os.getpid(), worker]


def test_fetched_inputs_are_kept_least_recently_used_within_a_budget(tmp_path):
    import pickle

    from shoal._worker import _Fetched

    path = str(tmp_path / "loads")
    kept = _Fetched(3600)
    # Slow to unpickle (a millisecond each), about 1.1 KB each.
    frames = {i: pickle.dumps((LoadCounted(path), bytes(1000)), protocol=5) for i in range(4)}
    a = kept.load(0, frames[0])
    assert kept.load(0, frames[0]) is a  # kept: the same object
    b = kept.load(1, frames[1])
    kept.load(0, frames[0])  # 0 used last: 1 is the oldest now
    kept.load(2, frames[2])
    kept.load(3, frames[3])  # over 3600 bytes: 1 goes
    assert kept.load(0, frames[0]) is a
    assert kept.load(1, frames[1]) is not b
    assert kept.held <= 3600
    # Fast to unpickle (an array maps in microseconds): not kept (three
    # tries: a busy machine may stall one past the threshold).
    quick = pickle.dumps(bytearray(2000), protocol=5)
    assert any(kept.load(k, quick) is not kept.load(k, quick) for k in (6, 7, 8))
    big = pickle.dumps((LoadCounted(path), bytes(5000)), protocol=5)
    assert kept.load(9, big) is not kept.load(9, big)  # over the budget: never kept
    kept.clear()
    assert kept.held == 0 and kept.load(0, frames[0]) is not a
    assert _Fetched.budget_for(1 << 30) == 32 << 20 and _Fetched.budget_for(None) == 64 << 20


def whole(a: np.ndarray) -> int:
    return int(a.sum())


def head_view(a: np.ndarray) -> np.ndarray:
    return a[: 1 << 17]  # a view (1 MiB): the worker keeps mapping the put's file


def test_a_puts_file_goes_back_to_its_client_for_the_next_put_but_never_while_mapped():
    from shoal import _puts, _store

    home = _puts.returned_dir(_store.segment_dir())

    def returned() -> list[str]:
        return os.listdir(home) if os.path.isdir(home) else []

    with shoal.Client(n_workers=1) as c:
        x = c.scatter(np.full(MiB, 1, dtype=np.int64))
        assert c.submit(whole, x).result() == MiB
        del x
        wait_for(lambda: len(returned()) == 1, 10, "the put's file handed back")
        (name,) = returned()
        inode = os.stat(os.path.join(home, name)).st_ino
        # The next put of its size is written into it, and reads back right.
        y = c.scatter(np.full(MiB, 2, dtype=np.int64))
        assert returned() == []
        assert c.submit(whole, y).result() == 2 * MiB
        (pid,) = c.worker_pids
        held = [os.stat(e.path).st_ino for e in os.scandir(seg_dir(pid))]
        assert inode in held, "the new put was not written into the handed-back file"
        # A result on the worker that is a view of the put keeps it mapped:
        # handed back, it is not written again while that view lives.
        view = c.submit(head_view, y)
        shoal.wait([view])
        del y
        wait_for(lambda: len(returned()) == 1, 10, "the second put's file handed back")
        z = c.scatter(np.full(MiB, 3, dtype=np.int64))
        assert len(returned()) == 1, "a mapped file was taken for a new put"
        assert (c.gather(view) == 2).all() and c.submit(whole, z).result() == 3 * MiB
        # Released for good, and not claimed: unlinked after a few seconds.
        del view, z
        wait_for(lambda: returned() == [], _puts.RETURNED_FOR + 10, "unclaimed files unlinked")


def test_a_worker_killed_while_holding_segments_leaves_none_behind():
    with shoal.Client(n_workers=2) as c:
        xs = [c.submit(make, 64 * MiB, i, 0.2) for i in range(4)]
        shoal.wait(xs)
        # Make every result a segment (the client fetches them).
        c.gather(xs)
        pids = c.worker_pids
        assert any(os.listdir(seg_dir(p)) for p in pids)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 10
        while os.path.exists(seg_dir(victim)) and time.time() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(seg_dir(victim)), "a dead worker's segments leaked"
        # What it held is recomputed when needed.
        got = c.gather([c.submit(total, x, 0, 0) for x in xs])
        want = [int(make(64 * MiB, i)[::512].sum() % 1000) for i in range(4)]
        assert got == want
    # Closing removes everything of this cluster.
    for p in pids:
        assert not os.path.exists(seg_dir(p))


def test_leftovers_of_dead_processes_are_swept():
    dead = 4_194_305  # above the kernel's pid limit: never alive
    d = seg_dir(dead)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "1"), "wb") as fh:
        fh.write(b"x" * 100)
    assert _core.sweep() >= 1
    assert not os.path.exists(d)


def digest_of(a: np.ndarray) -> str:
    return hashlib.sha1(a.data).hexdigest()


def pair_digest(a, b):
    return digest_of(a), digest_of(b)


def test_spilling_lets_four_times_the_memory_limit_complete_bit_identical():
    limit = 256 * MiB
    with shoal.Client(n_workers=2, memory_limit=limit) as c:
        n = 32  # 32 x 32 MiB = 1 GiB: 4x a worker's limit, 2x both together
        xs = [c.submit(make, 32 * MiB, i) for i in range(n)]
        shoal.wait(xs)
        pids = c.worker_pids
        spilled = sum(dir_bytes(spill_dir(p)) for p in pids)
        assert spilled >= (n * 32 * MiB - 2 * limit) // 2, f"only {spilled / MiB:.0f} MiB spilled"
        for p in pids:
            assert rss_anon(p) < limit, "a worker is above its memory limit"
        # Read back (inside tasks and by the client): the same bits.
        got = c.gather([c.submit(digest_of, x) for x in xs])
        assert got == [digest_of(make(32 * MiB, i)) for i in range(n)]
        assert np.array_equal(xs[0].result(), make(32 * MiB, 0))
        # The dashboard's task stream shows the spills and the transfers
        # (they travel with heartbeats), and the counters add them up. Tasks
        # go where their input is, so make one that needs inputs from both.
        holder = {x: c.query(f"/api/task/{x._id}")["location"] for x in xs}
        a = xs[0]
        b = next(x for x in xs if holder[x] != holder[a])
        assert c.submit(pair_digest, a, b).result() == (
            digest_of(a.result()),
            digest_of(b.result()),
        )
        deadline = time.time() + 5
        while time.time() < deadline:
            st = c.query("/api/status?merge=0")
            kinds = {r[7] for r in st["stream"]}
            counters = st["counters"]
            if {2, 3} <= kinds and counters["spill_bytes"] >= spilled:
                break
            time.sleep(0.2)
        assert {0, 2, 3} <= kinds, kinds  # tasks, transfers, spills
        assert st["counters"]["spill_bytes"] >= spilled
        assert st["counters"]["transfer_bytes"] >= 32 * MiB
        spills = [r for r in st["stream"] if r[7] == 3]
        assert all(r[8] > 0 and r[1] in {x._id for x in xs} for r in spills)


def hog(n_mib: int) -> int:
    keep = []
    for _ in range(n_mib // 16):
        keep.append(np.ones(2 * MiB))  # 16 MiB each, touched
        time.sleep(0.005)
    return len(keep)


def test_a_task_exceeding_the_memory_limit_restarts_its_worker_and_fails_clearly():
    with shoal.Client(n_workers=1, memory_limit=300 * MiB) as c:
        f = c.submit(hog, 2048)
        with pytest.raises(shoal.KilledWorker, match="hog"):
            f.result(timeout=120)
        # The cluster goes on with a fresh worker.
        assert c.submit(sum, [1, 2, 3]).result(timeout=30) == 6


def test_scattered_data_lost_with_its_worker_is_a_clear_error():
    with shoal.Client(n_workers=2) as c:
        x = c.scatter(np.ones(MiB))
        assert c.submit(np.sum, x).result() == MiB
        killed = set(c.worker_pids)
        for p in killed:
            os.kill(p, signal.SIGKILL)
        with pytest.raises(shoal.DataLostError, match="scatter it again"):
            c.submit(np.sum, x).result(timeout=30)
        with pytest.raises(shoal.DataLostError):
            x.result(timeout=30)
        # Everything else works on the replacements (once the scheduler has
        # seen both deaths: data scattered to a worker dying unseen is lost
        # too, rightly).
        deadline = time.time() + 30
        while time.time() < deadline:
            pids = {w["pid"] for w in c.scheduler_info()["workers"].values()}
            if len(pids) == 2 and not pids & killed:
                break
            time.sleep(0.05)
        y = c.scatter(np.ones(10))
        assert c.submit(np.sum, y).result(timeout=30) == 10


def test_scatter_shapes_and_put():
    with shoal.Client(n_workers=2) as c:
        fs = c.scatter([1, "two", np.arange(3)])
        assert isinstance(fs, list) and len(fs) == 3
        assert fs[1].result() == "two"
        d = c.scatter({"a": 1, "b": np.zeros(200_000)})
        assert d["a"].key == "a"
        assert c.submit(lambda a, b: a + b.size, d["a"], d["b"]).result() == 200_001
        # Same key again: the same future.
        assert c.scatter({"a": 5})["a"].result() == 1
        ref = shoal.put(np.arange(1_000_000))
        assert shoal.get(ref).sum() == np.arange(1_000_000).sum()
        with pytest.raises(TypeError, match="not a Future"):
            shoal.put(ref)


def test_bad_memory_limits_are_refused_clearly():
    with pytest.raises(ValueError, match="memory limit 'lots'"):
        shoal.Client(n_workers=1, memory_limit="lots")


def counted(path: str, i: int) -> np.ndarray:
    """Makes a 1 MiB array, recording each run in `path`."""
    with open(path, "a") as fh:
        fh.write(f"{i}\n")
    return np.full(MiB // 8, i, dtype=np.int64)


def runs(path) -> list[int]:
    with open(path) as fh:
        return sorted(int(x) for x in fh.read().split())


def test_retire_workers_hands_results_over_without_recomputing(tmp_path):
    log = str(tmp_path / "runs")
    with shoal.Client(n_workers=2) as c:
        xs = [c.submit(counted, log, i) for i in range(6)]
        shoal.wait(xs)
        held = {a: w["held"] for a, w in c.scheduler_info()["workers"].items()}
        assert all(n > 0 for n in held.values()), held
        gone = c.retire_workers(n=1)
        assert len(gone) == 1 and gone[0] not in c.scheduler_info()["workers"]
        assert [int(x.result()[0]) for x in xs] == list(range(6))
        assert c.submit(np.sum, xs[1]).result() == MiB // 8
        assert runs(log) == list(range(6)), "a retired worker's results were recomputed"
        with pytest.raises(ValueError, match="no such workers"):
            c.retire_workers(["nobody"])


def test_restart_cancels_futures_and_brings_fresh_workers(tmp_path):
    with shoal.Client(n_workers=2) as c:
        before = set(c.worker_pids)
        f = c.submit(time.sleep, 30)
        c.restart()
        assert not before & set(c.worker_pids)
        with pytest.raises(shoal.FutureCancelledError):
            f.result(timeout=10)
        assert c.submit(sum, [1, 2]).result(timeout=30) == 3


def constant(i: int) -> np.ndarray:
    return np.full(4 * MiB, float(i))  # 32 MiB that compress a thousandfold


def make_pair(seed: int) -> dict:
    return {"a": make(16 * MiB, seed), "b": make(16 * MiB, seed + 1000)}


def pair_digests(d: dict) -> tuple[str, str]:
    return digest_of(d["a"]), digest_of(d["b"])


def test_dicts_of_arrays_kept_as_objects_spill_and_read_back_bit_identical():
    limit = 256 * MiB
    with shoal.Client(n_workers=1, memory_limit=limit) as c:
        xs = [c.submit(make_pair, i) for i in range(16)]  # 512 MiB: twice the limit
        shoal.wait(xs)
        (pid,) = c.worker_pids
        assert dir_bytes(spill_dir(pid)) >= 16 * 32 * MiB - limit
        assert rss_anon(pid) < limit, "the worker is above its memory limit"
        want = [
            (digest_of(make(16 * MiB, i)), digest_of(make(16 * MiB, i + 1000))) for i in range(16)
        ]
        assert c.gather([c.submit(pair_digests, x) for x in xs]) == want
        assert pair_digests(xs[3].result()) == want[3]


def test_spilled_data_that_compresses_well_is_compressed_and_reads_back(monkeypatch):
    pytest.importorskip("lz4")
    monkeypatch.setenv("SHOAL_SPILL_COMPRESSION", "lz4")  # workers inherit it
    with shoal.Client(n_workers=1, memory_limit=200 * MiB) as c:
        xs = [c.submit(constant, i) for i in range(16)]  # 512 MiB
        shoal.wait(xs)
        pid = c.worker_pids[0]
        on_disk = dir_bytes(spill_dir(pid))
        assert 0 < on_disk < 16 * MiB, f"{on_disk / MiB:.1f} MiB on disk"
        # The heartbeat reports spilled bytes too (within a second or two).
        deadline = time.time() + 5
        while time.time() < deadline:
            (w,) = c.scheduler_info()["workers"].values()
            if w["spilled"] > 0:
                break
            time.sleep(0.1)
        assert 0 < w["spilled"] < 16 * MiB
        assert [float(x.result()[7]) for x in xs] == [float(i) for i in range(16)]
        assert c.submit(np.sum, xs[0]).result() == 0.0


# ------------------------------------------------ arrays born in shared memory

PAGE = 4096  # a shared-memory block's first page holds the frame's header


def fill(n_mib: int, value: float, delay: float) -> np.ndarray:
    time.sleep(delay)
    a = np.empty(n_mib * MiB // 8)
    a[:] = value
    return a


def wchar(pid: int) -> int:
    """Bytes process ``pid`` has passed to write calls (sockets included)."""
    with open(f"/proc/{pid}/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))


def mapped_input(a: np.ndarray, b: np.ndarray) -> tuple:
    """Runs on a worker: for the input mapped from the other worker, the
    offset of its data in the file mapped, the file's size, and its values."""
    (x,) = [x for x in (a, b) if is_mapped(x)]
    addr = x.__array_interface__["data"][0]
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= addr < hi:
                assert int(fields[2], 16) == 0, "segments are mapped whole"
                return addr - lo, os.path.getsize(fields[-1]), float(x.min()), float(x.max())
    raise AssertionError("input not in a mapping")


@pytest.mark.parametrize("allocator", ["on", "off"])
def test_a_large_array_is_made_in_shared_memory_and_exported_without_a_copy(monkeypatch, allocator):
    if allocator == "off":
        monkeypatch.setenv("SHOAL_SHM_ALLOC", "0")  # workers inherit it
    with shoal.Client(n_workers=2) as c:
        xs = [c.submit(fill, 64, i + 1, 0.3) for i in range(2)]  # one per worker
        shoal.wait(xs)
        pids = c.worker_pids
        before = {p: wchar(p) for p in pids}
        offset, size, lo, hi = c.submit(mapped_input, xs[0], xs[1]).result()
        written = sum(wchar(p) - before[p] for p in pids)
        assert lo == hi and lo in (1.0, 2.0)
        if allocator == "on":
            # The producer's own block, named: data one page in, nothing written.
            assert (offset, size) == (PAGE, PAGE + 64 * MiB)
            assert written < MiB, f"{written / MiB:.0f} MiB written exporting"
        else:
            # Copied into a new file: the frame's header just before the data.
            assert offset < PAGE and size == offset + 64 * MiB
            assert written >= 64 * MiB
        # The client maps it too.
        r = xs[0].result()
        assert is_mapped(r) and float(r.min()) == float(r.max()) == 1.0


def churn() -> tuple:
    """Runs on a worker: how its NumPy allocator treats freed, zeroed,
    resized and small arrays."""
    import numpy._core.multiarray as multiarray

    n = 4 * MiB // 8
    a = np.ones(n)
    first = a.__array_interface__["data"][0]
    del a
    b = np.zeros(n)  # the same block again, zeroed
    reused = b.__array_interface__["data"][0] == first
    zero = not b.any()
    c = np.arange(2 * MiB // 8, dtype=np.int64)
    c.resize(16 * MiB // 8, refcheck=False)  # larger than its block: moved
    kept = bool((c[: 2 * MiB // 8] == np.arange(2 * MiB // 8)).all()) and not c[-1]
    small = np.ones(10)
    handler = multiarray.get_handler_name(b)
    del b, c
    return reused, zero, kept, handler, small.sum(), _core.shm_allocator_stats()


def test_freed_shared_memory_blocks_are_reused_and_allocations_behave():
    with shoal.Client(n_workers=1) as c:
        reused, zero, kept, handler, small, stats = c.submit(churn).result()
        assert handler == "shoal_shm"
        assert reused and zero and kept and small == 10.0
        live, spare, allocs, n_reused = stats
        assert allocs >= 4 and n_reused >= 1
        assert live == 0 and spare > 0, "the task's arrays were freed into the pool"


_pinned: list = []


def churn_heap(n_mib: int) -> tuple[int, int]:
    """Fills the C heap with 64 KiB blocks (under glibc's mapping threshold)
    and frees all but every 16th: the kept ones hold each heap's free space
    between them, which glibc's own trimming (of a heap's top, or a whole
    heap) cannot return. The process's pid and private memory after."""
    blocks = [b"\x01" * (64 * 1024) for _ in range(n_mib * 16)]  # written, not calloc'd
    _pinned.extend(blocks[::16])
    del blocks
    return os.getpid(), rss_anon()


@pytest.mark.parametrize("trim", ["1", "0"])
def test_a_worker_idle_a_second_returns_the_heap_memory_its_tasks_freed(monkeypatch, trim):
    monkeypatch.setenv("SHOAL_MALLOC_TRIM", trim)
    with shoal.Client(n_workers=1) as c:
        pid, freed = c.submit(churn_heap, 256, pure=False).result()
        time.sleep(2.5)  # idle: past the executor's 1 s wait for work
        now = rss_anon(pid)
    if trim == "1":
        assert freed - now > 128 * MiB, (freed, now)
    else:  # switched off: glibc keeps what it may
        assert freed - now < 64 * MiB, (freed, now)


def filled(n_mib: int, value: float) -> np.ndarray:
    return np.full(n_mib * MiB // 8, value)


def pool_stats() -> tuple | None:
    return _core.shm_allocator_stats()


def test_a_fetched_result_s_block_is_reused_once_released_and_never_under_a_reader():
    with shoal.Client(n_workers=1) as c:
        # Fetched by the client (published, mapped here), then released: the
        # client's array still reads the block.
        kept = c.submit(filled, 8, -1.0).result()
        assert is_mapped(kept)
        allocs0, reused0 = c.submit(pool_stats).result()[2:]
        for v in range(20):
            r = c.submit(filled, 8, float(v)).result()
            assert is_mapped(r) and r[0] == r[-1] == v
        allocs, reused = c.submit(pool_stats).result()[2:]
        # Blocks the client let go of were taken back and named again...
        assert reused - reused0 >= 15, (allocs - allocs0, reused - reused0)
        # ...but never the one it still reads.
        assert float(kept.min()) == float(kept.max()) == -1.0
        del kept, r


def frame(n: int, with_objects: bool):
    import pandas as pd

    df = pd.DataFrame({"a": np.arange(n), "b": np.ones(n)})
    if with_objects:
        df["c"] = [str(i) for i in range(n)]
        df["c"] = df["c"].astype(object)
    return df


def files_written() -> int:
    """Runs on a worker: how many results its store has written to files."""
    from shoal import _context

    return len(_context.executor.store.files)


def test_a_large_dataframe_result_waits_to_be_pickled_like_an_array():
    pd = pytest.importorskip("pandas")
    with shoal.Client(n_workers=1) as c:
        f = c.submit(frame, 1_000_000, False)  # 16 MB of numbers
        # Its consumer here takes the object itself: nothing pickled.
        total = c.submit(lambda df: float(df.a.sum() + df.b.sum()), f).result()
        assert total == 1_000_000 * 999_999 / 2 + 1_000_000
        assert c.submit(files_written, pure=False).result() == 0
        # Fetched by the client: written once, then, and read back whole.
        pd.testing.assert_frame_equal(f.result(), frame(1_000_000, False))
        assert c.submit(files_written, pure=False).result() == 1
        # A column of Python objects may not pickle: pickled at once, so
        # that a failure is the task's own error.
        g = c.submit(frame, 200_000, True)
        shoal.wait([g])
        assert c.submit(files_written, pure=False).result() == 2
        pd.testing.assert_frame_equal(g.result(), frame(200_000, True))


def test_a_frame_is_sized_as_pandas_sizes_it_and_one_holding_objects_not_at_all():
    pd = pytest.importorskip("pandas")
    from shoal._worker import _frame_size

    n = 100_000
    frames = [
        pd.DataFrame({"a": np.arange(n), "b": np.ones(n)}),  # one block per dtype
        pd.DataFrame({"t": pd.date_range("2020", periods=n, tz="UTC")}),  # extension
        pd.DataFrame({"c": pd.Categorical(["x", "y"] * (n // 2))}),
        pd.DataFrame({"a": np.arange(n)}, index=np.arange(n) * 2),
        pd.DataFrame({"a": np.arange(n), "b": np.ones(n)})[["b"]],  # a view's block
    ]
    for df in frames:
        assert _frame_size(df) == int(df.memory_usage(index=True, deep=False).sum())
    objects = pd.Series([object()] * n, dtype=object)
    assert _frame_size(pd.DataFrame({"a": np.arange(n), "o": objects})) is None
    assert _frame_size(pd.DataFrame({"a": np.arange(n)}, index=pd.Index(objects))) is None
    assert _frame_size(pd.DataFrame({"a": np.arange(10)})) is None  # pickled inline


def frame_groups(n: int, with_objects: bool, kind: type = dict) -> dict:
    """A Dask shuffle's group task's result: a frame's pieces by partition."""
    df = frame(n, with_objects)
    return kind({i: df.iloc[i::4] for i in range(4)})


def shuffle_group_result() -> type:
    """The dict subclass Dask's tasks shuffle returns its groups in."""
    pytest.importorskip("dask.dataframe")
    from dask.dataframe.backends import ShuffleGroupResult

    return ShuffleGroupResult


@pytest.mark.parametrize("kind", ["dict", "dask"])
def test_a_dict_of_frames_waits_to_be_pickled_as_its_frames_do(kind):
    pd = pytest.importorskip("pandas")
    cls = dict if kind == "dict" else shuffle_group_result()
    with shoal.Client(n_workers=1) as c:
        g = c.submit(frame_groups, 1_000_000, False, cls)
        # Its consumers here take their piece from the object: nothing pickled.
        rows = [c.submit(lambda d, i: len(d[i]), g, i) for i in range(4)]
        assert [r.result() for r in rows] == [250_000] * 4
        assert c.submit(files_written, pure=False).result() == 0
        # Fetched by the client: written once, then, and read back whole.
        got = g.result()
        assert type(got) is cls and sorted(got) == [0, 1, 2, 3]
        for i, piece in frame_groups(1_000_000, False).items():
            pd.testing.assert_frame_equal(got[i], piece)
        assert c.submit(files_written, pure=False).result() == 1
        # A piece of Python objects may not pickle: pickled at once.
        h = c.submit(frame_groups, 200_000, True, cls)
        shoal.wait([h])
        assert c.submit(files_written, pure=False).result() == 2
        pd.testing.assert_frame_equal(h.result()[3], frame_groups(200_000, True)[3])


def test_a_container_is_sized_by_its_array_likes_and_anything_else_not_at_all():
    pd = pytest.importorskip("pandas")
    from shoal._worker import _buffer_size

    a = np.ones(100_000)
    df = pd.DataFrame({"a": np.arange(10_000)})  # each piece small, together not
    assert _buffer_size({0: a, 1: a[:10]}) == a.nbytes + 80
    assert _buffer_size((a, a)) == 2 * a.nbytes
    assert _buffer_size([df] * 10) == 10 * int(df.memory_usage(index=True).sum())
    assert _buffer_size({"x": a, "y": pd.Series(np.ones(10))}) == a.nbytes + 80
    assert _buffer_size((a[:10], a[:10])) is None  # small: pickled inline
    assert _buffer_size((a, object())) is None  # may not pickle
    assert _buffer_size((a, np.array([object()] * 10))) is None
    assert _buffer_size({(0, 1): a}) is None  # a key of anything else
    assert _buffer_size(((a,), a)) is None  # one level only
    assert _buffer_size([a] * 1000) is None  # too many items to add up
    assert _buffer_size(()) is None
    # Dask's shuffle groups (a dict subclass with nothing else to pickle).
    groups = shuffle_group_result()({0: a, 1: df})
    assert _buffer_size(groups) == a.nbytes + int(df.memory_usage(index=True).sum())
    groups.tag = "state of its own"  # may not pickle as the items do
    assert _buffer_size(groups) is None
    assert _buffer_size(Tagged({0: a})) is None  # a subclass of anyone else's


class Tagged(dict):
    """A dict with more than its items to pickle."""

    def __init__(self, *args):
        super().__init__(*args)
        self.lock = threading.Lock()


G: list = []


def shared_results(kind: str):
    big = np.arange(3 * MiB, dtype=np.int64)  # 24 MiB
    if kind == "view":
        return big[100:]  # inside the block, not at its start
    if kind == "pair":
        return big, big[::-1].copy()  # two buffers: copied into one frame
    if kind == "same-twice":
        return big, big  # one buffer, pickled once
    if kind == "global":
        if not G:
            G.append(big)
        return G[0]  # two results, one block: the second export copies
    raise ValueError(kind)


def test_results_in_shared_memory_blocks_of_every_shape_read_back():
    want = np.arange(3 * MiB, dtype=np.int64)
    with shoal.Client(n_workers=1) as c:
        view, pair, same, g1, g2 = [
            c.submit(shared_results, k) for k in ("view", "pair", "same-twice", "global", "global")
        ]
        assert np.array_equal(view.result(), want[100:])
        a, b = pair.result()
        assert np.array_equal(a, want) and np.array_equal(b, want[::-1])
        x, y = same.result()
        assert x is y and np.array_equal(x, want)
        assert np.array_equal(g1.result(), want) and np.array_equal(g2.result(), want)
        # A peer on this host reads them from the files too.
        assert c.submit(lambda v, p: int(v[-1] + p[1][0]), view, pair).result() == 2 * (3 * MiB - 1)


def fork_and_write() -> tuple:
    """Runs on a worker: a forked child writes into an inherited array (in
    a shared-memory block) and reports what it read first."""
    a = np.full(2 * MiB, 1.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        seen = a[0]
        a[:] = 2.0
        os.write(w, b"%d" % (seen + a[1]))
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    child = int(os.read(r, 16))
    os.close(r)
    return status, child, float(a.min()), float(a.max())


def test_a_child_forked_in_a_task_writes_its_own_copy_of_shared_memory_arrays():
    with shoal.Client(n_workers=1) as c:
        assert c.submit(fork_and_write).result() == (0, 3, 1.0, 1.0)


def mapped_and_sum(a) -> tuple:
    return is_mapped(a), float(np.asarray(a).sum())


def test_large_arguments_travel_beside_their_task_and_are_mapped():
    """A large array argument is put on the cluster beside its task (shared
    memory), not pickled into it: the task maps it. Data NumPy cannot hand
    out of band (a broadcast view) is put whole; before, an argument over
    the message limit could not be sent at all."""
    import dask.array as da

    x = np.arange(1_000_000, dtype=np.float64)  # 8 MB
    with shoal.Client(n_workers=2) as c:
        assert c.submit(mapped_and_sum, x).result(timeout=60) == (True, x.sum())
        assert c.gather(c.map(mapped_and_sum, [x, x])) == [(True, x.sum())] * 2
        small = c.submit(mapped_and_sum, x[:10]).result(timeout=60)
        assert small == (False, x[:10].sum()), "small arguments stay in the task"
        broadcast = np.broadcast_to(1.0, (2**22,))  # 32 MiB pickled, in band
        assert c.submit(mapped_and_sum, broadcast).result(timeout=60)[1] == 2**22
        # Dask graphs embed arrays (from_array): the same.
        y = da.from_array(x, chunks=250_000)
        assert float((y + 1).sum().compute()) == x.sum() + x.size
        # Column chunks are not contiguous (pickle would copy them in band):
        # each is written once into shared memory and mapped by its task.
        x2 = np.random.default_rng(0).random((1000, 2000))
        z = da.from_array(x2, chunks=(1000, 500))
        assert np.array_equal(z.compute(), x2)
        where = z.map_blocks(lambda b: np.full((1, 1), is_mapped(b)), chunks=(1, 1))
        assert where.compute().all(), "a column chunk was copied into its task"
        # Once the tasks are done, the puts go with them.
        wait_for(lambda: c.scheduler_info()["tasks"] == 0, 20, "the puts to be released")


def big_bytes(kind: str):
    data = bytes(range(256)) * (32 * 1024)  # 8 MiB
    return {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data)}[kind]


def test_large_bytes_results_travel_out_of_band():
    """bytes, bytearray and memoryview results keep their types and values;
    their data is written once to shared memory (out of band, not inside a
    pickle), and a memoryview reaches the client as a view of the mapped
    file."""
    want = bytes(range(256)) * (32 * 1024)
    with shoal.Client(n_workers=1) as c:
        for kind in ("bytes", "bytearray", "memoryview"):
            got = c.submit(big_bytes, kind).result(timeout=60)
            assert type(got).__name__ == kind and bytes(got) == want
        view = c.submit(big_bytes, "memoryview").result(timeout=60)
        assert isinstance(view.obj, MAPPED), "the memoryview was copied"
