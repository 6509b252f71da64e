#!/usr/bin/env bash
# The whole local NanoGrid stack in one command.
#
#   scripts/stack.sh up     bootstrap, services, images, worker + Flower, demo run
#   scripts/stack.sh down   stop worker + Flower, remove our containers, services down
#   scripts/stack.sh status show what is running
#
# Idempotent: `up` reuses a worker/Flower already started from this checkout.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCRIPTS="$REPO_ROOT/scripts"
WORKER_READY_S=${NANOGRID_WORKER_READY_S:-60}
# The worker's Prometheus endpoint (0 turns it off); exported so the worker inherits it.
export NANOGRID_METRICS_PORT=${NANOGRID_METRICS_PORT:-9808}
WORKER_PATTERN="nanogrid_celery worker"
# Where the worker sends Celery events and listens for remote control (events_broker_url).
FLOWER_BROKER="${NANOGRID_EVENTS_BROKER_URL:-redis://$REDIS_HOST:$REDIS_PORT/1}"
FLOWER_PATTERN="nanogrid_celery flower"

cd "$REPO_ROOT"
export_local_aws_env

nanogrid_cli() {
    [[ -x "$VENV/bin/nanogrid" ]] || die "$VENV/bin/nanogrid not found; run: bash scripts/bootstrap.sh"
    "$VENV/bin/nanogrid" "$@"
}

# Keep one previous log around; a fresh log means `ready.` is from this run.
rotate_log() {
    local f=$1
    if [[ -f "$f" ]]; then
        mv -f "$f" "$f.1"
    fi
}

# --- worker ----------------------------------------------------------------------

wait_worker_ready() {
    local pid=$1 log_file=$2
    local deadline=$((SECONDS + WORKER_READY_S))
    while ((SECONDS < deadline)); do
        if grep -q 'ready\.' "$log_file" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            err "the worker exited during startup"
            return 1
        fi
        sleep 0.5
    done
    err "the worker did not log 'ready.' within ${WORKER_READY_S}s"
    return 1
}

worker_up() {
    local log_file="$RUN_DIR/worker.log"
    if is_running worker "$WORKER_PATTERN"; then
        ok "worker already running (pid $(read_pid worker), log $log_file); not starting another"
        return 0
    fi
    local others
    others="$(pgrep -f "$WORKER_PATTERN" 2>/dev/null | tr '\n' ' ' || true)"
    if [[ -n "$others" ]]; then
        warn "other NanoGrid worker processes are running (pids: ${others% }); they may consume the same queue"
    fi
    [[ -x "$VENV/bin/celery" ]] || die "$VENV/bin/celery not found; run: bash scripts/bootstrap.sh"
    rotate_log "$log_file"
    log "starting the worker (log: $log_file)"
    local pid
    pid="$(start_bg worker "$log_file" "$VENV/bin/celery" -A nanogrid_celery worker \
        --loglevel=INFO -n 'nanogrid@%h')"
    if ! wait_worker_ready "$pid" "$log_file"; then
        show_tail "$log_file" 60
        stop_pid worker "$WORKER_PATTERN" 10 || true
        exit 1
    fi
    ok "worker ready (pid $pid)"
}

# --- flower --------------------------------------------------------------------------

flower_up() {
    local log_file="$RUN_DIR/flower.log"
    if is_running flower "$FLOWER_PATTERN"; then
        ok "Flower already running (pid $(read_pid flower))"
        return 0
    fi
    if port_open 127.0.0.1 "$FLOWER_PORT"; then
        warn "port $FLOWER_PORT is already in use (not our Flower); not starting Flower"
        return 0
    fi
    rotate_log "$log_file"
    log "starting Flower on http://127.0.0.1:$FLOWER_PORT (log: $log_file)"
    local pid
    # The one NanoGrid app (docs/monitoring.md): events and remote control on the events Redis,
    # tasks applied through Flower's API on SQS.
    pid="$(start_bg flower "$log_file" env FLOWER_UNAUTHENTICATED_API=true \
        NANOGRID_EVENTS_BROKER_URL="$FLOWER_BROKER" \
        "$VENV/bin/celery" -A nanogrid_celery flower --port="$FLOWER_PORT" --address=127.0.0.1)"
    # Flower is a convenience: a failure here is reported, not fatal.
    if wait_for_port 127.0.0.1 "$FLOWER_PORT" 30 "$pid"; then
        ok "Flower ready (pid $pid)"
    else
        warn "Flower did not come up; the stack works without it"
        show_tail "$log_file" 20
    fi
}

# --- commands ----------------------------------------------------------------------

demo_run() {
    log "demo submission: nanogrid run examples/hello.py --runtime python"
    if ! nanogrid_cli run "$REPO_ROOT/examples/hello.py" --runtime python; then
        err "the demo run failed"
        show_tail "$RUN_DIR/worker.log" 60
        exit 1
    fi
    ok "demo run succeeded"
}

print_summary() {
    cat <<EOF

NanoGrid is up.
  SQS + S3 (moto)   http://$MOTO_HOST:$MOTO_PORT   (queue ${NANOGRID_QUEUE:-nanogrid-runs}, bucket ${NANOGRID_S3_BUCKET:-nanogrid-code})
  Redis (results)   redis://$REDIS_HOST:$REDIS_PORT/0
  Flower            http://127.0.0.1:$FLOWER_PORT
  Metrics           http://127.0.0.1:$NANOGRID_METRICS_PORT/metrics   (0 = off)
  Worker            pid $(read_pid worker || echo '?'), log $RUN_DIR/worker.log
  Logs              $RUN_DIR/{worker,flower,dockerd,redis,moto}.log
  Work root         $WORK_ROOT

Try:   .venv/bin/nanogrid run examples/hello.cpp --runtime cpp
       .venv/bin/nanogrid run examples/echo_stdin.py --runtime python --stdin examples/hello.py
Stop:  make down   (or: bash scripts/stack.sh down)
EOF
}

cmd_up() {
    ensure_run_dir
    bash "$SCRIPTS/bootstrap.sh"
    bash "$SCRIPTS/services.sh" up
    log "building runtime images (skips images that exist)"
    nanogrid_cli images build || die "nanogrid images build failed"
    worker_up
    flower_up
    demo_run
    print_summary
}

cmd_down() {
    local rc=0
    stop_pid worker "$WORKER_PATTERN" 30 || rc=1
    stop_pid flower "$FLOWER_PATTERN" 10 || rc=1
    if [[ -x "$VENV/bin/nanogrid" ]] && timeout 10 docker info >/dev/null 2>&1; then
        log "removing NanoGrid containers (nanogrid cleanup)"
        if ! timeout 120 "$VENV/bin/nanogrid" cleanup; then
            warn "nanogrid cleanup failed"
            rc=1
        fi
    fi
    bash "$SCRIPTS/services.sh" down || rc=1
    return "$rc"
}

cmd_status() {
    local rc=0
    bash "$SCRIPTS/services.sh" status || rc=1
    if is_running worker "$WORKER_PATTERN"; then
        printf '  %-8s %-8s %s\n' worker up "pid $(read_pid worker), log $RUN_DIR/worker.log"
    else
        printf '  %-8s %-8s\n' worker down
        rc=1
    fi
    if is_running flower "$FLOWER_PATTERN"; then
        printf '  %-8s %-8s %s\n' flower up "http://127.0.0.1:$FLOWER_PORT (pid $(read_pid flower))"
    else
        printf '  %-8s %-8s\n' flower down
    fi
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
