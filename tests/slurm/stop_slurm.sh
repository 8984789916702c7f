#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start_slurm.sh (its daemons only).
set -uo pipefail
STATE=${SLURM_TEST_STATE:-/tmp/dinov3-test-slurm}
for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
done
[ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
echo "stop_slurm: stopped"
exit 0
