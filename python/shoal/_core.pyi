"""Type stubs for the private extension module ``shoal._core`` (Rust, PyO3)."""

from collections.abc import Iterator
from typing import Any, Literal, Self, final

from typing_extensions import disjoint_base

__version__: str
PROTOCOL_VERSION: int
INLINE_LIMIT: int
EXIT_STOPPED: int
EXIT_REFUSED: int
EXIT_SCHEDULER_SILENT: int

# (id, ok, payload, start_us, duration_us, size); a failure's payload is
# (pickled error, error text). A tuple, not a class: one is made per task on
# the hot path, where a NamedTuple costs 140 ns more (7 times a tuple's).
_Done = tuple[int, bool, bytes | str | tuple[bytes, str] | None, int, int, int]

# A task for an execution thread: (id, name, group, kind (0 call, 1 batch,
# 3 a batch run again after its worker died, saying which element runs,
# 2 command), pickled function, pickled arguments (a command: the encoded
# command), inputs [(id, bytes, a mapped file, or None: held here)],
# resources or None, time limit in seconds or None, job id or 0, what earlier
# runs of a careful batch did or None). A tuple
# for the reason given above.
_Order = tuple[
    int,
    str,
    str,
    int,
    bytes,
    bytes,
    list[tuple[int, bytearray | Mapped | Frame | str | None]],
    list[tuple[str, float]] | None,
    float | None,
    int,
    list[bytes] | None,
]

@disjoint_base
class Outcome:
    """How a task ended, as ``ClientCore.outcome`` tells it: one class per
    kind, matched by ``_results.py``."""
    @final
    class Pending(Outcome):
        """Not finished, released, or its result moved: wait and ask again."""

        __match_args__ = ()
        def __new__(cls) -> Self: ...

    @final
    class Value(Outcome):
        """Its pickled result: a bytearray, or a mapping of a file on this
        host (None: the client already has it unpickled)."""

        __match_args__ = ("data",)
        def __new__(cls, data: object) -> Self: ...
        @property
        def data(self) -> object: ...

    @final
    class Raised(Outcome):
        """It (or its input ``cause``) raised; ``error`` is the pickled
        ``(exception, traceback text)``."""

        __match_args__ = (
            "cause",
            "error",
        )
        def __new__(cls, cause: str, error: bytes) -> Self: ...
        @property
        def cause(self) -> str: ...
        @property
        def error(self) -> bytes: ...

    @final
    class Killed(Outcome):
        """It was running on workers that died, ``kills`` times."""

        __match_args__ = (
            "cause",
            "kills",
        )
        def __new__(cls, cause: str, kills: int) -> Self: ...
        @property
        def cause(self) -> str: ...
        @property
        def kills(self) -> int: ...

    @final
    class Cancelled(Outcome):
        """It, or its input ``cause``, was cancelled."""

        __match_args__ = ("cause",)
        def __new__(cls, cause: str) -> Self: ...
        @property
        def cause(self) -> str: ...

    @final
    class Missing(Outcome):
        """It takes a task the scheduler does not know (``dep``, its id)."""

        __match_args__ = ("dep",)
        def __new__(cls, dep: int) -> Self: ...
        @property
        def dep(self) -> int: ...

    @final
    class Lost(Outcome):
        """Scattered data it needs (``cause``) was lost with its worker."""

        __match_args__ = ("cause",)
        def __new__(cls, cause: str) -> Self: ...
        @property
        def cause(self) -> str: ...

    @final
    class Cycle(Outcome):
        """Its inputs lead back to ``cause``."""

        __match_args__ = ("cause",)
        def __new__(cls, cause: str) -> Self: ...
        @property
        def cause(self) -> str: ...

    @final
    class Unsatisfiable(Outcome):
        """No worker can give it the resources it asks for."""

        __match_args__ = (
            "cause",
            "detail",
        )
        def __new__(cls, cause: str, detail: str) -> Self: ...
        @property
        def cause(self) -> str: ...
        @property
        def detail(self) -> str: ...

    @final
    class Unreachable(Outcome):
        """Its result is held by a worker this client cannot reach."""

        __match_args__ = (
            "address",
            "detail",
        )
        def __new__(cls, address: str, detail: str) -> Self: ...
        @property
        def address(self) -> str: ...
        @property
        def detail(self) -> str: ...

class ShoalError(Exception): ...
class SchedulerLostError(ShoalError): ...

@final
class Cluster:
    """Embedded scheduler plus supervised worker processes."""

    address: str
    token: str
    dashboard: str | None
    def __new__(
        cls,
        n_workers: int,
        program: str,
        args: list[str],
        env: list[tuple[str, str]],
        dashboard: str | None = None,
        zygote: tuple[int, int] | None = None,
    ) -> Self: ...
    def scale(self, n: int) -> list[int]: ...
    def target(self) -> int: ...
    def failure(self) -> str | None: ...
    def worker_pids(self) -> list[int]: ...
    def close(self) -> None: ...

@final
class Watcher:
    def add(self, ids: list[int]) -> None: ...
    def next(self, timeout: float | None = None) -> list[int]: ...
    def pending(self) -> int: ...

