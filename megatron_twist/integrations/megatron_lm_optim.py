"""What TwIST reads and refills inside Megatron-LM's model and optimizer wrappers.

Megatron-LM hands the loop a ChainedOptimizer of one FP32Optimizer (fp32) or
Float16OptimizerWithFloat16Params (``--bf16``) around a torch AdamW. Under ``--bf16`` the module's
parameters are bf16 and each has an fp32 ``main_param`` that the AdamW steps: TwIST refills and
aggregates those masters (as ``twist train --bf16`` does its own), and the bf16 parameters follow.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


class MainParams(torch.nn.Module):
    """A bf16 module's fp32 master weights (Megatron's ``param.main_param``) under the module's
    parameter names, as SubnetState reads and refills parameters."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self._pairs = [(name, getattr(p, "main_param", p)) for name, p in module.named_parameters()]

    def named_parameters(self, *args, **kwargs):
        return iter(self._pairs)


class MastersToModel:
    """A SubnetState whose refill is followed by copying the fp32 masters into the bf16 module
    (Megatron-LM does that after each optimizer step; a refill happens between steps)."""

    def __init__(self, state, module: torch.nn.Module):
        self.state, self.module = state, module

    @torch.no_grad()
    def load(self, central, plan) -> None:
        self.state.load(central, plan)
        for p in self.module.parameters():
            main = getattr(p, "main_param", None)
            if main is not None:
                p.copy_(main)

    def contribution(self):
        return self.state.contribution()


def torch_optimizer_of(optimizer):
    """The torch Adam under Megatron's optimizer wrappers (ChainedOptimizer -> FP32Optimizer -> AdamW)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        if len(chained) != 1:
            raise ConfigError(
                f"Megatron-LM built {len(chained)} optimizers for this model; TwIST refills one torch Adam: "
                "drop per-module optimizer settings (e.g. --decoupled-lr)"
            )
        optimizer = chained[0]
    return getattr(optimizer, "optimizer", optimizer)
