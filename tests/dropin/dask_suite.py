"""Dask's own collection tests with a cluster as every named scheduler.

    python tests/dropin/dask_suite.py [--failed-only] [MODULE ...]

Runs Dask's test modules (default: ``dask.tests.test_delayed`` and
``dask.bag.tests.test_bag``; give others, e.g. ``dask.array.tests`` or
``dask.dataframe.tests``, for a full run) twice in one go: with Shoal, then
with ``distributed``, each installed as every scheduler name Dask knows
(``dask_plugin.py``). Many of Dask's tests assume its local schedulers (an
object's identity kept across compute, a mutation seen by the caller): any
multi-process scheduler fails those. So the measure is the difference:
exits non-zero when a test fails with Shoal and passes with distributed,
unless it is listed in ``DEVIATIONS`` with its reason.

``--failed-only`` runs distributed only on the tests that failed with
Shoal: the same verdict (a test that fails with Shoal and passes with
distributed) at a fraction of the time, which is what makes full runs of
``dask.array.tests`` and ``dask.dataframe.tests`` practical (distributed is
about ten times slower on them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = ["dask.tests.test_delayed", "dask.bag.tests.test_bag"]

DEVIATIONS: dict[str, str] = {}

# Tests left out because they crash the test process under any
# multi-process scheduler (distributed as well), and why.
CRASHERS: dict[str, str] = {
    "test_memmap": (
        "store() into a np.memmap writes the workers' copies, the assertion fails, and the "
        "test's `finally` closes the memmap under the live array pytest then prints: a "
        "segmentation fault"
    ),
}


def run(runner: str, modules: list[str]) -> tuple[set[str], str]:
    """Failed test ids (absolute paths, so another run can name them), and the
    summary line. ``modules`` are module names, or test ids from an earlier run."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory() as tmp:  # Dask's suite as shipped: no project config
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "dask_plugin", "--runner", runner]
            + ["--pyargs", *modules, "-q", "-p", "no:cacheprovider", "-W", "ignore"]
            + ["--timeout", "300", "-rfE"]
            # Test ids under a root that holds every test file; the report
            # shows them relative to `tmp`, made absolute below.
            + ["--rootdir", "/"]
            + ["-k", " and ".join(f"not {name}" for name in CRASHERS)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
    lines = out.stdout.splitlines()
    failed = set()
    for ln in lines:
        if ln.startswith(("FAILED ", "ERROR ")):
            # Reported relative to the run's directory: made absolute, so
            # that another run (in another directory) can name them.
            path, sep, rest = ln.split()[1].partition("::")
            failed.add(os.path.normpath(os.path.join(tmp, path)) + sep + rest)
    summary = next(
        (ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "failed" in ln)), ""
    )
    return failed, str(summary)


def main() -> int:
    args = sys.argv[1:]
    failed_only = "--failed-only" in args
    modules = [a for a in args if a != "--failed-only"] or DEFAULT
    shoal, s_summary = run("shoal", modules)
    if failed_only:
        dist, d_summary = run("distributed", sorted(shoal)) if shoal else (set(), "(not run)")
        d_summary += " (only the tests that failed with shoal)"
    else:
        dist, d_summary = run("distributed", modules)
    print(f"shoal:       {s_summary}")
    print(f"distributed: {d_summary}")
    unexpected = []
    for test in sorted(shoal - dist):
        name = test.rsplit("::", 1)[-1].split("[")[0]
        if name in DEVIATIONS:
            print(f"  fails with shoal only (documented): {test}: {DEVIATIONS[name]}")
        else:
            print(f"  fails with shoal only: {test}")
            unexpected.append(test)
    for test in sorted(dist - shoal):
        print(f"  fails with distributed only: {test}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
