#!/usr/bin/env bash
# lm-evaluation-harness on an exported model, with a LOCAL data file (no hub, no network).
#
#   bash examples/lm_eval/run_lm_eval.sh HF_DIR HELDOUT.jsonl OUT_DIR [TEXT_FIELD]
#
# HF_DIR:        a directory from `twist export-hf` (or any local Llama / GPT-2 HF directory)
# HELDOUT.jsonl: one JSON object per line; its TEXT_FIELD (default "text") is one document
# OUT_DIR:       lm-eval writes its results JSON here
#
# The task is a rolling-loglikelihood perplexity task (lm-eval's `loglikelihood_rolling`, as its
# wikitext task): word_perplexity, byte_perplexity and bits_per_byte over the documents. It is
# written from examples/lm_eval/twist_heldout.yaml with the data file's absolute path filled in.
# Needs lm-eval: pip install -e '.[eval]'.
set -euo pipefail
hf_dir=$1; data=$2; out=$3; field=${4:-text}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
task_dir=$(mktemp -d)
trap 'rm -rf "$task_dir"' EXIT
data_abs=$(cd "$(dirname "$data")" && pwd)/$(basename "$data")
sed -e "s|@DATA_FILE@|$data_abs|" -e "s|@TEXT_FIELD@|$field|" "$here/twist_heldout.yaml" > "$task_dir/twist_heldout.yaml"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_CACHE="$task_dir/cache"
python -m lm_eval --model hf --model_args "pretrained=$hf_dir,dtype=float32,trust_remote_code=False" \
    --tasks twist_heldout --include_path "$task_dir" --device cpu --batch_size 1 --output_path "$out"
