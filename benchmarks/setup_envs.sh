#!/usr/bin/env bash
# Create the side-by-side environments for benchmarks/bench_side_by_side.py:
#   benchmarks/.venvs/ref   reference ginseng 0.1.4 (PyPI; requires Python >= 3.12)
#   benchmarks/.venvs/annb  annbatch 0.3.1 (PyPI; requires Python >= 3.12)
# Each in its own virtual environment so that neither's pins touch the project's environment.
# JAX is pinned to the version the project's environment runs (0.10.2) so that the training
# comparison measures the code, not a JAX upgrade.
# Usage: bash benchmarks/setup_envs.sh            (PYTHON312=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
JAX_VERSION="${JAX_VERSION:-0.10.2}"

find_py312() {
    # Both packages declare Requires-Python >= 3.12, so a 3.11 interpreter cannot install them.
    for cand in "${PYTHON312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

PY=$(find_py312) || {
    echo "setup_envs.sh: expected a Python 3.12 interpreter (python3.12 on PATH, pyenv 3.12.x, or PYTHON312=...), found none" >&2
    exit 1
}
echo "using $PY ($("$PY" --version))"
mkdir -p "$VENVS"

make_env() {
    local name="$1"; shift
    local env="$VENVS/$name"
    if [ ! -x "$env/bin/python" ]; then
        "$PY" -m venv "$env"
    fi
    "$env/bin/python" -m pip install -q --upgrade pip
    "$env/bin/python" -m pip install -q "$@"
    "$env/bin/python" -m pip freeze > "$env/requirements.lock"
    echo "$name: $("$env/bin/python" --version) -> $env ($(wc -l < "$env/requirements.lock") packages, see requirements.lock)"
}

make_env ref "ginseng==0.1.4" "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" psutil
# zarrs: annbatch's README calls its Rust codec pipeline essential for local-filesystem speed.
make_env annb "annbatch[zarrs]==0.3.1" psutil h5py
