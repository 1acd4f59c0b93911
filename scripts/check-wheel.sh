#!/usr/bin/env bash
# Installs dist/'s wheel into a fresh virtual environment for each CPython
# from 3.11 on that this machine has (pyenv's versions, python3.N on PATH),
# with no Rust toolchain on PATH and binary packages only, then runs
# `shoal --version`, a task and a Dask array sum in each.
#   bash scripts/build-wheels.sh && bash scripts/check-wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=(dist/shoal-*.whl)
[ -f "${wheel[0]}" ] || { echo "no wheel in dist/: run scripts/build-wheels.sh first" >&2; exit 1; }
bare=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if PATH=$bare command -v cargo >/dev/null || PATH=$bare command -v rustc >/dev/null; then
  echo "a Rust toolchain is on the bare PATH ($bare): this check would prove nothing" >&2
  exit 1
fi
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
checked=()
for v in 3.11 3.12 3.13 3.14; do
  py=""
  for candidate in "$pyenv_root"/versions/"$v"*/bin/python"$v" "$(command -v python"$v" || true)"; do
    if [ -x "$candidate" ]; then py="$candidate"; break; fi
  done
  if [ -z "$py" ]; then
    echo "CPython $v: not on this machine, skipped"
    continue
  fi
  venv="$work/py$v"
  "$py" -m venv "$venv"
  # Only the venv and the bare system PATH: no cargo, no rustc, no maturin.
  run() { env -i HOME="$HOME" PATH="$venv/bin:$bare" LANG=C.UTF-8 "$@"; }
  run pip install -q --disable-pip-version-check --only-binary=:all: \
    "${wheel[0]}" "dask[array]==2026.8.0" "numpy==2.4.6"
  run shoal --version
  (cd "$work" && run python - <<'PY')
import sys

import dask.array as da

import shoal

with shoal.Client(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:
    assert c.submit(pow, 2, 10).result() == 1024
    x = da.ones((4000, 4000), chunks=1000)
    total = x.sum().compute(scheduler=c.get)
    assert total == 16_000_000, total
print(f"CPython {sys.version.split()[0]}: a task and a Dask array sum ran on {shoal.__file__}")
PY
  checked+=("$v")
done
[ "${#checked[@]}" -gt 0 ] || { echo "no CPython 3.11 or later found" >&2; exit 1; }
echo "the wheel installed and ran on CPython ${checked[*]} with no Rust toolchain"
