"""Failure and bad input: clear errors, recovery, no hangs, no orphans."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _helpers import alive

import shoal


def inc(x):
    return x + 1


def pid_and_sleep(delay):
    time.sleep(delay)
    return os.getpid()


def die_once(marker):
    # Kills its worker the first time only.
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return "survived"


def always_die():
    os._exit(3)


def segfault():
    import ctypes

    ctypes.string_at(0)


def _wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_worker_dying_mid_task_reruns_it_and_is_replaced(tmp_path):
    with shoal.Client(n_workers=2) as c:
        before = set(c.worker_pids)
        f = c.submit(die_once, str(tmp_path / "marker"))
        assert f.result(timeout=30) == "survived"
        assert _wait_for(lambda: len(c.worker_pids) == 2)
        assert set(c.worker_pids) != before
        assert c.submit(inc, 1).result(timeout=30) == 2


def test_sigkill_from_outside_recovers_running_and_finished_work():
    with shoal.Client(n_workers=2) as c:
        big = c.submit(lambda: bytearray(200_000))  # held on a worker, not inline
        big.result(timeout=30)
        running = [c.submit(pid_and_sleep, 0.5) for _ in range(2)]
        time.sleep(0.2)
        victim = c.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        pids = c.gather(running)
        assert victim not in pids
        # The lost large result is recomputed from lineage.
        assert c.submit(len, big).result(timeout=30) == 200_000


def test_task_killing_three_workers_fails_naming_it():
    with shoal.Client(n_workers=2) as c:
        f = c.submit(always_die, key="the-killer")
        with pytest.raises(shoal.KilledWorker, match="the-killer"):
            f.result(timeout=60)
        assert c.submit(inc, 1).result(timeout=30) == 2


def test_segfault_is_survived():
    with shoal.Client(n_workers=1) as c:
        f = c.submit(segfault, retries=0)
        with pytest.raises(shoal.KilledWorker, match="'segfault-"):
            f.result(timeout=60)
        assert c.submit(inc, 2).result(timeout=30) == 3


def test_unpicklable_argument_raises_at_submit_naming_it(client):
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"argument 1 \(lock\)"):
        client.submit(lambda a, b: a, 1, lock)
    with pytest.raises(TypeError, match="keyword argument 'k'"):
        client.submit(lambda k: k, k=lock)
    assert client.submit(inc, 1).result() == 2


def test_unpicklable_function_raises_at_submit(client):
    class Bad:
        def __call__(self):
            return 1

        def __reduce__(self):
            raise RuntimeError("no pickling me")

    with pytest.raises(TypeError, match="could not pickle the function"):
        client.submit(Bad())
    with pytest.raises(TypeError, match="callable"):
        client.submit(42)


def test_unpicklable_result_fails_that_task_only(client):
    bad = client.submit(lambda: threading.Lock())
    good = client.submit(inc, 1)
    with pytest.raises(TypeError, match="could not be pickled"):
        bad.result(timeout=30)
    assert good.result() == 2


def test_keyboardinterrupt_and_systemexit_do_not_take_the_cluster_down(client):
    def interrupt():
        raise KeyboardInterrupt

    def leave():
        sys.exit(3)

    for fn, name in [(interrupt, "KeyboardInterrupt"), (leave, "SystemExit")]:
        with pytest.raises(shoal.TaskAbortedError, match=name):
            client.submit(fn).result(timeout=30)
    assert client.submit(inc, 1).result() == 2


def test_bad_arguments_to_the_api(client):
    with pytest.raises(ValueError, match="batch_size"):
        client.map(inc, range(3), batch_size=0)
    with pytest.raises(ValueError, match="timeout"):
        client.submit(inc, 1).result(timeout=-1)
    with pytest.raises(ValueError, match="n_workers"):
        shoal.Client(n_workers=0)
    with pytest.raises(ValueError, match="address"):
        shoal.Client("tcp://nowhere")
    with pytest.raises(ConnectionError, match="cannot connect"):
        shoal.Client("unix:///nonexistent/sched.sock", token="t")
    with pytest.raises(ValueError, match="needs the cluster's token"):
        shoal.Client("unix:///nonexistent/sched.sock")


def test_closed_client_says_so():
    c = shoal.Client(n_workers=1)
    f = c.submit(inc, 1)
    assert f.result(timeout=30) == 2
    c.close()
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.submit(inc, 1)


def test_close_leaves_no_worker_behind():
    c = shoal.Client(n_workers=2)
    pids = c.worker_pids
    assert len(pids) == 2
    c.submit(inc, 1).result(timeout=30)
    c.close()
    assert _wait_for(lambda: not any(alive(p) for p in pids))


SCRIPT = textwrap.dedent(
    """
    import os, sys, time, shoal
    c = shoal.Client(n_workers=2)
    # Results held in shared memory on both workers, and one in the client.
    held = c.map(bytearray, [4 << 20] * 4, batch_size=1)
    shoal.wait(held)
    local = c.gather(held[:1])
    print(" ".join(map(str, [os.getpid(), *c.worker_pids])), flush=True)
    if sys.argv[1] == "hang":
        time.sleep(600)
    """
)


def _left_behind(pids):
    """Shoal's segment, spill and socket directories of these processes."""
    import tempfile

    wanted = {str(p) for p in pids}
    found = []
    for base in ("/dev/shm", tempfile.gettempdir()):
        for name in os.listdir(base):
            if name.startswith("shoal-") and wanted & set(name.split("-")):
                found.append(os.path.join(base, name))
    return found


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_client_process_exit_or_death_leaves_no_worker(how):
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "exit" if how == "exit" else "hang"],
        stdout=subprocess.PIPE,
        text=True,
    ) as p:
        client, *pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
        assert _left_behind([client, *pids]), "the test sees no directory at all"
        if how == "kill":
            p.kill()
        p.wait(timeout=30)
    assert _wait_for(lambda: not any(alive(x) for x in pids)), "orphan workers"
    # Nothing left in tmpfs or the temporary directory: before, a SIGKILLed
    # client's directories and its workers' stayed until a later Client().
    assert _wait_for(lambda: not _left_behind([client, *pids])), _left_behind([client, *pids])


def test_garbage_on_the_scheduler_socket_does_not_hurt(client):
    import socket

    path = client.scheduler_address.removeprefix("unix://")
    for payload in [b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 64]:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(payload)
        s.close()
    assert client.submit(inc, 1).result(timeout=30) == 2
