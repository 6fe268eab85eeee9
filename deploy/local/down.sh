#!/usr/bin/env bash
# Stop the local RabbitMQ and PostgreSQL (in parallel); data is kept.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$REPO/deploy/local/rabbitmq.sh" stop &
rabbitmq=$!
"$REPO/deploy/local/postgres.sh" stop &
postgres=$!
failed=()
wait "$rabbitmq" || failed+=(rabbitmq)
wait "$postgres" || failed+=(postgres)
((${#failed[@]} == 0)) || die "could not stop: ${failed[*]} (see the error above)"
