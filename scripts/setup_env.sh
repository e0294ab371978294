#!/usr/bin/env bash
# Creates ./.venv with the pinned stack and installs megatron-twist into it (editable).
# Idempotent: a stamp of setup.py + this script skips the install when nothing changed.
#
#   TWIST_PYTHON        interpreter for the venv (default: python3.11 if present, else python3)
#   TWIST_TORCH_INDEX   optional pip index for torch, e.g. a CPU-only wheel index on laptops
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${TWIST_PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" - <<'PYCHECK'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 11)):
    sys.exit(f"megatron-core 0.16.1 needs Python 3.10 or 3.11, this is {sys.version.split()[0]}; "
             "set TWIST_PYTHON to a Python 3.11 interpreter")
PYCHECK

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.twist-installed-$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the pinned stack into .venv (first time: about 2-4 minutes)"
  t0=$(date +%s)
  # torch FIRST and pinned: otherwise a later resolver step may pull a multi-GB CUDA build.
  if [ -n "${TWIST_TORCH_INDEX:-}" ]; then
    pip install -q torch==2.13.0 --index-url "$TWIST_TORCH_INDEX"
  else
    pip install -q torch==2.13.0
  fi
  pip install -q torch==2.13.0 -e ".[test,plot,eval]"
  rm -f .venv/.twist-installed-*
  touch "$stamp"
  echo "[setup] done in $(( $(date +%s) - t0 ))s"
fi
