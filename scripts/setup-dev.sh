#!/usr/bin/env bash
# Installs the pinned build and test tools (idempotent).
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check \
  "maturin==1.16.0" "ruff==0.17.6" "pytest==9.2.0" "pytest-timeout==2.4.0" "cloudpickle==3.1.2"
