"""Index maps between the central model and a subnet's parameters.

A subnet is a Megatron-core GPTModel with the same module tree and parameter
names as the central model, but fewer rows/columns in four weights per layer.
For each subnet parameter this module says which slice of the central
parameter it is: ``(dim, index)``, or ``None`` for a parameter every subnet
holds whole (embeddings, norms, output layer, output-projection biases).

Layouts (Megatron-core local spec, tensor parallel size 1):
* ``linear_qkv`` rows are grouped per KV group g: [q heads of g | k_g | v_g],
  each block ``head_dim`` rows. A kept head keeps its q rows; a kept group
  keeps its k and v rows (GQA keeps every group; MHA keeps a group with its head).
* ``linear_proj`` columns: ``head_dim`` columns per query head.
* ``linear_fc1`` rows: one per neuron, or for SwiGLU [gate rows | up rows],
  a neuron's gate and up rows move together.
* ``linear_fc2`` columns: one per neuron.

Every index map is built on the ``device`` its caller names: the device of the tensor it will
index (an index and the tensor it indexes must share a device; nothing here picks one).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

from ..config import ModelConfig
from .sampler import LayerUnits, SubnetPlan

_LAYER_PARAM = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

SliceSpec = Optional[Tuple[int, torch.Tensor]]  # (dim, index) or None for shared
Device = Union[torch.device, str]


def qkv_rows(model: ModelConfig, heads: Iterable[int], *, device: Device) -> torch.Tensor:
    p, hd = model.heads_per_group, model.head_dim
    block = (p + 2) * hd
    heads = sorted(heads)
    rows = []
    for g in sorted({h // p for h in heads}):
        base = g * block
        for h in heads:
            if h // p == g:
                rows.extend(range(base + (h - g * p) * hd, base + (h - g * p + 1) * hd))
        rows.extend(range(base + p * hd, base + (p + 2) * hd))  # k_g then v_g
    return torch.tensor(rows, dtype=torch.long, device=device)


def proj_columns(model: ModelConfig, heads: Iterable[int], *, device: Device) -> torch.Tensor:
    hd = model.head_dim
    return torch.tensor(
        [c for h in sorted(heads) for c in range(h * hd, (h + 1) * hd)], dtype=torch.long, device=device
    )


def fc1_rows(model: ModelConfig, neurons: Iterable[int], *, device: Device) -> torch.Tensor:
    idx = torch.as_tensor(sorted(neurons), dtype=torch.long, device=device)
    if model.gated_mlp:
        return torch.cat([idx, idx + model.ffn_hidden_size])
    return idx


def slice_for(model: ModelConfig, name: str, plan: SubnetPlan, *, device: Device) -> SliceSpec:
    """The slice of central parameter ``name`` that ``plan``'s subnet holds (index on ``device``)."""
    m = _LAYER_PARAM.match(name)
    if not m:
        return None
    lu: LayerUnits = plan.layers[int(m.group(1))]
    rest = m.group(2)
    full_heads = len(lu.heads) == model.num_attention_heads
    full_neurons = len(lu.neurons) == model.ffn_hidden_size
    if rest.startswith("self_attention.linear_qkv.") and not full_heads:
        return 0, qkv_rows(model, lu.heads, device=device)
    if rest == "self_attention.linear_proj.weight" and not full_heads:
        return 1, proj_columns(model, lu.heads, device=device)
    if rest.startswith("mlp.linear_fc1.") and not full_neurons:
        return 0, fc1_rows(model, lu.neurons, device=device)
    if rest == "mlp.linear_fc2.weight" and not full_neurons:
        return 1, torch.as_tensor(lu.neurons, dtype=torch.long, device=device)
    return None


def subnet_slices(
    model: ModelConfig, names: Iterable[str], plan: SubnetPlan, *, device: Device
) -> Dict[str, SliceSpec]:
    return {n: slice_for(model, n, plan, device=device) for n in names}


def take(central: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    """The subnet's copy of a central tensor (``spec`` built on its device)."""
    if spec is None:
        return central.detach().clone()
    dim, index = spec
    return central.detach().index_select(dim, index)


def put_add(target: torch.Tensor, spec: SliceSpec, value: torch.Tensor) -> None:
    """target[slice] += value (in place), the scatter used by aggregation (``spec`` built on its device)."""
    if spec is None:
        target.add_(value)
    else:
        dim, index = spec
        target.index_add_(dim, index, value)


def holder_count(model: ModelConfig, name: str, shape: torch.Size, plans, *, device: Device) -> torch.Tensor:
    """How many subnets hold each element of central parameter ``name`` (broadcastable, on ``device``)."""
    dims = len(shape)
    counts = None
    shared = 0
    for plan in plans:
        spec = slice_for(model, name, plan, device=device)
        if spec is None:
            shared += 1
            continue
        dim, index = spec
        if counts is None:
            counts = torch.zeros(shape[dim], device=device)
            counts_dim = dim
        assert dim == counts_dim
        counts.index_add_(0, index, torch.ones(len(index), device=device))
    if counts is None:
        return torch.full((1,) * dims, float(shared), device=device)
    counts += shared
    view = [1] * dims
    view[counts_dim] = shape[counts_dim]
    return counts.view(view)


def central_flat_index(
    spec: SliceSpec, central_shape: torch.Size, start: int, numel: int, *, device: Device
) -> torch.Tensor:
    """Flat positions in the central tensor of elements [start, start + numel) of the subnet's
    flattened copy (what a ZeRO fragment holds: a contiguous range of the flattened parameter),
    on ``device`` (that of the buffer they index; ``spec`` built there too)."""
    k = torch.arange(start, start + numel, dtype=torch.long, device=device)
    if spec is None:
        return k
    dim, index = spec
    inner = 1
    for size in central_shape[dim + 1 :]:
        inner *= size
    kept = len(index)
    outer, coord, rem = k // (kept * inner), (k // inner) % kept, k % inner
    return outer * (central_shape[dim] * inner) + index.to(torch.long)[coord] * inner + rem


def holder_count_at(model: ModelConfig, name: str, shape: torch.Size, plans, positions: torch.Tensor) -> torch.Tensor:
    """holder_count at flat positions of the central tensor (positions past its end count 0), on their device."""
    counts = holder_count(model, name, shape, plans, device=positions.device)
    numel = shape.numel()
    valid = positions < numel
    if counts.numel() == 1:
        out = torch.full(positions.shape, float(counts.reshape(-1)[0]), device=positions.device)
    else:
        dim = next(d for d, s in enumerate(counts.shape) if s != 1)
        inner = 1
        for size in shape[dim + 1 :]:
            inner *= size
        out = counts.reshape(-1)[(positions.clamp(max=numel - 1) // inner) % shape[dim]]
    return torch.where(valid, out, torch.zeros_like(out))
