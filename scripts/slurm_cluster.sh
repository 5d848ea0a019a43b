#!/usr/bin/env bash
# Single-node Slurm cluster on localhost (Debian 12, root, no systemd) for tests and CI.
#   bash scripts/slurm_cluster.sh start|stop|status
# No accounting daemon (slurmdbd needs a database), so `sacct` does not work; finished jobs stay
# visible to `scontrol show job` for MinJobAge (300 s).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by otprune scripts/slurm_cluster.sh"
LOGDIR=/var/log/slurm
MUNGE_PID=/run/munge/munged.pid CTLD_PID=/run/slurmctld.pid SLURMD_PID=/run/slurmd.pid
NODE=$(hostname -s)

die() { echo "slurm_cluster: $*" >&2; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
# "idle*" / "down" / "unknown" mean slurmctld does not (yet) accept the node; busy states are fine,
# since jobs saved in StateSaveLocation survive a restart.
node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }
node_up() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
summary() {
  echo "slurm_cluster: ${1:-}cluster otprune-local up:" \
    "$(sinfo -h -n "$NODE" -o 'node %n %T, CPUs(A/I/O/T) %C, RealMemory %mMB'), partition debug, $CONF"
}

install_pkgs() {
  local missing=0 b
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || missing=1; done
  ((missing)) || return 0
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurmctld slurmd slurm-client munge
}

write_conf() {
  if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away first (refusing to overwrite)"
  fi
  local cpus mem; cpus=$(nproc)
  # Stay below the detected memory: slurmd marks the node invalid if RealMemory exceeds it.
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
  cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=otprune-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
# cred_expire is also the delay before a requeued job may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
# Containers often lack a writable cgroup hierarchy, so track processes by pid and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Debian's default MailProg (/bin/mail) is usually absent; slurmctld logs an error for it.
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job without --mem would otherwise take the whole node and serialise everything.
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  # munged refuses to run as root without --force; prefer its own user.
  alive "$MUNGE_PID" || runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munge does not work (munge -n | unmunge failed); see /var/log/munge/munged.log"
}

start() {
  # slurmctld keeps reporting a dead slurmd's node as idle for SlurmdTimeout, so check the pids too.
  if grep -qxsF "$MARKER" "$CONF" && alive "$MUNGE_PID" && alive "$CTLD_PID" && alive "$SLURMD_PID" && node_up; then
    summary "already running; "; return 0
  fi
  install_pkgs
  write_conf
  start_munge
  alive "$CTLD_PID" || slurmctld || fail "slurmctld did not start"
  alive "$SLURMD_PID" || slurmd || fail "slurmd did not start"
  for _ in $(seq 120); do node_up && { summary; return 0; }; sleep 0.5; done
  fail "node $NODE not up after 60 s (state: $(node_state || true))"
}

fail() {
  echo "slurm_cluster: $*" >&2
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
    echo "==> $f" >&2; tail -n 20 "$f" >&2 2>/dev/null || true
  done
  exit 1
}

stop() {
  local pidf pid
  for pidf in "$SLURMD_PID" "$CTLD_PID" "$MUNGE_PID"; do
    alive "$pidf" || continue
    pid=$(cat "$pidf"); kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    echo "slurm_cluster: stopped $(basename "$pidf" .pid) (pid $pid)"
  done
  rm -f "$SLURMD_PID" "$CTLD_PID"
}

status() {
  local pidf rc=0
  for pidf in "$MUNGE_PID" "$CTLD_PID" "$SLURMD_PID"; do
    if alive "$pidf"; then echo "$(basename "$pidf" .pid): running (pid $(cat "$pidf"))"
    else echo "$(basename "$pidf" .pid): stopped"; rc=1; fi
  done
  ((rc == 0)) && node_up && { summary; sinfo; return 0; }
  echo "slurm_cluster: cluster not up"; return 1
}

case ${1:-} in
  start|stop|status) "$1" ;;
  *) die "usage: $0 start|stop|status" ;;
esac
