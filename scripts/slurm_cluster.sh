#!/usr/bin/env bash
# A real two-node SLURM cluster (Debian's Slurm 22.05) on this one machine, for the tests marked `slurm`.
#
#   scripts/slurm_cluster.sh start    install slurmctld/slurmd/slurm-client/munge if missing (apt, root),
#                                     write /etc/slurm/slurm.conf, start munged, slurmctld and two slurmd
#                                     (node1, node2; MULTIPLE_SLURMD), wait until both nodes are up
#   scripts/slurm_cluster.sh stop     stop slurmctld and both slurmd (munged is left running)
#   scripts/slurm_cluster.sh status   exit 0 iff both nodes are up (idle/mixed/allocated/completing)
#
# `start` is idempotent: a healthy cluster with the same slurm.conf is left alone; a changed slurm.conf
# restarts the daemons.  Needs root (it writes /etc and runs jobs as root).  No systemd: the daemons are
# started directly.  Logs: /var/log/slurm/{slurmctld,slurmd-node1,slurmd-node2}.log, /var/log/munge/.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
NODES=(node1 node2)
PKGS=(slurmctld slurmd slurm-client munge)
APT_LOG=/tmp/slurm_cluster-apt.log
WAIT_S=${SLURM_CLUSTER_WAIT_S:-60}
HOST=$(hostname -s)

die() { echo "slurm_cluster.sh: ERROR: $*" >&2; exit 1; }
say() { echo "slurm_cluster.sh: $*" >&2; }

# --- packages -------------------------------------------------------------------------------------------
missing_packages() {
    local p
    for p in "${PKGS[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || echo "$p"
    done
}

install_packages() {
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    [ -z "${missing// /}" ] && return 0
    command -v apt-get >/dev/null || die "packages missing ($missing) and there is no apt-get to install them"
    say "installing $missing(log: $APT_LOG)"
    # no init system here: keep the packages' postinst from starting daemons; we start them ourselves
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local ok=0
    # shellcheck disable=SC2086
    if apt-get install -y -q --no-install-recommends $missing >"$APT_LOG" 2>&1; then
        ok=1
    elif apt-get update -q >>"$APT_LOG" 2>&1 \
        && apt-get install -y -q --no-install-recommends $missing >>"$APT_LOG" 2>&1; then
        ok=1
    fi
    [ "$made_policy" = 1 ] && rm -f "$policy"
    if [ "$ok" != 1 ]; then
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install $missing failed; see $APT_LOG"
    fi
}

# --- munge ----------------------------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return 0
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        say "creating $key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key" && chmod 0400 "$key"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    # 9>&-: a daemon must not inherit the lock's descriptor, or it holds the lock for its lifetime
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&- \
        || die "munged did not start; see /var/log/munge/munged.log"
    local i
    for i in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged runs but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
}

# --- slurm.conf -----------------------------------------------------------------------------------------
render_conf() {
    cat <<CONF
# Written by taxotrain scripts/slurm_cluster.sh: a two-node test cluster on one machine (MULTIPLE_SLURMD).
ClusterName=taxotrain-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# a requeued job may start again after cred_expire+1 s (default 120); tests can also skip the wait
# with \`scontrol update JobId=N StartTime=now\`
AuthInfo=cred_expire=20
MailProg=/bin/true
MpiDefault=none
# containers: no cgroups, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldPort=6817
NodeName=node[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=1 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
}

# prints "changed" when it (re)wrote slurm.conf
write_conf() {
    local new
    new=$(render_conf)
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 0; fi
    install -d -m 0755 "$CONF_DIR"
    if [ -f "$CONF" ] && ! grep -q '^# Written by taxotrain scripts/slurm_cluster.sh' "$CONF"; then
        cp -p "$CONF" "$CONF.taxotrain-backup"
        say "saved the existing $CONF as $CONF.taxotrain-backup"
    fi
    printf '%s\n' "$new" >"$CONF"
    echo changed
}

ensure_hosts() {
    local n
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null && continue
        echo "127.0.0.1 ${NODES[*]}  # taxotrain slurm_cluster.sh" >>/etc/hosts
        return 0
    done
}

# --- daemons --------------------------------------------------------------------------------------------
# running PID: the process exists and is not a zombie (PID 1 in containers may be slow to reap)
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}
# alive PIDFILE NAME: the pid in PIDFILE is a running NAME process
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }

