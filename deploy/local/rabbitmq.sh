#!/usr/bin/env bash
# A private RabbitMQ node for development, tests and CI, from Debian packages.
#
#   deploy/local/rabbitmq.sh {start|stop|restart|status|kill}
#   deploy/local/rabbitmq.sh ctl ARGS...     rabbitmqctl against this node
#   deploy/local/rabbitmq.sh diag ARGS...    rabbitmq-diagnostics against this node
#   deploy/local/rabbitmq.sh queues ARGS...  rabbitmq-queues against this node
#
# (A bare `rabbitmqctl` cannot reach this node: it would use the default
# epmd port 4369 and $HOME/.erlang.cookie of the caller, and for 4.x it is
# not even installed on this machine.)
#
# HERALD_LOCAL_RABBITMQ chooses the version: 3.10 (default; bookworm's package
# on this machine), 4.0 (trixie's) or 4.3 (sid's), the last two in a Debian
# root built once under .local/chroot (see rabbitmq-lib.sh). Each version has
# its own data: .local/rabbitmq for 3.10, .local/rabbitmq-VERSION otherwise.
# Starting one version while another of this checkout listens on the same
# AMQP port stops that one first (its data is kept). Versions can run side by
# side on other ports (all three HERALD_LOCAL_*_PORT, the epmd one included:
# every version's node is herald@localhost).
#
# The node (herald@localhost) keeps everything in its data directory: data,
# logs, config, pid file and its own Erlang cookie (HOME points there). It
# listens on 127.0.0.1 only and uses its own epmd, so it never meets the
# Debian system node or another checkout's node.
#
# Ports (override with the environment):
#   HERALD_LOCAL_AMQP_PORT  AMQP                     default 5673
#   HERALD_LOCAL_DIST_PORT  Erlang distribution      default 25673
#   HERALD_LOCAL_EPMD_PORT  private epmd             default 4370
#   HERALD_LOCAL_START_TIMEOUT  seconds to wait for readiness, default 120
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=deploy/local/rabbitmq-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/rabbitmq-lib.sh"

AMQP="${HERALD_LOCAL_AMQP_PORT:-5673}"
DIST="${HERALD_LOCAL_DIST_PORT:-25673}"
EPMD="${HERALD_LOCAL_EPMD_PORT:-4370}"

# use_version V: make the single node of version V the current node.
use_version() {
    rmq_select "$1"
    rmq_node herald@localhost "$(rmq_data_dir rabbitmq)" "$AMQP" "$DIST" "$EPMD" "rabbitmq $RMQ_VERSION"
}

# Stop this checkout's single node of another version that listens on our
# AMQP port (its data directory stays as it is). One on other ports may run on.
stop_other_versions() {
    local wanted="$RMQ_VERSION" v
    for v in "${RMQ_VERSIONS[@]}"; do
        [[ $v != "$wanted" ]] || continue
        use_version "$v"
        if server_pid >/dev/null &&
            grep -qx "listeners.tcp.default = 127.0.0.1:$AMQP_PORT" "$RMQ_DIR/rabbitmq.conf" 2>/dev/null; then
            echo "rabbitmq: stopping RabbitMQ $v of this checkout to start $wanted on the same ports"
            node_stop
        fi
    done
    use_version "$wanted"
}

cmd_start() {
    stop_other_versions
    node_start
}

cmd_stop() {
    node_stop
    epmd_stop_if_idle
}

cmd_status() {
    if is_running; then
        echo "$LABEL: running ($NODE, amqp://127.0.0.1:$AMQP_PORT, pid $(server_pid || echo '?'))"
    else
        echo "$LABEL: not running"
        return 3
    fi
}

use_version "${HERALD_LOCAL_RABBITMQ:-3.10}"

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
restart) node_stop && cmd_start ;;
status) cmd_status ;;
kill) node_kill ;;                 # SIGKILL, for fault tests; `start` brings it back
ctl) shift && rmqctl "$@" ;;       # e.g. rabbitmq.sh ctl list_queues name type messages
diag) shift && rmqdiag "$@" ;;     # e.g. rabbitmq.sh diag check_port_connectivity
queues) shift && rmqqueues "$@" ;; # e.g. rabbitmq.sh queues quorum_status QUEUE
version) echo "$RMQ_VERSION" ;;
*)
    echo "usage: $0 {start|stop|restart|status|kill|version|ctl ARGS...|diag ARGS...|queues ARGS...}" >&2
    exit 2
    ;;
esac
