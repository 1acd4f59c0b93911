"""CPython's own ``test_concurrent_futures`` against ``shoal.Executor``.

    python tests/dropin/concurrent_futures.py [--compare] [-k PATTERN]

Runs the suite's executor-generic test classes (initializer, failing
initializer, shutdown, wait, as_completed, executor) with ``shoal.Executor``
in the executor's seat, as the suite itself does for ``ThreadPoolExecutor``
and ``ProcessPoolExecutor``. ``--compare`` runs the same classes with
``ProcessPoolExecutor`` (fork) in the same run and prints both outcomes side
by side. Exits non-zero when a test fails for Shoal that is not listed in
``DEVIATIONS`` below (each with its reason).

The suite is CPython's: Debian's ``libpython3.11-testsuite`` package has it.
It is taken from ``$SHOAL_CF_SUITE`` (the path of
``test_concurrent_futures.py``), else extracted from that package (fetched
with ``apt-get download``) into ``.cache/dropin/``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "dropin"
PACKAGE = "libpython3.11-testsuite"
MEMBER = "usr/lib/python3.11/test/test_concurrent_futures.py"

# Tests that fail for Shoal and pass for ProcessPoolExecutor, and why.
DEVIATIONS: dict[str, str] = {}

# The executor-generic mixins of the suite (ProcessPool*/ThreadPool* classes
# test those executors' internals: their processes, threads, contexts).
MIXINS = [
    "InitializerMixin",
    "FailingInitializerMixin",
    "ExecutorShutdownTest",
    "WaitTests",
    "AsCompletedTests",
    "ExecutorTest",
]


def suite_file() -> Path:
    given = os.environ.get("SHOAL_CF_SUITE")
    if given:
        return Path(given)
    target = CACHE / "test_concurrent_futures.py"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True)
        shutil.copy(Path(tmp) / "x" / MEMBER, target)
    return target


def install(suite: Path) -> tuple[Path, Path]:
    """A directory put first on every interpreter's path while the suite
    runs (scripts it starts run isolated, ``-I``, so through a ``.pth`` file
    in this environment's site-packages, removed after): a ``test`` package
    that adds the suite to the standard library's ``test`` package (whose
    ``support`` it needs), and a ``sitecustomize`` that lets those scripts
    import the executor from ``concurrent.futures`` by its class name, as
    the suite's shutdown tests do. Returns the directory and the ``.pth``."""
    d = Path(tempfile.mkdtemp(prefix="shoal-dropin-"))
    (d / "test").mkdir()
    (d / "test" / "__init__.py").write_text(
        "from pkgutil import extend_path\n__path__ = extend_path(__path__, __name__)\n"
    )
    shutil.copy(suite, d / "test" / "test_concurrent_futures.py")
    (d / "sitecustomize.py").write_text(
        "import concurrent.futures as _cf\n"
        "_orig = _cf.__getattr__\n"
        "def __getattr__(name):\n"
        "    if name == 'ShoalExecutor':\n"
        "        from shoal import Executor\n"
        "        return Executor\n"
        "    return _orig(name)\n"
        "_cf.__getattr__ = __getattr__\n"
    )
    pth = Path(sysconfig.get_paths()["purelib"]) / f"shoal-dropin-{os.getpid()}.pth"
    pth.write_text(f"import sys; sys.path.insert(0, {str(d)!r})\n")
    return d, pth


def build(m, executor: str) -> list[type]:
    """The suite's generic test classes with ``executor`` in the seat."""
    import shoal

    if executor == "shoal":
        # Named so that the suite's scripts find it in concurrent.futures.
        seat = type("ShoalExecutor", (shoal.Executor,), {"__module__": "concurrent.futures"})
        mixin = type("ShoalMixin", (m.ExecutorMixin,), {"executor_type": seat})
    else:
        mixin = m.ProcessPoolForkMixin
    out = []
    for name in MIXINS:
        base = getattr(m, name)
        out.append(type(f"{executor}_{name}", (base, mixin, m.BaseTestCase), {}))
    return out


def run(classes: list[type], pattern: str | None) -> dict[str, str]:
    loader = unittest.TestLoader()
    if pattern:
        loader.testNamePatterns = [f"*{pattern}*"]
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in classes)
    outcome = {t.id(): "pass" for t in _tests(suite)}  # (running empties the suite)
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stderr).run(suite)
    for t, _ in result.failures + result.errors:
        outcome[t.id()] = "FAIL"
    for t, _ in result.skipped:
        outcome[t.id()] = "skip"
    return outcome


def _tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _tests(t)
        else:
            yield t


def short(test_id: str) -> str:
    cls, meth = test_id.split(".")[-2:]
    return f"{cls.split('_', 1)[1]}.{meth}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", action="store_true", help="also run ProcessPoolExecutor")
    ap.add_argument("-k", help="only tests whose name contains this")
    args = ap.parse_args()
    d, pth = install(suite_file())
    try:
        sys.path.insert(0, str(d))
        runpy.run_path(str(d / "sitecustomize.py"))  # the path was set after start-up
        import test.test_concurrent_futures as m

        shoal = {short(k): v for k, v in run(build(m, "shoal"), args.k).items()}
        ppe = {}
        if args.compare:
            ppe = {short(k): v for k, v in run(build(m, "ppe"), args.k).items()}
    finally:
        pth.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    unexpected = []
    print(f"\n{'test':64} {'shoal':6} {'ppe' if ppe else ''}")
    for name in sorted(shoal):
        mark = ""
        if shoal[name] == "FAIL" and ppe.get(name) != "FAIL":
            if name in DEVIATIONS:
                mark = f"  (documented: {DEVIATIONS[name]})"
            else:
                unexpected.append(name)
                mark = "  <- unexpected"
        if shoal[name] != "pass" or ppe.get(name, "pass") != "pass" or mark:
            print(f"{name:64} {shoal[name]:6} {ppe.get(name, '')}{mark}")
    counts = {v: sum(1 for x in shoal.values() if x == v) for v in ("pass", "FAIL", "skip")}
    print(f"\nshoal: {counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")
    if ppe:
        pc = {v: sum(1 for x in ppe.values() if x == v) for v in ("pass", "FAIL", "skip")}
        print(f"ppe:   {pc['pass']} passed, {pc['FAIL']} failed, {pc['skip']} skipped")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
