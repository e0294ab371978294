"""Cutting a dense smaller model out of the central model, at zero cost.

No calibration data, no reconstruction, no fine-tuning: the cut-out model is
a Megatron-core GPTModel with fewer heads and MLP neurons whose weights are
slices of the central weights; the activation-shift correction (hooks.py) is
folded into the output-projection weights, so the result is a plain model
with no hooks.

Which units to keep (design decision 7), per bucket (KV group or TP shard,
so the result stays GQA-valid and TP-balanced):
* ``magnitude`` (default): the units with the largest weight norms, product
  of the norm of the unit's input rows and of its output columns. Uses
  weights only, so it is still zero-cost;
* ``random:SEED``: a subnet drawn by the training sampler (round SEED), the
  "any subnet is a good ticket" reading of TwIST.
Layers kept whole during training stay whole.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch

from ..config import ConfigError, ModelConfig, TwistConfig
from ..model.gpt import LayerSize, build_gpt_model
from .hooks import correction_scales
from .magnitude import layer_norms, unit_scores
from .sampler import LayerUnits, SubnetPlan, SubnetSampler
from .slicing import slice_for, take


def select_plan(
    model: ModelConfig,
    twist: TwistConfig,
    params: Dict[str, torch.Tensor],
    keep_ratio: float,
    method: str = "magnitude",
) -> SubnetPlan:
    """The subnet to cut at ``keep_ratio`` (which may differ from the training kappa)."""
    cut = dataclasses.replace(twist, keep_ratio=keep_ratio, num_subnets=1, coverage=False)
    try:
        SubnetSampler(model, cut)  # refuses a keep ratio this model cannot be cut at
    except ConfigError as e:
        raise ConfigError(f"cannot cut at keep ratio {keep_ratio}: {e}") from None
    if method.startswith("random"):
        _, _, seed = method.partition(":")
        return SubnetSampler(model, dataclasses.replace(cut, seed=int(seed or twist.seed))).sample(0)[0]
    if method != "magnitude":
        raise ConfigError(f"extraction method {method!r} is unknown; use 'magnitude' or 'random:SEED'")
    return plan_from_scores(
        model, twist, keep_ratio, [unit_scores(model, layer_norms(params, layer)) for layer in range(model.num_layers)]
    )


def plan_from_scores(
    model: ModelConfig,
    twist: TwistConfig,
    keep_ratio: float,
    scores: List[Tuple[torch.Tensor, torch.Tensor]],
    tensor_parallel_size: int = 1,
) -> SubnetPlan:
    """Keep the best-scoring units per bucket: ``scores[layer] = (head scores, neuron scores)``.

    The buckets (KV groups, TP-balance blocks at ``tensor_parallel_size``) and whole layers are the
    sampler's, so any score
    (weights only here; activation-aware ones in benchmarks/) gives a GQA-valid, TP-balanced cut.
    """
    cut = dataclasses.replace(twist, keep_ratio=keep_ratio, num_subnets=1, coverage=False)
    sampler = SubnetSampler(model, cut, tensor_parallel_size)
    layers: List[LayerUnits] = []
    for layer in range(model.num_layers):
        whole = layer in sampler.whole
        head_scores, neuron_scores = scores[layer]
        heads = list(range(model.num_attention_heads))
        if twist.splits_heads and not whole:
            heads = _top_per_bucket(head_scores, sampler.head_buckets(), keep_ratio)
        neurons = list(range(model.ffn_hidden_size))
        if twist.splits_mlp and not whole:
            neurons = _top_per_bucket(neuron_scores, sampler.neuron_buckets(), keep_ratio)
        layers.append(LayerUnits(tuple(heads), tuple(neurons)))
    return SubnetPlan(tuple(layers))


def _top_per_bucket(scores: torch.Tensor, buckets, keep_ratio: float) -> List[int]:
    kept = []
    for bucket in buckets:
        quota = int(round(len(bucket) * keep_ratio))
        b = torch.as_tensor(bucket, device=scores.device)
        top = torch.topk(scores[b], quota).indices
        kept.extend(b[top].tolist())
    return sorted(kept)


@torch.no_grad()
def cut_state(
    model: ModelConfig, twist: TwistConfig, params: Dict[str, torch.Tensor], plan: SubnetPlan
) -> Dict[str, torch.Tensor]:
    """Sliced central weights with the correction scale folded into the projections."""
    out = {}
    scales = correction_scales(model, twist, plan)
    for name, value in params.items():
        t = take(value, slice_for(model, name, plan, device=value.device))
        if name.startswith("decoder.layers."):
            layer = int(name.split(".")[2])
            s_attn, s_mlp = scales[layer]
            if name.endswith("self_attention.linear_proj.weight") and s_attn != 1.0:
                t = t * s_attn
            elif name.endswith("mlp.linear_fc2.weight") and s_mlp != 1.0:
                t = t * s_mlp
        out[name] = t.contiguous()
    return out


def cut_model(model: ModelConfig, twist: TwistConfig, params: Dict[str, torch.Tensor], plan: SubnetPlan):
    """A dense Megatron-core GPTModel of the subnet's sizes holding the cut weights."""
    sizes: List[LayerSize] = plan.layer_sizes(model)
    module = build_gpt_model(model, sizes)
    state = cut_state(model, twist, params, plan)
    load_named_parameters(module, state)
    return module, sizes


@torch.no_grad()
def load_named_parameters(module: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy tensors into a module's parameters; names and shapes must match exactly."""
    own = dict(module.named_parameters())
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    if missing or unexpected:
        raise ConfigError(
            f"weights do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, p in own.items():
        if p.shape != tensors[name].shape:
            raise ConfigError(f"shape of {name} is {tuple(tensors[name].shape)}, the model expects {tuple(p.shape)}")
        p.copy_(tensors[name])
