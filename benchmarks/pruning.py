"""Structured pruning of a trained dense model without retraining, shared by the quality benchmarks.

* magnitude: the weight-only score of TwIST's own cut (twist.extraction.select_plan), no calibration;
* activation: a Wanda-style structured score, |W| x ||X|| per unit at the inputs of linear_proj
  (heads) and linear_fc2 (neurons), from calibration sequences of a training split.
Both keep whole KV groups valid and cut every layer to the same sizes (plan_from_scores).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

METHODS = ("magnitude", "activation")


def projection_input_sums(module, calib: torch.Tensor, power: int) -> dict:
    """{(layer, "proj" | "fc2"): sum over the calibration tokens of x**power}, x the inputs of linear_proj
    (heads) and linear_fc2 (neurons); also the token count under "tokens"."""
    from megatron_twist.model.gpt import gpt_forward

    sums = {"tokens": 0}
    hooks = []
    for i, layer in enumerate(module.decoder.layers):
        for kind, sub in (("proj", layer.self_attention.linear_proj), ("fc2", layer.mlp.linear_fc2)):

            def hook(mod, inputs, key=(i, kind)):
                x = inputs[0].detach().double() if power == 1 else inputs[0].detach().float()
                sums[key] = sums.get(key, 0) + x.pow(power).reshape(-1, x.shape[-1]).sum(0)

            hooks.append(sub.register_forward_pre_hook(hook))
    module.eval()
    with torch.no_grad():
        for start in range(0, len(calib), 8):
            gpt_forward(module, calib[start : start + 8])
            sums["tokens"] += calib[start : start + 8].numel()
    for h in hooks:
        h.remove()
    return sums


def activation_scores(module, model, calib: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Wanda-style structured scores: per unit, ||W[:, unit columns]|| x ||X[unit columns]|| summed over
    the calibration tokens, at the inputs of linear_proj (heads) and linear_fc2 (neurons)."""
    from megatron_twist.twist.slicing import proj_columns

    sq = projection_input_sums(module, calib, 2)
    scores = []
    for i, layer in enumerate(module.decoder.layers):
        w_proj = layer.self_attention.linear_proj.weight.detach().float()
        w_fc2 = layer.mlp.linear_fc2.weight.detach().float()
        col_proj = w_proj.norm(dim=0) * sq[(i, "proj")].sqrt()
        heads = torch.stack(
            [col_proj[proj_columns(model, [h], device=col_proj.device)].sum() for h in range(model.num_attention_heads)]
        )
        neurons = w_fc2.norm(dim=0) * sq[(i, "fc2")].sqrt()
        scores.append((heads, neurons))
    return scores


def calibration(data: str, sequences: int, seq_length: int) -> torch.Tensor:
    """The first ``sequences`` windows of ``seq_length`` tokens of a prepared directory's training split."""
    from megatron_twist.data import load_token_stream

    tokens = load_token_stream(str(data), "train")
    n = min(sequences, len(tokens) // seq_length)
    return tokens[: n * seq_length].long().view(n, seq_length)


class Pruner:
    """Prunes one trained central model to any keep ratio by ``method``; activation scores are
    computed once (from ``calib``) and reused for every ratio."""

    def __init__(self, central, calib: torch.Tensor = None):
        from megatron_twist.config import TwistConfig

        self.central = central
        self.cfg = TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False)  # split heads and MLP, no correction
        self.scores = None if calib is None else activation_scores(central.module, central.config, calib)

    def plan(self, kappa: float, method: str):
        from megatron_twist.twist.extraction import plan_from_scores, select_plan

        c = self.central
        if method == "magnitude":
            return select_plan(c.config, self.cfg, c.params, kappa)
        if method == "activation":
            if self.scores is None:
                raise ValueError("activation pruning needs calibration sequences")
            return plan_from_scores(c.config, self.cfg, kappa, self.scores)
        raise ValueError(f"unknown pruning method {method!r}; one of {METHODS}")

    def prune(self, kappa: float, method: str):
        """(the pruned dense module, its plan) at keep ratio ``kappa``."""
        from megatron_twist.twist.extraction import cut_model

        plan = self.plan(kappa, method)
        return cut_model(self.central.config, self.cfg, self.central.params, plan)[0], plan
