# shellcheck shell=bash
# Shared helpers for the NanoGrid scripts. Source it; do not run it.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Sets REPO_ROOT, RUN_DIR, VENV and a few constants, and defines logging,
# port/pid checks and start/stop helpers for background processes.

if [[ -n "${_NANOGRID_LIB_SOURCED:-}" ]]; then
    return 0
fi
_NANOGRID_LIB_SOURCED=1

# dockerd lives in /usr/sbin, which a non-root PATH may lack.
case ":$PATH:" in
    *:/usr/sbin:*) ;;
    *) PATH="$PATH:/usr/sbin:/sbin" ;;
esac

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${NANOGRID_RUN_DIR:-$REPO_ROOT/.run}"
VENV="$REPO_ROOT/.venv"
WORK_ROOT="${NANOGRID_WORK_ROOT:-/var/lib/nanogrid}"

# Ports are fixed by nanogrid_celery/config.py defaults; the overrides exist
# only to exercise the scripts beside an already-running stack.
REDIS_HOST=127.0.0.1
REDIS_PORT=${NANOGRID_SVC_REDIS_PORT:-6379}
MOTO_HOST=127.0.0.1
MOTO_PORT=${NANOGRID_SVC_MOTO_PORT:-5000}
FLOWER_PORT=${NANOGRID_SVC_FLOWER_PORT:-5555}

export REPO_ROOT RUN_DIR VENV WORK_ROOT
export REDIS_HOST REDIS_PORT MOTO_HOST MOTO_PORT FLOWER_PORT

# --- logging ---------------------------------------------------------------

if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
    _C_INFO=$'\033[1;34m' _C_WARN=$'\033[1;33m' _C_ERR=$'\033[1;31m' _C_OK=$'\033[1;32m'
    _C_OFF=$'\033[0m'
else
    _C_INFO='' _C_WARN='' _C_ERR='' _C_OK='' _C_OFF=''
fi

_ts() { date '+%H:%M:%S'; }
log() { printf '%s[%s]%s %s\n' "$_C_INFO" "$(_ts)" "$_C_OFF" "$*" >&2; }
ok() { printf '%s[%s] ok%s %s\n' "$_C_OK" "$(_ts)" "$_C_OFF" "$*" >&2; }
warn() { printf '%s[%s] warning:%s %s\n' "$_C_WARN" "$(_ts)" "$_C_OFF" "$*" >&2; }
err() { printf '%s[%s] error:%s %s\n' "$_C_ERR" "$(_ts)" "$_C_OFF" "$*" >&2; }
die() {
    err "$*"
    exit 1
}

# Print the last N lines (default 40) of a file to stderr, framed.
show_tail() {
    local file=$1 n=${2:-40}
    if [[ -f "$file" ]]; then
        printf -- '----- last %s lines of %s -----\n' "$n" "$file" >&2
        tail -n "$n" "$file" >&2 || true
        printf -- '----- end of %s -----\n' "$file" >&2
    else
        printf -- '(no log file at %s)\n' "$file" >&2
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

ensure_run_dir() { mkdir -p "$RUN_DIR"; }

# --- ports -----------------------------------------------------------------

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
    local host=$1 port=$2
    timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" >/dev/null 2>&1
}

# wait_for_port HOST PORT [TIMEOUT_S] [PID]: wait until the port accepts
# connections. Fails early when PID is given and that process has died.
wait_for_port() {
    local host=$1 port=$2 timeout_s=${3:-30} pid=${4:-}
    local deadline=$((SECONDS + timeout_s))
    while ((SECONDS < deadline)); do
        if port_open "$host" "$port"; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.3
    done
    port_open "$host" "$port"
}

# --- pid files -------------------------------------------------------------

pidfile_for() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }

# read_pid NAME: print the pid recorded in .run/NAME.pid (empty if none).
read_pid() {
    local f
    f="$(pidfile_for "$1")"
    [[ -s "$f" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" ]] || return 1
    printf '%s' "$pid"
}

# pid_matches PID PATTERN: the process is alive and its command line
# contains PATTERN (guards against a recycled pid).
pid_matches() {
    local pid=$1 pattern=$2 cmdline
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$pattern"* ]]
}

# is_running NAME PATTERN: we started NAME (pid file) and it is still alive.
# Removes a stale pid file.
is_running() {
    local name=$1 pattern=$2 pid
    pid="$(read_pid "$name")" || return 1
    if pid_matches "$pid" "$pattern"; then
        return 0
    fi
    rm -f "$(pidfile_for "$name")"
    return 1
}

# --- background processes --------------------------------------------------

# start_bg NAME LOGFILE CMD [ARGS...]: start CMD in its own session (so the
# whole process group can be signalled later), stdout/stderr appended to
# LOGFILE, pid recorded in .run/NAME.pid. Prints the pid.
start_bg() {
    local name=$1 logfile=$2
    shift 2
    ensure_run_dir
    local pidfile
    pidfile="$(pidfile_for "$name")"
    rm -f "$pidfile"
    # The inner shell records its own pid, then execs the command, so the pid
    # file holds the real process even if setsid had to fork.
    # shellcheck disable=SC2016  # $$ and $@ are for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" \
        >>"$logfile" 2>&1 </dev/null &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$pidfile" ]] && break
        sleep 0.1
    done
    read_pid "$name" || {
        err "could not start $name"
        return 1
    }
}

# stop_pid NAME PATTERN [GRACE_S]: SIGTERM the process we started (and its
# process group), wait up to GRACE_S seconds, then SIGKILL. Only touches the
# pid recorded in .run/NAME.pid, and only if its command line matches.
stop_pid() {
    local name=$1 pattern=$2 grace=${3:-30} pid
    if ! pid="$(read_pid "$name")"; then
        return 0
    fi
    if ! pid_matches "$pid" "$pattern"; then
        rm -f "$(pidfile_for "$name")"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "$name (pid $pid) still running after ${grace}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # Children left in the process group start_bg created (pgid == pid; a pid
    # is not reused while its group still has members), e.g. celery's
    # prefork pool processes.
    if pgrep -g "$pid" >/dev/null 2>&1; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 10; i++)); do
            pgrep -g "$pid" >/dev/null 2>&1 || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile_for "$name")"
    ok "$name stopped"
}

# --- environment -----------------------------------------------------------

# Credentials/region for the local moto server, only when none are set.
export_local_aws_env() {
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
    export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
    export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
}

require_venv() {
    [[ -x "$VENV/bin/python" ]] || die "no virtualenv at $VENV; run: bash scripts/bootstrap.sh"
}
