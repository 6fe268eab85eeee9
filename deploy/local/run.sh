#!/usr/bin/env bash
# `make run`: apply migrations, start the provider sandbox in the background,
# then run the service in the foreground. Ctrl-C (or SIGTERM) stops both.
# Expects the venv and the services (make does both first).
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
# shellcheck source=deploy/local/env.sh
. "$REPO/deploy/local/env.sh"

HERALD="$REPO/.venv/bin/herald"
[[ -x $HERALD ]] || die "$HERALD not found; run: make venv"

children=()
cleanup() {
    local pid
    for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$HERALD" migrate

"$HERALD" sandbox &
children+=($!)

"$HERALD" run "$@" &
children+=($!)
wait "$!"
