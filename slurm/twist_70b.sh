#!/bin/bash
# TwIST on a 70B Llama-style model (80 layers, hidden 8192, 64 query heads in 8 KV groups,
# FFN 28672, vocab 128256) over N nodes of 8 GPUs: TP 8 inside a node, PP 8 across nodes,
# data parallel = subnets x replicas, kappa 0.5. slurm/README.md documents every variable.
#
#   sbatch slurm/twist_70b.sh                      # submit (from the repository root)
#   bash slurm/twist_70b.sh --plan                 # check the layout and size it, no GPU, no Slurm
#   NODES=64 bash slurm/twist_70b.sh --plan --json # the same for another node count, as JSON
#   LAUNCHER=deepspeed PP=1 sbatch slurm/twist_70b.sh        # the DeepSpeed variant (hostfile; TP only)
#
# Every size below is an environment variable with a default (VAR=... sbatch slurm/twist_70b.sh
# overrides it); the smaller recipes (twist_8b.sh, twist_tiny_cpu.sh) set them and run this file,
# so every recipe goes through the same checks and launch lines. Extra arguments after the
# options above are passed to `twist train` (and to the planner).
#
#SBATCH --job-name=twist-70b
#SBATCH --nodes=32                 # 256 GPUs: TP 8 x PP 8 x DP 4 (2 subnets x 2 replicas)
#SBATCH --ntasks-per-node=1        # one launcher per node; it starts GPUS_PER_NODE ranks
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# ------------------------------------------------------------------------------ where the code is
# Under sbatch this file runs from Slurm's spool directory, so the repository is found from
# TWIST_REPO, else from this file's location (bash slurm/...), else from the submit directory.
if [[ -n "${TWIST_REPO:-}" ]]; then
  REPO=$TWIST_REPO
elif [[ -d "$(dirname "${BASH_SOURCE[0]}")/../megatron_twist" ]]; then
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else
  REPO=${SLURM_SUBMIT_DIR:-$PWD}
fi
[[ -d "$REPO/megatron_twist" ]] || { echo "twist_70b.sh: no megatron_twist/ in $REPO; set TWIST_REPO" >&2; exit 2; }
cd "$REPO"
VENV=${VENV:-$REPO/.venv}                  # Python environment with megatron-twist (scripts/setup_env.sh)
if [[ -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
PYTHON=${PYTHON:-python}

MODE=run
if [[ "${1:-}" == "--plan" ]]; then MODE=plan; shift; fi

# ------------------------------------------------------------------------------ cluster
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-32}}}  # nodes (inside a job: Slurm's count)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}          # ranks per node (GPUs; CPU processes for the CPU recipe)
GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80}       # memory of one GPU for the planner's check; 0: no check
LAUNCHER=${LAUNCHER:-torchrun}             # torchrun (srun + torchrun per node) | deepspeed (hostfile)
DS_LAUNCHER=${DS_LAUNCHER:-slurm}          # the deepspeed launcher's backend: slurm (srun) | pdsh (ssh)

# ------------------------------------------------------------------------------ model (Llama 3 70B shape)
MODEL_FAMILY=${MODEL_FAMILY:-llama}        # llama: RMSNorm, SwiGLU, RoPE, grouped-query attention
NUM_LAYERS=${NUM_LAYERS:-80}               # transformer layers
HIDDEN_SIZE=${HIDDEN_SIZE:-8192}           # model width
NUM_HEADS=${NUM_HEADS:-64}                 # query heads (head dim = HIDDEN_SIZE / NUM_HEADS = 128)
NUM_KV_HEADS=${NUM_KV_HEADS:-8}            # key-value heads (GQA groups); TP must divide them
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-28672}  # MLP neurons per layer
VOCAB_SIZE=${VOCAB_SIZE:-128256}           # vocabulary (with DATA_PATH the data's tokenizer decides)
SEQ_LENGTH=${SEQ_LENGTH:-4096}             # tokens per sequence

# ------------------------------------------------------------------------------ parallel layout
TP=${TP:-8}                                # tensor parallel: inside a node (8 KV heads -> TP <= 8)
PP=${PP:-4}                                # pipeline parallel: 80 layers / 4 = 20 per stage; fits 80 GiB
                                           # GPUs in bf16 with the central model sharded (`--plan` shows it)

# ------------------------------------------------------------------------------ TwIST
KAPPA=${KAPPA:-0.5}                        # keep ratio: share of heads and MLP neurons a subnet keeps
NUM_SUBNETS=${NUM_SUBNETS:-2}              # subnets; data parallel (NODES*GPUS_PER_NODE/(TP*PP)) must be
                                           # a multiple of it (replicas) or divide it (turns)
