#!/usr/bin/env bash
# GPU check (issue #17 item 3): every path of megatron-twist on CUDA in one run, meant to finish in
# under 8 minutes including the install. Prints ONE line at the end, "PASS {...}" or "FAIL {...}",
# and writes every figure to $OUT/gpu_smoke.json (OUT defaults to runs/gpu-smoke).
#
#   bash scripts/gpu_smoke.sh                      # on a machine with >= 1 NVIDIA GPU
#   TWIST_SMOKE_CPU=1 bash scripts/gpu_smoke.sh    # the same logic on CPU/gloo at tiny sizes
#
# Layout, from the GPUs visible (NCCL needs one GPU per rank):
#   1 GPU   one process: 1 subnet at kappa 0.5 (coverage off: DeepSpeed trains one subnet per rank)
#   2-3     2 ranks: 2 subnets, one per rank
#   >= 4    4 ranks: TP 2 x 2 subnets (tensor parallelism on both paths, DeepSpeed's included)
# TWIST_SMOKE_CPU=1 hides CUDA (CUDA_VISIBLE_DEVICES=""), uses gloo and tiny sizes, and takes the
# rank count from SMOKE_RANKS (default 2; 1 and 4 run the other layouts); nothing else changes, so a
# CPU run exercises the script's logic before a GPU sees it.
#
# Checks, in order (each step's exit code, seconds and log under $OUT/logs/):
#   data       `twist prepare-data` on 2 MB of the standard library (tokenizer + held-out split)
#   mg-fp32    the Megatron path, fp32 (the reference; saves the central model)
#   mg-bf16    the Megatron path, --bf16: within 5e-2 of fp32's loss curve
#   mg-1proc   (more than one rank) the same run in one process: within 1e-3 of the multi-rank one
#   ds-zero1/2/3   DeepSpeed ZeRO 1, 2, 3 in fp32 at the same layout: within 1e-3 of mg-fp32
#   ds-zero2-bf16  DeepSpeed ZeRO 2 with bf16: within 5e-2 of mg-fp32
#   extract, eval, export-hf, eval-hf: the cut model's perplexity; the HF export loaded back with
#              transformers gives the same perplexity (relative 5e-3); a cut of the DeepSpeed
#              ZeRO-2 checkpoint within 2% of it
#   hf-load    AutoModelForCausalLM.from_pretrained on the export, one forward on the device
#   tput-dense / tput-twist: tokens/s of dense training against TwIST at kappa 0.5 (bf16, a model
#              that keeps the GPU busy for a few seconds per run); on a GPU TwIST must be faster
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-runs/gpu-smoke}
CPU=${TWIST_SMOKE_CPU:-0}
MARK="$OUT/.megatron-twist-gpu-smoke"
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$MARK" ]; then
  echo "gpu_smoke.sh: $OUT is a non-empty directory this script did not write; set OUT to a new path" >&2
  exit 2
