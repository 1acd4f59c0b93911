#!/usr/bin/env bash
# Builds what users install into dist/: one abi3 wheel (CPython 3.11 and
# later) for the oldest manylinux this toolchain reaches, and the sdist.
# Zig links against that glibc's symbols, so the wheel runs on older
# systems than the one it was built on; auditwheel then checks the claim.
#   bash scripts/build-wheels.sh            (then: pip install dist/*.whl)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
python3 -m pip install -q --disable-pip-version-check \
  "maturin==1.16.0" "ziglang==0.17.0" "auditwheel==6.8.2"
# glibc 2.28 (RHEL/Rocky 8, Debian 10, Ubuntu 18.10 and later): the oldest
# with every call the runtime makes (memfd_create and copy_file_range are
# 2.27, statx 2.28).
policy="${SHOAL_MANYLINUX:-manylinux_2_28}"
rm -rf dist
maturin build --release --strip --zig --compatibility "$policy" --out dist
maturin sdist --out dist
wheel=(dist/shoal-*.whl)
# The wheel must meet the policy it is tagged with, or an older one.
auditwheel show "${wheel[0]}" | tee dist/auditwheel.txt
python3 - "$policy" <<'PY'
import re, sys
want = int(sys.argv[1].rsplit("_", 1)[1])
text = open("dist/auditwheel.txt").read()
m = re.search(r'consistent\s+with\s+the\s+following\s+platform\s+tag:\s+"manylinux_2_(\d+)_', text)
if not m or int(m.group(1)) > want:
    sys.exit(f"the wheel is not {sys.argv[1]}-compliant (see dist/auditwheel.txt)")
PY
ls -l dist
