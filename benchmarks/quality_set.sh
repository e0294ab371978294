#!/usr/bin/env bash
# The default quality set of issue #15, one after the other, timed (budget: 45 min on 2 CPU cores):
#   continued.py   TwIST in the paper's regime (pretrained model, continued on another corpus), one seed;
#   scratch.py     from scratch at 120 / 400 / 1,000 steps, equal tokens and equal FLOPs, one seed.
#
#   bash benchmarks/quality_set.sh [OUT]          # default OUT=runs/quality-set
#   bash benchmarks/quality_set.sh OUT --long     # the longer variant: 3 seeds each (about 3x)
#
# Each benchmark goes into a FRESH folder under OUT (they reuse checkpoints they find, which would hide
# training time). Needs the environment of scripts/setup_env.sh (set up if missing). Run nothing else
# meanwhile, or the times (not the ratios, measured side by side) are inflated.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/quality-set}"
SEEDS=(--seeds 1)
if [ "${2:-}" = "--long" ]; then SEEDS=(--seeds 1 2 3); fi
bash scripts/setup_env.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
# OUT is replaced only if this script made it (its marker); anything else of the user's is refused.
MARK="$OUT/.megatron-twist-output"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  if ! grep -qs '"kind": "benchmark-quality-set"' "$MARK"; then
    echo "error: $OUT exists and was not made by benchmarks/quality_set.sh; nothing was written. Pass another OUT" >&2
    exit 2
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
echo '{"kind": "benchmark-quality-set"}' > "$MARK"
: > "$OUT/timings.txt"
total_start=$(date +%s)
run() {  # name, command...
    local name="$1"; shift
    local start; start=$(date +%s)
    echo "[quality_set] $name: $* (log: $OUT/$name.log)"
    "$@" > "$OUT/$name.log" 2>&1 || { echo "[quality_set] $name FAILED; see $OUT/$name.log"; tail -20 "$OUT/$name.log"; exit 1; }
    local secs=$(( $(date +%s) - start ))
    printf '%-12s %6d s  %s\n' "$name" "$secs" "$*" | tee -a "$OUT/timings.txt"
}
run continued python benchmarks/continued.py "${SEEDS[@]}" --out "$OUT/continued"
run scratch python benchmarks/scratch.py "${SEEDS[@]}" --out "$OUT/scratch"
total=$(( $(date +%s) - total_start ))
printf '%-12s %6d s  (%d min; budget 45 min on 2 cores)\n' total "$total" $(( (total + 59) / 60 )) | tee -a "$OUT/timings.txt"
