"""pytest plugin: one cluster as every named Dask scheduler.

    python -m pytest -p dask_plugin --runner shoal|distributed --pyargs dask.tests.test_delayed

(with ``tests/dropin`` on ``PYTHONPATH``). Every name Dask knows ("sync",
"threads", "processes", ...) and the default scheduler become the cluster's
``get``, so Dask's own tests run their computations there.
"""

from __future__ import annotations

from typing import Any

_client: Any = None


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--runner", default="shoal", choices=["shoal", "distributed"])


def pytest_configure(config: Any) -> None:
    global _client
    import dask
    import dask.base

    runner = config.getoption("--runner")
    if runner == "shoal":
        import shoal

        _client = shoal.Client(n_workers=2)
    else:
        from distributed import Client, LocalCluster

        _client = Client(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None))
    for name in list(dask.base.named_schedulers):
        dask.base.named_schedulers[name] = _client.get
    dask.config.set(scheduler=_client.get)


def pytest_unconfigure(config: Any) -> None:
    if _client is not None:
        _client.close()
