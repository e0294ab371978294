"""Aggregation of a round's subnets into the central model.

Rule (docs/ARCHITECTURE.md, design decision 3): every element of a central
tensor becomes the AVERAGE over the subnets that held it in this round;
parameters every subnet holds (embeddings, norms, output layer, output
projection biases) are averaged over all subnets; elements no subnet held
keep their central value. The same rule aggregates Adam's moments when the
optimizer-state policy is 'aggregate'.

Mechanics: each rank scatter-adds its own subnets' tensors into one flat
central-shaped buffer, the buffer is all-reduced (SUM) once over the
aggregation group, and divided by per-unit holder counts. The counts need no
communication: every rank knows every subnet's plan (the sampler is
deterministic). Summation into zeros makes a single-process run (subnets in
turn) and a multi-rank run produce bit-identical sums for two subnets.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..config import ModelConfig
from .sampler import SubnetPlan
from .slicing import holder_count, put_add, slice_for


class RoundAggregator:
    """Accumulates subnets' tensors for several fields (weights, Adam moments)."""

    def __init__(
        self,
        model: ModelConfig,
        shapes: Dict[str, torch.Size],
        fields: Sequence[str],
        *,
        device: Union[torch.device, str],
    ):
        """``device``: that of the model the round serves (the buffer is all-reduced over its group)."""
        self.model = model
        self.shapes = dict(shapes)
        self.fields = tuple(fields)
        total = sum(s.numel() for s in self.shapes.values()) * len(self.fields)
        self.flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.views: Dict[tuple, torch.Tensor] = {}
        offset = 0
        for field in self.fields:
            for name, shape in self.shapes.items():
                n = shape.numel()
                self.views[(field, name)] = self.flat[offset : offset + n].view(shape)
                offset += n
        self.plans: List[SubnetPlan] = []
        self.counts: Dict[str, torch.Tensor] = {}
        self.bytes_reduced = 0  # payload of all-reduces so far (per rank)

    def begin_round(self, plans: Sequence[SubnetPlan]) -> None:
        self.flat.zero_()
        self.plans = list(plans)
        self.counts = {
            n: holder_count(self.model, n, s, self.plans, device=self.flat.device) for n, s in self.shapes.items()
        }

    def drop_subnets(self, subnets: Iterable[int]) -> None:
        """Leave these subnets (indices into this round's plans) out of the average: holder counts are
        recomputed from the remaining plans. Their tensors must not have been added (a non-finite
        subnet, docs/ARCHITECTURE.md "Reliability"); every rank must drop the same ones."""
        dropped = set(subnets)
        kept = [p for i, p in enumerate(self.plans) if i not in dropped]
        self.counts = {n: holder_count(self.model, n, s, kept, device=self.flat.device) for n, s in self.shapes.items()}

    def add(self, field: str, name: str, plan: SubnetPlan, value: torch.Tensor) -> None:
        target = self.views[(field, name)]
        put_add(target, slice_for(self.model, name, plan, device=target.device), value.detach().float())

    def add_subnet(self, plan: SubnetPlan, tensors_by_field: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for field, tensors in tensors_by_field.items():
            for name, value in tensors.items():
                self.add(field, name, plan, value)

    def all_reduce(self, group: Optional[dist.ProcessGroup]) -> None:
        if group is None or dist.get_world_size(group) == 1:
            return
        dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, group=group)
        self.bytes_reduced += self.flat.numel() * self.flat.element_size()

    @torch.no_grad()
    def write_average(self, field: str, central: Dict[str, torch.Tensor]) -> None:
        """central[name] <- average over holders (unchanged where no subnet held it)."""
        for name, target in central.items():
            total = self.views[(field, name)]
            count = self.counts[name]
            averaged = total / count.clamp(min=1.0)
            target.copy_(torch.where(count > 0, averaged, target.float()).to(target.dtype))

    def payload_bytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()
