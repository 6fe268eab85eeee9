#!/usr/bin/env bash
# Start the local RabbitMQ and PostgreSQL (in parallel); reuses running ones.
# HERALD_LOCAL_RABBITMQ chooses the RabbitMQ version (3.10, 4.0, 4.3; see rabbitmq.sh).
# Then:  . deploy/local/env.sh
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

t0="$(now)"
"$REPO/deploy/local/rabbitmq.sh" start &
rabbitmq=$!
"$REPO/deploy/local/postgres.sh" start &
postgres=$!
failed=()
wait "$rabbitmq" || failed+=(rabbitmq)
wait "$postgres" || failed+=(postgres)
((${#failed[@]} == 0)) || die "could not start: ${failed[*]} (see the error above)"
echo "services: up in $(elapsed_since "$t0")s; to use them: . deploy/local/env.sh"
