#!/usr/bin/env bash
# The main job on an embedded default, from a fresh clone:
#   1. set up .venv with the pinned stack;
#   2. `twist prepare-data`: a sentencepiece tokenizer + Megatron indexed dataset from the
#      installed Python's standard-library sources (a few modules held out for evaluation);
#   3. `twist train` under torchrun: a small Llama-style Megatron-core GPT, 2 subnets at
#      kappa 0.5, one per rank, aggregated every 15 steps;
#   4. `twist extract`: cut the dense kappa=0.5 model;
#   5. `twist eval` on the held-out modules, for the central and the cut-out model;
#   6. a table (and a loss plot) of perplexity and parameters.
# About 3 minutes on 2 CPU cores after set-up. Override the size with TRAIN_ITERS=..., the place with RUN_DIR=...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate

RUN_DIR=${RUN_DIR:-runs/stdlib-main}
TRAIN_ITERS=${TRAIN_ITERS:-300}
NPROC=${NPROC:-2}
EVAL_TOKENS=${EVAL_TOKENS:-65536}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$RUN_DIR"
start=$(date +%s)

echo "== 1/4 prepare data (Python standard library) =="
twist prepare-data --output "$RUN_DIR/data" --vocab-size 2048

echo "== 2/4 train with TwIST on $NPROC ranks =="
torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" -m megatron_twist train \
  --data-path "$RUN_DIR/data" --model-preset small \
  --keep-ratio 0.5 --num-subnets 2 --local-steps 15 \
  --train-iters "$TRAIN_ITERS" --micro-batch-size 8 --lr 3e-3 --log-interval 30 \
  --save "$RUN_DIR/central" --metrics-file "$RUN_DIR/metrics.json"

echo "== 3/4 extract the kappa=0.5 dense model =="
twist extract --load "$RUN_DIR/central" --keep-ratio 0.5 --save "$RUN_DIR/cut-0.5"

echo "== 4/4 held-out perplexity =="
twist eval --load "$RUN_DIR/central" --data-path "$RUN_DIR/data" --max-tokens "$EVAL_TOKENS" | tail -n 1 > "$RUN_DIR/eval-central.json"
twist eval --load "$RUN_DIR/cut-0.5" --data-path "$RUN_DIR/data" --max-tokens "$EVAL_TOKENS" | tail -n 1 > "$RUN_DIR/eval-cut-0.5.json"

python examples/summarize.py "$RUN_DIR"
echo "total $(( $(date +%s) - start ))s (after setup)"
