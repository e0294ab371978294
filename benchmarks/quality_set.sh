#!/usr/bin/env bash
# The default quality set of issue #15, one after the other, timed (budget: 45 min on 2 CPU cores):
#   continued.py   TwIST in the paper's regime (pretrained model, continued on another corpus), one seed;
#   scratch.py     from scratch at 120 / 400 / 1,000 steps, equal tokens and equal FLOPs, one seed;
# both with `--model quick` (hidden 96: about a third of the base model's FLOPs per token, same recipe).
#
#   bash benchmarks/quality_set.sh [OUT]          # default OUT=runs/quality-set
#   bash benchmarks/quality_set.sh OUT --long     # RESULTS.md's tables: the base model, 3 seeds (about 2.5 h)
#
# Each benchmark goes into a FRESH folder under OUT (they reuse checkpoints they find, which would hide
# training time). Run nothing else meanwhile, or the times (not the ratios, measured side by side) are inflated.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/bench_set.sh
. benchmarks/bench_set.sh
ARGS=(--seeds 1 --model quick)
if [ "${2:-}" = "--long" ]; then ARGS=(--seeds 1 2 3 --model base); fi
begin_set "${1:-runs/quality-set}" benchmark-quality-set quality_set.sh
run continued python benchmarks/continued.py "${ARGS[@]}" --out "$OUT/continued"
run scratch python benchmarks/scratch.py "${ARGS[@]}" --out "$OUT/scratch"
end_set 45
