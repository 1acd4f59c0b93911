"""Type stubs for the private extension module ``shoal._core`` (Rust, PyO3)."""

__version__: str
PROTOCOL_VERSION: int
INLINE_LIMIT: int

class ShoalError(Exception): ...
class SchedulerLostError(ShoalError): ...

class Cluster:
    """Embedded scheduler plus supervised worker processes."""

    address: str
    def __init__(
        self, n_workers: int, program: str, args: list[str], env: list[tuple[str, str]]
    ) -> None: ...
    def worker_pids(self) -> list[int]: ...
    def close(self) -> None: ...

class Watcher:
    def add(self, ids: list[int]) -> None: ...
    def next(self, timeout: float | None = None) -> list[int]: ...
    def pending(self) -> int: ...

class ClientCore:
    def __init__(self, address: str) -> None: ...
    @property
    def id(self) -> int: ...
    def submit(
        self,
        group: str,
        key: str | None,
        batch: bool,
        func: bytes,
        args: bytes,
        deps: list[int],
        priority: int,
        retries: int,
        resources: list[tuple[str, float]] = ...,
    ) -> int: ...
    def submit_many(
        self,
        group: str,
        batch: bool,
        func: bytes,
        items: list[tuple[bytes, list[int]]],
        priority: int,
        retries: int,
        resources: list[tuple[str, float]] = ...,
    ) -> list[int]: ...
    def new_ids(self, n: int) -> int: ...
    def submit_graph(
        self,
        func: bytes,
        items: list[tuple[int, str, str | None, bytes, list[int], int]],
        retries: int,
        resources: list[tuple[str, float]] = ...,
    ) -> None: ...
    def release(self, ids: list[int]) -> None: ...
    def cancel(self, ids: list[int]) -> None: ...
    def withdraw(self, resource: str) -> None: ...
    def expect(self, resource: str) -> None: ...
    def status(self, id: int) -> int: ...
    def wait(self, ids: list[int], count: int, timeout: float | None = None) -> int: ...
    def outcome(self, id: int) -> tuple[int, object, object]: ...
    def watcher(self) -> Watcher: ...
    def closed_reason(self) -> str | None: ...

class WorkerCore:
    def __init__(
        self,
        address: str,
        nthreads: int,
        name: str,
        resources: list[tuple[str, float]] = ...,
    ) -> None: ...
    @property
    def id(self) -> int: ...
    def next_batch(
        self,
        done: list[tuple[int, bool, bytes | None, int, int]],
        max: int,
        timeout: float,
    ) -> (
        tuple[
            list[
                tuple[
                    int,
                    str,
                    bool,
                    bytes,
                    bytes,
                    list[tuple[int, bytes | None]],
                    str | None,
                    list[tuple[str, float]] | None,
                ]
            ],
            list[int],
        ]
        | None
    ): ...
    def pickle_requests(self, timeout: float) -> list[int]: ...
    def set_threads(self, n: int) -> None: ...
    def report(self, done: list[tuple[int, bool, bytes | None, int, int]]) -> None: ...
    def put_pickled(self, id: int, value: bytes | None) -> None: ...

def cli_main(
    argv: list[str], python: str | None = None, package_path: str | None = None
) -> int: ...
