"""Dask's front door: LocalCluster, client.cluster, processes=False,
persisted collections used again, and the rest of distributed's surface
(docs/coming-from-dask.md). Each test is how Dask's documentation and
example notebooks use the feature."""

import os
import time

import pytest

import shoal
from shoal import Client, LocalCluster


def inc(x):
    return x + 1


def slow(x):
    time.sleep(0.2)
    return x


def pid(_=None):
    return os.getpid()


def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_threads_in_the_clients_process_as_in_dasks_array_notebook():
    da = pytest.importorskip("dask.array")
    client = Client(processes=False, threads_per_worker=4, n_workers=1, memory_limit="2GB")
    try:
        assert isinstance(client.cluster, LocalCluster) and not client.cluster.processes
        # Tasks run in this very process, on the worker's four threads.
        assert client.submit(pid).result(timeout=30) == os.getpid()
        (w,) = client.scheduler_info()["workers"].values()
        assert w["nthreads"] == 4 and w["pid"] == os.getpid()
        until(lambda: next(iter(client.scheduler_info()["workers"].values()))["memory_limit"])
        (w,) = client.scheduler_info()["workers"].values()
        assert w["memory_limit"] == 2_000_000_000
        x = da.random.random((2000, 2000), chunks=(500, 500))
        y = (x + x.T).persist()
        assert float(y[0, 0].compute()) == pytest.approx(2 * float(x[0, 0].compute()))
        assert float(y.sum().compute()) == pytest.approx(float((x + x.T).sum().compute()))
        with pytest.raises(RuntimeError, match="processes=True"):
            client.restart()
        # get_worker() inside a task, ValueError outside, as in Dask.
        view = client.submit(lambda: shoal.get_worker()).result(timeout=30)
        assert view.pid == os.getpid() and view.nthreads == 4
        with pytest.raises(ValueError, match="inside a task"):
            shoal.get_worker()
    finally:
        client.close()
    # The workers' threads end with the cluster; this process goes on.
    assert client.cluster._closed
    with Client(processes=False, n_workers=1, threads_per_worker=2) as again:
        assert again.submit(inc, 1).result(timeout=30) == 2


def test_local_cluster_then_client_as_in_dasks_documentation():
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=400e6) as cluster:
        with Client(cluster) as client:
            assert client.cluster is cluster
            assert client.submit(inc, 1).result(timeout=30) == 2
            # Right after start the workers are there, with their pids
            # (Dask's resilience notebook reads them).
            workers = cluster.scheduler.workers
            assert len(workers) == 2
            pids = {w.pid for w in workers.values()}
            assert pids == set(cluster.worker_pids) and os.getpid() not in pids
            # (Memory figures come with each worker's heartbeat, every second.)
            until(lambda: all(w.memory_limit for w in cluster.workers.values()))
            assert all(w.memory_limit == 400_000_000 for w in cluster.workers.values())
            assert cluster.scheduler_address == client.scheduler_address
            assert "token=" in cluster.dashboard_link
            assert "LocalCluster" in repr(cluster) and "workers=2" in repr(cluster)
            html = cluster._repr_html_()
            assert "2 (2 threads)" in html and "<a href=" in html
            client.cluster.scale(3)
            until(lambda: len(cluster.workers) == 3)
            fs = client.map(slow, range(6), batch_size=1)
            assert client.gather(fs) == list(range(6))
            kept = client.submit(inc, 41)
            assert kept.result(timeout=30) == 42
            cluster.scale(1)  # retires the newest two, handing their data over
            until(lambda: len(cluster.scheduler_info()["workers"]) == 1)
            assert kept.result(timeout=30) == 42
            assert client.submit(inc, 1).result(timeout=30) == 2
            time.sleep(0.5)  # not replaced: scaled down
            assert len(cluster.worker_pids) == 1
    assert cluster.workers == {} and "closed" in repr(cluster)


def test_client_cluster_of_the_embedded_cluster_scales():
    with Client(n_workers=1) as client:
        assert isinstance(client.cluster, LocalCluster)
        client.cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        assert len(client.worker_pids) == 2
        # A client of an address has no cluster object, as in Dask.
        with Client(client.scheduler_address) as other:
            assert other.cluster is None
            assert other.submit(inc, 1).result(timeout=30) == 2


