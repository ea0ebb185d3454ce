#!/usr/bin/env bash
# Start a real one-node Slurm with accounting on this machine, as plain background processes
# (no systemd): munged, mariadbd, slurmdbd, slurmctld, slurmd. Meant for CI and for trying the
# Slurm launchers locally; the reason for each non-obvious setting is in a comment beside it.
#
#   sudo slurm/start_local.sh          # start (installs the packages if missing); idempotent
#   sudo slurm/stop_local.sh           # cancel all jobs, stop the daemons
#
# Knobs (environment):
#   SLURM_LOCAL_DIR  state, spool, logs, pid files, MariaDB datadir   (default /var/tmp/cskd-slurm)
#   SLURM_ACCOUNTING 1: slurmdbd + MariaDB so that sacct works; 0: none (default 1)
#   SLURM_FAKE_GPUS  number of fake GPUs (GRES gpu) on the node; 0: no GRES at all (default 2)
#   SLURM_WAIT_S     deadline in seconds for each readiness stage       (default 90)
#
# A second call while everything runs is a quick no-op. slurmctld/slurmd (slurmdbd) are restarted
# only when the configuration this script writes changed. Daemons are tracked by PID files holding
# "PID STARTTIME" and are never looked up or killed by name.
# stop_local.sh sources this file for its helpers; main only runs when the file is executed.
set -euo pipefail

# Daemons live in /usr/sbin, which CI shells often leave out of PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/var/tmp/cskd-slurm}
SLURM_ACCOUNTING=${SLURM_ACCOUNTING:-1}
SLURM_FAKE_GPUS=${SLURM_FAKE_GPUS:-2}
SLURM_WAIT_S=${SLURM_WAIT_S:-90}

ETC=/etc/slurm
MARKER="# managed-by cskd slurm/start_local.sh (a foreign file is backed up before it is replaced)"
PIDS="$SLURM_LOCAL_DIR/pids"    # our "PID STARTTIME" records, one per daemon
LOGS="$SLURM_LOCAL_DIR/log"
RUN="$SLURM_LOCAL_DIR/run"      # the daemons' own pid files
DB_DIR="$SLURM_LOCAL_DIR/mysql"
DB_SOCKET=/run/mysqld/mysqld.sock
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop in reverse
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

T0=${EPOCHREALTIME/./}   # microseconds, for the timings printed

elapsed() { local now=${EPOCHREALTIME/./}; printf '%d.%01d' $(((now - T0) / 1000000)) $(((now - T0) / 100000 % 10)); }
say() { printf '[%s %5ss] %s\n' "${0##*/}" "$(elapsed)" "$*"; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Process tracking: a PID alone can be recycled, so each record also holds the start time (field
# 22 of /proc/PID/stat). A zombie ('Z') counts as dead: a minimal PID 1 reaps orphans seconds late,
# which is also why `kill -0` alone (true for a zombie) is never used.

# "STATE STARTTIME" of a PID, or failure when there is no such process. The command name (field 2)
# may contain spaces and ')', so split after the last ')'.
proc_state() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $stat ]] || return 1
    local -a f
    read -r -a f <<<"${stat##*) }"
    echo "${f[0]} ${f[19]}"
}

# recorded_pid NAME: the PID in NAME's record (nothing if none).
recorded_pid() { local pid _; [[ -f $PIDS/$1.pid ]] && read -r pid _ <"$PIDS/$1.pid" && echo "$pid"; true; }

