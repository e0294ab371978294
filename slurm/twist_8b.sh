#!/bin/bash
# TwIST on an 8B Llama-style model (32 layers, hidden 4096, 32 query heads in 8 KV groups,
# FFN 14336, vocab 128256) over 2 nodes of 8 GPUs: TP 8, PP 1, DP 2 = 2 subnets, kappa 0.5.
# The sizes are set here and everything else is twist_70b.sh (same variables, same checks).
#
#   sbatch slurm/twist_8b.sh                       # submit (from the repository root)
#   bash slurm/twist_8b.sh --plan                  # check the layout and size it, no GPU
#   LAUNCHER=deepspeed TP=1 sbatch slurm/twist_8b.sh   # the DeepSpeed variant (ZeRO-3, bf16)
#
#SBATCH --job-name=twist-8b
#SBATCH --nodes=2                  # 16 GPUs: TP 8 x PP 1 x DP 2 (2 subnets)
#SBATCH --ntasks-per-node=1        # one launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
export NODES=${NODES:-${SLURM_JOB_NUM_NODES:-2}}   # nodes
export NUM_LAYERS=${NUM_LAYERS:-32}                # transformer layers
export HIDDEN_SIZE=${HIDDEN_SIZE:-4096}            # model width
export NUM_HEADS=${NUM_HEADS:-32}                  # query heads (head dim 128)
export NUM_KV_HEADS=${NUM_KV_HEADS:-8}             # key-value heads
export FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-14336}   # MLP neurons per layer
export VOCAB_SIZE=${VOCAB_SIZE:-128256}            # vocabulary
export SEQ_LENGTH=${SEQ_LENGTH:-4096}              # tokens per sequence
export TP=${TP:-8}                                 # tensor parallel, inside a node
export PP=${PP:-1}                                 # pipeline parallel: the 8B model fits one stage
export NUM_SUBNETS=${NUM_SUBNETS:-2}               # subnets over DP = NODES x 8 / (TP x PP)
export LR=${LR:-3e-4}                              # peak learning rate
export MIN_LR=${MIN_LR:-3e-5}                      # end of the cosine decay
export RUN_DIR=${RUN_DIR:-runs/twist-8b-${SLURM_JOB_ID:-local}}
if [[ -n "${TWIST_REPO:-}" ]]; then REPO=$TWIST_REPO
elif [[ -d "$(dirname "${BASH_SOURCE[0]}")/../megatron_twist" ]]; then REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else REPO=${SLURM_SUBMIT_DIR:-$PWD}; fi
export TWIST_REPO=$REPO
exec bash "$REPO/slurm/twist_70b.sh" "$@"
