#!/usr/bin/env bash
# GPU smoke check: a few TwIST rounds on CUDA with NCCL, then the same on the single-process
# path, extraction and evaluation. Meant for a machine with >= 1 NVIDIA GPU; takes ~2-4 minutes
# including the install. Prints one PASS/FAIL line at the end and writes $OUT/gpu_smoke.json
# (OUT defaults to runs/gpu-smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-smoke}
mkdir -p "$OUT"
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python - <<'PY'
import torch, sys
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for GPU machines (the CPU path is covered by scripts/test.sh)")
PY
NGPU=$(python -c 'import torch; print(min(2, torch.cuda.device_count()))')
NSUB=2
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
COMMON=(--model-preset small --mock-data --vocab-size 4096 --train-iters 30 --local-steps 10
        --micro-batch-size 8 --num-subnets "$NSUB" --keep-ratio 0.5 --log-interval 10)
t0=$(date +%s)
torchrun --nproc_per_node "$NGPU" --master_addr 127.0.0.1 --master_port "$PORT" -m megatron_twist train \
  "${COMMON[@]}" --save "$OUT/central" --metrics-file "$OUT/metrics-${NGPU}gpu.json"
python -m megatron_twist train "${COMMON[@]}" --metrics-file "$OUT/metrics-1proc.json"
python -m megatron_twist extract --load "$OUT/central" --save "$OUT/cut"
python -m megatron_twist eval --load "$OUT/cut" --mock-data | tail -n 1 > "$OUT/eval-cut.json"
python - "$OUT" "$NGPU" "$(( $(date +%s) - t0 ))" <<'PY'
import json, math, sys
out, ngpu, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = json.load(open(f"{out}/metrics-{ngpu}gpu.json"))["loss_curve"]
b = json.load(open(f"{out}/metrics-1proc.json"))["loss_curve"]
ev = json.load(open(f"{out}/eval-cut.json"))
diff = max(abs(x - y) for x, y in zip(a, b))
ok = len(a) == 30 and a[-1] < a[0] and diff < 1e-3 and math.isfinite(ev["perplexity"])
res = {"ngpu": ngpu, "first_loss": a[0], "last_loss": a[-1], "max_loss_diff_multi_vs_single": diff,
       "cut_ppl": ev["perplexity"], "seconds": secs, "pass": ok}
json.dump(res, open(f"{out}/gpu_smoke.json", "w"), indent=1)
print(("PASS " if ok else "FAIL ") + json.dumps(res))
sys.exit(0 if ok else 1)
PY