# alive NAME: the recorded process still exists, is not a zombie and has the recorded start time.
alive() {
    local pid start cur
    [[ -f $PIDS/$1.pid ]] || return 1
    read -r pid start <"$PIDS/$1.pid" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cur=$(proc_state "$pid") || return 1
    [[ ${cur%% *} != [ZX] && ${cur#* } == "$start" ]]
}

# stop_daemon NAME [GRACE_S]: TERM the recorded process (only if it is still the recorded one),
# KILL it after GRACE_S (default 30), and remove the record.
stop_daemon() {
    local name=$1 grace=${2:-30} pid t
    if alive "$name"; then
        pid=$(recorded_pid "$name")
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((t = 0; t < grace * 10; t++)); do alive "$name" || break; sleep 0.1; done
        if alive "$name"; then
            say "$name did not exit within ${grace}s of TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((t = 0; t < 100; t++)); do alive "$name" || break; sleep 0.1; done
            alive "$name" && die "$name (pid $pid) survived KILL"
        fi
    fi
    rm -f "$PIDS/$name.pid"
}

# launch NAME CMD...: run CMD in its own session (setsid), stdin from /dev/null, stdout/stderr
# appended to $LOGS/NAME.out and every other inherited descriptor closed, so that the caller's
# pipes (a CI step, pytest's capture) are not held open by the daemon; record "PID STARTTIME".
launch() {
    local name=$1; shift
    local out="$LOGS/$name.out" pid st
    printf '==== %s: %s\n' "$(date '+%F %T')" "$*" >>"$out"
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            if ((fd > 2 && fd < 255)); then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        # Not a process-group leader here, so setsid calls setsid() and execs: $! is the daemon.
        exec setsid "$@" </dev/null >>"$out" 2>&1
    ) &
    pid=$!
    st=$(proc_state "$pid") || fail "$name" "$name exited immediately"
    echo "$pid ${st#* }" >"$PIDS/$name.pid.tmp"
    mv -f "$PIDS/$name.pid.tmp" "$PIDS/$name.pid"
    say "started $name (pid $pid)"
}

# fail STAGE DAEMON REASON: report which stage failed with the end of the daemon's logs; exit 1.
fail() {
    local stage=$1 daemon=$2 reason=$3 f
    printf '%s: FAILED at stage "%s": %s\n' "${0##*/}" "$stage" "$reason" >&2
    for f in "$LOGS/$daemon.out" "$LOGS/$daemon.log"; do
        [[ -s $f ]] || continue
        printf -- '----- tail of %s -----\n' "$f" >&2
        tail -n 30 "$f" >&2
    done
    exit 1
}

# wait_for STAGE DAEMON CHECK...: retry CHECK until it succeeds, failing early if DAEMON died and
# at the latest after SLURM_WAIT_S. Each CHECK bounds its own commands with `timeout`.
wait_for() {
    local stage=$1 daemon=$2; shift 2
    local deadline=$((${EPOCHREALTIME%.*} + SLURM_WAIT_S))
    until "$@" >/dev/null 2>&1; do
        alive "$daemon" || fail "$stage" "$daemon" "$daemon is not running (exited or killed)"
        ((${EPOCHREALTIME%.*} < deadline)) || fail "$stage" "$daemon" "not ready within SLURM_WAIT_S=${SLURM_WAIT_S}s"
        sleep 0.2
    done
    say "ready: $stage"
}

# ---------------------------------------------------------------------------------------------
# Readiness checks.

munge_ok() { timeout 5 munge -n | timeout 5 unmunge; }
mariadb_ok() { timeout 5 mariadb-admin --socket="$DB_SOCKET" ping; }
dbd_port_ok() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'; }
ctld_ok() { timeout 10 scontrol ping | grep -q 'is UP'; }
sacct_ok() { timeout 10 sacct -n -X -S now; }

# node_ok: the node is usable (idle, or busy with jobs recovered after a restart); a node left
# drained or down (e.g. by a previous unclean stop) is resumed.
node_ok() {
    local state
    state=$(timeout 10 sinfo -h -n localhost -o %t | head -n1) || return 1
    case $state in
        idle | mix | alloc) return 0 ;;
        drain* | drng | down | fail*) timeout 10 scontrol update nodename=localhost state=resume || true ;;
    esac
    return 1
}

# ---------------------------------------------------------------------------------------------
# Installation and configuration.