def test_adapt_grows_with_work_and_shrinks_after():
    with LocalCluster(n_workers=0, threads_per_worker=1) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=2, interval=0.1, wait_count=3)
        fs = client.map(slow, range(20), batch_size=1)
        until(lambda: len(cluster.scheduler_info()["workers"]) == 2)
        assert client.gather(fs) == list(range(20))
        del fs
        until(lambda: len(cluster.scheduler_info()["workers"]) == 0)
        cluster.scale(1)  # scale() takes over from adapt
        assert client.submit(inc, 1).result(timeout=30) == 2
        time.sleep(0.5)
        assert len(cluster.scheduler_info()["workers"]) == 1


def test_bad_cluster_arguments_say_what_to_do(client):
    with pytest.raises(ValueError, match="synchronous"):
        LocalCluster(asynchronous=True)
    with pytest.raises(ValueError, match="shoal scheduler"):
        LocalCluster(host="0.0.0.0")
    with pytest.raises(TypeError, match="bogus"):
        LocalCluster(bogus=1)
    with pytest.raises(ValueError, match="memory limit"):
        LocalCluster(memory_limit="lots")
    with pytest.raises(ValueError, match="threads_per_worker"):
        Client(processes=False, threads_per_worker=0)
    with pytest.raises(TypeError, match="cluster"):
        Client(object())
    with LocalCluster(n_workers=1) as cluster:
        with pytest.raises(ValueError, match="number of workers"):
            cluster.scale(-1)
        with pytest.raises(ValueError, match="minimum"):
            cluster.adapt(minimum=3, maximum=1)
    assert client.submit(inc, 1).result(timeout=30) == 2  # the rest goes on


def test_every_cluster_has_the_same_methods():
    for cls in (LocalCluster, shoal.SLURMCluster, shoal.PBSCluster):
        for name in (
            "scale",
            "adapt",
            "close",
            "workers",
            "scheduler",
            "scheduler_info",
            "dashboard_link",
            "wait_for_workers",
            "get_client",
            "_repr_html_",
            "__enter__",
        ):
            assert hasattr(cls, name), (cls, name)


def test_persisted_collections_are_used_again(client):
    dask = pytest.importorskip("dask")
    dd = pytest.importorskip("dask.dataframe")
    import dask.bag as db
    import pandas as pd
    from dask.base import tokenize

    pdf = pd.DataFrame({"name": list("abcab") * 40, "x": range(200)})
    df = dd.from_pandas(pdf, npartitions=4).persist()
    # Dask's TokenizationError before: every expression tokenizes the futures.
    assert df.groupby("name").x.sum().compute().to_dict() == pdf.groupby("name").x.sum().to_dict()
    assert len(df.loc[10:19].compute()) == 10
    by = df.set_index("name").persist()
    assert len(by.loc["a"].compute()) == 80
    assert len(shoal.futures_of(by)) >= 1
    assert tokenize(df) == tokenize(df)  # deterministic, as Dask asks
    b = db.from_sequence(range(100), npartitions=5).persist()
    assert b.map(inc).sum().compute() == 5050
    d = dask.delayed(sum)([1, 2, 3]).persist()
    assert (d + 1).compute() == 7
    f = client.submit(inc, 1)
    assert tokenize(f) == tokenize(f) and tokenize(f) != tokenize(client.submit(inc, 1))


def add_through_worker_client(n):
    with shoal.worker_client() as c:
        return c.submit(inc, n).result() + 1


def test_worker_client_and_print_from_tasks(client):
    assert client.submit(add_through_worker_client, 1).result(timeout=30) == 3
    with pytest.raises(ValueError, match="inside a task"):
        with shoal.worker_client():
            pass

    def shout():
        shoal.print("hello from a task")
        shoal.warn("careful")
        return 1

    assert client.submit(shout).result(timeout=30) == 1
    lines = [line for ls in client.get_worker_logs().values() for line in ls]
    assert any("hello from a task" in line for line in lines)
    assert any("careful" in line for line in lines)
    assert client.status == "running" and client.id.startswith("Client-")
    assert sum(client.nthreads().values()) == 2


def test_distributed_names_shoal_does_otherwise_say_how(client):
    with pytest.raises(NotImplementedError, match="actor"):
        shoal.Lock("x")
    with pytest.raises(NotImplementedError, match="resources"):
        shoal.Semaphore(max_leases=2)
    from shoal import Variable

    with pytest.raises(NotImplementedError, match="shoal.Variable"):
        Variable("x")
    with pytest.raises(AttributeError, match="preload"):
        client.run(os.getpid)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        client.nonsense  # noqa: B018
