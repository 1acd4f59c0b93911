"""A local cluster's worker processes, forked from a copy of the client.

Started anew, each worker process imports the libraries its tasks need
(a second for Dask's dataframes) and holds its own copy of them: about
90 MiB of private memory per worker with NumPy, pandas and Dask. Forked
from the client, a worker has them already, and shares their pages with
the client and the other workers until it writes to them.

Forking a client that runs things is unsafe (another thread may hold a
lock the child then waits on forever; a GPU context does not survive it),
so ``LocalCluster`` forks one process, the zygote, before its scheduler
starts, and only when nothing else runs: the zygote then forks each
worker, now and later (replacements, scale-ups), from a process that only
waits. When forking is not safe, or ``SHOAL_WORKER_START=spawn``, workers
start anew as before (``why_not``).

The zygote's side of the protocol is here; the supervisor's is
``shoal_runtime::zygote``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from . import _core

# Libraries whose device context a fork would copy half-alive.
_GPU = ("cupy", "jax", "tensorflow", "numba.cuda")
# A fork keeps what the client held then alive in the zygote for the
# cluster's life, even after the client frees it: not for a large client.
RSS_MAX = 1 << 30
_PR_SET_PDEATHSIG = 1


def mode() -> str:
    """``SHOAL_WORKER_START``: ``auto`` (fork where safe), ``fork`` or ``spawn``."""
    value = (_core.setting("SHOAL_WORKER_START") or "auto").strip().lower()
    if value not in ("auto", "fork", "spawn"):
        raise ValueError(f"SHOAL_WORKER_START must be auto, fork or spawn, not {value!r}")
    return value


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def why_not() -> str | None:
    """Why this process must not fork its workers now (None: it may)."""
    how = mode()
    if how == "spawn":
        return "SHOAL_WORKER_START=spawn"
    if not sys.platform.startswith("linux"):
        return "workers are forked on Linux only"
    if _core.shm_allocator_stats() is not None:
        return "this process has run a worker (its NumPy allocator is Shoal's)"
    if _core.runtime_started():
        # Its tokio runtime's process-wide state would be the workers' too.
        return "this process has run a cluster or client before"
    if how == "fork":
        return None
    if threading.active_count() > 1:
        return "other threads run in this process (SHOAL_WORKER_START=fork forks anyway)"
    gpu = [m for m in _GPU if m in sys.modules]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) and torch.cuda.is_initialized():
        gpu.append("torch.cuda")
    if gpu:
        return f"{', '.join(gpu)} imported (a GPU context does not survive a fork)"
    held = _rss()
    if held > RSS_MAX:
        return f"this process holds {held / 2**30:.1f} GiB (a fork would keep it alive)"
    return None


def start() -> tuple[int, int]:
    """Forks the zygote; returns the supervisor's end of its socket (a
    descriptor the caller hands on to ``_core.Cluster``) and its pid."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Written once, not once more by every child at its exit.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 70
        try:
            ours.close()
            _serve(theirs)
            code = 0
        except BaseException:  # noqa: BLE001 - said, then the cluster learns from the socket
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return ours.detach(), pid


def _detach_descriptors(keep: set[int]) -> None:
    """Points every inherited descriptor but ``keep`` at /dev/null: the
    client's sockets and files must close when the client closes them,
    not live on in its workers. Not closed: an object of the client's that
    still names one may close it later, and must not close another file
    that took its number."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = []
    for fd in fds:
        if fd in keep or fd == null or fd < 3:
            continue
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass  # the listing's own descriptor, closed by now
    os.close(null)


def _serve(sock: socket.socket) -> None:
    """The zygote: forks a worker per request until the socket closes,
    reaps them and reports how each ended; then stops those left."""
    # Ctrl-C reaches the whole process group: the client handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    _detach_descriptors({sock.fileno()})
    from . import _worker  # noqa: F401 - imported once, shared by every worker

    # Objects that exist now are never collected in the children: their
    # pages stay shared (a collection writes to every object it visits).
    gc.collect()
    gc.freeze()
    zygote = os.getpid()
    children: set[int] = set()
    while True:
        try:
            ready, _, _ = select.select([sock], [], [], 0.05)
        except InterruptedError:
            ready = []
        if not _reap(sock, children):
            break
        if not ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
        except OSError:
            break
        if not msg:
            break  # the cluster closed, or its process died
        try:
            req = json.loads(msg)
            args, env = list(req["args"]), [tuple(kv) for kv in req["env"]]
            pid = os.fork()
        except (OSError, ValueError, KeyError, TypeError) as e:
            for fd in fds:
                os.close(fd)
            if not _say(sock, f"error cannot fork a worker: {e}"):
                break
            continue
        if pid == 0:
            sock.close()
            _become_worker(zygote, args, env, fds)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        if not _say(sock, f"pid {pid}"):
            break
    _stop(children)


def _say(sock: socket.socket, msg: str) -> bool:
    try:
        sock.send(msg.encode())
        return True
    except OSError:
        return False


def _reap(sock: socket.socket, children: set[int]) -> bool:
    """Reports each ended worker; False once the supervisor is gone."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return True
        children.discard(pid)
        if not _say(sock, f"exit {pid} {status}"):
            return False
    return True


def _stop(children: set[int]) -> None:
    """SIGTERM to the workers left (each retires), then SIGKILL after 3 s."""
    for pid in children:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
        else:
            children.discard(pid)
    for pid in children:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _become_worker(
    zygote: int, args: list[str], env: list[tuple[str, str]], fds: list[int]
) -> None:
    """The forked child: runs the worker module with ``args``; never returns."""
    code = 1
    try:
        # Ends with the zygote, as a started worker ends with its supervisor.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != zygote:
            os._exit(0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.update(env)
        if fds:
            os.environ["SHOAL_SLOT_FD"] = str(fds[0])
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # not the client's sequence, nor each other's
        if args[:2] == ["-m", "shoal._worker"]:
            args = args[2:]
        from . import _worker

        sys.argv = [_worker.__file__, *args]
        _worker.main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - said, then the exit status tells
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(code)
