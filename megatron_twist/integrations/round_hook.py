"""TwIST as a hook on someone else's training loop.

A host loop (Megatron-LM's ``train``, a DeepSpeed engine, a user's own loop)
owns the subnet model, its optimizer and the data; each rank trains ONE
subnet (data parallel ranks = subnets x replicas). The hook only needs to be
told when an iteration starts:

    hook = TwistRoundHook(model_config, twist, groups, central, subnet_module, torch_optimizer)
    for iteration in range(start, train_iters):
        hook.on_iteration_start(iteration)   # at round boundaries: aggregate, resample, refill
        ... host's forward / backward / optimizer step ...
    hook.finish()                            # aggregate the last (possibly partial) round

At a boundary (iteration % local_steps == 0) the previous optimizer step is
complete, so the subnet's weights and Adam moments are scatter-added into the
aggregation buffer, all-reduced over the aggregation group, averaged into the
central model, and the subnet is refilled for the next round's plan. It uses
the same sampler, slicing, aggregation and worker code as ``twist train``, so
a host loop that takes the same steps on the same data reaches the same
central model bit for bit (tested).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, TwistConfig
from ..distributed.full_state import layer_range
from ..distributed.runtime import TwistGroups
from ..optim.optimizer import ADAM_MOMENTS
from ..twist.aggregation import RoundAggregator
from ..twist.central import CentralModel
from ..twist.sampler import SubnetSampler
from ..twist.sharding import local_model_view, local_plan
from ..twist.worker import SubnetState


class TwistRoundHook:
    def __init__(self, model: ModelConfig, twist: TwistConfig, groups: TwistGroups, central: CentralModel,
                 subnet_module: torch.nn.Module, optimizer: torch.optim.Optimizer, worker=None):
        """``worker``: how to read/refill the subnet; default: plain parameters + torch optimizer state
        (the DeepSpeed path uses integrations/zero_round_hook.py instead)."""
        subnets = groups.local_subnets(twist.num_subnets)
        if len(subnets) != 1:
            raise ConfigError(
                f"a host training loop trains one model per rank, but this rank would hold {len(subnets)} subnets; "
                f"launch at least {twist.num_subnets} data-parallel ranks (num_subnets x replicas)"
            )
        self.subnet = subnets[0]
        self.model, self.twist, self.groups, self.central = model, twist, groups, central
        self.sampler = SubnetSampler(model, twist, groups.tp_size)
        self.first_layer, self.num_layers = layer_range(model, groups.pp_rank, groups.pp_size)
        geometry = local_model_view(model, groups.tp_size, self.first_layer, self.num_layers)
        self.worker = worker or SubnetState(subnet_module, optimizer, geometry, twist)
        fields = ("param",) + (ADAM_MOMENTS if twist.optimizer_state == "aggregate" else ())
        device = next(central.module.parameters()).device
        self.aggregator = RoundAggregator(geometry, central.shapes(), fields, device=device)
        self.fields = fields
        self._round_open = False
        self._plans = None

    def _local(self, plan):
        g = self.groups
        return local_plan(plan, self.model, g.tp_rank, g.tp_size, self.first_layer, self.num_layers)

    def _open_round(self) -> None:
        self._plans = [self._local(p) for p in self.sampler.sample(self.central.round)]
        self.aggregator.begin_round(self._plans)
        self.worker.load(self.central, self._plans[self.subnet])
        self._round_open = True

    def _close_round(self, steps_taken: int) -> int:
        """Aggregate this round into the central model; returns bytes all-reduced."""
        before = self.aggregator.bytes_reduced
        self.aggregator.add_subnet(self._plans[self.subnet], self.worker.contribution())
        self.aggregator.all_reduce(self.groups.aggregation_group)
        for field in self.fields:
            target = self.central.params if field == "param" else self.central.moments[field]
            self.aggregator.write_average(field, target)
        self.central.step += steps_taken
        self.central.round += 1
        self._round_open = False
        return self.aggregator.bytes_reduced - before

    def on_iteration_start(self, iteration: int) -> Optional[int]:
        """Call before every optimizer step; returns aggregation bytes when a round just closed."""
        moved = None
        if self._round_open and iteration > self.central.step and iteration % self.twist.local_steps == 0:
            moved = self._close_round(iteration - self.central.step)
        if not self._round_open:
            self._open_round()
        return moved

    def finish(self, iteration: int) -> Optional[int]:
        """Call once after the last step: folds the (possibly partial) last round in."""
        if self._round_open and iteration > self.central.step:
            return self._close_round(iteration - self.central.step)
        return None
