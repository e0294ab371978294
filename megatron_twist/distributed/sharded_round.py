"""A TwIST round over a central model sharded over data parallel (``twist train --twist-shard-central``).

The replicated round (twist/rounds.py ``ReplicatedRound``) keeps, on every data-parallel rank, the
whole central model of its TP shard / PP stage in fp32 with both Adam moments, plus a flat buffer of
the same size for the all-reduce: 24 bytes per central parameter. Here every data-parallel rank
(subnet slots x replicas at one TP/PP position: ``TwistGroups.data_parallel_group``) keeps 1/DP of
every central tensor (distributed/sharded_central.py, the layout Megatron's distributed optimizer
gives its optimizer state), so the central model costs 12 / DP bytes per parameter, and the largest
transient is one central parameter:

* refill (``refill``): the subnet reads its slice of each central tensor, all-gathered one tensor
  at a time (``ShardedCentral.gather``), through the same ``SubnetState.load`` as the replicated
  round;
* contribute (``contribute``): for each tensor and field, this subnet's values are scatter-added
  into a zero buffer shaped like the central tensor and reduce-scattered over the group; each rank
  adds the sums of its own shard into a shard-sized accumulator. Replicas of a subnet hold the
  same values, so only replica 0 adds them (the others join the collective with zeros);
* close (``close``): each rank divides its accumulated sums by the holder counts of its shard's
  positions (every rank knows every plan) and writes its shard; elements no subnet held keep
  their value. The same rule as twist/aggregation.py, so the result equals the replicated
  round's to float rounding (the same sums, in another reduction order).

Collectives run in the same order on every rank of the group: each rank refills and contributes
the same number of subnets per round (a non-finite subnet contributes zeros and is then dropped
from the counts on every rank).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..config import TwistConfig
from ..twist.magnitude import SCORED, layer_prefix
from ..twist.pin import pinned_plan_from_norms
from ..twist.rounds import LocalPlans, Subnet, aggregated_fields
from ..twist.sampler import SubnetPlan
from ..twist.slicing import holder_count_at, put_add, slice_for
from .sharded_central import ShardedCentral


class _Gathered(dict):
    """``SubnetState.load``'s view of one field: ``view[name]`` all-gathers that tensor on access."""

    def __init__(self, central: ShardedCentral, field: str):
        super().__init__()
        self.central, self.field = central, field

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.central.gather(name, self.field)


class _GatheredCentral:
    """What ``SubnetState.load`` reads of a central model, gathered one tensor at a time."""

    def __init__(self, central: ShardedCentral, fields: Sequence[str]):
        self.params = _Gathered(central, "param")
        self.moments = {m: _Gathered(central, m) for m in fields if m != "param"}
        self.step = central.step


