#!/usr/bin/env bash
# joblib's own test_parallel.py against the "shoal" backend. joblib
# parametrizes its tests over every registered backend, and Shoal's .pth
# hook registers "shoal" wherever joblib is imported, so the suite runs its
# backend-generic tests for Shoal as it does for loky.
# All of them run: test_parallel_unordered_generator_returns_fastest_first,
# left out before, passes since a cancel stops a running task (joblib
# abandons a 30 s task; loky kills its worker, Shoal stops the task).
set -euo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"  # no project configuration: joblib's suite as shipped
python3 -m pytest --pyargs joblib.test.test_parallel -q -p no:cacheprovider \
    --timeout 120 -W ignore \
    -k "shoal" "$@"
