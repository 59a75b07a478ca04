#!/usr/bin/env bash
# Stop the test cluster that up.sh started under ROOT (SLURM.md §8): cancel its jobs, then stop its daemons by
# their recorded PIDs, never by name. Safe to run twice and after a failed up.sh.
# Usage: down.sh ROOT
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: down.sh ROOT" >&2; exit 1; }
ROOT=$1
PIDS=$ROOT/pids
[[ -d $PIDS ]] || { echo "down.sh: nothing recorded under $PIDS"; exit 0; }
export SLURM_CONF=$ROOT/etc/slurm.conf

gone() {  # PID has exited or is a zombie waiting to be reaped (kill -0 still succeeds on a zombie)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
    [[ -z $state || $state == Z ]]
}
pid_of() {  # the PID recorded in file $1, if that process is still one of our daemons (not a reused PID)
    local pid comm
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == slurmctld || $comm == slurmd || $comm == munged ]] || return 1
    echo "$pid"
}

# 1. Cancel this cluster's jobs while the controller still runs, and give them up to 10 s to leave the queue.
ctld=$(pid_of "$PIDS/slurmctld.pid" || true)
if [[ -n $ctld ]] && ! gone "$ctld" && [[ -f $SLURM_CONF ]]; then
    mapfile -t jobs < <(timeout 5 squeue -h -o %i 2>/dev/null || true)
    if (( ${#jobs[@]} )); then
        timeout 5 scancel "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null || true) ]] && break
            sleep 0.2
        done
    fi
fi

# 2. slurmd and slurmctld together, then munged last (the daemons authenticate through it until they exit).
stop() {  # stop the processes whose PID files are given: SIGTERM, ≤ 10 s, then SIGKILL
    local f pid pids=()
    for f in "$@"; do
        pid=$(pid_of "$f") || continue
        gone "$pid" || { kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); }
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do
            gone "$pid" && break
            sleep 0.1
        done
        gone "$pid" || { echo "down.sh: PID $pid ignored SIGTERM for 10 s: SIGKILL" >&2; kill -KILL "$pid" 2>/dev/null || true; }
    done
    rm -f "$@"
}
shopt -s nullglob
stop "$PIDS"/slurm*.pid
stop "$PIDS"/munged.pid
echo "down.sh: cluster under $ROOT stopped"