class ShardedRound:
    """open / refill / contribute / drop / close, as ``ReplicatedRound``, on ``ShardedCentral`` shards."""

    def __init__(
        self,
        plans: LocalPlans,
        central: ShardedCentral,
        twist: TwistConfig,
        replica_index: int = 0,
        model_parallel_group=None,
    ):
        self.planner, self.central, self.twist = plans, central, twist
        self.replica_index, self.model_parallel_group = replica_index, model_parallel_group
        self.fields = aggregated_fields(twist)
        self.geometry = plans.geometry
        self.plans: List[SubnetPlan] = []
        self.dropped: set = set()
        self.sums: Dict[str, Dict[str, torch.Tensor]] = {}
        self.bytes_moved = 0  # all-gather outputs + reduce-scatter inputs, per rank

    def payload_bytes(self) -> int:
        """Bytes one contribution reduce-scatters (every field of every tensor, fp32)."""
        c = self.central
        return 4 * len(self.fields) * sum(c.shard_numel(n) * c.shard_count for n in c.shapes)

    def open(self) -> List[SubnetPlan]:
        self.plans = self.planner.sample(self.central.round, self._pinned())
        self.dropped = set()
        c = self.central
        self.sums = {f: {n: torch.zeros(c.shard_numel(n), device=c.device) for n in c.shapes} for f in self.fields}
        return self.plans

    def _pinned(self) -> Optional[SubnetPlan]:
        return pinned_plan_of_shards(self.planner, self.central, self.twist, self.model_parallel_group)

    def refill(self, subnet: Subnet, s: int) -> None:
        c = self.central
        subnet.load(_GatheredCentral(c, self.fields), self.plans[s])  # gathers each field it reads
        self.bytes_moved += 4 * len(self.fields) * sum(c.shard_numel(n) * c.shard_count for n in c.shapes)

    @torch.no_grad()
    def contribute(self, subnet: Subnet, s: int, valid: bool = True) -> None:
        """Collective: every rank of the group calls it once per subnet it trains, ``valid`` or not."""
        c, plan = self.central, self.plans[s]
        adds = valid and self.replica_index == 0
        values = subnet.contribution() if adds else None
        for name, shape in c.shapes.items():
            spec = slice_for(self.geometry, name, plan, device=c.device)
            for field in self.fields:
                buffer = torch.zeros(c.shard_numel(name) * c.shard_count, device=c.device)
                if adds:
                    full = buffer[: shape.numel()].view(shape)
                    put_add(full, spec, values[field][name].detach().float())
                self.sums[field][name] += self._reduce_scatter(buffer)

    def _reduce_scatter(self, buffer: torch.Tensor) -> torch.Tensor:
        self.bytes_moved += buffer.numel() * buffer.element_size()
        return self.central.reduce_scatter(buffer)

    def drop(self, subnets: Sequence[int]) -> None:
        """Leave subnets out of the holder counts (they contributed zeros; the same ones on every rank)."""
        self.dropped.update(subnets)

    @torch.no_grad()
    def close(self, steps_taken: int) -> int:
        """Average into this rank's shards; returns the bytes moved since the last close."""
        c = self.central
        held = [p for s, p in enumerate(self.plans) if s not in self.dropped]
        for name, shape in c.shapes.items():
            counts = holder_count_at(self.geometry, name, shape, held, c.shard_positions(name))
            for field in self.fields:
                shard = c.shards[field][name]
                shard.copy_(torch.where(counts > 0, self.sums[field][name] / counts.clamp(min=1.0), shard))
        c.step += steps_taken
        c.round += 1
        moved, self.bytes_moved = self.bytes_moved, 0
        return moved


def shard_central(central, group) -> ShardedCentral:
    """This rank's 1/DP of a (replicated, just built or loaded) central model; the full copy is dropped
    by the caller (a transient at start-up, like the DeepSpeed path's)."""
    device = next(iter(central.params.values())).device
    sharded = ShardedCentral.from_full(central.config, dict(central.params), group, central.moments, device=device)
    sharded.step, sharded.round = central.step, central.round
    return sharded


def pinned_plan_of_shards(
    planner: LocalPlans, central: ShardedCentral, twist: TwistConfig, model_parallel_group
) -> Optional[SubnetPlan]:
    """Under --twist-pin-cut, subnet 0's plan for the next round, else None (collective when on): this TP
    shard / PP stage's squared row/column norms summed over the data-parallel shards of ``central``
    (``squared_norms``), then its unit scores summed over ``model_parallel_group`` (twist/pin.py).
    Shared by ``ShardedRound`` and the DeepSpeed path's ZeRO round hook."""
    if not twist.pin_cut:
        return None
    layers = range(planner.geometry.num_layers)
    norms = central.squared_norms({layer_prefix(i) + s: w for i in layers for s, w in SCORED.items()})
    return pinned_plan_from_norms(
        planner.model,
        twist,
        lambda i: {s: norms[layer_prefix(i) + s] for s in SCORED},
        tp_rank=planner.tp_rank,
        tp_size=planner.tp_size,
        first_layer=planner.first_layer,
        num_layers=planner.num_layers,
        device=central.device,
        model_parallel_group=model_parallel_group,
    )
