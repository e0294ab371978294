#!/bin/bash
# The tiny model the tests train (2 layers, hidden 64, 4 query heads in 2 KV groups, FFN 128,
# vocab 512) on 2 CPU nodes x 1 rank, synthetic data, 8 steps: twist_70b.sh's logic (the same
# checks, rendezvous, srun + torchrun or DeepSpeed launch) at a size that runs in seconds.
# tests/scale/test_slurm_script.py runs it under a simulated Slurm (stand-in srun / scontrol).
#
#   sbatch slurm/twist_tiny_cpu.sh                 # on a CPU partition
#   bash slurm/twist_tiny_cpu.sh --plan            # the planner's view
#
#SBATCH --job-name=twist-tiny-cpu
#SBATCH --nodes=2                  # 2 ranks: 2 subnets, one per node
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:10:00
#SBATCH --output=%x-%j.out
set -euo pipefail
export NODES=${NODES:-${SLURM_JOB_NUM_NODES:-2}}   # nodes
export GPUS_PER_NODE=${GPUS_PER_NODE:-1}           # ranks (CPU processes) per node
export GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-0}         # no GPU: skip the memory check
export NUM_LAYERS=${NUM_LAYERS:-2}                 # the `tiny` preset's sizes
export HIDDEN_SIZE=${HIDDEN_SIZE:-64}
export NUM_HEADS=${NUM_HEADS:-4}
export NUM_KV_HEADS=${NUM_KV_HEADS:-2}
export FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-128}
export VOCAB_SIZE=${VOCAB_SIZE:-512}
export SEQ_LENGTH=${SEQ_LENGTH:-64}
export TP=${TP:-1}                                 # no model parallelism
export PP=${PP:-1}
export KAPPA=${KAPPA:-0.5}                         # keep ratio
export NUM_SUBNETS=${NUM_SUBNETS:-2}               # one subnet per rank
export LOCAL_STEPS=${LOCAL_STEPS:-4}               # 2 rounds of 4 steps
export MICRO_BATCH=${MICRO_BATCH:-2}
export TRAIN_ITERS=${TRAIN_ITERS:-8}
export LR=${LR:-3e-3}
export MIN_LR=${MIN_LR:-3e-4}
export WARMUP_ITERS=${WARMUP_ITERS:-2}
export WEIGHT_DECAY=${WEIGHT_DECAY:-0.01}
export LOG_INTERVAL=${LOG_INTERVAL:-4}
export MOCK_DATA=${MOCK_DATA:-1}                   # synthetic tokens: no data files
export CKPT_FORMAT=${CKPT_FORMAT:-safetensors}     # one file set, gathered on rank 0
export ZERO_STAGE=${ZERO_STAGE:-1}                 # DeepSpeed variant: ZeRO-1, fp32 on CPU
export BF16=${BF16:-0}
export GLOBAL_BATCH=${GLOBAL_BATCH:-}              # one micro-batch per step
export SHARD_CENTRAL=${SHARD_CENTRAL:-0}           # the central model replicated (the trainer's default)
export RUN_DIR=${RUN_DIR:-runs/twist-tiny-cpu-${SLURM_JOB_ID:-local}}
if [[ -n "${TWIST_REPO:-}" ]]; then REPO=$TWIST_REPO
elif [[ -d "$(dirname "${BASH_SOURCE[0]}")/../megatron_twist" ]]; then REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else REPO=${SLURM_SUBMIT_DIR:-$PWD}; fi
export TWIST_REPO=$REPO
exec bash "$REPO/slurm/twist_70b.sh" "$@"
