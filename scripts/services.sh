#!/usr/bin/env bash
# Local infrastructure for NanoGrid: dockerd, redis-server, moto server (SQS + S3).
#
#   scripts/services.sh up       start whatever is not already running/listening
#   scripts/services.sh down     stop only what `up` started (pid files in .run/)
#   scripts/services.sh status   show each service and who owns it
#
# Services found already running (started by hand, by systemd, by another
# checkout) are reused and never stopped by `down`.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DOCKER_WAIT_S=${NANOGRID_DOCKER_WAIT_S:-60}
# Extra dockerd arguments (word-split), for a separate instance; empty by default.
read -r -a DOCKERD_ARGS <<<"${NANOGRID_DOCKERD_ARGS:-}"

docker_ok() { timeout 10 docker info >/dev/null 2>&1; }

# The command that starts moto, one word per line: the project's launcher
# (scripts/moto_server.py: moto minus its per-request access log and directory
# scan) where the venv has moto, else a moto_server on PATH.
moto_cmd() {
    if [[ -x "$VENV/bin/moto_server" ]]; then
        printf '%s\n' "$VENV/bin/python" "$REPO_ROOT/scripts/moto_server.py"
    elif have moto_server; then
        command -v moto_server
    else
        return 1
    fi
}

# --- dockerd -------------------------------------------------------------------

