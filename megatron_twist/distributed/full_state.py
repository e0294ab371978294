"""Moving whole (unsharded) model states in and out of a TP x PP layout.

A tensor-parallel shard is itself a "subnet" of the full model: TP rank t
holds the heads and MLP neurons of shard t (and rows [t*V/T, (t+1)*V/T) of
the vocabulary-parallel embedding and output layer). So the index maps of
twist/slicing.py give, for every local parameter, where it sits in the full
tensor; a pipeline stage additionally renames its local layers
``decoder.layers.i`` to ``decoder.layers.{first_layer + i}``.

Used to start runs of different layouts from the same weights, and to
compare their results (tests), and to write a single-file central checkpoint
from a sharded run. Large-scale checkpoints use dist_checkpointing instead.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..twist.sampler import LayerUnits, SubnetPlan
from ..twist.slicing import Device, SliceSpec, slice_for

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def global_name(local_name: str, first_layer: int) -> str:
    m = _LAYER.match(local_name)
    if not m or first_layer == 0:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + first_layer}.{m.group(2)}"


def tp_shard_plan(model: ModelConfig, tp_rank: int, tp: int) -> SubnetPlan:
    h, f = model.num_attention_heads // tp, model.ffn_hidden_size // tp
    lu = LayerUnits(tuple(range(tp_rank * h, (tp_rank + 1) * h)), tuple(range(tp_rank * f, (tp_rank + 1) * f)))
    return SubnetPlan((lu,) * model.num_layers)


def shard_spec(model: ModelConfig, name: str, tp_rank: int, tp: int, *, device: Device) -> SliceSpec:
    """Where TP rank ``tp_rank``'s copy of full parameter ``name`` sits in the full tensor (index on ``device``)."""
    if tp == 1:
        return None
    if name in _VOCAB_PARALLEL:
        v = model.vocab_size // tp
        return 0, torch.arange(tp_rank * v, (tp_rank + 1) * v, device=device)
    return slice_for(model, name, tp_shard_plan(model, tp_rank, tp), device=device)


def layer_range(model: ModelConfig, pp_rank: int, pp: int) -> Tuple[int, int]:
    per = model.num_layers // pp
    return pp_rank * per, per


@torch.no_grad()
def load_full_state(
    module: torch.nn.Module,
    full: Dict[str, torch.Tensor],
    model: ModelConfig,
    tp_rank: int = 0,
    tp: int = 1,
    first_layer: int = 0,
) -> None:
    """Fill a (sharded) module from a full state dict keyed by global parameter names."""
    for name, p in module.named_parameters():
        g = global_name(name, first_layer)
        spec = shard_spec(model, g, tp_rank, tp, device=full[g].device)
        src = full[g] if spec is None else full[g].index_select(spec[0], spec[1])
        if src.shape != p.shape:
            raise ValueError(f"{g}: full-state slice has shape {tuple(src.shape)}, the shard expects {tuple(p.shape)}")
        p.copy_(src)


@torch.no_grad()
def gather_full_state(
    tensors: Dict[str, torch.Tensor],
    model: ModelConfig,
    tp_rank: int,
    tp: int,
    first_layer: int,
    tp_group: Optional[dist.ProcessGroup],
    pp_group: Optional[dist.ProcessGroup],
) -> Dict[str, torch.Tensor]:
    """Reassemble full tensors from every TP shard and PP stage (a collective; every rank gets them).

    ``tensors`` maps LOCAL parameter names to local tensors (weights, or Adam moments).
    Meant for small models (tests, single-file export): it materialises the whole model.
    Returns CPU tensors on purpose: this consolidates for checkpoint I/O, and all_gather_object
    pickles its payload (docs/ARCHITECTURE.md "Devices").
    """
    local = {global_name(n, first_layer): t.detach().cpu() for n, t in tensors.items()}
    if tp > 1:
        shards = [None] * tp
        dist.all_gather_object(shards, local, group=tp_group)
        merged = {}
        for name in local:
            spec = shard_spec(model, name, 0, tp, device="cpu")  # only its dim is used
            if spec is None:
                merged[name] = local[name]
                continue
            dim, _ = spec
            full_shape = list(local[name].shape)
            full_shape[dim] *= tp
            out = torch.empty(full_shape, dtype=local[name].dtype, device="cpu")  # checkpoint I/O: see above
            for t in range(tp):
                out.index_copy_(dim, shard_spec(model, name, t, tp, device=out.device)[1], shards[t][name])
            merged[name] = out
        local = merged
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        stages = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, local, group=pp_group)
        local = {}
        for stage in stages:
            local.update(stage)
    return local
