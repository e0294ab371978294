"""Tensor- and pipeline-parallel views of a subnet plan.

A rank holds a shard of every model it builds: with tensor parallel size T
its attention keeps KV groups [t*G/T, (t+1)*G/T) (their query heads with
them), its MLP keeps neurons [t*F/T, (t+1)*F/T); with pipeline parallelism it
holds a contiguous range of layers, named from 0 locally. Megatron lays out
each shard exactly like a smaller unsharded model: [q heads | k | v] per
group in ``linear_qkv``, [gate | up] in a SwiGLU ``linear_fc1``. So the
slicing rules of slicing.py apply to a shard unchanged if they are given the
shard's geometry and the plan in shard-local indices - which is what this
module computes. The sampler guarantees every shard keeps the same number of
its own units, so all shards of a subnet have one shape.
"""

from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from .sampler import LayerUnits, SubnetPlan


def local_model_view(
    model: ModelConfig, tensor_parallel_size: int, first_layer: int = 0, num_layers: int = None
) -> ModelConfig:
    """The geometry of one TP shard / PP stage, as a ModelConfig of per-shard sizes."""
    tp = tensor_parallel_size
    return dataclasses.replace(
        model,
        num_layers=model.num_layers - first_layer if num_layers is None else num_layers,
        num_attention_heads=model.num_attention_heads // tp,
        num_query_groups=model.num_query_groups // tp,
        ffn_hidden_size=model.ffn_hidden_size // tp,
        kv_channels=model.head_dim,
    )


def local_plan(
    plan: SubnetPlan,
    model: ModelConfig,
    tp_rank: int,
    tensor_parallel_size: int,
    first_layer: int = 0,
    num_layers: int = None,
) -> SubnetPlan:
    """``plan`` restricted to one TP shard and PP stage, in shard-local indices."""
    tp = tensor_parallel_size
    heads_per_shard = model.num_attention_heads // tp
    neurons_per_shard = model.ffn_hidden_size // tp
    h0, n0 = tp_rank * heads_per_shard, tp_rank * neurons_per_shard
    last = len(plan.layers) if num_layers is None else first_layer + num_layers
    layers = []
    for lu in plan.layers[first_layer:last]:
        heads = tuple(h - h0 for h in lu.heads if h0 <= h < h0 + heads_per_shard)
        neurons = tuple(j - n0 for j in lu.neurons if n0 <= j < n0 + neurons_per_shard)
        layers.append(LayerUnits(heads, neurons))
    return SubnetPlan(tuple(layers))
