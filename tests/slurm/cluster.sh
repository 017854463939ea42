#!/usr/bin/env bash
# A single-node SLURM cluster with accounting on this machine, for the SLURM test suite.
#
#   tests/slurm/cluster.sh up      install (Debian packages, if missing) and start munge, MariaDB,
#                                  slurmdbd, slurmctld and slurmd
#   tests/slurm/cluster.sh down    cancel the cluster's jobs, stop every daemon by its recorded PID
#
# Root, Debian 12, no systemd needed. Every daemon runs in the foreground under setsid with its
# inherited file descriptors closed; its PID is written to $STATE/pid/<name>. The node declares
# $VQ4DIT_SLURM_GPUS stand-in GPUs (character devices like /dev/null) as GRES, so GPU jobs are
# scheduled and get CUDA_VISIBLE_DEVICES exactly as on a GPU node, and the CPUs and memory of a GPU
# node (SlurmdParameters=config_overrides), so that profiles/slurm is scheduled unchanged.
# The configuration lives in $STATE/etc and is linked into /etc/slurm (refused if another one is
# there; the links are removed by `down`): jobs find it there as on a real cluster (the executor
# plugin's job step drops SLURM_* variables, SLURM_CONF included, before its inner srun).
# Environment: VQ4DIT_SLURM_STATE (default /tmp/vq4dit-slurm), VQ4DIT_SLURM_GPUS (4),
# VQ4DIT_SLURM_CPUS (32), VQ4DIT_SLURM_MEM_MB (262144), VQ4DIT_SLURM_ACCOUNT (vq4dit).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${VQ4DIT_SLURM_STATE:-/tmp/vq4dit-slurm}
GPUS=${VQ4DIT_SLURM_GPUS:-4}
CPUS=${VQ4DIT_SLURM_CPUS:-32}
MEM_MB=${VQ4DIT_SLURM_MEM_MB:-262144}
ACCOUNT=${VQ4DIT_SLURM_ACCOUNT:-vq4dit}
HOST=$(hostname -s)
CONFS=(slurm.conf gres.conf slurmdbd.conf)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stopped in reverse

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

wait_for() {  # seconds, daemon, command...: poll the command until it succeeds; fail if the daemon exits
    local seconds=$1 daemon=$2; shift 2
    for _ in $(seq $((seconds * 4))); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$(cat "$STATE/pid/$daemon")" 2>/dev/null || die "$daemon exited: $(tail -n 5 "$STATE/log/$daemon.out")"
        sleep 0.25
    done
    die "$daemon not ready after ${seconds}s; logs in $STATE/log/"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]}"
    local policy=/usr/sbin/policy-rc.d created=""
    if [[ ! -e $policy ]]; then   # keep maintainer scripts from starting services
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [[ -n $created ]] && rm -f "$policy"
    return 0
}

start() {  # name, command...: run in the foreground of a new session, fds > 2 closed, PID recorded
    local name=$1; shift
    setsid bash -c 'for fd in /proc/$$/fd/*; do n=${fd##*/}; (( n > 2 )) && eval "exec $n>&-"; done; exec "$@"' \
        _ "$@" </dev/null >"$STATE/log/$name.out" 2>&1 &
    echo $! > "$STATE/pid/$name"
}

fill() {  # template, output: substitute the @…@ values
    sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
        -e "s|@GPUS@|$GPUS|g" -e "s|@LAST_GPU@|$((GPUS - 1))|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@PORT@|${VQ4DIT_SLURM_PORT:-6817}|g" -e "s|@PORT1@|$((${VQ4DIT_SLURM_PORT:-6817} + 1))|g" \
        -e "s|@PORT2@|$((${VQ4DIT_SLURM_PORT:-6817} + 2))|g" "$1" > "$2"
}

node_state() { sinfo -h -N -o %T | head -1; }

