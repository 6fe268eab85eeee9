#!/usr/bin/env bash
# The environment for talking to the services of deploy/local/up.sh.
#
#   . deploy/local/env.sh        export HERALD_AMQP_URL and HERALD_DATABASE_URL
#                                and activate .venv when it exists
#   deploy/local/env.sh          print the export lines, e.g. eval "$(deploy/local/env.sh)"
#
# Respects HERALD_LOCAL_AMQP_PORT and HERALD_LOCAL_PG_PORT like the start scripts.
# Meant to be sourced into an interactive shell: no `set -e`, nothing but
# HERALD_* (and the venv) is changed.

# Where is this file? (bash and zsh know; other shells must source it from the repo root.)
_herald_executed=
if [ -n "${BASH_VERSION:-}" ]; then
    eval '_herald_src="${BASH_SOURCE[0]}"; if [ "$_herald_src" = "$0" ]; then _herald_executed=1; fi'
elif [ -n "${ZSH_VERSION:-}" ]; then
    eval '_herald_src="${(%):-%x}"'
else
    _herald_src="$PWD/deploy/local/env.sh"
fi
_herald_repo="$(cd "$(dirname "$_herald_src")/../.." && pwd)"

export HERALD_AMQP_URL="amqp://guest:guest@127.0.0.1:${HERALD_LOCAL_AMQP_PORT:-5673}/"
export HERALD_DATABASE_URL="postgresql://herald:herald@127.0.0.1:${HERALD_LOCAL_PG_PORT:-5433}/herald"

if [ -n "$_herald_executed" ]; then
    # Executed, not sourced: print what sourcing would export.
    printf 'export HERALD_AMQP_URL=%s\n' "$HERALD_AMQP_URL"
    printf 'export HERALD_DATABASE_URL=%s\n' "$HERALD_DATABASE_URL"
    if [ -f "$_herald_repo/.venv/bin/activate" ]; then
        printf '. %s/.venv/bin/activate\n' "$_herald_repo"
    fi
elif [ -f "$_herald_repo/.venv/bin/activate" ] && [ "${VIRTUAL_ENV:-}" != "$_herald_repo/.venv" ]; then
    # shellcheck disable=SC1091
    . "$_herald_repo/.venv/bin/activate"
fi
unset _herald_src _herald_repo _herald_executed
