# shellcheck shell=bash
# RabbitMQ nodes for deploy/local/rabbitmq.sh and cluster.sh: which version,
# where it comes from, and how to start, stop and ask one node. Sourced after
# lib.sh, never executed.
#
# HERALD_LOCAL_RABBITMQ chooses the version (default 3.10):
#   3.10  Debian bookworm's rabbitmq-server, installed on this machine with apt
#   4.0   Debian trixie's rabbitmq-server, in a Debian root built once with
#         debootstrap into .local/chroot/4.0 (about a minute, 370 MB)
#   4.3   Debian sid's rabbitmq-server, likewise in .local/chroot/4.3
#
# A version in a root runs there through chroot, each command in a mount
# namespace of its own (unshare) holding the few mounts it needs: proc, the
# node's data directory at the same path as outside, and /tmp for CLI calls.
# Those mounts exist only while the command runs and are never visible outside,
# so nothing is left mounted when a node stops or dies, and `rm -rf .local`
# cannot reach through a mount into the rest of the machine.
#
# Node variables, set by the caller before use (rmq_node does it):
#   NODE RMQ_DIR AMQP_PORT DIST_PORT EPMD_PORT LABEL, and optionally
#   RMQ_EXTRA_CONF (more rabbitmq.conf lines) and RMQ_COOKIE (a shared cookie).

RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_VERSIONS=(3.10 4.0 4.3)
START_TIMEOUT="${HERALD_LOCAL_START_TIMEOUT:-120}"

# Sets RMQ_VERSION, RMQ_SUITE (the Debian suite of a root, empty for the
# host's package) and RMQ_ROOT (the root's directory, empty for the host).
rmq_select() {
    RMQ_VERSION="${1:-${HERALD_LOCAL_RABBITMQ:-3.10}}"
    case "$RMQ_VERSION" in
    3.10) RMQ_SUITE="" ;;
    4.0) RMQ_SUITE=trixie ;;
    4.3) RMQ_SUITE=sid ;;
    *) die "HERALD_LOCAL_RABBITMQ=$RMQ_VERSION is not a RabbitMQ version we run (choose one of: ${RMQ_VERSIONS[*]})" ;;
    esac
    RMQ_ROOT=""
    [[ -z $RMQ_SUITE ]] || RMQ_ROOT="$LOCAL_DIR/chroot/$RMQ_VERSION"
}

# The data directory for BASE under .local: 3.10 keeps the names it always
# had, other versions add theirs, so switching versions never mixes data.
rmq_data_dir() {
    if [[ $RMQ_VERSION == 3.10 ]]; then
        echo "$LOCAL_DIR/$1"
    else
        echo "$LOCAL_DIR/$1-$RMQ_VERSION"
    fi
}

# rmq_node NAME DIR AMQP DIST EPMD LABEL: make the node the current one.
rmq_node() {
    NODE="$1" RMQ_DIR="$2" AMQP_PORT="$3" DIST_PORT="$4" EPMD_PORT="$5" LABEL="$6"
    PID_FILE="$RMQ_DIR/herald.pid"
    CONSOLE_LOG="$RMQ_DIR/log/console.log"
}

# The Debian archive this machine's apt uses (the same one serves every
# suite), unless HERALD_LOCAL_DEBIAN_MIRROR names another.
debian_mirror() {
    if [[ -n ${HERALD_LOCAL_DEBIAN_MIRROR:-} ]]; then
        echo "$HERALD_LOCAL_DEBIAN_MIRROR"
        return
    fi
    local f url
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # deb822 "URIs: a b" and one-line "deb [opts] URI suite comp..." forms.
        url="$(awk '
            /^[[:space:]]*#/ { next }
            $1 == "URIs:" { for (i = 2; i <= NF; i++) print $i; next }
            $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i }
        ' "$f" | grep -E '^https?://[^ ]*/debian/?$' | head -n 1)" || true
        if [[ -n $url ]]; then
            echo "${url%/}"
            return
        fi
    done
    echo http://deb.debian.org/debian
}

# Mount points at or below $1, as this mount namespace sees them.
mounts_under() {
    awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/self/mounts
}