# node_states: "node1 idle" lines (sinfo's long state names, "*" appended when not responding)
node_states() { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

nodes_up() {
    local states n
    states=$(node_states) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated|completing|planned)\$" <<<"$states" || return 1
    done
}

daemons_alive() {
    local n
    alive "$CTLD_PID" slurmctld || return 1
    for n in "${NODES[@]}"; do alive "$(slurmd_pidfile "$n")" slurmd || return 1; done
}

stop_daemons() {
    local f name pids=() i
    for f in "$(slurmd_pidfile node1)" "$(slurmd_pidfile node2)" "$CTLD_PID"; do
        name=slurmd; [ "$f" = "$CTLD_PID" ] && name=slurmctld
        if alive "$f" "$name"; then pids+=("$(cat "$f")"); fi
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for i in $(seq 150); do
        local left=()
        for f in "${pids[@]}"; do running "$f" && left+=("$f"); done
        [ ${#left[@]} -eq 0 ] && return 0
        if [ "$i" = 100 ]; then
            say "sending SIGKILL to ${left[*]} (still running 20 s after SIGTERM)"
            kill -KILL "${left[@]}" 2>/dev/null || true
        fi
        sleep 0.2
    done
    die "slurm daemons ${pids[*]} did not exit"
}

start_daemons() {
    local n i
    install -d -m 0755 "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
    if ! alive "$CTLD_PID" slurmctld; then
        slurmctld </dev/null >/dev/null 2>&1 9>&- || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
    fi
    for i in $(seq $((WAIT_S * 5))); do
        [[ "$(timeout 5 scontrol ping 2>/dev/null || true)" == *"is UP"* ]] && break
        if [ "$i" = $((WAIT_S * 5)) ] || ! alive "$CTLD_PID" slurmctld; then
            tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true
            die "slurmctld is not answering; see $LOG_DIR/slurmctld.log"
        fi
        sleep 0.2
    done
    for n in "${NODES[@]}"; do
        alive "$(slurmd_pidfile "$n")" slurmd && continue
        install -d -m 0755 "$SPOOL_DIR/$n"
        slurmd -N "$n" </dev/null >/dev/null 2>&1 9>&- || die "slurmd -N $n did not start; see $LOG_DIR/slurmd-$n.log"
    done
}

wait_nodes_up() {
    local i states resumed=0
    for i in $(seq $((WAIT_S * 2))); do
        nodes_up && return 0
        states=$(node_states || true)
        # down/drained nodes (e.g. left so by an earlier run) are put back to work once
        if [ "$resumed" = 0 ] && grep -Eq ' (down|drain|drained|draining|fail)' <<<"$states"; then
            scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        local n
        for n in "${NODES[@]}"; do
            alive "$(slurmd_pidfile "$n")" slurmd \
                || die "slurmd -N $n exited; see $LOG_DIR/slurmd-$n.log"
        done
        sleep 0.5
    done
    echo "$states" >&2
    die "nodes not up after ${WAIT_S}s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-node{1,2}.log"
}

show_status() {
    timeout 10 sinfo -N -l 2>&1 || true
}

# --- commands -------------------------------------------------------------------------------------------
cmd_start() {
    if [ "$(id -u)" != 0 ]; then
        # others may use a cluster that root started; only root can start one
        if command -v sinfo >/dev/null && nodes_up; then show_status; return 0; fi
        die "must run as root (it installs packages, writes /etc/slurm and /etc/hosts)"
    fi
    lock
    install_packages
    ensure_hosts
    start_munge
    local changed
    changed=$(write_conf)
    if [ -z "$changed" ] && daemons_alive && nodes_up; then
        show_status
        return 0
    fi
    if [ -n "$changed" ]; then
        say "wrote $CONF"
        stop_daemons
    fi
    start_daemons
    wait_nodes_up
    show_status
}

cmd_stop() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    lock
    stop_daemons
    say "stopped slurmctld and slurmd (munged left running)"
}

cmd_status() {
    command -v sinfo >/dev/null || die "sinfo not found: run '$0 start'"
    show_status
    daemons_alive || die "slurmctld or a slurmd (node1, node2) is not running; run '$0 start'"
    nodes_up || die "the nodes are not both up"
}

# one start/stop at a time (parallel test sessions may all call start)
lock() {
    exec 9>>/run/taxotrain-slurm_cluster.lock || die "cannot open /run/taxotrain-slurm_cluster.lock"
    flock -w 300 9 || die "another slurm_cluster.sh start/stop held the lock for 300 s"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
