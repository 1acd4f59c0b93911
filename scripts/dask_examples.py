"""Runs Dask's example notebooks on Shoal and on Dask distributed, with only
the import changed (every ``dask.distributed``/``distributed`` import made
``shoal``), and prints which run.

    python scripts/dask_examples.py PATH/TO/dask-examples [NOTEBOOK ...]

The notebooks are those of the public ``dask/dask-examples`` repository
that need no network and no service (default: array, bag, dataframe,
delayed, futures, resilience). Needs nbclient, ipykernel and nbformat,
and what the notebooks import (mimesis for ``make_people``, matplotlib,
graphviz for ``visualize``)::

    pip install nbclient ipykernel nbformat mimesis matplotlib graphviz
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

DEFAULT = ["array", "bag", "dataframe", "delayed", "futures", "resilience"]


def port(source: str) -> str:
    """What a user does: the import changed, nothing else."""
    source = re.sub(r"\bfrom dask\.distributed import\b", "from shoal import", source)
    source = re.sub(r"\bfrom distributed import\b", "from shoal import", source)
    return re.sub(r"\bimport dask\.distributed\b", "import shoal", source)


def run(path: str, runtime: str, timeout: int) -> tuple[bool, float, str]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if runtime == "shoal":
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = port(cell.source)
    work = tempfile.mkdtemp(prefix=f"nb-{runtime}-")
    t0 = time.monotonic()
    try:
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": work}}
        ).execute()
        return True, time.monotonic() - t0, ""
    except Exception as e:  # noqa: BLE001 - reported, and the next notebook runs
        text = str(e).strip().splitlines()
        return False, time.monotonic() - t0, (text[-1] if text else repr(e))[:300]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", help="a checkout of dask-examples")
    ap.add_argument("notebooks", nargs="*", default=DEFAULT)
    ap.add_argument("--runtimes", default="shoal,distributed")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ns = ap.parse_args()
    runtimes = ns.runtimes.split(",")
    passed = dict.fromkeys(runtimes, 0)
    for name in ns.notebooks:
        path = os.path.join(ns.repo, name if name.endswith(".ipynb") else name + ".ipynb")
        for rt in runtimes:
            ok, secs, why = run(path, rt, ns.timeout)
            passed[rt] += ok
            print(f"{name:<24} {rt:<12} {'ok' if ok else 'FAILED'} {secs:6.1f}s {why}", flush=True)
    for rt in runtimes:
        print(f"{rt}: {passed[rt]} of {len(ns.notebooks)} notebooks ran", flush=True)
    sys.exit(0 if all(passed[rt] == len(ns.notebooks) for rt in runtimes) else 1)


if __name__ == "__main__":
    main()
