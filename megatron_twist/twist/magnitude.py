"""Magnitude scores of heads and MLP neurons, from squared row and column norms.

A unit's score is the product of the norm of the rows it writes in its input
projection and of the columns it reads in its output projection (a head: its
q rows and its group's k/v rows of ``linear_qkv``, its columns of
``linear_proj``; a neuron: its gate and up rows of ``linear_fc1``, its column
of ``linear_fc2``). Written on squared row/column norms, not on the weights,
because squared norms add: a rank that holds only part of a weight (a ZeRO
partition: distributed/sharded_central.py) computes its part and a SUM
all-reduce completes them, while a rank holding a tensor-parallel shard has
whole rows and columns of its own units and scores them directly.

Used by extraction's magnitude cut (twist/extraction.py) and by
``--twist-pin-cut`` (twist/pin.py, and the ZeRO hook), so training pins the
units the final cut will take.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..config import ModelConfig
from .slicing import proj_columns, qkv_rows

# The four weights a layer's scores read, and which of their norms: rows (dim 1 summed) or columns.
SCORED = {
    "self_attention.linear_qkv.weight": "rows",
    "self_attention.linear_proj.weight": "columns",
    "mlp.linear_fc1.weight": "rows",
    "mlp.linear_fc2.weight": "columns",
}


def layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}."


def squared_norms(weight: torch.Tensor, which: str) -> torch.Tensor:
    """Squared norms of a whole weight's rows or columns (fp32)."""
    return weight.detach().float().pow(2).sum(dim=1 if which == "rows" else 0)


def layer_norms(params: Dict[str, torch.Tensor], layer: int) -> Dict[str, torch.Tensor]:
    """The squared norms one layer's scores need, from whole (or whole-row TP-shard) weights."""
    pre = layer_prefix(layer)
    return {suffix: squared_norms(params[pre + suffix], which) for suffix, which in SCORED.items()}


def unit_scores(model: ModelConfig, norms: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(head scores [num_attention_heads], neuron scores [ffn_hidden_size]) of one layer of ``model``'s
    geometry (a whole model, or a TP shard's view: twist/sharding.local_model_view)."""
    qkv = norms["self_attention.linear_qkv.weight"]
    proj = norms["self_attention.linear_proj.weight"]
    fc1 = norms["mlp.linear_fc1.weight"]
    fc2 = norms["mlp.linear_fc2.weight"]
    heads = torch.stack(
        [
            qkv[qkv_rows(model, [h], device=qkv.device)].sum().sqrt()
            * proj[proj_columns(model, [h], device=proj.device)].sum().sqrt()
            for h in range(model.num_attention_heads)
        ]
    )
    if model.gated_mlp:  # a neuron's gate row and up row together
        fc1 = fc1[: model.ffn_hidden_size] + fc1[model.ffn_hidden_size :]
    return heads, fc1.sqrt() * fc2.sqrt()
