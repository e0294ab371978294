#!/usr/bin/env bash
# TwIST on a plain-text corpus, then the cut-out model in HuggingFace format, measured in both forms:
#
#   bash examples/text_to_hf.sh CORPUS.txt [RUN_DIR]
#
#   1. `twist prepare-data --split-paragraphs`: one document per paragraph, every 10th held out,
#      a sentencepiece BPE tokenizer trained on the training paragraphs;
#   2. `twist train` under torchrun: the `small` Llama-style model, 2 subnets at kappa 0.5;
#   3. `twist extract` at kappa 0.5;
#   4. `twist export-hf` of the central and of the cut-out model (config.json, model.safetensors,
#      tokenizer files);
#   5. `twist eval` of all four (same windows, same held-out tokens) and a table.
# About 10 minutes on 2 CPU cores (.venv already set up: bash scripts/setup_env.sh).
# The closing note of issue #5 ran it on tinyshakespeare.txt (results in docs/RESULTS.md).
set -euo pipefail
corpus=$1
RUN_DIR=${2:-runs/text-to-hf}
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
TRAIN_ITERS=${TRAIN_ITERS:-300}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$RUN_DIR"
start=$(date +%s)

twist prepare-data --input "$corpus" --split-paragraphs --vocab-size "${VOCAB:-2048}" --output "$RUN_DIR/data"
torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" -m megatron_twist train \
  --data-path "$RUN_DIR/data" --model-preset small \
  --keep-ratio 0.5 --num-subnets 2 --local-steps 15 \
  --train-iters "$TRAIN_ITERS" --micro-batch-size 8 --lr 3e-3 --log-interval 30 \
  --save "$RUN_DIR/central" --metrics-file "$RUN_DIR/metrics.json"
twist extract --load "$RUN_DIR/central" --keep-ratio 0.5 --save "$RUN_DIR/cut-0.5"
twist export-hf --load "$RUN_DIR/central" --save "$RUN_DIR/hf-central"
twist export-hf --load "$RUN_DIR/cut-0.5" --save "$RUN_DIR/hf-cut-0.5"
for form in central cut-0.5 hf-central hf-cut-0.5; do
  twist eval --load "$RUN_DIR/$form" --data-path "$RUN_DIR/data" | tail -n 1 > "$RUN_DIR/eval-$form.json"
done
python - "$RUN_DIR" <<'PY'
import json, sys
run = sys.argv[1]
print(f"\n{'model':28s} {'form':12s} {'parameters':>12s} {'held-out ppl':>13s} {'tokens':>8s}")
for name, form, label in (("central", "central", "megatron-twist"), ("hf-central", "central", "HuggingFace"),
                          ("cut-0.5", "cut kappa=0.5", "megatron-twist"), ("hf-cut-0.5", "cut kappa=0.5", "HuggingFace")):
    r = json.load(open(f"{run}/eval-{name}.json"))
    print(f"{form:28s} {label:12s} {r['parameters']:12,d} {r['perplexity']:13.3f} {r['tokens']:8d}")
PY
echo "total $(( $(date +%s) - start ))s"
