# shellcheck shell=bash
# Helpers shared by deploy/local/*.sh. Sourced, never executed.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCAL_DIR="$REPO/.local"

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 1
}

# Seconds since the epoch, with milliseconds, for timing messages.
now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

restore_policy_cmd() {
    if [[ -n $2 ]]; then
        printf 'mv -f %q %q' "$2" "$1"
    else
        printf 'rm -f %q' "$1"
    fi
}

# apt_install PACKAGE: install a Debian package without letting its maintainer
# scripts start the system-wide service. Serialised with a lock so that up.sh
# can start both services in parallel without two dpkg runs colliding.
apt_install() {
    local pkg="$1" policy=/usr/sbin/policy-rc.d backup=""
    [[ $EUID -eq 0 ]] || die "$pkg is not installed and installing it needs root"
    mkdir -p "$LOCAL_DIR"
    exec 9>"$LOCAL_DIR/.apt.lock"
    flock 9
    echo "installing Debian package $pkg ..." >&2
    if [[ -e $policy ]]; then
        backup="$(mktemp)"
        cp -p "$policy" "$backup"
    fi
    # Put back whatever policy-rc.d there was, even if we are interrupted.
    # shellcheck disable=SC2064  # expand now: these are locals
    trap "$(restore_policy_cmd "$policy" "$backup")" EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    local rc=0
    {
        if ! apt-cache show "$pkg" >/dev/null 2>&1; then
            apt-get update -qq
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg"
    } >"$LOCAL_DIR/apt-$pkg.log" 2>&1 || rc=$?
    eval "$(restore_policy_cmd "$policy" "$backup")"
    trap - EXIT
    flock -u 9
    exec 9>&-
    ((rc == 0)) || die "apt-get install $pkg failed (exit $rc); see $LOCAL_DIR/apt-$pkg.log"
}
