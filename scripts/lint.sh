#!/usr/bin/env bash
# fmt, clippy (-D warnings), ruff check and ruff format.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
ruff check python tests benches examples
ruff format --check python tests benches examples
