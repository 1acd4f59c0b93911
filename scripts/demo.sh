#!/usr/bin/env bash
# Builds and installs Shoal, then runs the demo job on the embedded cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
python3 -m pip install -q --disable-pip-version-check .
python3 examples/demo.py "$@"
