#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster for fault tests, from the same Debian
# packages as rabbitmq.sh (HERALD_LOCAL_RABBITMQ chooses the version).
#
#   deploy/local/cluster.sh start          start the nodes (in parallel) and join them
#   deploy/local/cluster.sh stop           stop every node (data kept)
#   deploy/local/cluster.sh status         each node, and the cluster's running members
#   deploy/local/cluster.sh urls           the AMQP URLs of the nodes, comma-separated
#   deploy/local/cluster.sh kill N         SIGKILL node N (1-3), as a crash would
#   deploy/local/cluster.sh start-node N   start node N again; it rejoins from its data
#   deploy/local/cluster.sh stop-node N    stop node N gracefully
#   deploy/local/cluster.sh leader QUEUE [VHOST]
#                                          the number of the node leading a quorum queue
#   deploy/local/cluster.sh ctl N ARGS...  rabbitmqctl against node N (diag, queues: likewise
#                                          rabbitmq-diagnostics and rabbitmq-queues)
#
# Nodes herald1@localhost .. herald3@localhost listen on 127.0.0.1 only and
# share one private epmd (nodes find each other through it) and one cookie.
# Data: .local/cluster/nodeN for 3.10, .local/cluster-VERSION/nodeN otherwise;
# delete that directory (after stop) for a fresh cluster. Nodes are started
# together because a node that stopped last-but-one waits for its peers.
# A node that is not yet a member is reset (its data dropped) and joined to
# node 1. Partition handling is pause_minority, as in most 3-node deployments.
#
# Ports (node N uses the first port + N - 1):
#   HERALD_LOCAL_CLUSTER_AMQP_PORT   AMQP                 default 5691 (5691-5693)
#   HERALD_LOCAL_CLUSTER_DIST_PORT   Erlang distribution  default 25691 (25691-25693)
#   HERALD_LOCAL_CLUSTER_EPMD_PORT   the nodes' epmd      default 4391
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=deploy/local/rabbitmq-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/rabbitmq-lib.sh"

SIZE=3
AMQP_BASE="${HERALD_LOCAL_CLUSTER_AMQP_PORT:-5691}"
DIST_BASE="${HERALD_LOCAL_CLUSTER_DIST_PORT:-25691}"
CLUSTER_EPMD="${HERALD_LOCAL_CLUSTER_EPMD_PORT:-4391}"
RMQ_EXTRA_CONF="cluster_partition_handling = pause_minority"

for var in AMQP_BASE DIST_BASE CLUSTER_EPMD; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "port ${!var} is not a number"
done

rmq_select "${HERALD_LOCAL_RABBITMQ:-3.10}"
WANTED="$RMQ_VERSION"

# use_cluster V: the cluster of version V (sets CLUSTER_DIR and RMQ_COOKIE).
use_cluster() {
    rmq_select "$1"
    CLUSTER_DIR="$(rmq_data_dir cluster)"
    RMQ_COOKIE=""
    [[ ! -s $CLUSTER_DIR/.erlang.cookie ]] || RMQ_COOKIE="$(<"$CLUSTER_DIR/.erlang.cookie")"
}

# use_node N: make node N of the current cluster the current node.
use_node() {
    local n="$1"
    if ! [[ $n =~ ^[1-9]$ ]] || ((n > SIZE)); then
        die "node $n: choose a node number from 1 to $SIZE"
    fi
    rmq_node "herald$n@localhost" "$CLUSTER_DIR/node$n" "$((AMQP_BASE + n - 1))" \
        "$((DIST_BASE + n - 1))" "$CLUSTER_EPMD" "cluster $RMQ_VERSION node $n"
}

