#!/usr/bin/env bash
# Stops what scripts/slurm-up.sh started: slurmd, slurmctld, munged.
set -u
for d in slurmd slurmctld munged; do
  pkill -x "$d" 2>/dev/null
done
for _ in $(seq 50); do
  pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || exit 0
  sleep 0.2
done
exit 0