@final
class RefCounts:
    """Live futures per task (``Client._refs``): 4 bytes a task for the
    client's own ids."""

    def __new__(cls, client_id: int) -> Self: ...
    def incref(self, id: int, n: int) -> None: ...
    def incref_many(self, ids: list[int]) -> None: ...
    def decref(self, id: int) -> bool: ...
    def __contains__(self, id: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def ids(self) -> list[int]: ...
    def __iter__(self) -> Iterator[int]: ...

@final
class ClientCore:
    def __new__(cls, address: str, token: str | None, reconnect: float | None = None) -> Self: ...
    def close(self) -> None: ...
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
        recompute: bool = True,
        time_limit_ms: int = 0,
        time_request_ms: int = 0,
        crash_limit: int = 0,
    ) -> int: ...
    def submit_command(
        self,
        group: str,
        key: str | None,
        argv: list[str],
        env: list[tuple[str, str]],
        cwd: str | None,
        stdout: tuple[int, str],
        stderr: tuple[int, str],
        deps: list[int],
        priority: int,
        retries: int,
        resources: list[tuple[str, float]],
        time_limit_ms: int,
        time_request_ms: int = 0,
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
        time_limit_ms: int = 0,
    ) -> list[int]: ...
    def new_ids(self, n: int) -> int: ...
    def submit_graph(
        self,
        func: bytes,
        items: list[tuple[int, str, str | None, bytes, list[int], int, bytes | None]],
        retries: int,
        resources: list[tuple[str, float]] = ...,
    ) -> None: ...
    def release(self, ids: list[int]) -> None: ...
    def cancel(self, ids: list[int]) -> None: ...
    def cancel_queued(self, ids: list[int]) -> None: ...
    def name(self, name: str, value: str | None = None, timeout: float = 10.0) -> str: ...
    def unname(self, name: str) -> None: ...
    def detach(self, ids: list[int]) -> None: ...
    def adopt(self, ids: list[int]) -> None: ...
    def hold(self, by: int, tasks: list[int]) -> None: ...
    def withdraw(self, resource: str) -> None: ...
    def expect(self, resource: str) -> None: ...
    def status(self, id: int) -> Literal["pending", "finished", "error", "released"]: ...
    def wait(self, ids: list[int], count: int, timeout: float | None = None) -> int: ...
    def outcome(self, id: int, timeout: float | None = None) -> Outcome: ...
    def watcher(self) -> Watcher: ...
    def closed_reason(self) -> str | None: ...
    def cluster_info(self, timeout: float) -> dict[str, Any]: ...
    def query(self, path: str, timeout: float) -> str: ...
    def retire(self, workers: list[str]) -> None: ...
    def restart(self) -> None: ...

@final
class WorkerCore:
    def __new__(
        cls,
        address: str,
        nthreads: int,
        name: str,
        token: str,
        resources: list[tuple[str, float]] = ...,
        in_process: bool = False,
    ) -> Self: ...
    @property
    def id(self) -> int: ...
    def next_batch(
        self,
        done: list[_Done],
        max: int,
        timeout: float,
        lane: int,
    ) -> tuple[list[_Order], list[int]] | Literal["shutdown", "retire"]: ...
    def pickle_requests(self, timeout: float) -> tuple[list[int], list[int]]: ...
    def put_frames(self, items: list[tuple[int, list[Any] | None]]) -> None: ...
    def slot_item(self, lane: int, item: int) -> None: ...
    def batch_progress(self, id: int, start: int, count: int, values: bytes) -> None: ...
    def lend_thread(self) -> None: ...
    def reclaim_thread(self) -> None: ...
    def put_stored(self, id: int, file: tuple[str, int] | None) -> None: ...
    def put_stored_many(self, items: list[tuple[int, tuple[str, int] | None]]) -> None: ...
    def put_unpicklable(self, id: int, why: str) -> None: ...
    def set_paused(self, paused: bool) -> None: ...
    def retire(self) -> None: ...
    def pin(self, id: int) -> None: ...
    def run_command(
        self,
        id: int,
        args: bytes,
        job: int,
        cpus: int,
        extra_env: list[tuple[str, str]],
        time_limit: float | None = None,
    ) -> tuple[str, int, bytes | None, bytes | None, str, bool, list[str]]: ...
    def stop_requests(self, timeout: float) -> list[int]: ...
    def kill_commands(self) -> None: ...
    def report_stuck(self, done: _Done, lane: int) -> None: ...
    @property
    def stop_grace(self) -> float: ...
    @staticmethod
    def signal_name(sig: int) -> str: ...
    def stored_file(self, id: int) -> tuple[str, int] | None: ...
    def set_metrics(
        self,
        memory: int,
        managed: int,
        spilled: int,
        limit: int,
        paused: bool,
        spilled_total: int = 0,
    ) -> None: ...
    def record_activity(
        self, kind: str, task: int, bytes: int, start_us: int, duration_us: int
    ) -> None: ...
    def add_profile(self, samples: list[tuple[str, str, int]]) -> None: ...
    def set_sampler(self, on: bool) -> None: ...
    def sync_epoch(self) -> int: ...
    def synced(self) -> None: ...
    def sampler_sleep(self, secs: float) -> None: ...
    def ticks(self) -> int: ...

