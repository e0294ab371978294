"""``--twist-pin-cut``: the plan subnet 0 is pinned to each round.

The plan is the magnitude cut at the training keep ratio of the current
central model, the one extraction would take now (twist/extraction.py), so the
final cut is trained as one model all along. It must be the same on every
rank although no rank may hold the whole model:

* replicated central model (``twist train``, the host-loop hook), any TP/PP
  layout: each rank scores the units of its own TP shard and pipeline stage
  (a shard holds whole rows and columns of its units) into a zero table of
  every layer's units, and a SUM all-reduce over the model-parallel group
  fills the table on every rank (``pinned_plan``);
* central model sharded over data parallel (the DeepSpeed path's ZeRO round
  hook, ``--twist-shard-central``; distributed/sharded_round.py
  ``pinned_plan_of_shards``): the squared row/column norms of this TP shard /
  PP stage are summed over the data-parallel shards first
  (distributed/sharded_central.py ``squared_norms``), then scored and summed
  over the model-parallel group like the replicated case
  (``pinned_plan_from_norms``).

The buckets are the sampler's (KV groups, and the run's TP-balance blocks,
which ``twist train`` records in its checkpoints as ``balance_shards``), so the
pinned plan is TP-balanced like every other subnet, and extraction from the
checkpoint scores over the same buckets: it takes the last pinned plan, up to
the weights changed by the round that followed.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, TwistConfig
from .extraction import plan_from_scores
from .magnitude import layer_norms, unit_scores
from .sampler import SubnetPlan
from .sharding import local_model_view


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


@torch.no_grad()
def pinned_plan(
    model: ModelConfig,
    twist: TwistConfig,
    params: Dict[str, torch.Tensor],
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    first_layer: int = 0,
    num_layers: Optional[int] = None,
    model_parallel_group=None,
    agreement_group=None,
) -> SubnetPlan:
    """The magnitude cut of the whole central model at the keep ratio, from this rank's TP shard /
    PP stage (``params``, local names) and a SUM all-reduce over ``model_parallel_group`` (TP x PP)."""
    device = next(iter(params.values())).device
    plan = pinned_plan_from_norms(
        model,
        twist,
        lambda i: layer_norms(params, i),
        tp_rank=tp_rank,
        tp_size=tp_size,
        first_layer=first_layer,
        num_layers=num_layers,
        device=device,
        model_parallel_group=model_parallel_group,
    )
    check_agreement(plan, agreement_group, device)
    return plan


@torch.no_grad()
def pinned_plan_from_norms(
    model: ModelConfig,
    twist: TwistConfig,
    norms_of: Callable[[int], Dict[str, torch.Tensor]],
    *,
    tp_rank: int,
    tp_size: int,
    first_layer: int,
    num_layers: Optional[int],
    device: torch.device,
    model_parallel_group=None,
) -> SubnetPlan:
    """``pinned_plan`` from this rank's layers' squared norms (``norms_of(local layer)``, local TP-shard
    geometry), e.g. summed over the data-parallel shards of a sharded central model first."""
    view = local_model_view(model, tp_size, first_layer, num_layers)
    heads = torch.zeros(model.num_layers, model.num_attention_heads, device=device)
    neurons = torch.zeros(model.num_layers, model.ffn_hidden_size, device=device)
    h0, n0 = tp_rank * view.num_attention_heads, tp_rank * view.ffn_hidden_size
    for i in range(view.num_layers):
        h, n = unit_scores(view, norms_of(i))
        heads[first_layer + i, h0 : h0 + h.numel()] = h
        neurons[first_layer + i, n0 : n0 + n.numel()] = n
    if _group_size(model_parallel_group) > 1:
        table = torch.cat([heads.reshape(-1), neurons.reshape(-1)])
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=model_parallel_group)
        heads = table[: heads.numel()].view_as(heads)
        neurons = table[heads.numel() :].view_as(neurons)
    return plan_from_scores(
        model, twist, twist.keep_ratio, [(heads[layer], neurons[layer]) for layer in range(model.num_layers)], tp_size
    )


def check_agreement(plan: SubnetPlan, group, device: torch.device) -> None:
    """A one-tensor all-reduce refusing plans that differ across ``group`` (aggregation would mix units)."""
    if _group_size(group) <= 1:
        return
    digest = int.from_bytes(hashlib.sha256(repr(plan).encode()).digest()[:7], "little")
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if int(both[0]) != -int(both[1]):
        raise RuntimeError("--twist-pin-cut: ranks chose different cuts from central copies that differ")
