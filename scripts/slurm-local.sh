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
# Prints `export SLURM_CONF=...` last (the configuration is always .toolchain/slurm/slurm.conf).
# Exits non-zero, saying why, when the cluster does not come up. The daemons stay up after the
# tests (a later run finds them); `pkill slurmctld; pkill slurmd` stops them.
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
# (grep reads all of ldconfig's output: `ldconfig -p | grep -q` can fail on SIGPIPE under pipefail.)
grep -q 'libpmix\.so ' < <(ldconfig -p 2>/dev/null) || missing+=(libpmix-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm-local: installing ${missing[*]} with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Whether our daemon $1 runs (its pid file names a live process of that name: a pid file may
# outlive a restart).
running() {
  local pid
  pid="$(cat "$dir/$1.pid" 2>/dev/null)" || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

# Ours, both daemons alive, and the node ready for jobs (the controller goes on reporting a
# node whose slurmd died as idle for minutes: then start again).
if [ -f "$conf" ] && running slurmctld && running slurmd \
  && [[ "$(timeout 10 sinfo -h -o %t 2>/dev/null)" =~ ^(idle|mix|alloc)$ ]]; then
  echo "slurm-local: the cluster in $dir is up"
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

# Our old daemons (a node that went down, another host name) go first: only processes that
# still are slurmctld or slurmd (a pid file may outlive a restart), and until they are gone.
for daemon in slurmctld slurmd; do
  if running "$daemon"; then
    pid="$(cat "$dir/$daemon.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
done
for port in 16817 16818; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "slurm-local: port $port is in use by another program; this cluster needs 16817 and 16818" >&2
    exit 1
  fi
done
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