docker_up() {
    if docker_ok; then
        if is_running dockerd dockerd; then
            ok "dockerd already running (started by us, pid $(read_pid dockerd))"
        else
            ok "dockerd already running (external), reusing it"
        fi
        return 0
    fi
    have docker || die "docker CLI not found; run: bash scripts/bootstrap.sh"
    local pid
    if is_running dockerd dockerd; then
        pid="$(read_pid dockerd)"
        log "dockerd (pid $pid, ours) is not answering yet, waiting"
    elif ((${#DOCKERD_ARGS[@]} == 0)) && pgrep -x dockerd >/dev/null 2>&1; then
        # (With NANOGRID_DOCKERD_ARGS a separate instance is wanted, so another
        # dockerd process says nothing about ours.)
        pid=""
        log "a dockerd process exists but is not answering yet, waiting for it"
    else
        have dockerd || die "dockerd not found; run: bash scripts/bootstrap.sh"
        is_root || die "dockerd is not running and starting it needs root"
        log "starting dockerd (log: $RUN_DIR/dockerd.log)"
        pid="$(start_bg dockerd "$RUN_DIR/dockerd.log" dockerd "${DOCKERD_ARGS[@]}")"
    fi
    local deadline=$((SECONDS + DOCKER_WAIT_S))
    until docker_ok; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            err "dockerd exited during startup"
            show_tail "$RUN_DIR/dockerd.log"
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            err "docker info still failing after ${DOCKER_WAIT_S}s"
            show_tail "$RUN_DIR/dockerd.log"
            exit 1
        fi
        sleep 1
    done
    ok "dockerd ready${pid:+ (pid $pid)}"
}

# --- redis -----------------------------------------------------------------------

redis_up() {
    if port_open "$REDIS_HOST" "$REDIS_PORT"; then
        if is_running redis redis-server; then
            ok "redis already running on $REDIS_HOST:$REDIS_PORT (started by us, pid $(read_pid redis))"
        else
            ok "redis already listening on $REDIS_HOST:$REDIS_PORT (external), reusing it"
        fi
        return 0
    fi
    have redis-server || die "redis-server not found; run: bash scripts/bootstrap.sh"
    ensure_run_dir
    log "starting redis-server on $REDIS_HOST:$REDIS_PORT (log: $RUN_DIR/redis.log)"
    local pidfile
    pidfile="$(pidfile_for redis)"
    rm -f "$pidfile"
    # Startup errors (before daemonizing) go to stderr, the rest to --logfile.
    # shellcheck disable=SC2094
    if ! redis-server --bind "$REDIS_HOST" --port "$REDIS_PORT" --save '' --appendonly no \
        --daemonize yes --pidfile "$pidfile" --logfile "$RUN_DIR/redis.log" \
        --dir "$RUN_DIR" >>"$RUN_DIR/redis.log" 2>&1; then
        err "redis-server failed to start"
        show_tail "$RUN_DIR/redis.log"
        exit 1
    fi
    if ! wait_for_port "$REDIS_HOST" "$REDIS_PORT" 20; then
        err "redis did not open $REDIS_HOST:$REDIS_PORT within 20s"
        show_tail "$RUN_DIR/redis.log"
        exit 1
    fi
    ok "redis ready on $REDIS_HOST:$REDIS_PORT (pid $(read_pid redis || echo '?'))"
}

# --- moto --------------------------------------------------------------------------

moto_up() {
    if port_open "$MOTO_HOST" "$MOTO_PORT"; then
        if is_running moto moto_server; then
            ok "moto already running on $MOTO_HOST:$MOTO_PORT (started by us, pid $(read_pid moto))"
        else
            ok "moto (or something) already listening on $MOTO_HOST:$MOTO_PORT (external), reusing it"
        fi
        return 0
    fi
    local cmd
    mapfile -t cmd < <(moto_cmd) || true
    ((${#cmd[@]})) || die "moto_server not found; run: bash scripts/bootstrap.sh"
    log "starting moto server on $MOTO_HOST:$MOTO_PORT (log: $RUN_DIR/moto.log)"
    local pid
    pid="$(start_bg moto "$RUN_DIR/moto.log" "${cmd[@]}" -H "$MOTO_HOST" -p "$MOTO_PORT")"
    if ! wait_for_port "$MOTO_HOST" "$MOTO_PORT" 60 "$pid"; then
        err "moto server did not open $MOTO_HOST:$MOTO_PORT"
        show_tail "$RUN_DIR/moto.log"
        exit 1
    fi
    ok "moto ready on http://$MOTO_HOST:$MOTO_PORT (pid $pid)"
}

# --- work root -----------------------------------------------------------------------

work_root_up() {
    if [[ -d "$WORK_ROOT" ]]; then
        return 0
    fi
    if mkdir -p "$WORK_ROOT" 2>/dev/null; then
        ok "created $WORK_ROOT"
    else
        warn "could not create $WORK_ROOT (not root?); create it with: sudo mkdir -p $WORK_ROOT"
    fi
}

# --- commands ----------------------------------------------------------------------

cmd_up() {
    ensure_run_dir
    work_root_up
    docker_up
    redis_up
    moto_up
}

cmd_down() {
    # Reverse order; each only acts on a pid file we wrote.
    stop_pid moto moto_server 15
    stop_pid redis redis-server 15
    stop_pid dockerd dockerd 30
    # dockerd cleans up its own containerd; nothing else of ours is left.
    local leftover=()
    if port_open "$MOTO_HOST" "$MOTO_PORT"; then leftover+=("moto :$MOTO_PORT"); fi
    if port_open "$REDIS_HOST" "$REDIS_PORT"; then leftover+=("redis :$REDIS_PORT"); fi
    if docker_ok; then leftover+=("dockerd"); fi
    if ((${#leftover[@]})); then
        log "still running, not started by this checkout (left alone): ${leftover[*]}"
    fi
    ok "services down"
}

status_line() {
    local name=$1 up=$2 owner=$3
    if [[ "$up" == yes ]]; then
        printf '  %-8s %-8s %s\n' "$name" "up" "$owner"
    else
        printf '  %-8s %-8s %s\n' "$name" "down" "$owner"
    fi
}

owner_of() {
    local up=$1 name=$2 pattern=$3
    [[ "$up" == yes ]] || return 0
    if is_running "$name" "$pattern"; then
        printf 'started by this checkout (pid %s)' "$(read_pid "$name")"
    else
        printf 'external'
    fi
}

cmd_status() {
    local rc=0 up
    echo "NanoGrid services:"
    if docker_ok; then up=yes; else up=no rc=1; fi
    status_line dockerd "$up" "$(owner_of "$up" dockerd dockerd)"
    if port_open "$REDIS_HOST" "$REDIS_PORT"; then up=yes; else up=no rc=1; fi
    status_line redis "$up" "redis://$REDIS_HOST:$REDIS_PORT $(owner_of "$up" redis redis-server)"
    if port_open "$MOTO_HOST" "$MOTO_PORT"; then up=yes; else up=no rc=1; fi
    status_line moto "$up" "http://$MOTO_HOST:$MOTO_PORT $(owner_of "$up" moto moto_server)"
    if [[ -d "$WORK_ROOT" ]]; then up=yes; else up=no rc=1; fi
    status_line workroot "$up" "$WORK_ROOT"
    return "$rc"
}

usage() {
    echo "usage: $0 up|down|status" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
case "$1" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