# Build the version's root once: debootstrap into a temporary directory, check
# that the suite still carries the version we named, then rename it into place.
build_root() {
    local t0 tmp log version mirror
    command -v debootstrap >/dev/null || apt_install debootstrap
    mkdir -p "$LOCAL_DIR/chroot"
    exec 8>"$LOCAL_DIR/chroot/.build.lock"
    flock 8
    if [[ -x $RMQ_ROOT$RMQ_BIN/rabbitmq-server ]]; then
        exec 8>&-
        return 0
    fi
    t0="$(now)"
    tmp="$RMQ_ROOT.building"
    log="$LOCAL_DIR/chroot/debootstrap-$RMQ_VERSION.log"
    if [[ -e $tmp ]]; then
        # A build that was interrupted. Refuse to delete through a mount.
        [[ -z "$(mounts_under "$tmp")" ]] ||
            die "$tmp has mounts below it ($(mounts_under "$tmp" | tr '\n' ' ')); unmount them first"
        rm -rf "$tmp"
    fi
    [[ ! -e $RMQ_ROOT ]] || rm -rf "$RMQ_ROOT"  # a root without rabbitmq-server
    mirror="$(debian_mirror)"
    echo "rabbitmq $RMQ_VERSION: building a Debian $RMQ_SUITE root with rabbitmq-server from $mirror (once) ..." >&2
    # debootstrap mounts proc and sys in the target while it installs; in a
    # mount namespace of its own those go away with it, even if interrupted.
    # netbase: sid's minimal base no longer has it, and without it the root
    # has no /etc/hosts, so Erlang cannot resolve "localhost" (epmd nxdomain).
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --include=rabbitmq-server,netbase \
        "$RMQ_SUITE" "$tmp" "$mirror" >"$log" 2>&1 ||
        die "debootstrap of Debian $RMQ_SUITE failed; see $log"
    version="$(awk '/^Package: / { p = $2 } p == "rabbitmq-server" && /^Version: / { print $2; exit }' \
        "$tmp/var/lib/dpkg/status")"
    [[ $version == "$RMQ_VERSION".* ]] ||
        die "Debian $RMQ_SUITE now carries rabbitmq-server ${version:-(none)}, not $RMQ_VERSION.x; update RMQ_VERSIONS in $(basename "${BASH_SOURCE[0]}") (the root is left in $tmp)"
    if ! grep -qE '^127\.0\.0\.1[[:space:]].*\blocalhost\b' "$tmp/etc/hosts" 2>/dev/null; then
        printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >>"$tmp/etc/hosts"
    fi
    mv "$tmp" "$RMQ_ROOT"
    echo "rabbitmq $RMQ_VERSION: root with rabbitmq-server $version built in $(elapsed_since "$t0")s ($(du -sh "$RMQ_ROOT" | cut -f1))" >&2
    exec 8>&-
}

rmq_ensure_installed() {
    if [[ -z $RMQ_ROOT ]]; then
        [[ -x $RMQ_BIN/rabbitmq-server ]] || apt_install rabbitmq-server
    else
        [[ -x $RMQ_ROOT$RMQ_BIN/rabbitmq-server ]] || build_root
    fi
}