LOCAL_STEPS=${LOCAL_STEPS:-20}             # optimizer steps between aggregations (a round)
TWIST_SEED=${TWIST_SEED:-1234}             # subnet sampler seed

# ------------------------------------------------------------------------------ training
MICRO_BATCH=${MICRO_BATCH:-1}              # sequences per rank per micro-batch (per subnet replica)
GLOBAL_BATCH=${GLOBAL_BATCH-1024}          # sequences per optimizer step of each subnet, over its replicas
                                           # (micro-batches through 1F1B: the bubble is (PP-1)/(N+PP-1));
                                           # empty: one micro-batch per step
SHARD_CENTRAL=${SHARD_CENTRAL:-1}          # 1: central model sharded over data parallel (1/DP per rank);
                                           # 0: replicated (a full copy of the TP shard / PP stage per rank)
TRAIN_ITERS=${TRAIN_ITERS:-20000}          # optimizer steps
LR=${LR:-1.5e-4}                           # peak learning rate
MIN_LR=${MIN_LR:-1.5e-5}                   # end of the cosine decay
WARMUP_ITERS=${WARMUP_ITERS:-500}          # linear warm-up steps
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}          # AdamW weight decay
CLIP_GRAD=${CLIP_GRAD:-1.0}                # gradient clipping (global norm)
LOG_INTERVAL=${LOG_INTERVAL:-20}           # steps between log lines (at round ends)
SEED=${SEED:-1234}                         # initialisation and data order

# ------------------------------------------------------------------------------ data and outputs
MOCK_DATA=${MOCK_DATA:-0}                  # 1: synthetic tokens (dry runs); 0: DATA_PATH
DATA_PATH=${DATA_PATH:-}                   # directory from `twist prepare-data`
RUN_DIR=${RUN_DIR:-runs/twist-70b-${SLURM_JOB_ID:-local}}  # hostfile, ds_config, metrics, checkpoint
SAVE=${SAVE-$RUN_DIR/central}              # central checkpoint at the end; SAVE= (empty): none
CKPT_FORMAT=${CKPT_FORMAT:-safetensors}    # with SHARD_CENTRAL=1: one file per rank (safetensors only);
                                           # else torch_dist (every rank writes its shard) | safetensors
METRICS_FILE=${METRICS_FILE-$RUN_DIR/metrics.json}  # per-round losses and bytes (rank 0); empty: none
EXIT_INTERVAL=${EXIT_INTERVAL:-}           # stop (and save) after the round reaching this step; resume: --load

# ------------------------------------------------------------------------------ DeepSpeed variant
DS_CONFIG=${DS_CONFIG:-}                   # a ds_config JSON; empty: written to RUN_DIR from the variables
ZERO_STAGE=${ZERO_STAGE:-3}                # ZeRO stage of the written config (subnet over its replicas)
BF16=${BF16:-1}                            # bf16 (1: --bf16, or the written ds_config) or fp32 (0; CPU)

WORLD=$((NODES * GPUS_PER_NODE))
ARGS=(
  --model-family "$MODEL_FAMILY" --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE"
  --num-attention-heads "$NUM_HEADS" --num-query-groups "$NUM_KV_HEADS" --ffn-hidden-size "$FFN_HIDDEN_SIZE"
  --seq-length "$SEQ_LENGTH" --vocab-size "$VOCAB_SIZE"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --keep-ratio "$KAPPA" --num-subnets "$NUM_SUBNETS" --local-steps "$LOCAL_STEPS" --twist-seed "$TWIST_SEED"
  --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR"
  --lr-warmup-iters "$WARMUP_ITERS" --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD"
  --log-interval "$LOG_INTERVAL" --seed "$SEED"
)
if [[ "$MOCK_DATA" == 1 ]]; then
  ARGS+=(--mock-data)
elif [[ -n "$DATA_PATH" ]]; then
  ARGS+=(--data-path "$DATA_PATH")
elif [[ "$MODE" == run ]]; then
  echo "twist_70b.sh: set DATA_PATH (a directory from \`twist prepare-data\`) or MOCK_DATA=1" >&2
  exit 2
fi
if [[ -n "$SAVE" ]]; then ARGS+=(--save "$SAVE" --ckpt-format "$CKPT_FORMAT"); fi
if [[ -n "$METRICS_FILE" ]]; then ARGS+=(--metrics-file "$METRICS_FILE"); fi
if [[ -n "$EXIT_INTERVAL" ]]; then ARGS+=(--exit-interval "$EXIT_INTERVAL"); fi

