#!/usr/bin/env bash
# Stop the one-node Slurm started by slurm/start_local.sh: cancel every job and wait until the
# queue is empty (so that no slurmstepd outlives slurmd), then TERM each recorded daemon in
# reverse start order, KILL after 30 s, and remove the PID files. Only processes whose PID file
# still matches (PID and start time) are signalled; nothing is ever looked up or killed by name.
# Idempotent: with nothing running it does nothing. State, logs and the database are kept, so
# the next start_local.sh resumes from them.
#
# Knobs: SLURM_LOCAL_DIR (as for start_local.sh), SLURM_STOP_WAIT_S (deadline for the queue to
# drain, default 60).
set -euo pipefail

# The PID-file helpers (alive, stop_daemon, say, ...) and the paths come from start_local.sh;
# sourcing it defines them without starting anything.
# shellcheck source=start_local.sh
source "$(dirname "${BASH_SOURCE[0]}")/start_local.sh"

SLURM_STOP_WAIT_S=${SLURM_STOP_WAIT_S:-60}

# cancel_all_jobs: scancel every job (all users) and wait, with a deadline, until squeue is empty
# (completing jobs included).
cancel_all_jobs() {
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || { say "slurmctld not answering; no jobs to cancel"; return 0; }
    local -a jobs
    mapfile -t jobs < <(timeout 10 squeue -h -o %A | sort -u)
    if ((${#jobs[@]} == 0)); then return 0; fi
    say "cancelling ${#jobs[@]} job(s): ${jobs[*]}"
    timeout 30 scancel "${jobs[@]}" || true
    local deadline=$((${EPOCHREALTIME%.*} + SLURM_STOP_WAIT_S)) left
    while :; do
        left=$(timeout 10 squeue -h -o %A | wc -l) || left=unknown
        [[ $left == 0 ]] && break
        if ((${EPOCHREALTIME%.*} >= deadline)); then
            say "warning: $left job(s) still in the queue after ${SLURM_STOP_WAIT_S}s; stopping anyway"
            break
        fi
        sleep 0.5
    done
    say "queue empty"
}

stop_main() {
    local d any=0
    for d in "${DAEMONS[@]}"; do alive "$d" && any=1; done
    if ((!any)); then
        rm -f "$PIDS"/*.pid 2>/dev/null || true   # stale records of daemons that died on their own
        say "nothing running"
        return 0
    fi
    ((EUID == 0)) || die "must run as root: the daemons run as root (and munge/mysql)"
    alive slurmctld && cancel_all_jobs
    # Reverse start order: slurmd before slurmctld (which flushes job records to slurmdbd), slurmdbd
    # before its database, munge (everyone's authentication) last.
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}" 30; done
    say "stopped in $(elapsed)s"
}

stop_main "$@"
