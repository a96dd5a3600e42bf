#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying slurm/*.sh by hand.
#
#   bash ci/slurm-up.sh          # install (Debian slurm-wlm + munge), configure, start; idempotent
#   bash ci/slurm-up.sh down     # scancel every job, stop slurmd, slurmctld and munged
#   bash ci/slurm-up.sh status   # exit 0 when the cluster answers and the node is usable
#
# Exit codes: 0 up (or already up, or stopped for `down`); 77 skip: this machine cannot host it
# (not root, no apt-get, not Debian-like) -- the message says why and nothing was changed;
# 1 it tried and failed (the message names the log to read).
#
# What it sets up: a 1024-byte random /etc/munge/munge.key (owner munge, mode 400), munged run as
# user munge, /etc/slurm/slurm.conf with this host as controller and only node (CPUs=nproc,
# RealMemory=free -m minus a margin), auth/munge, proctrack/linuxproc, task/none (no cgroups: works
# in containers), select/cons_tres + CR_Core, MpiDefault=none, one default partition `debug`
# without a time limit that lets up to 4 jobs share a core (OverSubscribe=FORCE:4) so concurrent
# 2-task test jobs on a 2-core machine run instead of queueing. State, spool and logs under /var.
# An already-running cluster is detected and left untouched.
set -uo pipefail

MODE="${1:-up}"
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
WAIT_S="${SLURM_UP_WAIT_S:-60}"

say() { echo "slurm-up: $*"; }
skip() { say "skip: $*"; exit 77; }
fail() { say "FAILED: $*" >&2; exit 1; }

node_state() {  # the node's state as sinfo prints it ("idle", "mixed", "down*", ...), or nothing
    timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -1
}

cluster_ok() {  # controller answers and the node can take jobs
    command -v sinfo >/dev/null 2>&1 || return 1
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

if [[ "$MODE" == status ]]; then
    if cluster_ok; then say "up: node $(hostname) is $(node_state)"; exit 0; fi
    say "not running"; exit 1
fi

if [[ "$MODE" == down ]]; then
    if [[ $(id -u) -ne 0 ]]; then skip "not root"; fi
    if command -v squeue >/dev/null 2>&1 && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        ids=$(squeue -h -o '%i' 2>/dev/null)
        [[ -n "$ids" ]] && { say "cancelling jobs: $(echo $ids)"; scancel $ids 2>/dev/null; sleep 2; }
        scontrol shutdown >/dev/null 2>&1 || true  # stops slurmd and slurmctld
    fi
    for pidf in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [[ -f "$pidf" ]] || continue
        pid=$(cat "$pidf" 2>/dev/null)
        [[ -n "$pid" ]] && kill "$pid" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        rm -f "$pidf"
    done
    say "stopped"
    exit 0
fi

[[ "$MODE" == up ]] || { echo "usage: $0 [up|down|status]" >&2; exit 2; }

t0=$(date +%s)
if cluster_ok; then
    say "already running: node $(hostname) is $(node_state); nothing to do"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || skip "not root (installing and starting Slurm needs root); Slurm tests will skip"

# ---------------------------------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
        || ! command -v munged >/dev/null 2>&1 || ! command -v sinfo >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || skip "no apt-get: install slurm-wlm and munge by hand"
    say "installing slurm-wlm munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying the install anyway"
    apt-get install -y -qq slurm-wlm munge >/tmp/slurm-up-apt.log 2>&1 \
        || fail "apt-get install slurm-wlm munge failed; see /tmp/slurm-up-apt.log"
fi
for b in slurmctld slurmd munged sinfo sbatch srun; do
    command -v "$b" >/dev/null 2>&1 || fail "$b missing after install"
done
id munge >/dev/null 2>&1 || fail "user munge missing after installing munge"

# ------------------------------------------------------------------------------------------ munge
install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 755 /run/munge
NEWKEY=0
if [[ ! -f /etc/munge/munge.key ]] || [[ $(stat -c %s /etc/munge/munge.key) -ne 1024 ]]; then
    # Debian's postinst makes a 128-byte key; use 1024 random bytes as in the issue's recipe.
    say "creating /etc/munge/munge.key (1024 random bytes)"
    rm -f /etc/munge/munge.key
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    NEWKEY=1
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if [[ $NEWKEY == 1 ]] || ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ -f /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        kill "$(cat /run/munge/munged.pid)"; sleep 1
    fi
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start; see /var/log/munge/munged.log"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
    munge -n | unmunge >/dev/null 2>&1 || fail "munge credential round trip fails; see /var/log/munge/munged.log"
fi

# ------------------------------------------------------------------------------------ slurm.conf
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(free -m | awk '/^Mem:/ {print $2}')
MARGIN=$(( MEM_MB / 10 > 512 ? MEM_MB / 10 : 512 ))
REALMEM=$(( MEM_MB - MARGIN > 256 ? MEM_MB - MARGIN : 256 ))
install -d -m 755 /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
NEW=$(mktemp)
cat >"$NEW" <<EOF
# Written by hpc_lensiam ci/slurm-up.sh: a one-node test cluster. Edit that script, not this file.
ClusterName=lensiam
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# MinJobAge <= 4 makes "sbatch --wait" poll every 2 s (it backs off 2, 8, 32 s otherwise, so a
# 3-second job took 10 s to report); finished jobs still stay visible for a minute or so.
MinJobAge=4
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST CPUs=$NCPU RealMemory=$REALMEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
if ! cmp -s "$NEW" "$CONF"; then
    say "writing $CONF (node $HOST, CPUs=$NCPU, RealMemory=$REALMEM MB)"
    install -m 644 "$NEW" "$CONF"
fi
rm -f "$NEW"

# ------------------------------------------------------------------------------------- daemons
running() { [[ -f "$1" ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
if running /run/slurmctld.pid; then
    scontrol reconfigure >/dev/null 2>&1 || true
else
    say "starting slurmctld"
    slurmctld || fail "slurmctld did not start; see $LOGDIR/slurmctld.log"
fi
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd || fail "slurmd did not start; see $LOGDIR/slurmd.log"
fi

deadline=$(( $(date +%s) + WAIT_S ))
state=""
while (( $(date +%s) < deadline )); do
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) fail "node $HOST not usable after ${WAIT_S}s (sinfo state: '${state:-no answer}');" \
            "see $LOGDIR/slurmctld.log and $LOGDIR/slurmd.log" ;;
esac
say "up in $(( $(date +%s) - t0 ))s: node $HOST is $state (CPUs=$NCPU); try: sbatch --wait -n 2 --wrap 'srun hostname'"
exit 0
