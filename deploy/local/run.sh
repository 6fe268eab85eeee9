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

# Point Herald at the sandbox's fake Twilio, WhatsApp and Messenger (and give it
# the sandbox's credentials and webhook secrets), unless the caller set them.
SANDBOX_PORT="${HERALD_SANDBOX_PORT:-8090}"
while IFS= read -r line; do
    name="${line#export }"; name="${name%%=*}"
    [[ -n "${!name:-}" ]] || eval "$line"
done < <("$REPO/.venv/bin/python" -m consumer.sandbox "$SANDBOX_PORT")
export HERALD_PUBLIC_URL="${HERALD_PUBLIC_URL:-http://127.0.0.1:${HERALD_HTTP_PORT:-8080}}"
# The sandbox's http endpoints are on loopback, which the http channel refuses by default.
export HERALD_HTTP_ALLOW_NETWORKS="${HERALD_HTTP_ALLOW_NETWORKS:-127.0.0.0/8}"
# Both listeners on loopback (Herald's defaults, said out loud): the public one
# (webhooks) and the admin one (admin API, console, /metrics).
export HERALD_HTTP_HOST="${HERALD_HTTP_HOST:-127.0.0.1}"
export HERALD_ADMIN_HOST="${HERALD_ADMIN_HOST:-127.0.0.1}"
# A fresh random operator token per run unless the caller set tokens (a fixed demo
# token would be a known password; Herald refuses short or placeholder tokens).
if [[ -z "${HERALD_ADMIN_TOKEN:-}" ]]; then
    demo_token="$("$REPO/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
    HERALD_ADMIN_TOKEN="demo:operator:$demo_token"
fi
export HERALD_ADMIN_TOKEN

"$HERALD" sandbox --port "$SANDBOX_PORT" > "$REPO/.local/sandbox.log" 2>&1 &
children+=($!)

"$HERALD" run "$@" > "$REPO/.local/herald.log" 2>&1 &
herald_pid=$!
children+=("$herald_pid")

ready="http://127.0.0.1:${HERALD_HTTP_PORT:-8080}/readyz"
is_ready() {
    "$REPO/.venv/bin/python" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2)' "$ready" > /dev/null 2>&1
}
for _ in $(seq 1 120); do
    is_ready && break
    kill -0 "$herald_pid" 2>/dev/null || die "herald run stopped; see .local/herald.log"
    sleep 0.5
done
is_ready || die "herald run not ready after 60 s; see .local/herald.log"
echo "herald is running (logs: .local/herald.log, sandbox: .local/sandbox.log)"
echo "  webhooks:                    http://$HERALD_HTTP_HOST:${HERALD_HTTP_PORT:-8080}/webhooks/"
echo "  admin API, console, metrics: http://$HERALD_ADMIN_HOST:${HERALD_ADMIN_PORT:-8081}/"
if [[ -n "${demo_token:-}" ]]; then
    echo "  console: http://$HERALD_ADMIN_HOST:${HERALD_ADMIN_PORT:-8081}/console/ (sign in with this run's token: $demo_token;"
    echo "  the admin API takes it too: Authorization: Bearer $demo_token)"
else
    echo "  console: http://$HERALD_ADMIN_HOST:${HERALD_ADMIN_PORT:-8081}/console/ (sign in with a token from your HERALD_ADMIN_TOKEN)"
fi
echo

if [[ -z "${HERALD_NO_DEMO:-}" ]]; then
    "$HERALD" demo --sandbox-url "http://127.0.0.1:$SANDBOX_PORT" || true
fi
echo
echo "Herald keeps running; in another terminal: . deploy/local/env.sh, then the commands above."
echo "Console: $console. Ctrl-C stops Herald."
wait "$herald_pid"
