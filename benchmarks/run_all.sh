#!/usr/bin/env bash
# The whole benchmark set, one after the other, each timed: the "one hour on 2 CPU cores" budget
# of issue #7 is checked by this script's last lines (OUT/timings.txt).
#
#   bash benchmarks/run_all.sh [OUT]        # default OUT=runs/bench-all
#
# Runs quality.py, speed.py, deepspeed_memory.py, megatron_memory.py and deployment.py with their
# documented defaults,
# each into a FRESH folder under OUT (quality.py reuses checkpoints it finds, which would hide
# training time). Needs the environment of scripts/setup_env.sh (it is set up if missing).
# The benchmarks share the machine's cores: run nothing else meanwhile, or the times (not the
# ratios, which are measured side by side) are inflated.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/bench_set.sh
. benchmarks/bench_set.sh
begin_set "${1:-runs/bench-all}" benchmark-all run_all.sh
run quality python benchmarks/quality.py --out "$OUT/quality"
run speed python benchmarks/speed.py --out "$OUT/speed"
run memory python benchmarks/deepspeed_memory.py --out "$OUT/memory"
run megatron-memory python benchmarks/megatron_memory.py --out "$OUT/megatron-memory"
run deployment python benchmarks/deployment.py --out "$OUT/deployment" --repeats 30
end_set 60
