#!/usr/bin/env bash
# The whole benchmark set, one after the other, each timed: the "one hour on 2 CPU cores" budget
# of issue #7 is checked by this script's last lines (OUT/timings.txt).
#
#   bash benchmarks/run_all.sh [OUT]        # default OUT=runs/bench-all
#
# Runs quality.py, speed.py, deepspeed_memory.py and deployment.py with their documented defaults,
# each into a FRESH folder under OUT (quality.py reuses checkpoints it finds, which would hide
# training time). Needs the environment of scripts/setup_env.sh (it is set up if missing).
# The benchmarks share the machine's cores: run nothing else meanwhile, or the times (not the
# ratios, which are measured side by side) are inflated.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/bench-all}"
bash scripts/setup_env.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
# OUT is replaced only if this script made it (its marker); anything else of the user's is refused.
MARK="$OUT/.megatron-twist-output"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  if ! grep -qs '"kind": "benchmark-all"' "$MARK"; then
    echo "error: $OUT exists and was not made by benchmarks/run_all.sh; nothing was written. Pass another OUT" >&2
    exit 2
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
echo '{"kind": "benchmark-all"}' > "$MARK"
: > "$OUT/timings.txt"
total_start=$(date +%s)
run() {  # name, command...
    local name="$1"; shift
    local start; start=$(date +%s)
    echo "[run_all] $name: $* (log: $OUT/$name.log)"
    "$@" > "$OUT/$name.log" 2>&1 || { echo "[run_all] $name FAILED; see $OUT/$name.log"; tail -20 "$OUT/$name.log"; exit 1; }
    local secs=$(( $(date +%s) - start ))
    printf '%-12s %6d s  %s\n' "$name" "$secs" "$*" | tee -a "$OUT/timings.txt"
}
run quality python benchmarks/quality.py --out "$OUT/quality"
run speed python benchmarks/speed.py --out "$OUT/speed"
run memory python benchmarks/deepspeed_memory.py --out "$OUT/memory"
run deployment python benchmarks/deployment.py --out "$OUT/deployment" --repeats 30
total=$(( $(date +%s) - total_start ))
printf '%-12s %6d s  (%d min; budget 60 min on 2 cores)\n' total "$total" $(( (total + 59) / 60 )) | tee -a "$OUT/timings.txt"