if [[ "$LAUNCHER" == deepspeed ]]; then
  if [[ -z "$DS_CONFIG" ]]; then  # one source of truth: the config is written from the variables above
    if [[ "$MODE" == plan ]]; then
      DS_CONFIG=$(mktemp "${TMPDIR:-/tmp}/twist-ds-config.XXXXXX"); TEMP_CONFIG=$DS_CONFIG
    else
      mkdir -p "$RUN_DIR"; DS_CONFIG=$RUN_DIR/ds_config.json
    fi
    bf16=false; [[ "$BF16" == 1 ]] && bf16=true
    cat > "$DS_CONFIG" <<EOF
{
  "train_micro_batch_size_per_gpu": $MICRO_BATCH,
  "gradient_accumulation_steps": 1,
  "gradient_clipping": $CLIP_GRAD,
  "steps_per_print": 1000000,
  "bf16": {"enabled": $bf16},
  "zero_optimization": {"stage": $ZERO_STAGE},
  "twist": {"keep_ratio": $KAPPA, "num_subnets": $NUM_SUBNETS, "local_steps": $LOCAL_STEPS, "seed": $TWIST_SEED}
}
EOF
  fi
  ARGS+=(--deepspeed --deepspeed_config "$DS_CONFIG")
elif [[ "$LAUNCHER" == torchrun ]]; then  # the Megatron path's own precision, batch and central layout
  if [[ "$BF16" == 1 ]]; then ARGS+=(--bf16); fi
  if [[ -n "$GLOBAL_BATCH" ]]; then ARGS+=(--global-batch-size "$GLOBAL_BATCH"); fi
  if [[ "$SHARD_CENTRAL" == 1 ]]; then ARGS+=(--twist-shard-central); fi
else
  echo "twist_70b.sh: LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2
  exit 2
fi
ARGS+=("$@")
PLAN=("$PYTHON" -m megatron_twist plan "${ARGS[@]}" --world-size "$WORLD" --gpus-per-node "$GPUS_PER_NODE"
      --gpu-memory-gib "$GPU_MEMORY_GIB")

if [[ "$MODE" == plan ]]; then
  rc=0
  "${PLAN[@]}" || rc=$?
  if [[ -n "${TEMP_CONFIG:-}" ]]; then rm -f "$TEMP_CONFIG"; fi
  exit "$rc"
fi

# ------------------------------------------------------------------------------ inside the allocation
: "${SLURM_JOB_NODELIST:?submit with sbatch (or run \`bash slurm/twist_70b.sh --plan\` to check the layout)}"
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [[ "${#HOSTS[@]}" -ne "$NODES" ]]; then
  echo "twist_70b.sh: NODES=$NODES but the allocation has ${#HOSTS[@]} hosts (${HOSTS[*]})" >&2
  exit 2
fi
export MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}  # rendezvous on the first host of the allocation
export MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUN_DIR"
echo "[twist_70b.sh] $NODES nodes x $GPUS_PER_NODE = $WORLD ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER"
"${PLAN[@]}"  # refuses an impossible layout before any rank starts (exit code 2, reason and fix)

if [[ "$LAUNCHER" == torchrun ]]; then
  # One task per node; each runs torchrun with a static rendezvous and node rank = SLURM_NODEID,
  # so global rank = node x GPUS_PER_NODE + local rank and a TP group (consecutive ranks) is one node.
  # shellcheck disable=SC2016  # expanded by the task's bash, where SLURM_NODEID is this node's index
  NODE_CMD='exec "$1" -m torch.distributed.run --nnodes "$2" --nproc_per_node "$3" --node_rank "$SLURM_NODEID" --master_addr "$4" --master_port "$5" "${@:6}"'
  srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$NODE_CMD" twist-node "$PYTHON" "$NODES" "$GPUS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" \
    -m megatron_twist train "${ARGS[@]}"
else
  HOSTFILE=$RUN_DIR/hostfile  # DeepSpeed's hostfile: "<host> slots=<ranks>" per node of the allocation
  for h in "${HOSTS[@]}"; do echo "$h slots=$GPUS_PER_NODE"; done > "$HOSTFILE"
  # --launcher slurm: deepspeed runs `srun -n WORLD --ntasks-per-node=GPUS_PER_NODE ... twist train ...`
  # (the per-node count overrides the batch step's --ntasks-per-node=1); each task maps SLURM_PROCID /
  # SLURM_NTASKS / SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK (distributed/runtime.py) and meets
  # the others at MASTER_ADDR:MASTER_PORT (exported above). --launcher pdsh needs passwordless ssh.
  LAUNCHER_ARGS=()
  if [[ "$DS_LAUNCHER" == slurm ]]; then LAUNCHER_ARGS=("--launcher_args=--ntasks-per-node=$GPUS_PER_NODE"); fi
  deepspeed --hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER" "${LAUNCHER_ARGS[@]}" --no_ssh_check --no_local_rank \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$(command -v twist)" train "${ARGS[@]}"
fi
