"""TwIST's round boundary on a DeepSpeed engine, working on ZeRO partitions.

The same rule as twist/aggregation.py (each central element becomes the
average over the subnets that held it; unheld elements keep their value),
computed without any rank holding the full model:

close a round, for each parameter (in the same order on every rank) and
each field (weights, and Adam's two moments when they are aggregated):
  1. scatter-add the fragment THIS rank holds (EngineFragments.held: its
     ZeRO partition of the subnet parameter) into a zero buffer shaped like
     the central parameter, at the central positions the subnet's slice maps
     it to (slicing.central_flat_index);
  2. reduce-scatter the buffer over the shard group: each rank receives the
     sums for its own shard of the central parameter;
  3. divide by the holder counts of its shard positions (no communication:
     every rank knows every subnet's plan) and write the shard.
open a round: sample the next plans (under --twist-pin-cut, subnet 0's from the shards' squared
row/column norms, ShardedCentral.squared_norms); for each parameter all-gather its
central shards (one parameter at a time), take this subnet's slice and write
this rank's fragment of weights and moments (EngineFragments.write).

Each element of a subnet is contributed exactly once (replicas hold disjoint
ZeRO fragments), so the sums equal those of the replicated path. Memory per
rank: 3N/W for the central shards (N central parameters, W ranks) plus one
parameter-sized buffer at a time. Traffic per round: one reduce-scatter and
one all-gather of the central model per field, as much on the wire as the
all-reduce it replaces.

Under tensor parallelism every rank works on its own TP shard: the engine's model is the subnet's TP
shard, the central model is the central TP shard sharded over the data-parallel ranks of that TP
position, and plans are drawn in the shard's local indices (``LocalPlans``, as on the Megatron path), so
slicing and holder counts use the shard's geometry; TP ranks exchange nothing at a round boundary
except, under --twist-pin-cut, the unit scores (``pinned_plan_of_shards``).

Only the two boundaries above are ZeRO's own. When they happen (twist/rounds.py
``RoundClock``), which plans a round draws (``LocalPlans``), which fields it
averages and the activation correction (twist/hooks.py ``CorrectionHooks``) are
the code the replicated paths run.

Devices: every buffer, count and index map here is on the central model's device, which must be the
device of the engine's model (checked at construction): the collectives run over the group's backend.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..config import DEEPSPEED_NO_PP, ConfigError, ModelConfig, TwistConfig
from ..distributed.runtime import TwistGroups
from ..distributed.sharded_central import ShardedCentral
from ..distributed.sharded_round import pinned_plan_of_shards
from ..optim.optimizer import ADAM_MOMENTS
from ..twist.hooks import CorrectionHooks
from ..twist.rounds import LocalPlans, RoundClock, aggregated_fields
from ..twist.sampler import SubnetPlan
from ..twist.slicing import central_flat_index, holder_count_at, slice_for, take
from .deepspeed_engine import EngineFragments, relink_optimizer_state


class ZeroRoundHook:
    """``on_iteration_start(it)`` before every engine step, ``finish(it)`` after the last one."""

    def __init__(
        self,
        model: ModelConfig,
        twist: TwistConfig,
        groups: TwistGroups,
        central: ShardedCentral,
        engine,
        fragments: Optional[EngineFragments] = None,
    ):
        if groups.pp_size != 1:
            raise ConfigError(DEEPSPEED_NO_PP)
        subnets = groups.local_subnets(twist.num_subnets)
        if len(subnets) != 1:
            raise ConfigError(
                f"DeepSpeed trains one subnet per rank, but this rank would hold {len(subnets)}; "
                f"launch at least {twist.num_subnets} data-parallel ranks (num_subnets x replicas)"
            )
        self.subnet = subnets[0]
        self.model, self.twist, self.central, self.engine = model, twist, central, engine
        self.module = engine.module
        self.device = central.device
        engine_device = next(self.module.parameters()).device
        if engine_device != self.device:
            raise ValueError(
                f"the sharded central model is on {self.device}, the engine's model on {engine_device}: "
                "build the central model on the engine's device"
            )
        self.fragments = fragments or EngineFragments(engine)
        # Plans in this rank's TP shard indices: the engine's model, its fragments and the central shards
        # are all of TP shard tp_rank (PP = 1, checked above), so slicing works on the shard's geometry.
        self.local_plans = LocalPlans(model, twist, groups.tp_rank, groups.tp_size)
        self.geometry = self.local_plans.geometry
        self.model_parallel_group = groups.model_parallel_group
        self.sampler = self.local_plans.sampler
        self.fields = aggregated_fields(twist)
        self.plans: List[SubnetPlan] = []
        self.has_state = False  # Adam state exists once the engine stepped (or loaded a checkpoint)
        self.correction = CorrectionHooks(self.module, model, twist)
        self.clock = RoundClock(central, twist.local_steps, self)
        self.bytes_moved = 0  # reduce-scatter input + all-gather output, per rank

    # -- state of the engine's optimizer --------------------------------------------------------------------
    def mark_state_present(self) -> None:
        """After engine.load_checkpoint: Adam state exists; link it to the fragments."""
        relink_optimizer_state(self.engine)
        self.has_state = True

    def after_step(self) -> None:
        if not self.has_state:
            relink_optimizer_state(self.engine)
            self.has_state = True

    # -- round boundary -------------------------------------------------------------------------------------
    @torch.no_grad()
    def open_round(self) -> int:
        """Refill this rank's fragments for the next round's plan; returns the bytes all-gathered."""
        if not self.has_state and self.central.step > 0:
            raise ConfigError("resuming needs the engine's checkpoint: pass the directory a DeepSpeed run saved")
        before = self.bytes_moved
        self.plans = self.local_plans.sample(self.central.round, self._pinned())
        plan = self.plans[self.subnet]
        # Before the first step Adam has no state: it starts from zero moments, as the central's are.
        fields = self.fields if self.has_state else ("param",)
        for name, p in self.module.named_parameters():
            spec = slice_for(self.geometry, name, plan, device=self.device)
            for field in fields:
                full = self.central.gather(name, field)
                self.bytes_moved += full.numel() * full.element_size()
                self.fragments.write(p, take(full, spec), field)
                del full
            if self.has_state and self.twist.optimizer_state == "reset":
                for m in ADAM_MOMENTS:
                    shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
                    self.fragments.write(p, torch.zeros(shape, device=self.device), m)
        if self.has_state:
            self.fragments.set_step(self.central.step if self.twist.optimizer_state == "aggregate" else 0)
        self.correction.apply(plan)
        return self.bytes_moved - before

    def _pinned(self) -> Optional[SubnetPlan]:
        """--twist-pin-cut: the magnitude cut of the sharded central model (twist/pin.py): squared row/column
        norms summed over the data-parallel shards, unit scores over the TP group; the same on every rank."""
        return pinned_plan_of_shards(self.local_plans, self.central, self.twist, self.model_parallel_group)

    @torch.no_grad()
    def close_round(self, steps_taken: int) -> int:
        """Aggregate this round into the central shards; returns the bytes reduce-scattered."""
        before = self.bytes_moved
        plan = self.plans[self.subnet]
        c = self.central
        for name, p in self.module.named_parameters():
            shape = c.shapes[name]
            spec = slice_for(self.geometry, name, plan, device=self.device)
            positions = c.shard_positions(name)
            counts = holder_count_at(self.geometry, name, shape, self.plans, positions)
            for field in self.fields:
                buffer = torch.zeros(c.shard_numel(name) * c.shard_count, device=self.device)
                held = self.fragments.held(p, field)
                if held is not None:
                    start, values = held
                    index = central_flat_index(spec, shape, start, values.numel(), device=self.device)
                    buffer.index_add_(0, index, values)
                total = self._reduce_scatter(buffer)
                shard = c.shards[field][name]
                shard.copy_(torch.where(counts > 0, total / counts.clamp(min=1.0), shard))
        c.step += steps_taken
        c.round += 1
        return self.bytes_moved - before

    def _reduce_scatter(self, buffer: torch.Tensor) -> torch.Tensor:
        self.bytes_moved += buffer.numel() * buffer.element_size()
        return self.central.reduce_scatter(buffer)

    def on_iteration_start(self, iteration: int) -> Optional[int]:
        """Returns the bytes a round closed with (reduce-scatter + all-gather since the last close)."""
        return self.clock.on_iteration_start(iteration)

    def finish(self, iteration: int) -> Optional[int]:
        return self.clock.finish(iteration)
