#!/usr/bin/env bash
# Builds and installs Shoal into the project's Python environment
# (scripts/venv.sh), then runs the demo job on the embedded cluster. Only
# what Shoal itself needs is installed; the test tools come with test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
python3 -m pip install -q --disable-pip-version-check .
python3 examples/demo.py "$@"
