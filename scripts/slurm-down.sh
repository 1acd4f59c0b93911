#!/usr/bin/env bash
# Stops what scripts/slurm-up.sh started: its jobs first (a job left
# completing would hold the node at the next start), then slurmd,
# slurmctld, munged.
set -u
if command -v squeue >/dev/null && squeue -h -o %i >/dev/null 2>&1; then
  squeue -h -o %i | xargs -r scancel
  for _ in $(seq 100); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi
for d in slurmd slurmctld munged; do
  pkill -x "$d" 2>/dev/null
done
for _ in $(seq 50); do
  pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || exit 0
  sleep 0.2
done
exit 0
