#!/usr/bin/env bash
# fmt, clippy (-D warnings), ruff check, ruff format, and stubtest of _core.pyi.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
ruff check python tests benches examples scripts
ruff format --check python tests benches examples scripts
# The extension module's stub against the built module (installed first:
# scripts/test.sh installs before it lints).
(cd "$(mktemp -d)" && python3 -m mypy.stubtest shoal._core \
  --allowlist "$OLDPWD/python/stubtest-allowlist.txt")
