#!/usr/bin/env bash
# Installs the pinned build and test tools (idempotent).
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check \
  "maturin==1.16.0" "ruff==0.17.6" "pytest==9.2.0" "pytest-timeout==2.4.0" "cloudpickle==3.1.2" \
  "dask==2026.8.0" "distributed==2026.8.0" "numpy==2.4.6" "pandas==3.1.1" "pyarrow==26.0.1" "joblib==1.6.0" \
  "scikit-learn==1.9.1" "scipy==1.17.1" "threadpoolctl==3.8.0" "lz4==4.4.5" \
  "prometheus-client==0.26.0" "ipython==9.18.1" "ipywidgets==8.1.9" "mpi4py==4.1.2" "mypy==2.4.1" \
  "jupyter-server==2.21.1" "jupyter-server-proxy==4.6.0" "nbclient==0.11.0" "nbformat==5.11.1" \
  "ipykernel==7.4.0" "mkdocs==1.6.1" "mkdocs-material==9.8.1" "mkdocstrings==1.0.8" \
  "mkdocstrings-python==2.0.11" "griffe==2.4.1" "pymdown-extensions==13.1"
# iproute2 (`ip netns`) for the multi-host tests; they fall back to loopback
# addresses, and say so, where it cannot be had.
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq iproute2) >/dev/null 2>&1 || true
fi
# Debian's chromium for the dashboard's browser tests (they fail, saying
# why, where it is missing), and playwright-core to drive it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --silent)
# Debian's Open MPI for the MPI launcher tests (the mpi4py wheel loads its
# libmpi), and Slurm with munge for the batch tests (tests/test_slurm.py
# starts the daemons with scripts/slurm-up.sh); the tests fail, saying why,
# where they are missing.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
  && { ! command -v mpirun >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
       || ! command -v munged >/dev/null 2>&1; }; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    openmpi-bin slurm-wlm munge) >/dev/null
fi