fi
mkdir -p "$OUT/logs" && touch "$MARK"
rm -f "$OUT/steps.tsv" "$OUT"/logs/*.log

bash scripts/setup_env.sh || { echo "FAIL {\"step\": \"install\"}"; exit 1; }
INSTALL_S=$((SECONDS - START))
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONUNBUFFERED=1

if [ "$CPU" = 1 ]; then  # one thread per rank (the CPU suite's setting); on GPUs torch's default threads
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  RANKS=${SMOKE_RANKS:-2}
else
  NGPU=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
  if [ "$NGPU" -lt 1 ]; then
    echo "FAIL {\"reason\": \"no CUDA device visible (TWIST_SMOKE_CPU=1 runs the CPU version)\"}"
    exit 1
  fi
  RANKS=$(( NGPU >= 4 ? 4 : (NGPU >= 2 ? 2 : 1) ))
fi
case "$RANKS" in
  1) NSUB=1; TP=1; TWIST=(--num-subnets 1 --keep-ratio 0.5 --no-coverage); COVERAGE=false ;;
  2) NSUB=2; TP=1; TWIST=(--num-subnets 2 --keep-ratio 0.5); COVERAGE=true ;;
  4) NSUB=2; TP=2; TWIST=(--num-subnets 2 --keep-ratio 0.5); COVERAGE=true ;;
  *) echo "gpu_smoke.sh: SMOKE_RANKS must be 1, 2 or 4, got $RANKS" >&2; exit 2 ;;
esac
LAYOUT=(--tensor-model-parallel-size "$TP")

if [ "$CPU" = 1 ]; then
  MODEL=(--model-preset tiny); VOCAB=512; MB=2; ITERS=12; LS=4
  TPUT=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 256
        --seq-length 64 --vocab-size 512 --micro-batch-size 4 --train-iters 8 --local-steps 2)
else
  MODEL=(--model-preset small); VOCAB=4096; MB=8; ITERS=30; LS=10
  GIB=$(python -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)')
  if [ "$GIB" -ge 70 ]; then  # ~0.7B parameters, 8 x 1024 tokens a step: a few seconds of a large GPU
    TPUT=(--num-layers 12 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 8 --ffn-hidden-size 5632
          --seq-length 1024 --vocab-size 32000 --micro-batch-size 8 --train-iters 40 --local-steps 10)
  else
    TPUT=(--num-layers 8 --hidden-size 1024 --num-attention-heads 8 --num-query-groups 4 --ffn-hidden-size 2816
          --seq-length 1024 --vocab-size 32000 --micro-batch-size 8 --train-iters 40 --local-steps 10)
  fi
fi
DATA=(--data-path "$OUT/data")
RUN=("${DATA[@]}" --train-iters "$ITERS" --local-steps "$LS" --micro-batch-size "$MB" --log-interval "$LS")

free_port() {
  python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
step() {  # step NAME CMD... | step NAME launch TWIST-ARGS...: run with a time limit, log, record exit code and seconds
  local name=$1; shift
  if [ "$1" = launch ]; then  # the job's layout: torchrun with one rank per GPU, or one process
    shift
    if [ "$RANKS" -gt 1 ]; then
      set -- torchrun --nproc_per_node "$RANKS" --master_addr 127.0.0.1 --master_port "$(free_port)" \
        -m megatron_twist "$@"
    else
      set -- python -m megatron_twist "$@"
    fi
  fi
  local t0=$SECONDS
  timeout -k 10 "${SMOKE_STEP_TIMEOUT:-300}" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
  [ "$rc" = 0 ] || echo "[gpu-smoke] $name failed (exit $rc): $OUT/logs/$name.log" >&2
  return 0
}
ds_config() {  # ds_config STAGE BF16 -> $OUT/ds-zeroSTAGE[-bf16].json, TwIST settings in its "twist" section
  python - "$OUT/ds-zero$1$([ "$2" = true ] && echo -bf16).json" "$1" "$2" "$MB" "$NSUB" "$LS" "$COVERAGE" <<'PY'
import json, sys
path, stage, bf16, mb, nsub, ls, coverage = sys.argv[1:]
json.dump({"train_micro_batch_size_per_gpu": int(mb), "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "steps_per_print": 100000, "zero_optimization": {"stage": int(stage)}, "bf16": {"enabled": bf16 == "true"},
           "twist": {"keep_ratio": 0.5, "num_subnets": int(nsub), "local_steps": int(ls), "seed": 1234,
                     "coverage": coverage == "true"}}, open(path, "w"), indent=1)
PY
}

# 2 MB of the Python standard library's sources, a sentencepiece tokenizer of the model's vocabulary:
# real text, so the cut's perplexity is a held-out one and the HF export carries a tokenizer
step data python -m megatron_twist prepare-data --output "$OUT/data" --vocab-size "$VOCAB" --max-bytes 2000000
step mg-fp32 launch train "${MODEL[@]}" "${RUN[@]}" "${TWIST[@]}" "${LAYOUT[@]}" \
  --save "$OUT/central" --metrics-file "$OUT/mg-fp32.json"
step mg-bf16 launch train "${MODEL[@]}" "${RUN[@]}" "${TWIST[@]}" "${LAYOUT[@]}" --bf16 --metrics-file "$OUT/mg-bf16.json"
if [ "$RANKS" -gt 1 ]; then
  # --twist-balance-shards: the subnets the multi-rank run drew (balanced over its TP size), at TP 1
  step mg-1proc python -m megatron_twist train "${MODEL[@]}" "${RUN[@]}" "${TWIST[@]}" --twist-balance-shards "$TP" \
    --metrics-file "$OUT/mg-1proc.json"
fi
for z in 1 2 3; do
  ds_config "$z" false
  step "ds-zero$z" launch train "${MODEL[@]}" "${RUN[@]}" "${LAYOUT[@]}" --deepspeed \
    --deepspeed_config "$OUT/ds-zero$z.json" --save "$OUT/ds-zero$z" --metrics-file "$OUT/ds-zero$z-metrics.json"
done
ds_config 2 true
step ds-zero2-bf16 launch train "${MODEL[@]}" "${RUN[@]}" "${LAYOUT[@]}" --deepspeed \
  --deepspeed_config "$OUT/ds-zero2-bf16.json" --metrics-file "$OUT/ds-zero2-bf16-metrics.json"

step extract python -m megatron_twist extract --load "$OUT/central" --save "$OUT/cut"
step eval python -m megatron_twist eval --load "$OUT/cut" "${DATA[@]}"
step export-hf python -m megatron_twist export-hf --load "$OUT/cut" --save "$OUT/hf" --tokenizer "$OUT/data"
step eval-hf python -m megatron_twist eval --load "$OUT/hf" "${DATA[@]}"
step extract-ds python -m megatron_twist extract --load "$OUT/ds-zero2" --save "$OUT/cut-ds"
step eval-ds python -m megatron_twist eval --load "$OUT/cut-ds" "${DATA[@]}"
step hf-load python - "$OUT/hf" "$OUT/hf-load.json" <<'PY'
import json, sys
import torch
from transformers import AutoModelForCausalLM
path, out = sys.argv[1:]
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(device).eval()
tokens = torch.randint(0, model.config.vocab_size, (2, 32), device=device)
with torch.no_grad():
    logits = model(tokens).logits
json.dump({"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
           "device": str(logits.device), "logits_shape": list(logits.shape),
           "finite": bool(torch.isfinite(logits).all())}, open(out, "w"))
PY
step tput-dense launch train "${TPUT[@]}" --bf16 --mock-data --keep-ratio 1 --num-subnets 1 "${LAYOUT[@]}" \
  --log-interval 10 --metrics-file "$OUT/tput-dense.json"
step tput-twist launch train "${TPUT[@]}" --bf16 --mock-data "${TWIST[@]}" "${LAYOUT[@]}" \
  --log-interval 10 --metrics-file "$OUT/tput-twist.json"

python - "$OUT" "$CPU" "$RANKS" "$TP" "$ITERS" "$INSTALL_S" "$((SECONDS - START))" <<'PY'
import json, math, sys
from pathlib import Path

out, cpu, ranks, tp, iters, install_s, total_s = Path(sys.argv[1]), sys.argv[2] == "1", *map(int, sys.argv[3:])
res = {"cpu_mode": cpu, "ranks": ranks, "tensor_parallel": tp, "install_seconds": install_s, "checks": {}}
try:
    import torch
    res["torch"], res["cuda"] = torch.__version__, torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res["gpu"] = {"name": p.name, "count": torch.cuda.device_count(), "memory_gib": round(p.total_memory / 2**30, 1),
                      "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
except Exception as e:  # the summary must still be written
    res["torch_error"] = repr(e)
res["steps"] = {n: {"rc": int(rc), "seconds": int(s)} for n, rc, s in
                (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}
checks = res["checks"]


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def curve(m):
    """Mean loss over subnets per step: the Megatron path's loss_curve, or DeepSpeed's per-rank losses
    averaged over ranks (TP ranks of a subnet report the same loss, so every subnet weighs the same)."""
    if m is None:
        return None
    if "loss_curve" in m:
        return m["loss_curve"]
    rows = m["losses_per_rank"]
    return [sum(r[t] for r in rows) / len(rows) for t in range(len(rows[0]))]


def diff(a, b):
    if a is None or b is None or len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) for x, y in zip(a, b))


def check(name, value, ok):
    checks[name] = {"value": value, "pass": bool(ok)}


runs = {n: curve(load(f)) for n, f in (("mg-fp32", "mg-fp32.json"), ("mg-bf16", "mg-bf16.json"),
                                        ("mg-1proc", "mg-1proc.json"), ("ds-zero1", "ds-zero1-metrics.json"),
                                        ("ds-zero2", "ds-zero2-metrics.json"), ("ds-zero3", "ds-zero3-metrics.json"),
                                        ("ds-zero2-bf16", "ds-zero2-bf16-metrics.json"))}
res["loss_first_last"] = {n: [c[0], c[-1]] for n, c in runs.items() if c}
ref = runs["mg-fp32"]
res["mg_fp32_first_last_loss"] = [ref[0], ref[-1]] if ref else None
check("mg-fp32 trains", res["mg_fp32_first_last_loss"], ref and len(ref) == iters and ref[-1] < ref[0])
d = diff(curve(load("mg-bf16.json")), ref)
check("mg-bf16 vs fp32 (<= 5e-2)", d, d <= 5e-2)
if ranks > 1:
    d = diff(curve(load("mg-1proc.json")), ref)
    check("one process vs multi-rank (<= 1e-3)", d, d <= 1e-3)
for z in (1, 2, 3):
    d = diff(curve(load(f"ds-zero{z}-metrics.json")), ref)
    check(f"ds-zero{z} vs mg-fp32 (<= 1e-3)", d, d <= 1e-3)
d = diff(curve(load("ds-zero2-bf16-metrics.json")), ref)
check("ds-zero2-bf16 vs mg-fp32 (<= 5e-2)", d, d <= 5e-2)


def perplexity(step):
    """The JSON line `twist eval` ends with (warnings may follow it in the merged log)."""
    try:
        lines = (out / "logs" / f"{step}.log").read_text().splitlines()
    except OSError:
        return math.nan
    for line in reversed(lines):
        if line.startswith("{") and '"perplexity"' in line:
            return json.loads(line)["perplexity"]
    return math.nan


ppl, ppl_hf, ppl_ds = perplexity("eval"), perplexity("eval-hf"), perplexity("eval-ds")
res["perplexity"] = {"cut": ppl, "hf_export": ppl_hf, "cut_of_deepspeed_zero2": ppl_ds}
check("cut perplexity finite", ppl, math.isfinite(ppl))
rel = abs(ppl_hf - ppl) / ppl if math.isfinite(ppl) and math.isfinite(ppl_hf) else math.inf
check("HF export perplexity = cut's (relative <= 5e-3)", rel, rel <= 5e-3)
rel = abs(ppl_ds - ppl) / ppl if math.isfinite(ppl) and math.isfinite(ppl_ds) else math.inf
check("cut of DeepSpeed ZeRO-2 vs Megatron's (relative <= 2e-2)", rel, rel <= 2e-2)
hf = load("hf-load.json")
res["hf_load"] = hf
check("transformers loads the export and runs it", hf, bool(hf and hf["finite"]))


def tokens_per_s(name):
    m = load(name)
    if m is None or len(m.get("rounds", [])) < 2:
        return math.nan
    rounds = m["rounds"][1:]  # the first round warms up (allocator, kernels)
    return sum(r["tokens"] for r in rounds) / sum(r["seconds"] for r in rounds)


dense, twist = tokens_per_s("tput-dense.json"), tokens_per_s("tput-twist.json")
ratio = twist / dense if dense > 0 else math.nan
res["throughput"] = {"dense_tokens_per_s": dense, "twist_tokens_per_s": twist, "twist_over_dense": ratio}
# a kappa-0.5 subnet does about half the matmul work of the dense model: faster on a GPU; at CPU mode's
# tiny sizes overheads dominate, so there the ratio is only recorded
check("TwIST / dense throughput", ratio, math.isfinite(ratio) and (cpu or ratio > 1.0))
for name, s in res["steps"].items():
    check(f"step {name} exit 0", s["rc"], s["rc"] == 0)
res["seconds"] = total_s
check("under 8 minutes including the install (GPU only)", total_s, cpu or total_s < 480)
res["pass"] = all(c["pass"] for c in checks.values())
(out / "gpu_smoke.json").write_text(json.dumps(res, indent=1, default=str))
failed = [n for n, c in checks.items() if not c["pass"]]
summary = {"ranks": ranks, "tp": tp, "gpu": res.get("gpu", {}).get("name", "cpu"), "seconds": total_s,
           "twist_over_dense": ratio, "failed": failed, "json": str(out / "gpu_smoke.json")}
print(("PASS " if res["pass"] else "FAIL ") + json.dumps(summary))
sys.exit(0 if res["pass"] else 1)
PY
