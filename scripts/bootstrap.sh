#!/usr/bin/env bash
# Idempotent install of what NanoGrid needs on a Debian 12 machine:
#   - apt packages docker.io, redis-server, mmdebstrap, chromium (only those missing;
#     `apt-get update` runs once, only when something must be installed)
#   - a virtualenv at .venv with `pip install -e '.[dev]'`, redone only when
#     pyproject.toml changed since the last successful install.
# Quiet when all is well; prints the captured output when a step fails.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STAMP="$VENV/.nanogrid-bootstrap.sha256"
ensure_run_dir
STEP_LOG="$RUN_DIR/bootstrap.log"

# run_quiet DESCRIPTION CMD...: run CMD with output captured; show it on failure.
run_quiet() {
    local what=$1
    shift
    if ! "$@" >"$STEP_LOG" 2>&1; then
        err "$what failed: $*"
        show_tail "$STEP_LOG" 60
        exit 1
    fi
}

# --- pick a Python >= 3.11 ---------------------------------------------------

python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in "${NANOGRID_PYTHON:-}" python3.11 python3 /usr/bin/python3; do
        [[ -n "$candidate" ]] || continue
        if have "$candidate" && python_ok "$candidate"; then
            printf '%s' "$candidate"
            return 0
        fi
    done
    return 1
}

# --- apt packages ------------------------------------------------------------

missing_pkgs=()
if ! have dockerd || ! have docker; then missing_pkgs+=(docker.io); fi
have redis-server || missing_pkgs+=(redis-server)
have mmdebstrap || missing_pkgs+=(mmdebstrap)
have chromium || missing_pkgs+=(chromium) # headless browser check of Flower (tests/integration)
# validates docker-compose.yml in tests/unit/test_compose.py
if ! have docker-compose && ! docker compose version >/dev/null 2>&1; then
    missing_pkgs+=(docker-compose)
fi

PYTHON="$(find_python || true)"
if [[ -z "$PYTHON" ]]; then
    missing_pkgs+=(python3 python3-venv)
elif [[ ! -d "$VENV" ]] && ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing_pkgs+=(python3-venv)
fi

if ((${#missing_pkgs[@]})); then
    if is_root; then
        log "installing apt packages: ${missing_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        run_quiet "apt-get update" apt-get update -qq
        run_quiet "apt-get install" apt-get install -y -qq "${missing_pkgs[@]}"
        ok "apt packages installed"
    else
        err "missing system packages: ${missing_pkgs[*]}"
        err "install them as root: sudo apt-get update && sudo apt-get install -y ${missing_pkgs[*]}"
        exit 1
    fi
    [[ -n "$PYTHON" ]] || PYTHON="$(find_python)" || die "no Python >= 3.11 found"
fi

# --- virtualenv --------------------------------------------------------------

want_hash="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"

if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    warn "$VENV is broken, recreating it"
    rm -rf "$VENV"
fi

if [[ -d "$VENV" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_hash" ]]; then
    ok "virtualenv up to date ($VENV)"
    exit 0
fi

if [[ ! -d "$VENV" ]]; then
    log "creating virtualenv at $VENV with $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
    run_quiet "venv creation" "$PYTHON" -m venv "$VENV"
    run_quiet "pip upgrade" "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi

log "installing nanogrid into the virtualenv (pip install -e '.[dev]')"
rm -f "$STAMP"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
run_quiet "pip install" "$VENV/bin/python" -m pip install -q -e "${REPO_ROOT}[dev]"
printf '%s\n' "$want_hash" >"$STAMP"
ok "virtualenv ready ($VENV)"
