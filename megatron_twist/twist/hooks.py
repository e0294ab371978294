"""Forward pre-hooks on Megatron modules: activation correction and the masked oracle.

Both work the same way: the input of an output projection
(``self_attention.linear_proj``: concatenated head outputs, and
``mlp.linear_fc2``: MLP neuron activations) is multiplied by a scale before
the projection sums the units into the residual stream. Nothing inside
Megatron is modified; removing the hooks restores the plain model.

* Activation-shift correction ('rescale'): a subnet that keeps a fraction
  kappa of a layer's units sums only that fraction into the residual
  stream, the full model sums all of them. Like inverted dropout, a subnet
  scales its summed unit outputs by (units in the full layer / units kept),
  so the full central model needs no scale and a cut-out model at any kappa
  gets its scale folded into the projection weights (see extraction.py).
  Biases of the projections are shared and never scaled.
* Masked oracle: the full central model with the units outside a subnet
  zeroed (and the same correction scale on the kept ones) computes exactly
  what the materialized subnet computes. Tests use it to check slicing.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..config import ModelConfig, TwistConfig
from .sampler import SubnetPlan


def correction_scales(model: ModelConfig, twist: TwistConfig, plan: SubnetPlan) -> List[Tuple[float, float]]:
    """Per layer (attention scale, MLP scale) applied to a subnet's summed unit outputs."""
    if twist.correction == "none":
        return [(1.0, 1.0)] * model.num_layers
    return [(model.num_attention_heads / len(lu.heads), model.ffn_hidden_size / len(lu.neurons)) for lu in plan.layers]


def _scale_input_hook(scale):
    """``scale``: a number, or a tensor on the device of the module's input (attach_mask builds it there)."""

    def hook(module, args):
        return (args[0] * scale,) + tuple(args[1:])

    return hook


def _projections(gpt_model):
    for layer in gpt_model.decoder.layers:
        yield layer.self_attention.linear_proj, layer.mlp.linear_fc2


def attach_correction(gpt_model, scales: List[Tuple[float, float]]) -> list:
    """Scale each layer's summed head / neuron outputs; returns hook handles."""
    handles = []
    for (proj, fc2), (s_attn, s_mlp) in zip(_projections(gpt_model), scales):
        if s_attn != 1.0:
            handles.append(proj.register_forward_pre_hook(_scale_input_hook(s_attn)))
        if s_mlp != 1.0:
            handles.append(fc2.register_forward_pre_hook(_scale_input_hook(s_mlp)))
    return handles


def attach_mask(gpt_model, model: ModelConfig, twist: TwistConfig, plan: SubnetPlan) -> list:
    """Turn the full central model into the masked form of ``plan``'s subnet (masks on its device)."""
    handles = []
    hd = model.head_dim
    device = next(gpt_model.parameters()).device
    for (proj, fc2), lu, (s_attn, s_mlp) in zip(
        _projections(gpt_model), plan.layers, correction_scales(model, twist, plan)
    ):
        head_mask = torch.zeros(model.num_attention_heads, device=device)
        head_mask[list(lu.heads)] = s_attn
        neuron_mask = torch.zeros(model.ffn_hidden_size, device=device)
        neuron_mask[list(lu.neurons)] = s_mlp
        handles.append(proj.register_forward_pre_hook(_scale_input_hook(head_mask.repeat_interleave(hd))))
        handles.append(fc2.register_forward_pre_hook(_scale_input_hook(neuron_mask)))
    return handles


def remove_hooks(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class CorrectionHooks:
    """The activation correction of one subnet module for the current round's plan.

    A subnet's units change every round, so do its scales: ``apply(plan)`` replaces the previous
    round's hooks. Shared by every way a subnet is refilled (twist/worker.py's ``SubnetState``,
    the ZeRO round hook), so the rule lives here once.
    """

    def __init__(self, module: torch.nn.Module, geometry: ModelConfig, twist: TwistConfig):
        self.module, self.geometry, self.twist = module, geometry, twist
        self.handles: list = []

    def apply(self, plan: SubnetPlan) -> None:
        remove_hooks(self.handles)
        self.handles = attach_correction(self.module, correction_scales(self.geometry, self.twist, plan))

    def add(self, handles: list) -> None:
        """More hooks for this round only (benchmarks/speed.py's masks): removed by the next ``apply``."""
        self.handles += handles
