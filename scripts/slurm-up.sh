#!/usr/bin/env bash
# Starts a one-node Slurm (munged, slurmctld, slurmd) on this machine for the
# HPC tests, as ../shared/SLURM_HERE.md describes (no systemd: the daemons are
# started directly). Idempotent: a running cluster is left as it is. Needs
# root and Debian's packages; prints why and exits 1 where it cannot.
# Prints "started" when it started the daemons (scripts/slurm-down.sh stops
# them), nothing when they were running.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin
# (A trailing * in the state: slurmd is not answering.)
if pgrep -x slurmd >/dev/null && sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)$'; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "slurm-up: needs root and apt-get to install and start Slurm" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    slurm-wlm munge) >/dev/null
fi
mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
chown munge: /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null
H=$(hostname -s)
CPUS=$(nproc)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=shoal
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=5
MinJobAge=300
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE OverSubscribe=FORCE:8 State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 120); do
  state=$(sinfo -h -o %t 2>/dev/null || true)
  if echo "$state" | grep -qE '^(idle|mix|alloc)$'; then
    echo started
    exit 0
  fi
  # Left down or drained by an earlier run (a daemon killed mid-job).
  if echo "$state" | grep -qE '^(down|drain|drng)'; then
    scontrol update nodename="$H" state=resume 2>/dev/null || true
  fi
  sleep 0.5
done
echo "slurm-up: the node did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