up() {
    [[ $(id -u) -eq 0 ]] || die "needs root (it installs packages and starts system daemons)"
    for name in "${DAEMONS[@]}"; do
        [[ -s $STATE/pid/$name ]] && kill -0 "$(cat "$STATE/pid/$name")" 2>/dev/null \
            && die "$name already running (PID $(cat "$STATE/pid/$name")); run '$0 down' first"
    done
    install_packages
    rm -rf "$STATE" && mkdir -p "$STATE"/{etc,ctld,slurmd,run,log,pid,gpu,mysql}
    for i in $(seq 0 $((GPUS - 1))); do mknod "$STATE/gpu/fakegpu$i" c 1 3; done
    DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    fill "$HERE/slurm.conf.in" "$STATE/etc/slurm.conf"
    fill "$HERE/gres.conf.in" "$STATE/etc/gres.conf"
    fill "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf"
    chmod 600 "$STATE/etc/slurmdbd.conf"
    mkdir -p /etc/slurm
    for conf in "${CONFS[@]}"; do
        [[ -e /etc/slurm/$conf || -L /etc/slurm/$conf ]] \
            && die "/etc/slurm/$conf exists: this machine has its own SLURM configuration; not touching it"
    done
    for conf in "${CONFS[@]}"; do ln -s "$STATE/etc/$conf" "/etc/slurm/$conf"; done

    # munge: the key and directories of the Debian package, the daemon as the munge user
    mkdir -p /etc/munge /var/lib/munge /run/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /run/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
    wait_for 20 munged bash -c 'munge -n | unmunge'

    # MariaDB for slurmdbd: a fresh data directory under $STATE, local socket only
    chown mysql:mysql "$STATE/mysql" && mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" >"$STATE/log/mariadb-install.out" 2>&1 \
        || die "mariadb-install-db failed: $STATE/log/mariadb-install.out"
    start mariadbd mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-networking \
        --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid
    wait_for 60 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
    mariadb --socket=/run/mysqld/mysqld.sock -e "CREATE DATABASE slurm_acct_db;
        CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

    start slurmdbd slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster vq4dit-test >/dev/null
    sacctmgr -i add account "$ACCOUNT" cluster=vq4dit-test description="vq4dit tests" >/dev/null
    sacctmgr -i add user "$(id -un)" account="$ACCOUNT" cluster=vq4dit-test >/dev/null

    start slurmctld slurmctld -D -c   # -c: no state (DRAIN etc.) from earlier runs
    wait_for 30 slurmctld scontrol ping
    start slurmd slurmd -D
    for _ in $(seq 120); do
        case $(node_state) in
            idle) log "up: $HOST, $CPUS CPUs, $MEM_MB MB, $GPUS GPUs (GRES), partitions cpu and gpu, account $ACCOUNT"
                  return 0 ;;
            drain*|inval*|down*) sleep 1; [[ $(node_state) == idle ]] && continue
                  scontrol show node "$HOST" >&2; die "node $(node_state); logs in $STATE/log/" ;;
        esac
        sleep 0.5
    done
    die "node not idle after 60s (state: $(node_state)); logs in $STATE/log/"
}

stop() {  # name: SIGTERM to the recorded PID, SIGKILL after 15 s
    local file=$STATE/pid/$1 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && { log "$1 (PID $pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid"; }
    fi
    rm -f "$file"
}

down() {
    if [[ -s $STATE/pid/slurmctld ]] && scontrol ping >/dev/null 2>&1; then
        scancel --full --user="$(id -un)" 2>/dev/null || true   # the jobs' steps end with their job
        for _ in $(seq 40); do [[ -z $(squeue -h -t R,CG 2>/dev/null) ]] && break; sleep 0.5; done
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop "${DAEMONS[i]}"; done
    for conf in "${CONFS[@]}"; do   # only our links
        [[ $(readlink "/etc/slurm/$conf") == "$STATE/etc/$conf" ]] && rm -f "/etc/slurm/$conf"
    done
    log "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
