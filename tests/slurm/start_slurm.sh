#!/usr/bin/env bash
# Start a single-node SLURM cluster on 127.0.0.1 for the tests (run as root).
#
#   tests/slurm/start_slurm.sh      # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd
#   tests/slurm/stop_slurm.sh       # stops them again
#
# Needs Debian's slurm-wlm and munge packages. Idempotent: a cluster already up is left alone.
# The node offers this machine's CPUs and most of its memory and no GPUs, so test jobs
# must be submitted with --no-gpu. State and daemon logs live in $SLURM_TEST_STATE.
set -euo pipefail

STATE=${SLURM_TEST_STATE:-/tmp/dinov3-test-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by tests/slurm/start_slurm.sh"
NODE=localhost

fail() { echo "start_slurm: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (the daemons and the munge key need it)"
for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install slurm-wlm munge"
done

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }
# a live (not zombie) daemon from its pid file; asking sinfo first would retry for ~30 s when none runs
running() { [ -s "$1" ] && ps -o stat= -p "$(cat "$1")" 2>/dev/null | grep -qv '^Z'; }

if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid"; then
    case "$(node_state)" in
        idle|mixed|allocated) echo "start_slurm: cluster already up (node $NODE $(node_state))"; exit 0 ;;
    esac
fi

if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script; not overwriting a real cluster's configuration"
fi

mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
CPUS=$(nproc)
# leave 2 GiB to the system; slurmd drains a node that reports less memory than configured
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))

cat > "$CONF" <<CONF
$MARKER
ClusterName=dinov3test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no cgroups in containers: track processes by parent pid, no task binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
MaxArraySize=1001
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# munged runs as the munge user and needs its runtime directory (systemd would create it)
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n >/dev/null 2>&1 || fail "munged did not start (see /var/log/munge/munged.log)"

# -c: a clean start, no jobs or node states recovered from an earlier run
running "$STATE/slurmctld.pid" || slurmctld -c
running "$STATE/slurmd.pid" || slurmd -c -N "$NODE"

for _ in $(seq 120); do
    case "$(node_state)" in
        idle) echo "start_slurm: cluster up (node $NODE idle, $CPUS CPUs, $MEM_MB MB)"; exit 0 ;;
        drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
fail "node $NODE did not become idle within 60 s (logs above)"