def dashboard_token(token: str) -> str: ...
def dashboard_asset(name: str) -> str: ...
def log_line(line: str) -> None: ...
def segment_dir() -> str: ...
def spill_dir(local: str | None = None) -> str: ...
def remove_process_dirs(pid: int) -> None: ...
def sweep(local: str | None = None) -> int: ...
def malloc_trim() -> bool: ...
def runtime_started() -> bool: ...
def configure_tls(ca: str, cert: str, key: str) -> None: ...

# A worker's NumPy memory handler: allocations of min..=max bytes in shared
# memory blocks (see shoal_runtime::shm_pool).
def shm_allocator_install(dir: str, min: int, max: int, spare_cap: int) -> bool: ...
def shm_allocator_use() -> bool: ...
def shm_allocator_forked() -> None: ...
def shm_locate(buffer: Any) -> tuple[int, int] | None: ...
def shm_publish(key: int, path: str, head: bytes) -> bool: ...
def shm_unpublish(path: str) -> bool: ...
def shm_publish_frame(path: str, parts: list[Any]) -> int | None: ...
def shm_reserve(fd: int, length: int) -> None: ...

@final
class Mapped:
    """A file mapped 2 MiB-aligned: copy-on-write or read-only (a buffer)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

def map_file(fd: int, writable: bool) -> Mapped: ...
def shm_allocator_stats() -> tuple[int, int, int, int] | None: ...
def shm_allocator_trim(age: float, spare_cap: int | None = None) -> int: ...
def cli_main(
    argv: list[str],
    python: str | None = None,
    package_path: str | None = None,
    executable: str | None = None,
) -> int: ...

@final
class Frame:
    """Received bytes lent as a read-only buffer (a task's input from
    another host): arrays unpickled from it are views of it."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

MAX_DURATION: float

def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"90"``, ``"2.5"``, ``"10m"``,
    ``"1h30m"`` (the CLI's parser); ``ValueError`` says what is wrong."""

def check_settings() -> str | None:
    """The settings file in use (None if there is none); ``ValueError``
    saying what is wrong with it where it cannot be used."""

def setting(name: str) -> str:
    """The value of the ``SHOAL_*`` variable ``name`` (from the environment,
    else the settings file), or its default ("" for none); ``KeyError`` for
    a name that is not one of Shoal's settings."""

def settings() -> list[tuple[str, str, str, str, str]]:
    """Every ``SHOAL_*`` variable: ``(name, effective value, default,
    meaning, origin)``; origin is ``user``, ``shoal`` or ``tests``."""

@final
class MemoryDecision:
    """What a worker does at one measurement of its memory."""

    trim: bool
    spill: bool
    pause: bool
    past_restart: bool
    restart: bool

@final
class MemoryPolicy:
    """A worker's memory rules (``shoal_core::memory``): spill, pause and
    restart at fractions of its limit."""

    TARGET: float
    SPILL: float
    PAUSE: float
    TERMINATE: float
    def __new__(cls, limit: int, can_restart: bool) -> Self: ...
    def decide(self, process: int, managed: int) -> MemoryDecision: ...

@final
class Watchdog:
    """When a worker interrupts a running Python task, and when it gives up
    on one (``shoal_core::worker::interrupts``): once per task, not inside
    an import, a stop before the task starts remembered for a minute, a
    task still running ``grace`` seconds after its interrupt is stuck (the
    worker restarts, once). Times are monotonic seconds."""

    def __new__(cls, grace: float) -> Self: ...
    @property
    def watching(self) -> bool:
        """A deadline or an interrupt is under way: tasks that end must
        call ``ended``."""
    def limit(self, task: int, now: float, limit: float) -> None: ...
    def asked_before(self, task: int) -> bool: ...
    def ended(self, task: int, thread: int) -> bool:
        """True: an interrupt may be pending on ``thread``; clear it."""
    def not_raised(self, thread: int, importing: bool) -> None: ...
    def tick(
        self, now: float, stops: list[int], running: dict[int, int]
    ) -> tuple[
        list[tuple[int, int, Literal["cancelled", "time-up"]]],
        tuple[int, Literal["cancelled", "time-up"], float, float] | None,
    ]:
        """The interrupts to raise, ``(thread, task, why)``, and a stuck
        task to report, ``(task, why, seconds waited, time limit)``."""

@final
class UnraisableHook:
    """``sys.unraisablehook`` wrapped: each report passes on to ``previous``,
    then a ``KeyboardInterrupt`` a finalizer swallowed in the main thread
    trips SIGINT again, so the program's next check raises it."""

    @property
    def previous(self) -> Any: ...
    def __call__(self, report: Any) -> None: ...

def guard_interrupts() -> None:
    """Wraps ``sys.unraisablehook`` in an ``UnraisableHook`` unless it
    already is one (every ``Client`` calls it)."""
