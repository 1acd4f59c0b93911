#!/usr/bin/env bash
# Runs every check and test: the wheel (built, checked, installed on each
# CPython here), lint, Rust tests, pytest, the peers' own suites.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
bash scripts/setup-dev.sh
# The wheel users get (manylinux, abi3) is built, checked by auditwheel and
# installed before the lint: stubtest checks _core.pyi against it, and every
# test below runs on it.
bash scripts/build-wheels.sh
python3 -m pip install -q --disable-pip-version-check --force-reinstall --no-deps dist/shoal-*.whl
# The same wheel in fresh environments of each CPython here, with no Rust.
bash scripts/check-wheel.sh
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
