# Sourced by run_demo.sh and run_tests.sh: create (or reuse) ./.venv and install the project into it.
# Re-installs only when pyproject.toml changed since the last install (a stamp file records its hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY="$ROOT/.venv/bin/python"
# torch first, and only if missing: a GPU user who pre-installed the CUDA build keeps it.
# TORCH_SPEC picks another build (default: the 2.13 CPU wheel these machines carry on disk).
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q --upgrade pip
    "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
STAMP=.venv/.mistral_ft_installed
WANT="$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS:-dev}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VPY" -m pip install -q -e ".[${EXTRAS:-dev}]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