# rmq_command [--tmp] CMD ARGS...: set RMQ_CMD to the command line that runs
# CMD (a path, or a name on PATH, in the version's root) in the node's data
# directory. --tmp also shows the caller's /tmp to the command, so that CLI
# arguments naming files there work.
rmq_command() {
    local tmp=0
    if [[ ${1:-} == --tmp ]]; then
        tmp=1
        shift
    fi
    if [[ -z $RMQ_ROOT ]]; then
        RMQ_CMD=(env -C "$RMQ_DIR" "$@")
        return
    fi
    mkdir -p "$RMQ_ROOT$RMQ_DIR"
    # shellcheck disable=SC2016  # expanded by the inner shells
    RMQ_CMD=(unshare --mount --propagation private -- /bin/sh -euc '
        root=$1 dir=$2 tmp=$3
        shift 3
        mount -t proc proc "$root/proc"
        mount --bind "$dir" "$root$dir"
        if [ "$tmp" = 1 ]; then mount --bind /tmp "$root/tmp"; fi
        exec chroot "$root" /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$dir" "$@"
    ' sh "$RMQ_ROOT" "$RMQ_DIR" "$tmp" "$@")
}

# rmq_run [--tmp] CMD ARGS...: run it (see rmq_command).
rmq_run() {
    if [[ -n $RMQ_ROOT && ! -x $RMQ_ROOT$RMQ_BIN/rabbitmq-server ]]; then
        echo "RabbitMQ $RMQ_VERSION is not built yet (it is on the first start)" >&2
        return 127
    fi
    local RMQ_CMD
    rmq_command "$@"
    "${RMQ_CMD[@]}"
}

# The environment of the server and of every CLI call: they must agree on the
# node name, the epmd port and the cookie (read from $HOME/.erlang.cookie).
rmq_env() {
    export HOME="$RMQ_DIR"
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$AMQP_PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export ERL_EPMD_PORT="$EPMD_PORT"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
    export RABBITMQ_LOG_BASE="$RMQ_DIR/log"
    export RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
    export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
    export RABBITMQ_PID_FILE="$PID_FILE"
    export ERL_CRASH_DUMP="$RMQ_DIR/log/erl_crash.dump"
    # Erlang distribution on loopback only (the server and the CLI tools).
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    if [[ -n $RMQ_ROOT ]]; then
        # The root has no locales but C.UTF-8, which Erlang is content with.
        export LANG=C.UTF-8
        unset LC_ALL LANGUAGE
    fi
}

rmqctl() { (rmq_env && rmq_run --tmp "$RMQ_BIN/rabbitmqctl" -q -n "$NODE" "$@"); }
rmqdiag() { (rmq_env && rmq_run --tmp "$RMQ_BIN/rabbitmq-diagnostics" -q -n "$NODE" "$@"); }
rmqqueues() { (rmq_env && rmq_run --tmp "$RMQ_BIN/rabbitmq-queues" -q -n "$NODE" "$@"); }

write_config() {
    mkdir -p "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
    {
        echo "# Generated by deploy/local ($LABEL, RabbitMQ $RMQ_VERSION); rewritten at every start."
        echo "listeners.tcp.default = 127.0.0.1:$AMQP_PORT"
        echo "loopback_users.guest = true"
        echo "log.file.level = info"
        [[ -z ${RMQ_EXTRA_CONF:-} ]] || printf '%s\n' "$RMQ_EXTRA_CONF"
    } >"$RMQ_DIR/rabbitmq.conf"
    echo '[].' >"$RMQ_DIR/enabled_plugins"
    : >"$RMQ_DIR/rabbitmq-env.conf"  # keeps /etc/rabbitmq/rabbitmq-env.conf out
    echo '[].' >"$RMQ_DIR/advanced.config"
    # Create the cookie ourselves so that the server and the first CLI call
    # cannot race to create two different ones.
    if [[ -n ${RMQ_COOKIE:-} ]]; then
        if [[ ! -s $RMQ_DIR/.erlang.cookie || "$(<"$RMQ_DIR/.erlang.cookie")" != "$RMQ_COOKIE" ]]; then
            rm -f "$RMQ_DIR/.erlang.cookie"
            (umask 077 && printf '%s' "$RMQ_COOKIE" >"$RMQ_DIR/.erlang.cookie")
            chmod 400 "$RMQ_DIR/.erlang.cookie"
        fi
    elif [[ ! -s $RMQ_DIR/.erlang.cookie ]]; then
        (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' >"$RMQ_DIR/.erlang.cookie")
        chmod 400 "$RMQ_DIR/.erlang.cookie"
    fi
}

server_pid() {
    local pid
    [[ -s $PID_FILE ]] || return 1
    pid="$(<"$PID_FILE")"
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Our node answers. Asking our epmd first is instant, where a CLI call to a
# node that is not there costs seconds of retries.
node_answers() {
    [[ -s $RMQ_DIR/.erlang.cookie ]] || return 1
    (rmq_env && rmq_run epmd -port "$EPMD_PORT" -names) 2>/dev/null | grep -q "^name ${NODE%@*} " || return 1
    rmqdiag ping --timeout 10 >/dev/null 2>&1
}

is_running() {
    node_answers && rmqctl await_startup --timeout 30 >/dev/null 2>&1 && port_open "$AMQP_PORT"
}

# Quorum queues and at-least-once dead-lettering need feature flags
# (quorum_queue, stream_queue). A fresh node enables them all; a data
# directory created by an older RabbitMQ may not have them, so ask every time.
# ("all" leaves out the flags RabbitMQ marks experimental.)
enable_feature_flags() {
    rmqctl enable_feature_flag all >/dev/null 2>&1 ||
        echo "$LABEL: warning: could not enable all feature flags" >&2
}

# The pid files of this checkout's other RabbitMQ nodes that are alive, for
# a clearer error when one of them holds our port.
other_live_nodes() {
    local f pid
    for f in "$LOCAL_DIR"/*/herald.pid "$LOCAL_DIR"/*/*/herald.pid; do
        [[ -s $f && $f != "$PID_FILE" ]] || continue
        pid="$(<"$f")"
        [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "${f#"$LOCAL_DIR"/}"
    done
    return 0
}

# Start the current node unless it runs already; wait until it serves AMQP.
node_start() {
    local t0 pid deadline others
    t0="$(now)"
    rmq_ensure_installed
    write_config
    if node_answers; then
        rmqctl await_startup --timeout "$START_TIMEOUT" >/dev/null 2>&1 ||
            die "RabbitMQ node $NODE answers but did not finish booting; see $RMQ_DIR/log"
        port_open "$AMQP_PORT" ||
            die "RabbitMQ node $NODE is running but not listening on 127.0.0.1:$AMQP_PORT (port changed? stop and start it again)"
        enable_feature_flags
        echo "$LABEL: already running ($NODE, amqp://127.0.0.1:$AMQP_PORT)"
        return 0
    fi
    if port_open "$AMQP_PORT" || port_open "$DIST_PORT"; then
        others="$(other_live_nodes | tr '\n' ' ')"
        [[ -z $others ]] ||
            die "port $AMQP_PORT or $DIST_PORT is in use, probably by another RabbitMQ of this checkout (${others% }); stop it first"
        port_open "$AMQP_PORT" &&
            die "port $AMQP_PORT is in use by another process (set HERALD_LOCAL_AMQP_PORT to choose another)"
        die "Erlang distribution port $DIST_PORT is in use by another process (set HERALD_LOCAL_DIST_PORT)"
    fi
    if pid="$(server_pid)"; then
        die "a RabbitMQ process (pid $pid from $PID_FILE) exists but does not answer; stop it first"
    fi
    rm -f "$PID_FILE"

    echo "=== $(date -Is) start (RabbitMQ $RMQ_VERSION)" >>"$CONSOLE_LOG"
    (rmq_env && rmq_command "$RMQ_BIN/rabbitmq-server" &&
        exec setsid nohup "${RMQ_CMD[@]}" >>"$CONSOLE_LOG" 2>&1 </dev/null) &
    local launcher=$!

    deadline=$((SECONDS + START_TIMEOUT))
    until [[ -s $PID_FILE ]] && port_open "$AMQP_PORT"; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            tail -n 8 "$CONSOLE_LOG" >&2 || true
            die "rabbitmq-server exited during start-up; see $CONSOLE_LOG and $RMQ_DIR/log/"
        fi
        ((SECONDS < deadline)) ||
            die "RabbitMQ did not open 127.0.0.1:$AMQP_PORT within ${START_TIMEOUT}s; see $RMQ_DIR/log/"
        sleep 0.3
    done
    rmqctl await_startup --timeout "$START_TIMEOUT" >/dev/null ||
        die "RabbitMQ node $NODE did not finish booting; see $RMQ_DIR/log/"
    enable_feature_flags
    echo "$LABEL: ready in $(elapsed_since "$t0")s ($NODE, RabbitMQ $RMQ_VERSION, amqp://127.0.0.1:$AMQP_PORT, pid $(<"$PID_FILE"))"
}

# Wait until pid $1 has exited; SIGKILL it after $2 seconds.
wait_gone() {
    local pid="$1" deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        echo "$LABEL: pid $pid killed with SIGKILL" >&2
    fi
}

node_stop() {
    local t0 pid
    t0="$(now)"
    if ! pid="$(server_pid)"; then
        if node_answers; then
            rmqctl stop >/dev/null || die "could not stop RabbitMQ node $NODE"
            echo "$LABEL: stopped in $(elapsed_since "$t0")s"
        else
            echo "$LABEL: not running"
        fi
        rm -f "$PID_FILE"
        return 0
    fi
    # `stop <pid file>` is meant to return once the OS process is gone, but in
    # a root without `ps` it cannot tell, so wait for the pid here as well.
    if rmqctl stop "$PID_FILE" >/dev/null 2>&1; then
        wait_gone "$pid" 60
    else
        echo "$LABEL: node does not answer; sending SIGTERM to pid $pid" >&2
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 30
    fi
    rm -f "$PID_FILE"
    echo "$LABEL: stopped in $(elapsed_since "$t0")s"
}

# SIGKILL the node (a crash, for fault tests); its data stays.
node_kill() {
    local pid
    pid="$(server_pid)" || die "$LABEL is not running (no live pid in $PID_FILE)"
    kill -KILL "$pid"
    wait_gone "$pid" 10
    echo "$LABEL: killed (pid $pid, SIGKILL)"
}

# Stop epmd on our port when no node is registered with it any more; a daemon
# started from a root would otherwise keep that root's mount namespace alive.
epmd_stop_if_idle() {
    (rmq_env && rmq_run epmd -port "$EPMD_PORT" -names) 2>/dev/null | grep -q '^name ' && return 0
    (rmq_env && rmq_run epmd -port "$EPMD_PORT" -kill) >/dev/null 2>&1 || true
}
