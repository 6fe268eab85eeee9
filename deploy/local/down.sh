#!/usr/bin/env bash
# Stop the local RabbitMQ and PostgreSQL (in parallel); data is kept.
# Every RabbitMQ version of this checkout is stopped, whatever
# HERALD_LOCAL_RABBITMQ says, and so is a cluster of cluster.sh.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=deploy/local/rabbitmq-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/rabbitmq-lib.sh"

# The versions whose single node or cluster has a live pid file.
live_rabbitmq() {
    local v f pid
    for v in "${RMQ_VERSIONS[@]}"; do
        rmq_select "$v"
        for f in "$(rmq_data_dir rabbitmq)/herald.pid" "$(rmq_data_dir cluster)"/node*/herald.pid; do
            [[ -s $f ]] || continue
            pid="$(<"$f")"
            if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
                echo "$v ${f#"$LOCAL_DIR"/}"
            fi
        done
    done
}

stop_rabbitmq() {
    local selected="${HERALD_LOCAL_RABBITMQ:-3.10}" v what
    # The selected version's node always (it reports "not running" itself).
    "$REPO/deploy/local/rabbitmq.sh" stop
    while read -r v what; do
        case "$what" in
        cluster*) HERALD_LOCAL_RABBITMQ="$v" "$REPO/deploy/local/cluster.sh" stop ;;
        *) [[ $v == "$selected" ]] || HERALD_LOCAL_RABBITMQ="$v" "$REPO/deploy/local/rabbitmq.sh" stop ;;
        esac
    done < <(live_rabbitmq | awk '{ split($2, p, "/"); k = $1 " " p[1] } !seen[k]++ { print k }')
}

stop_rabbitmq &
rabbitmq=$!
"$REPO/deploy/local/postgres.sh" stop &
postgres=$!
failed=()
wait "$rabbitmq" || failed+=(rabbitmq)
wait "$postgres" || failed+=(postgres)
((${#failed[@]} == 0)) || die "could not stop: ${failed[*]} (see the error above)"
