"""The central model: full-size weights, their Adam moments, and the round clock.

Every data-parallel rank holds an identical copy of ITS tensor-parallel shard
and pipeline stage of the central model (the whole model at TP = PP = 1). It
changes only at aggregation, so ranks stay in lock-step without broadcasting it.
"""

from __future__ import annotations

from typing import Dict

import torch

from ..config import ModelConfig
from ..optim.optimizer import ADAM_MOMENTS


class CentralModel:
    def __init__(self, config: ModelConfig, module: torch.nn.Module):
        self.config = config
        self.module = module
        # named_parameters() lists a tied embedding/output weight once, which is what we want.
        self.params: Dict[str, torch.nn.Parameter] = dict(module.named_parameters())
        self.moments: Dict[str, Dict[str, torch.Tensor]] = {
            m: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()} for m in ADAM_MOMENTS
        }
        self.step = 0  # optimizer steps taken so far (by every subnet)
        self.round = 0  # aggregations done so far

    def shapes(self) -> Dict[str, torch.Size]:
        return {n: p.shape for n, p in self.params.items()}
