"""`twist plan`: check a TwIST layout and size it per GPU before any job is queued.

Pure arithmetic on the configs (no torch, no process group, no GPU; runs in
well under a second). Given the same model / parallel / TwIST / batch flags as
`twist train` plus how many GPUs (``--nodes`` x ``--gpus-per-node`` or
``--world-size``) and their memory, :func:`make_plan`

1. checks the layout in the order a user thinks about it: query heads,
   key-value heads and FFN neurons over tensor parallel (TP) and the keep
   ratio kappa (the units a subnet KEEPS must split evenly over TP too), layers
   over pipeline parallel (PP), data parallel (DP) over subnets, the vocabulary
   over TP, batch sizes; then the same checks ``twist train`` runs
   (:func:`~megatron_twist.distributed.layout.check_model_layout`,
   :meth:`~megatron_twist.distributed.layout.ParallelLayout.for_world`), all in
   :mod:`megatron_twist.planning.checks`;
2. sizes every kind of pipeline stage (first / middle / last; ``only`` at
   PP = 1) per GPU: parameters of the central shard and of the subnet shard,
   memory, compute per step and aggregation traffic per round;
3. refuses what cannot run (a :class:`~megatron_twist.config.ConfigError`:
   the reason, then a suggested fix, e.g. the smallest TP x PP that divides
   and fits in GPU memory).

What it models
--------------
``path='megatron'`` (``twist train`` without ``--deepspeed``; the Slurm
recipes' default). fp32, or with ``--bf16`` a subnet computing in bf16 from
fp32 masters (the central model stays fp32), as the code trains it. Per GPU,
for its TP shard / PP stage (N_c central parameters, N_s subnet parameters):

* central model, replicated over DP (twist/central.py): weights 4 N_c bytes,
  Adam moments 8 N_c (allocated whatever the optimizer-state policy);
* aggregation buffer (twist/aggregation.py, ``RoundAggregator.flat``): one fp32
  copy of the shard per aggregated field, 4 F N_c (F = 3 with
  ``--optimizer-state aggregate``: weights + 2 moments; 1 with ``reset``);
* the materialized subnet (twist/worker.py): weights 4 N_s, gradients 4 N_s,
  AdamW moments 8 N_s; with ``--bf16`` also its bf16 twin, 2 N_s, and the
  twin's bf16 gradients, 2 N_s (activations then take 2 bytes per element);
* activations, an estimate per micro-batch in flight, times the micro-batches
  a stage holds at once: min(N, PP - r) on stage r under 1F1B (N micro-batches
  per optimizer step, ``--global-batch-size``; 1 without PP), no recomputation,
  no sequence parallelism, unfused attention (scores are materialized): per
  layer, b x s tokens, e bytes per element::

      e * ( s*b*(4h + (q+2g)*d/T + q*d/T + m*f/T) + b*(q/T)*s^2 )

  (two norm inputs and two linear inputs of width h, which TP replicates; Q/K/V;
  the attention context; MLP activations, m = 3 for SwiGLU (gate+up, product),
  2 for GELU; the softmax output). q, g, f: the SUBNET's query heads, KV groups
  and FFN neurons of that layer, d the head dim, T the TP size. The last stage
  adds its final norm and output-layer inputs (2 s b h) and the logits with
  the cross-entropy's copy (2 s b V/T).

Compute per step is forward + backward = 3 x forward FLOPs, forward
``2 x tokens x (matmul weights of the shard) + 4 x b x s^2 x (q/T) x d``
(QK^T and PV over the full square, as the unfused kernel computes them) plus
the output layer; the dense reference is the same formula for the central
shard on the same micro-batch (dense TP x PP x DP training). Traffic per round
is what the trainer counts (``RoundRecord.aggregation_bytes``: the payload of
ONE all-reduce of the flat buffer, 4 F N_c, when the aggregation group has more
than one rank) against ``RoundRecord.dense_dp_bytes`` (dense DP all-reduces
the gradient shard, 4 N_c, every step: ``local_steps`` x 4 N_c per round, when
DP > 1): ratio F / local_steps. Ring all-reduce wire bytes per rank are
2 (A-1)/A x payload for a group of A. With subnet replicas, TwIST also
all-reduces the SUBNET's gradients (4 N_s) among the replicas every step; the
plan shows it on its own line (the trainer's round log does not count it).
The TwIST / dense traffic ratio is taken in ring wire bytes per GPU on both
sides (TwIST's aggregation group and replica group, dense DP's group of DP),
so a larger dense DP group is not understated.

``path='deepspeed'`` (``--deepspeed --deepspeed_config FILE``; any TP, PP = 1:
pipeline parallelism is refused on that path). The central model of each TP
shard is sharded over the W data-parallel ranks of its TP position
(distributed/sharded_central.py): 3 fields x ceil(n/W) per tensor of n
elements of the shard, fp32; at round boundaries one central tensor at a time
is gathered and reduce-scattered (transient: 2 x the largest tensor, fp32); at
start-up every rank builds its TP shard's central weights once (4 N bytes,
fp32) before sharding them. The subnet is a DeepSpeed engine over its R replicas; ZeRO's
own model (ZeRO paper): bf16 weights 2 + gradients 2 + fp32 master and Adam
12 bytes per parameter (fp32: 4 + 4 + 8), divided by R for the optimizer
state at stage >= 1, the gradients at stage >= 2, the weights at stage 3.
Traffic per round (``ZeroRoundHook.bytes_moved``): the refill all-gathers and
the aggregation reduce-scatters every field of every central tensor (padded
to a multiple of W): 2 x F x 4 x sum(padded n).

Not modeled: CUDA context and allocator fragmentation (leave ~5-10% headroom),
transients of a refill (one tensor at a time), data-loader memory, TP
all-reduces and PP point-to-point traffic (the same for a subnet as for dense
training, scaled by the subnet's width).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..config import ConfigError, ModelConfig, TrainConfig, TwistConfig
from ..distributed.layout import ParallelLayout
from .checks import check_deepspeed, check_layout, divisors, refuse
from .memory import MegatronLayout, deepspeed_memory, megatron_memory
from .sizes import (
    GIB,
    LayerShape,
    activation_bytes,
    embedding_params,
    forward_flops,
    head_params,
    layer_params,
    stage_kinds,
    stage_params,
    subnet_layer_shapes,
)

PATHS = ("megatron", "deepspeed")


@dataclass(frozen=True)
class StagePlan:
    """One kind of pipeline stage, per GPU."""

    kind: str
    pp_rank: int
    layers: int
    central_params: int
    subnet_params: int
    memory: Dict[str, int]  # bytes, by item; "total" last
    dense_memory: int  # bytes dense training would need on this GPU in the same layout
    subnet_flops_per_step: float
    dense_flops_per_step: float
    aggregation_bytes_per_round: int  # payload, as RoundRecord.aggregation_bytes / ZeroRoundHook counts it
    aggregation_wire_bytes_per_round: int
    replica_grad_bytes_per_round: int  # subnet gradients among a subnet's replicas, every step
    dense_dp_bytes_per_step: int  # as RoundRecord.dense_dp_bytes / steps
    # what each GPU sends over the wire, the same measure on both sides: ring all-reduce of a payload
    # P over a group of A ranks sends 2 (A - 1) / A x P (the DeepSpeed path's all-gather +
    # reduce-scatter counts are already per-GPU wire bytes)
    replica_grad_wire_bytes_per_round: int = 0
    dense_dp_wire_bytes_per_step: int = 0

    @property
    def total_memory(self) -> int:
        return self.memory["total"]


@dataclass(frozen=True)
class Plan:
    """The result of :func:`make_plan`: a checked layout and its per-GPU numbers."""

    path: str
    dtype: str
    zero_stage: Optional[int]
    model: ModelConfig
    twist: TwistConfig
    world_size: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    replicas: int
    subnets_per_rank: int
    aggregation_group_size: int
    micro_batch_size: int
    num_microbatches: int
    local_steps: int
    central_params_total: int
    subnet_params_total: int
    subnet_layer: LayerShape  # the sizes of a split layer
    gpu_memory_bytes: int  # 0: not checked
    checks: Tuple[str, ...]
    notes: Tuple[str, ...]
    stages: Tuple[StagePlan, ...]
    shard_central: bool = False  # the Megatron path's --twist-shard-central

    @property
    def nodes(self) -> Optional[int]:
        return self.world_size // self.gpus_per_node if self.world_size % self.gpus_per_node == 0 else None

    @property
    def tokens_per_step(self) -> int:
        samples = self.micro_batch_size * self.num_microbatches * self.twist.num_subnets * self.replicas
        return samples * self.model.seq_length

    @property
    def pipeline_bubble(self) -> float:
        """The fraction of a step each stage idles under 1F1B: (PP - 1) / (N + PP - 1)."""
        pp = self.pipeline_parallel
        return (pp - 1) / (self.num_microbatches + pp - 1)

    @property
    def peak_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_memory)

    def to_dict(self) -> dict:
        d = {
            "path": self.path,
            "dtype": self.dtype,
            "zero_stage": self.zero_stage,
            "model": self.model.to_dict(),
            "twist": self.twist.to_dict(),
            "world_size": self.world_size,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "data_parallel": self.data_parallel,
            "replicas": self.replicas,
            "subnets_per_rank": self.subnets_per_rank,
            "aggregation_group_size": self.aggregation_group_size,
            "micro_batch_size": self.micro_batch_size,
            "num_microbatches": self.num_microbatches,
            "pipeline_bubble": self.pipeline_bubble,
            "local_steps": self.local_steps,
            "tokens_per_step": self.tokens_per_step,
            "central_params_total": self.central_params_total,
            "subnet_params_total": self.subnet_params_total,
            "subnet_layer": dataclasses.asdict(self.subnet_layer),
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "checks": list(self.checks),
            "notes": list(self.notes),
            "stages": {s.kind: dict(dataclasses.asdict(s), total_memory=s.total_memory) for s in self.stages},
            "peak_stage": self.peak_stage.kind,
            "shard_central": self.shard_central,
        }
        return d


@dataclass(frozen=True)
class _Hardware:
    world_size: int
    gpus_per_node: int
    gpu_memory_bytes: int


def make_plan(
    model: ModelConfig,
    twist: TwistConfig,
    train: TrainConfig,
    *,
    world_size: int,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    gpus_per_node: int = 8,
    gpu_memory_gib: float = 80.0,
    path: str = "megatron",
    ds_config: Optional[dict] = None,
    suggest: bool = True,
    shard_central: bool = False,
) -> Plan:
    """Check the layout and size it; ConfigError (reason + suggested fix) when it cannot run.
    ``shard_central``: `twist train --twist-shard-central` (the Megatron path)."""
    shard_central = shard_central and path == "megatron"
    if path not in PATHS:
        raise ConfigError(f"unknown path {path!r}; use one of {PATHS}")
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(f"world size {world_size} and GPUs per node {gpus_per_node} must be positive")
    hw = _Hardware(world_size, gpus_per_node, int(gpu_memory_gib * GIB))
    tp, pp = tensor_parallel, pipeline_parallel
    if tp < 1 or pp < 1:
        raise ConfigError("tensor and pipeline parallel sizes must be at least 1")
    layout, checks = check_layout(model, twist, world_size, tp, pp, gpus_per_node)
    notes: List[str] = []
    dtype, zero_stage = "fp32", None
    if path == "deepspeed":
        dtype, zero_stage = check_deepspeed(ds_config, train, twist, world_size, tp, pp, layout, checks)
    else:
        dtype = "bf16" if train.bf16 else "fp32"
        n_micro = train.microbatches(layout.replicas)  # refuses a global batch that does not divide
        checks.append(
            f"batch: micro batch {train.micro_batch_size} x {n_micro} micro-batch(es) x seq {model.seq_length} per "
            f"subnet replica and step"
            + (f" (global batch {train.global_batch_size} per subnet)" if train.global_batch_size else "")
        )
    if tp > gpus_per_node or gpus_per_node % tp:
        notes.append(
            f"TP {tp} does not fit inside one node of {gpus_per_node} GPUs: tensor-parallel "
            f"all-reduces would cross the network"
        )
    plan = _size(model, twist, train, hw, layout, path, dtype, zero_stage, tuple(checks), notes, shard_central)
    if hw.gpu_memory_bytes and plan.peak_stage.total_memory > hw.gpu_memory_bytes:
        peak = plan.peak_stage
        where = "every GPU" if peak.kind == "only" else f"a GPU of the {peak.kind} pipeline stage"
        reason = (
            f"{where} needs {peak.total_memory / GIB:.1f} GiB "
            f"({_biggest(peak.memory)}), more than the {gpu_memory_gib:g} GiB of a GPU"
        )
        raise refuse(
            reason,
            _memory_fix(model, twist, train, hw, path, ds_config, shard_central)
            if suggest
            else "a larger pipeline or tensor parallel size",
        )
    return plan


def _biggest(memory: Dict[str, int]) -> str:
    items = sorted(((v, k) for k, v in memory.items() if k != "total"), reverse=True)[:3]
    return ", ".join(f"{k} {v / GIB:.1f}" for v, k in items)


def _size(
    model,
    twist,
    train,
    hw: _Hardware,
    layout: ParallelLayout,
    path,
    dtype,
    zero_stage,
    checks,
    notes: List[str],
    shard_central: bool = False,
) -> Plan:
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    full = [LayerShape(model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)] * model.num_layers
    sub = subnet_layer_shapes(model, twist, tp)
    split_layer = next((s for s in sub if s != full[0]), full[0])
    fields = 3 if twist.optimizer_state == "aggregate" else 1
    mbs, seq = train.micro_batch_size, model.seq_length
    if layout.data_parallel >= twist.num_subnets:
        agg_group = twist.num_subnets
    else:
        agg_group = dp  # Megatron's DP group
    reps, per_rank = layout.replicas, layout.subnets_per_rank
    n_micro = train.microbatches(reps)
    e_act = 2 if dtype == "bf16" else 4
    stages = []
    for kind, rank in stage_kinds(pp):
        nc = stage_params(model, full, tp, pp, rank)
        ns = stage_params(model, sub, tp, pp, rank)
        in_flight = min(n_micro, pp - rank)  # 1F1B: stage r holds up to PP - r micro-batches
        act = in_flight * activation_bytes(model, sub, tp, pp, rank, mbs, seq, e_act)
        dense_act = in_flight * activation_bytes(model, full, tp, pp, rank, mbs, seq, e_act)
        if path == "megatron":
            memory, dense_memory, agg, replica, dense_dp = megatron_memory(
                model,
                twist,
                ns,
                nc,
                act,
                dense_act,
                MegatronLayout(tp, pp, rank, dp, reps, agg_group, per_rank),
                fields,
                dtype,
                shard_central,
            )
        else:
            memory, dense_memory, agg, replica, dense_dp = deepspeed_memory(
                model, twist, sub, ns, nc, act, dense_act, dp, reps, fields, dtype, zero_stage, tp
            )
        startup = memory.pop("start-up peak: full central weights, fp32", 0)
        memory["total"] = max(sum(memory.values()), startup)  # the start-up peak is transient, not added
        if startup:
            memory = {
                **{k: v for k, v in memory.items() if k != "total"},
                "start-up peak: full central weights, fp32": startup,
                "total": memory["total"],
            }
        if path == "megatron" and shard_central:  # all-gather / reduce-scatter send (W - 1) / W x the tensor
            wire = int(agg * (dp - 1) / dp)
        elif path == "megatron":
            wire = int(agg * 2 * (agg_group - 1) / agg_group)
        else:
            wire = agg
        replica_wire = int(replica * 2 * (reps - 1) / reps) if path == "megatron" else replica
        stages.append(
            StagePlan(
                kind=kind,
                pp_rank=rank,
                layers=model.num_layers // pp,
                central_params=nc,
                subnet_params=ns,
                memory=memory,
                dense_memory=dense_memory,
                subnet_flops_per_step=3 * per_rank * n_micro * forward_flops(model, sub, tp, pp, rank, mbs, seq),
                dense_flops_per_step=3 * n_micro * forward_flops(model, full, tp, pp, rank, mbs, seq),
                aggregation_bytes_per_round=agg,
                aggregation_wire_bytes_per_round=wire,
                replica_grad_bytes_per_round=replica,
                dense_dp_bytes_per_step=dense_dp,
                replica_grad_wire_bytes_per_round=replica_wire,
                dense_dp_wire_bytes_per_step=int(dense_dp * 2 * (dp - 1) / dp),
            )
        )
    if pp > 1:
        bubble = (pp - 1) / (n_micro + pp - 1)
        notes.append(
            f"pipeline: {n_micro} micro-batch(es) per optimizer step through 1F1B, so each stage idles "
            f"{pp - 1}/{n_micro + pp - 1} = {bubble:.1%} of a step (the same for dense training with this step)"
            + ("" if bubble <= 0.1 else "; raise --global-batch-size to shrink it")
        )
    if per_rank > 1:
        notes.append(f"each rank trains {per_rank} subnets in turn: a global step costs {per_rank} subnet steps")
    if agg_group == 1:
        notes.append("the aggregation group has one rank: aggregation moves no bytes")
    n_total = sum(layer_params(model, s, 1) for s in full) + embedding_params(model, 1) + head_params(model, 1)
    s_total = sum(layer_params(model, s, 1) for s in sub) + embedding_params(model, 1) + head_params(model, 1)
    return Plan(
        path=path,
        dtype=dtype,
        zero_stage=zero_stage,
        model=model,
        twist=twist,
        world_size=hw.world_size,
        gpus_per_node=hw.gpus_per_node,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=dp,
        replicas=reps,
        subnets_per_rank=per_rank,
        aggregation_group_size=agg_group,
        micro_batch_size=mbs,
        num_microbatches=n_micro,
        local_steps=twist.local_steps,
        central_params_total=n_total,
        subnet_params_total=s_total,
        subnet_layer=split_layer,
        gpu_memory_bytes=hw.gpu_memory_bytes,
        checks=checks,
        notes=tuple(notes),
        stages=tuple(stages),
        shard_central=shard_central,
    )


def _memory_fix(model, twist, train, hw: _Hardware, path, ds_config, shard_central: bool = False) -> str:
    """The smallest TP x PP (TP inside a node first) that divides everything and fits, or what else to change."""
    world_gib = hw.gpu_memory_bytes / GIB
    best = None
    for t in divisors(hw.gpus_per_node):
        for p in divisors(model.num_layers) if path == "megatron" else (1,):  # no PP under DeepSpeed
            if hw.world_size % (t * p):
                continue
            try:
                plan = make_plan(
                    model,
                    twist,
                    train,
                    world_size=hw.world_size,
                    tensor_parallel=t,
                    pipeline_parallel=p,
                    gpus_per_node=hw.gpus_per_node,
                    gpu_memory_gib=world_gib,
                    path=path,
                    ds_config=ds_config,
                    suggest=False,
                    shard_central=shard_central,
                )
            except ConfigError:
                continue
            key = (t * p, p)
            if best is None or key < best[0]:
                best = (key, t, p, plan)
    if best is not None:
        _, t, p, plan = best
        return (
            f"--tensor-model-parallel-size {t}"
            + (f" --pipeline-model-parallel-size {p} " if path == "megatron" else " ")
            + f"(DP {plan.data_parallel}; {plan.peak_stage.total_memory / GIB:.1f} GiB on the fullest GPU)"
        )
    if path == "deepspeed":
        return (
            "no TP inside a node fits on the DeepSpeed path (it runs without pipeline parallelism); use the "
            "Megatron path (drop --deepspeed) with TP x PP, or a smaller --micro-batch-size / --seq-length"
        )
    return (
        "no TP x PP of these GPUs that divides the model fits: lower --micro-batch-size or --seq-length, "
        "use GPUs with more memory, or (with the DeepSpeed path's sharded central model) more GPUs"
    )
