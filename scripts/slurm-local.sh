#!/usr/bin/env bash
# Starts a one-node Slurm cluster on this machine, so that tests/mpi.rs can launch tessera
# with `srun --mpi=pmix` as on a real cluster (Debian's Slurm 22.05 with its PMIx plugin, the
# same PMIx that Debian's Open MPI is built against). Idempotent: a controller that answers
# is left as it is.
#
# Everything is the project's own: the configuration, state and logs live in
# .toolchain/slurm (git-ignored) and the tests find it by SLURM_CONF; nothing under
# /etc/slurm is touched. Installs slurm-wlm, munge and libpmix-dev with apt when missing, and starts
# munged (with a key made here if the package made none), slurmctld and slurmd as root.
#
# Prints `export SLURM_CONF=...` last; scripts/test.sh evaluates it. Exits non-zero, saying
# why, when the cluster does not come up.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.toolchain/slurm"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

if [ "$(id -u)" != 0 ]; then
  echo "slurm-local: needs root (it starts slurmd and munged)" >&2
  exit 1
fi
# Slurm's PMIx plugin opens libpmix.so by that name, which only libpmix-dev provides.
missing=()
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
ldconfig -p 2>/dev/null | grep -q 'libpmix\.so ' || missing+=(libpmix-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm-local: installing ${missing[*]} with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -f "$conf" ] && timeout 10 sinfo -h >/dev/null 2>&1; then
  echo "slurm-local: the controller in $dir answers"
  echo "export SLURM_CONF=$conf"
  exit 0
fi

# munge: the key, and the daemon.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
  sleep 1
fi
munge -n | unmunge >/dev/null || {
  echo "slurm-local: munged does not answer" >&2
  exit 1
}

# Old daemons of ours (a configuration from another checkout or host name) go first.
for pidfile in "$dir/slurmctld.pid" "$dir/slurmd.pid"; do
  if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
done
sleep 1
rm -rf "$dir"
mkdir -p "$dir/state" "$dir/spool"
host="$(hostname -s)"
# Four CPUs whatever the machine has (the tests run 4 ranks on 2 cores, as with mpirun's
# --oversubscribe); slurmd accepts the configuration over the hardware it finds.
cat > "$conf" <<EOF
ClusterName=tessera-local
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=pmix
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=4 RealMemory=2000 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
slurmctld -f "$conf"
slurmd -f "$conf"
for _ in $(seq 1 30); do
  if [ "$(sinfo -h -o %t 2>/dev/null)" = idle ]; then
    echo "slurm-local: one-node cluster up ($host, 4 CPUs), configuration $conf"
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "slurm-local: the node did not come up; the logs:" >&2
tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
