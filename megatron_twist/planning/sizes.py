"""Sizes of a TwIST layout, per tensor-parallel (TP) shard and pipeline-parallel (PP) stage.

What a subnet keeps in each layer, parameter counts, forward FLOPs and activation bytes: pure
functions of the configs. The formulas and what they leave out are written out in
:mod:`megatron_twist.planning.arithmetic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..config import ModelConfig, TwistConfig

GIB = 2**30


@dataclass(frozen=True)
class LayerShape:
    """Global sizes of one transformer layer: query heads, key-value groups, FFN neurons."""

    heads: int
    groups: int
    ffn: int


def subnet_layer_shapes(model: ModelConfig, twist: TwistConfig, tensor_parallel: int) -> List[LayerShape]:
    """What a subnet keeps in each layer: the sampler's quotas (twist/sampler.py), without drawing.

    Per bucket ``round(len(bucket) x kappa)`` units: buckets are KV groups (GQA) or
    ``balance_shards`` blocks of heads (MHA), and ``balance_shards`` blocks of neurons.
    With GQA every KV group is kept; with MHA a head keeps its own K/V.
    """
    twist.check_against_model(model, tensor_parallel)
    blocks = twist.shards_for(tensor_parallel)
    whole = twist.whole_layer_set(model.num_layers)
    k = twist.keep_ratio
    if model.heads_per_group > 1:
        heads, groups = model.num_query_groups * int(round(model.heads_per_group * k)), model.num_query_groups
    else:
        heads = blocks * int(round(model.num_attention_heads // blocks * k))
        groups = heads
    ffn = blocks * int(round(model.ffn_hidden_size // blocks * k))
    full = LayerShape(model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)
    out = []
    for layer in range(model.num_layers):
        if layer in whole:
            out.append(full)
            continue
        out.append(
            LayerShape(
                heads if twist.splits_heads else full.heads,
                groups if twist.splits_heads else full.groups,
                ffn if twist.splits_mlp else full.ffn,
            )
        )
    return out


def _fc1_rows(model: ModelConfig) -> int:
    return 2 if model.gated_mlp else 1  # fc1 rows per neuron (SwiGLU: gate + up)


def layer_matmul_params(model: ModelConfig, shape: LayerShape, tp: int) -> int:
    """Weights of the four linear layers of one layer on one TP shard (no biases, no norms)."""
    h, d = model.hidden_size, model.head_dim
    qkv = h * (shape.heads + 2 * shape.groups) * d
    proj = shape.heads * d * h
    fc1 = h * shape.ffn * _fc1_rows(model)
    fc2 = shape.ffn * h
    return (qkv + proj + fc1 + fc2) // tp


def layer_params(model: ModelConfig, shape: LayerShape, tp: int) -> int:
    """All parameters of one layer on one TP shard (Megatron local spec)."""
    h, d = model.hidden_size, model.head_dim
    n = layer_matmul_params(model, shape, tp)
    norm = 2 * h if model.family == "gpt2" else h  # LayerNorm weight + bias, RMSNorm weight
    n += 2 * norm  # input_layernorm, pre_mlp_layernorm: replicated over TP
    if model.family == "gpt2":  # biases: column-parallel ones are sharded, row-parallel ones replicated
        n += (shape.heads + 2 * shape.groups) * d // tp + h + shape.ffn * _fc1_rows(model) // tp + h
    return n


def embedding_params(model: ModelConfig, tp: int) -> int:
    n = model.vocab_size * model.hidden_size // tp  # vocab-parallel word embeddings
    if model.family == "gpt2":
        n += model.seq_length * model.hidden_size  # learned positions, replicated
    return n


def head_params(model: ModelConfig, tp: int) -> int:
    """Final norm and (untied) output layer: on the last stage."""
    norm = 2 * model.hidden_size if model.family == "gpt2" else model.hidden_size
    out = 0 if model.family == "gpt2" else model.vocab_size * model.hidden_size // tp  # gpt2 ties it
    return norm + out


def stage_kinds(pp: int) -> List[Tuple[str, int]]:
    """(kind, pipeline rank) of each distinct kind of stage."""
    if pp == 1:
        return [("only", 0)]
    if pp == 2:
        return [("first", 0), ("last", 1)]
    return [("first", 0), ("middle", 1), ("last", pp - 1)]


def stage_params(model: ModelConfig, shapes: Sequence[LayerShape], tp: int, pp: int, pp_rank: int) -> int:
    per = model.num_layers // pp
    n = sum(layer_params(model, s, tp) for s in shapes[pp_rank * per : (pp_rank + 1) * per])
    if pp_rank == 0:
        n += embedding_params(model, tp)
    if pp_rank == pp - 1:
        n += head_params(model, tp)
    return n


def stage_tensor_sizes(model: ModelConfig, tp: int = 1) -> List[int]:
    """Element counts of every central tensor of one TP shard of the whole model (PP = 1; for the sharded
    central model's padding): column- and row-parallel weights, column-parallel biases and the vocabulary
    tables are split over ``tp``; norms, row-parallel biases and learned positions are whole on every
    TP rank."""
    h, d = model.hidden_size, model.head_dim
    H, G, F = model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size
    gpt2 = model.family == "gpt2"
    per_layer = [h * (H + 2 * G) * d // tp, H * d * h // tp, h * F * _fc1_rows(model) // tp, F * h // tp, h, h]
    if gpt2:
        per_layer += [h, h, (H + 2 * G) * d // tp, h, F // tp, h]  # norm biases, linear biases
    sizes = per_layer * model.num_layers + [model.vocab_size * h // tp, h]
    if gpt2:
        sizes += [model.seq_length * h, h]
    else:
        sizes += [model.vocab_size * h // tp]
    return sizes


def forward_flops(
    model: ModelConfig, shapes: Sequence[LayerShape], tp: int, pp: int, pp_rank: int, micro_batch: int, seq: int
) -> float:
    per = model.num_layers // pp
    tokens = micro_batch * seq
    flops = 0.0
    for s in shapes[pp_rank * per : (pp_rank + 1) * per]:
        flops += 2.0 * tokens * layer_matmul_params(model, s, tp)
        flops += 4.0 * micro_batch * seq * seq * (s.heads // tp) * model.head_dim
    if pp_rank == pp - 1:
        flops += 2.0 * tokens * model.hidden_size * model.vocab_size / tp
    return flops


def activation_bytes(
    model: ModelConfig,
    shapes: Sequence[LayerShape],
    tp: int,
    pp: int,
    pp_rank: int,
    micro_batch: int,
    seq: int,
    element_bytes: int,
) -> int:
    per = model.num_layers // pp
    h, d, b, s = model.hidden_size, model.head_dim, micro_batch, seq
    m = 3 if model.gated_mlp else 2
    n = 0
    for sh in shapes[pp_rank * per : (pp_rank + 1) * per]:
        n += s * b * (4 * h + (sh.heads + 2 * sh.groups) * d // tp + sh.heads * d // tp + m * sh.ffn // tp)
        n += b * (sh.heads // tp) * s * s
    if pp_rank == pp - 1:
        n += s * b * 2 * h + 2 * s * b * model.vocab_size // tp
    return n * element_bytes