ensure_cookie() {
    mkdir -p "$CLUSTER_DIR"
    if [[ ! -s $CLUSTER_DIR/.erlang.cookie ]]; then
        (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' >"$CLUSTER_DIR/.erlang.cookie")
    fi
    RMQ_COOKIE="$(<"$CLUSTER_DIR/.erlang.cookie")"
}

# Node names that node N counts as members ("disk_nodes" on every version).
members_of() {
    use_node "$1"
    rmqctl cluster_status --formatter json |
        python3 -c 'import json, sys; print(" ".join(json.load(sys.stdin)[sys.argv[1]]))' "${2:-disk_nodes}"
}

live_nodes() {
    local n
    for n in $(seq 1 "$SIZE"); do
        use_node "$n"
        if server_pid >/dev/null; then echo "$n"; fi
    done
}

# Stop this checkout's cluster of another version that uses our AMQP ports.
stop_other_versions() {
    local v n
    for v in "${RMQ_VERSIONS[@]}"; do
        [[ $v != "$WANTED" ]] || continue
        use_cluster "$v"
        [[ -n "$(live_nodes)" ]] || continue
        grep -qx "listeners.tcp.default = 127.0.0.1:$AMQP_BASE" "$CLUSTER_DIR/node1/rabbitmq.conf" 2>/dev/null ||
            continue
        echo "cluster: stopping the RabbitMQ $v cluster of this checkout to start $WANTED on the same ports"
        for n in $(seq 1 "$SIZE"); do
            use_node "$n"
            node_stop
        done
    done
    use_cluster "$WANTED"
}

# Run "$@" once per node number, in parallel; fail if any failed.
each_node_parallel() {
    local n pids=() failed=()
    for n in $(seq 1 "$SIZE"); do
        "$@" "$n" &
        pids+=($!)
    done
    for n in $(seq 1 "$SIZE"); do
        wait "${pids[n - 1]}" || failed+=("$n")
    done
    ((${#failed[@]} == 0)) || die "node(s) ${failed[*]} failed (see above)"
}

start_one() { use_node "$1" && node_start; }
stop_one() { use_node "$1" && node_stop; }

join_to_first() {
    local n="$1" seed="herald1@localhost"
    [[ " $(members_of "$n") " == *" $seed "* ]] && return 0
    echo "cluster $RMQ_VERSION node $n: joining $seed"
    use_node "$n"
    # 3.10 reports harmless warnings while joining; show them only on failure.
    local out
    out="$({ rmqctl stop_app && rmqctl reset && rmqctl join_cluster "$seed" && rmqctl start_app &&
        rmqctl await_startup --timeout "$START_TIMEOUT"; } 2>&1)" ||
        die "node $n could not join $seed: $out"
}

cmd_start() {
    local t0 n running deadline
    t0="$(now)"
    stop_other_versions
    rmq_ensure_installed  # once, before the parallel starts
    ensure_cookie
    each_node_parallel start_one
    for n in $(seq 2 "$SIZE"); do join_to_first "$n"; done
    deadline=$((SECONDS + START_TIMEOUT))
    until running="$(members_of 1 running_nodes 2>/dev/null)" && (($(wc -w <<<"$running") == SIZE)); do
        ((SECONDS < deadline)) || die "the cluster has only ${running:-no} running nodes after ${START_TIMEOUT}s"
        sleep 0.5
    done
    rmqctl enable_feature_flag all >/dev/null 2>&1 || true
    echo "cluster $RMQ_VERSION: $SIZE nodes running in $(elapsed_since "$t0")s; HERALD_AMQP_URL=$(cmd_urls)"
}

cmd_stop() {
    each_node_parallel stop_one
    use_node 1
    epmd_stop_if_idle
}

cmd_status() {
    local n rc=0 first=""
    for n in $(seq 1 "$SIZE"); do
        use_node "$n"
        if pid="$(server_pid)" && node_answers; then
            echo "$LABEL: running ($NODE, amqp://127.0.0.1:$AMQP_PORT, pid $pid)"
            [[ -n $first ]] || first="$n"
        else
            echo "$LABEL: not running"
            rc=3
        fi
    done
    if [[ -n $first ]]; then
        echo "cluster $RMQ_VERSION: running members as node $first sees them: $(members_of "$first" running_nodes)"
    fi
    return "$rc"
}

cmd_urls() {
    local n urls=()
    for n in $(seq 1 "$SIZE"); do
        urls+=("amqp://guest:guest@127.0.0.1:$((AMQP_BASE + n - 1))/")
    done
    (IFS=,; echo "${urls[*]}")
}

# The leader of a quorum queue, asked of the first live node.
cmd_leader() {
    local queue="${1:?usage: $0 leader QUEUE [VHOST]}" vhost="${2:-/}" n leader
    for n in $(live_nodes); do
        use_node "$n"
        leader="$(rmqctl list_queues -p "$vhost" --no-table-headers name leader |
            awk -F '\t' -v q="$queue" '$1 == q { print $2 }')" || continue
        [[ $leader =~ ^herald([0-9]+)@ ]] || die "queue $queue in vhost $vhost: no leader known (${leader:-no such queue})"
        echo "${BASH_REMATCH[1]}"
        return 0
    done
    die "no node of the cluster answers"
}

use_cluster "$WANTED"

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
urls) cmd_urls ;;
kill) use_node "${2:?usage: $0 kill N}" && node_kill ;;
start-node) ensure_cookie && use_node "${2:?usage: $0 start-node N}" && node_start ;;
stop-node) use_node "${2:?usage: $0 stop-node N}" && node_stop ;;
leader) shift && cmd_leader "$@" ;;
ctl) use_node "${2:?usage: $0 ctl N ARGS...}" && shift 2 && rmqctl "$@" ;;
diag) use_node "${2:?usage: $0 diag N ARGS...}" && shift 2 && rmqdiag "$@" ;;
queues) use_node "${2:?usage: $0 queues N ARGS...}" && shift 2 && rmqqueues "$@" ;;
*)
    echo "usage: $0 {start|stop|status|urls|kill N|start-node N|stop-node N|leader QUEUE [VHOST]|ctl N ARGS...|diag N ARGS...|queues N ARGS...}" >&2
    exit 2
    ;;
esac
