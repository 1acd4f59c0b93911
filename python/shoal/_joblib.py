"""joblib on Shoal: ``with joblib.parallel_config(backend="shoal"):``.

Registered with joblib when joblib is imported (``import shoal`` does not
import joblib). The backend uses ``shoal.getdefault_client()``, or starts an
embedded cluster on first use and keeps it for later ``Parallel`` calls.
Batches follow joblib's auto-batching (``AutoBatchingMixin``): joblib groups
calls until a batch takes a fraction of a second, so per-task overhead stays
hidden.
"""

from __future__ import annotations

from typing import Any

from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from ._waiting import _LendThread
from .client import Client, Future, default_client


class ShoalBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend running each batch of calls as one Shoal task."""

    supports_retrieve_callback = True
    supports_timeout = True  # type: ignore[assignment]
    supports_return_generator = True  # type: ignore[assignment]
    default_n_jobs = -1

    def __init__(self, client: Client | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._given = client
        self.client: Client | None = None
        self._futures: set[Future] = set()

    def configure(self, n_jobs: int = 1, parallel: Any = None, **kwargs: Any) -> int:
        self.client = self._given or default_client()
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is not None and n_jobs > 0:
            return n_jobs
        total = (self.client or self._given or default_client())._session.nthreads
        # -1: every worker thread; -2: all but one; ...
        return max(1, total + 1 + n_jobs) if n_jobs is not None and n_jobs < -1 else total

    def start_call(self) -> None:
        # A Parallel call inside a task waits for its own tasks (joblib polls
        # its callbacks instead of blocking in result()): lend the thread.
        self._lent = _LendThread()
        self._lent.__enter__()

    def stop_call(self) -> None:
        lent = getattr(self, "_lent", None)
        if lent is not None:
            self._lent = None
            lent.__exit__(None, None, None)

    def submit(self, func: Any, callback: Any = None) -> Future:
        assert self.client is not None, "configure() runs first"
        f = self.client.submit(func)
        self._futures.add(f)
        f.add_done_callback(self._futures.discard)
        if callback is not None:
            f.add_done_callback(callback)
        return f

    def retrieve_result_callback(self, out: Future) -> Any:
        return out.result()

    def retrieve_result(self, out: Future, timeout: float | None = None) -> Any:
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        futures, self._futures = list(self._futures), set()
        if futures and self.client is not None and not self.client._session.closed:
            self.client.cancel(futures)

    def get_nested_backend(self) -> Any:
        # On a worker, nested Parallel calls run in that task's thread.
        from joblib._parallel_backends import SequentialBackend

        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register() -> None:
    from joblib import register_parallel_backend

    register_parallel_backend("shoal", ShoalBackend)
