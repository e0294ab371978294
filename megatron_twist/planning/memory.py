"""Bytes per GPU of one pipeline stage, by item, on each path (arithmetic.py's module docstring says
what is modelled and why). Pure arithmetic: no torch.

Each model returns ``(memory by item, dense training's total in the same layout, aggregation bytes
per round, subnet replicas' gradient bytes per round, dense data parallel's gradient bytes per
step)``, the counts the trainers log.
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import ModelConfig, TwistConfig
from .sizes import stage_tensor_sizes


class MegatronLayout(NamedTuple):
    """Where a stage sits: TP, PP, its PP rank, DP, replicas per subnet, the aggregation group's size
    and the subnets each rank trains per round."""

    tp: int
    pp: int
    pp_rank: int
    dp: int
    replicas: int
    aggregation_group: int
    subnets_per_rank: int


def largest_tensor(model: ModelConfig, tp: int, pp: int, pp_rank: int) -> int:
    """Elements of the largest central tensor of a TP shard / PP stage: the vocabulary table on the first
    (and an untied output layer on the last) stage, else linear_fc1 or linear_qkv."""
    h, d = model.hidden_size, model.head_dim
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * d // tp * h
    fc1 = (2 if model.gated_mlp else 1) * model.ffn_hidden_size // tp * h
    vocab = model.vocab_size // tp * h if pp_rank in (0, pp - 1) else 0
    return max(qkv, fc1, vocab)


def megatron_memory(
    model: ModelConfig,
    twist: TwistConfig,
    ns: int,
    nc: int,
    act: int,
    dense_act: int,
    at: MegatronLayout,
    fields: int,
    dtype: str,
    shard_central: bool,
):
    """`twist train` without DeepSpeed: ``nc`` / ``ns`` central / subnet parameters of this stage."""
    dp = at.dp
    central = {
        "central weights": 4 * nc,
        "central Adam moments": 8 * nc,
        "aggregation buffer": 4 * fields * nc,
    }
    if shard_central:  # 1/DP of each, and one central tensor in flight (gathered, or reduce-scattered)
        shard = -(-nc // dp)
        central = {
            "central weights (1/DP shard)": 4 * shard,
            "central Adam moments (1/DP shard)": 8 * shard,
            "round buffers (largest central tensor, x2)": 2 * 4 * largest_tensor(model, at.tp, at.pp, at.pp_rank),
        }
    memory = {
        **central,
        # --bf16: fp32 masters + a bf16 twin; bf16 gradients handed to fp32 master gradients
        "subnet weights": (4 + 2) * ns if dtype == "bf16" else 4 * ns,
        "subnet gradients": (2 + 4) * ns if dtype == "bf16" else 4 * ns,
        "subnet Adam moments": 8 * ns,
        "activations (estimate)": act,
    }
    # dense Megatron training in the same layout; with bf16 as a cluster team runs it: bf16 weights (2)
    # and fp32 main grads (4) per parameter, fp32 masters and moments (12) sharded over DP by the
    # distributed optimizer
    dense_memory = (6 * nc + 12 * nc // dp if dtype == "bf16" else 16 * nc) + dense_act
    agg = 4 * fields * nc if at.aggregation_group > 1 else 0
    if shard_central:  # per subnet trained: all-gather at refill + reduce-scatter at aggregation
        agg = 2 * 4 * fields * -(-nc // dp) * dp * at.subnets_per_rank if dp > 1 else 0
    replica = twist.local_steps * 4 * ns if at.replicas > 1 else 0
    dense_dp = 4 * nc if dp > 1 else 0
    return memory, dense_memory, agg, replica, dense_dp


def deepspeed_memory(model, twist, sub, ns, nc, act, dense_act, dp, reps, fields, dtype, zero, tp=1):
    """PP = 1: ns, nc are the counts of one TP shard of the subnet / central model, whose tensors are
    sharded over the DP ranks of that TP position."""
    sizes = stage_tensor_sizes(model, tp)
    padded = sum(-(-n // dp) * dp for n in sizes)
    w, g, o = (2, 2, 12) if dtype == "bf16" else (4, 4, 8)
    memory = {
        "central shard (weights + 2 moments)": 3 * 4 * padded // dp,
        "round transient (2 tensors)": 2 * 4 * max(sizes),
        "subnet weights": w * ns // (reps if zero >= 3 else 1),
        "subnet gradients": g * ns // (reps if zero >= 2 else 1),
        "subnet optimizer (master + Adam)": o * ns // (reps if zero >= 1 else 1),
        "activations (estimate)": act,
    }
    memory["start-up peak: full central weights, fp32"] = 4 * nc  # once, before the engine; not added
    dense_memory = (
        w * nc // (dp if zero >= 3 else 1)
        + g * nc // (dp if zero >= 2 else 1)
        + o * nc // (dp if zero >= 1 else 1)
        + dense_act
    )
    agg = 2 * fields * 4 * padded
    replica = twist.local_steps * g * ns if reps > 1 else 0
    dense_dp = g * nc if dp > 1 else 0
    return memory, dense_memory, agg, replica, dense_dp
