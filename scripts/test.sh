#!/usr/bin/env bash
# Runs every check and test: lint, Rust tests, wheel build and install, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
bash scripts/setup-dev.sh
# Installed before the lint: stubtest checks _core.pyi against the built module.
python3 -m pip install -q --disable-pip-version-check .
bash scripts/lint.sh
cargo test --workspace --locked
# Run from a directory without the source tree so the installed package is tested.
cd tests && python3 -m pytest -q -p no:cacheprovider --rootdir=.. -c ../pyproject.toml .
# The peers' own suites against Shoal (tests/dropin): CPython's
# test_concurrent_futures with shoal.Executor in the executor's seat.
cd .. && python3 tests/dropin/concurrent_futures.py
# joblib's own test_parallel.py with the shoal backend.
bash tests/dropin/joblib_parallel.sh
# Ray's documented core patterns with `import shoal as ray`.
python3 tests/dropin/ray_patterns.py
# Dask's own delayed and bag tests, Shoal against distributed, in one run.
python3 tests/dropin/dask_suite.py
