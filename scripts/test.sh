#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} DS_ACCELERATOR=cpu
# DeepSpeed JIT-compiles a shared-memory comm op once (~20 s); keep it with the venv.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
# Lint and format first (ruff.toml): seconds, and a failure names the file and line.
ruff check .
ruff format --check .
exec python -m pytest -q --durations=15 "$@"