ensure_installed() {
    local -a need=(slurmctld slurmd scontrol sinfo sbatch squeue scancel sacct munged munge unmunge
        setpriv setsid mknod timeout)
    ((SLURM_ACCOUNTING)) && need+=(slurmdbd mariadbd mariadb-install-db mariadb-admin mariadb)
    local -a missing=() b
    for b in "${need[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
    ((${#missing[@]})) || return 0
    ((EUID == 0)) || die "missing ${missing[*]}; installing them needs root: run this script as root, or
  apt-get install --no-install-recommends ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # The lock timeout waits out another apt (e.g. unattended-upgrades) instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -q >"$LOGS/apt.log" 2>&1 ||
        { tail -n 20 "$LOGS/apt.log" >&2; die "apt-get update failed (log: $LOGS/apt.log)"; }
    # --no-install-recommends: the slurm-wlm recommends pull in 40-odd packages we do not need.
    # policy-rc.d (or the absence of systemd) keeps the postinst scripts from starting daemons.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends "${PACKAGES[@]}" >>"$LOGS/apt.log" 2>&1 ||
        { tail -n 20 "$LOGS/apt.log" >&2; die "apt-get install failed (log: $LOGS/apt.log)"; }
    for b in "${need[@]}"; do command -v "$b" >/dev/null || die "$b still missing after apt-get install"; done
    say "installed"
}

prepare_dirs() {
    mkdir -p "$SLURM_LOCAL_DIR" "$PIDS" "$LOGS" "$RUN" "$SLURM_LOCAL_DIR/state" "$SLURM_LOCAL_DIR/spool" "$ETC"
    chmod 755 "$SLURM_LOCAL_DIR"    # mariadbd (mysql) and munged (munge) must traverse it
    # systemd's tmpfiles would create these runtime directories; without it, we do.
    install -d -o munge -g munge -m 755 /run/munge
    if ((SLURM_ACCOUNTING)); then install -d -o mysql -g mysql -m 755 /run/mysqld; fi
    # mariadbd writes its error log as mysql (and exits without a word if it cannot).
    if ((SLURM_ACCOUNTING)); then touch "$LOGS/mariadbd.log" && chown mysql:mysql "$LOGS/mariadbd.log"; fi
}

ensure_munge_key() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        say "creating $key"
        mungekey --create --keyfile="$key"
    fi
    chown munge:munge "$key"
    chmod 600 "$key"
}

# write_conf PATH MODE: install stdin as PATH if its content differs; sets CHANGED=1 if so. A file
# without our marker line is someone else's: keep a copy before replacing it.
CHANGED=0
write_conf() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 0; fi
    if [[ -f $path ]] && ! grep -qF "$MARKER" "$path"; then
        local backup
        backup="$path.bak.$(date +%Y%m%d-%H%M%S)"
        cp -p "$path" "$backup"
        say "backed up foreign $path to $backup"
    fi
    mv -f "$tmp" "$path"
    CHANGED=1
    say "wrote $path"
}

# Fake GPUs: slurmd only accepts character or block devices as GRES files; mknod c 1 3 (the
# /dev/null numbers) gives it those, and jobs then get CUDA_VISIBLE_DEVICES. Where mknod is not
# permitted (some containers), Count= still lets Slurm schedule GPUs, without CUDA_VISIBLE_DEVICES.
gres_lines() {
    local n=$SLURM_FAKE_GPUS dir="$SLURM_LOCAL_DIR/fakegpu" i ok=1
    ((n > 0)) || return 0
    mkdir -p "$dir"
    for ((i = 0; i < n; i++)); do
        [[ -c $dir/nvidia$i ]] && continue
        rm -f "$dir/nvidia$i"
        mknod "$dir/nvidia$i" c 1 3 2>/dev/null || { ok=0; break; }
    done
    if ((ok)); then
        if ((n == 1)); then echo "NodeName=localhost Name=gpu File=$dir/nvidia0"
        else echo "NodeName=localhost Name=gpu File=$dir/nvidia[0-$((n - 1))]"; fi
    else
        echo "# mknod failed here: GPUs are schedulable but jobs get no CUDA_VISIBLE_DEVICES"
        echo "NodeName=localhost Name=gpu Count=$n"
    fi
}

# Writes slurm.conf, gres.conf (and slurmdbd.conf). A change leaves a flag file in $RUN that is
# removed only once the daemons reading that file have been restarted and are ready, so a start
# that fails half-way still restarts them next time.
write_configs() {
    local hw cpus boards sockets cores threads mem
    hw=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || die "slurmd -C failed to detect the hardware"
    field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    cpus=$(field CPUs) boards=$(field Boards) sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore) mem=$(field RealMemory)
    [[ -n $cpus && -n $mem ]] || die "cannot parse slurmd -C: $hw"
    # RealMemory above what slurmd detects marks the node INVAL; leave 5% headroom.
    mem=$((mem * 95 / 100))

    local gres_node="" gres_types="" tres=""
    if ((SLURM_FAKE_GPUS > 0)); then
        gres_node=" Gres=gpu:$SLURM_FAKE_GPUS"
        gres_types="GresTypes=gpu"
        tres="AccountingStorageTRES=gres/gpu"
    fi
    local accounting
    if ((SLURM_ACCOUNTING)); then
        accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
$tres"
    else
        accounting="AccountingStorageType=accounting_storage/none"
    fi

    CHANGED=0
    write_conf "$ETC/slurm.conf" 644 <<EOF
$MARKER
# One-node Slurm for local tests (knobs: SLURM_LOCAL_DIR=$SLURM_LOCAL_DIR
# SLURM_ACCOUNTING=$SLURM_ACCOUNTING SLURM_FAKE_GPUS=$SLURM_FAKE_GPUS). All traffic stays on 127.0.0.1.
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job cannot restart before the credential expires (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
# Silences "MailProg invalid".
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
KillWait=5
# Scheduling passes every 2 s instead of 60/30 s: requeued and queued jobs start promptly.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job with no --mem takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=1024
$gres_types
$accounting
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# Preemption for tests: jobs in the hidden 'urgent' partition requeue jobs in cpu/gpu, which get
# their --signal first (preempt_send_user_signal) and GraceTime seconds to checkpoint.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation=$SLURM_LOCAL_DIR/state
SlurmdSpoolDir=$SLURM_LOCAL_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# From slurmd -C; the node is called localhost whatever the hostname (slurmd runs with -N localhost).
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem$gres_node State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF Hidden=YES
EOF
    # Not `... | write_conf`: a pipeline runs write_conf in a subshell and CHANGED would be lost.
    write_conf "$ETC/gres.conf" 644 < <(echo "$MARKER"; gres_lines)
    if ((CHANGED)); then touch "$RUN/restart-slurmctld" "$RUN/restart-slurmd"; fi

    CHANGED=0
    if ((SLURM_ACCOUNTING)); then
        # slurmdbd refuses a slurmdbd.conf readable by others (it holds the DB password).
        write_conf "$ETC/slurmdbd.conf" 600 <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(db_password)
StorageLoc=slurm_acct_db
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
    fi
    if ((CHANGED)); then touch "$RUN/restart-slurmdbd"; fi
}

# A random password for the local DB user, made once and kept with the state.
db_password() {
    local f="$SLURM_LOCAL_DIR/db.pass"
    if [[ ! -s $f ]]; then
        (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$f")
    fi
    cat "$f"
}

# ---------------------------------------------------------------------------------------------
# The daemons, in start order.

start_munged() {
    # As the munge user, as its packaging would; in the foreground it logs to stderr (munged.out).
    # --force: start even if a previous munged left its socket behind.
    alive munged || launch munged setpriv --reuid=munge --regid=munge --init-groups munged -F --force
    wait_for "munge (munge -n | unmunge)" munged munge_ok
}

start_mariadb() {
    if ! alive mariadbd; then
        if [[ ! -d $DB_DIR/mysql ]]; then
            say "initialising the MariaDB datadir $DB_DIR"
            mariadb-install-db --user=mysql --datadir="$DB_DIR" --skip-test-db \
                --auth-root-authentication-method=socket >"$LOGS/mariadb-install-db.log" 2>&1 ||
                fail "mariadb-install-db" mariadb-install-db "initialising $DB_DIR failed"
        fi
        # No networking: slurmdbd talks to it over the socket. Its pid file and error log must be
        # writable by mysql, or it exits (the pid file goes into its own datadir).
        launch mariadbd mariadbd --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCKET" \
            --skip-networking --innodb-buffer-pool-size=64M --pid-file="$DB_DIR/mariadbd.pid" \
            --log-error="$LOGS/mariadbd.log"
    fi
    wait_for "mariadb (mariadb-admin ping)" mariadbd mariadb_ok
    # Every time, so that a lost db.pass or a fresh datadir is repaired: root logs in by socket.
    timeout 30 mariadb --socket="$DB_SOCKET" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(db_password)';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(db_password)';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" >>"$LOGS/mariadbd.out" 2>&1 ||
        fail "mariadb user slurm@localhost" mariadbd "creating the DB user failed"
}

# restart_if_config_changed NAME: stop NAME if the config it reads changed since it started.
# (Jobs survive: slurmctld recovers them from its state, their slurmstepds outlive slurmd.)
restart_if_config_changed() {
    if [[ -e $RUN/restart-$1 ]]; then stop_daemon "$1"; fi
}
config_applied() { rm -f "$RUN/restart-$1"; }

start_slurmdbd() {
    restart_if_config_changed slurmdbd
    alive slurmdbd || launch slurmdbd slurmdbd -D
    wait_for "slurmdbd (TCP 127.0.0.1:6819)" slurmdbd dbd_port_ok
    config_applied slurmdbd
}

start_slurmctld() {
    restart_if_config_changed slurmctld
    alive slurmctld || launch slurmctld slurmctld -D
    wait_for "slurmctld (scontrol ping UP)" slurmctld ctld_ok
    config_applied slurmctld
}

start_slurmd() {
    restart_if_config_changed slurmd
    alive slurmd || launch slurmd slurmd -D -N localhost
    wait_for "slurmd (node localhost idle in sinfo)" slurmd node_ok
    config_applied slurmd
}

main() {
    [[ $SLURM_ACCOUNTING =~ ^[01]$ ]] || die "SLURM_ACCOUNTING must be 0 or 1"
    [[ $SLURM_FAKE_GPUS =~ ^[0-9]+$ ]] || die "SLURM_FAKE_GPUS must be a number"
    [[ $SLURM_WAIT_S =~ ^[0-9]+$ ]] || die "SLURM_WAIT_S must be a number of seconds"
    if ((EUID == 0)); then mkdir -p "$LOGS"; fi
    ensure_installed
    ((EUID == 0)) || die "must run as root: it writes $ETC, starts the daemons and owns $SLURM_LOCAL_DIR"

    prepare_dirs
    ensure_munge_key
    write_configs
    start_munged
    if ((SLURM_ACCOUNTING)); then
        start_mariadb
        start_slurmdbd
    fi
    start_slurmctld
    start_slurmd
    if ((SLURM_ACCOUNTING)); then wait_for "accounting (sacct -n -X -S now)" slurmdbd sacct_ok; fi

    local parts gres="none"
    parts=$(timeout 10 sinfo --all -h -o '%P' | paste -sd ' ')
    ((SLURM_FAKE_GPUS > 0)) && gres="gpu:$SLURM_FAKE_GPUS"
    say "slurm up in $(elapsed)s: node localhost $(timeout 10 sinfo -h -n localhost -o '%c CPUs, %m MB, %t' | head -n1), gres $gres, partitions $parts (urgent hidden), accounting $( ((SLURM_ACCOUNTING)) && echo slurmdbd || echo off), state in $SLURM_LOCAL_DIR"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
