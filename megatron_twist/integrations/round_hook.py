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

The host's optimizer runs at the subnets' learning rate, ``--lr`` x ``twist.lr_scale`` (peak and floor;
optim/optimizer.py's ``build_scheduler(optimizer, train, twist.lr_scale)``); the Megatron-LM adapter
sets it on the optimizer Megatron-LM built.

At a boundary (iteration % local_steps == 0) the previous optimizer step is
complete, so the subnet's weights and Adam moments are scatter-added into the
aggregation buffer, all-reduced over the aggregation group, averaged into the
central model, and the subnet is refilled for the next round's plan. The hook
is twist/rounds.py's ``RoundClock`` (when) driving its ``ReplicatedRound`` (what)
on a twist/worker.py ``SubnetState`` - the round code ``twist train`` runs - so
a host loop that takes the same steps on the same data reaches the same
central model bit for bit (tested).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, TwistConfig
from ..distributed.full_state import layer_range
from ..distributed.runtime import TwistGroups
from ..twist.central import CentralModel
from ..twist.rounds import LocalPlans, ReplicatedRound, RoundClock
from ..twist.worker import SubnetState


class TwistRoundHook:
    def __init__(
        self,
        model: ModelConfig,
        twist: TwistConfig,
        groups: TwistGroups,
        central: CentralModel,
        subnet_module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        worker=None,
        compute_module: Optional[torch.nn.Module] = None,
    ):
        """``worker``: how to read/refill the subnet (``load(central, plan)``, ``contribution()``);
        default: a ``SubnetState`` over plain parameters + torch optimizer state (the DeepSpeed path
        uses integrations/zero_round_hook.py instead). ``compute_module``: the module that runs forward
        when ``subnet_module`` holds fp32 master weights of a bf16 one (the correction hooks go on it)."""
        subnets = groups.local_subnets(twist.num_subnets)
        if len(subnets) != 1:
            raise ConfigError(
                f"a host training loop trains one model per rank, but this rank would hold {len(subnets)} subnets; "
                f"launch at least {twist.num_subnets} data-parallel ranks (num_subnets x replicas)"
            )
        self.subnet = subnets[0]
        self.model, self.twist, self.groups, self.central = model, twist, groups, central
        self.first_layer, self.num_layers = layer_range(model, groups.pp_rank, groups.pp_size)
        plans = LocalPlans(model, twist, groups.tp_rank, groups.tp_size, self.first_layer, self.num_layers)
        self.sampler = plans.sampler
        self.worker = worker or SubnetState(subnet_module, optimizer, plans.geometry, twist, compute_module)
        self.round = ReplicatedRound(plans, central, twist, groups.aggregation_group, groups.model_parallel_group)
        self.aggregator, self.fields = self.round.aggregator, self.round.fields
        self.clock = RoundClock(central, twist.local_steps, self)

    def open_round(self) -> int:
        """Draw the round's plans and refill this rank's subnet (no communication: 0 bytes)."""
        self.round.open()
        self.round.refill(self.worker, self.subnet)
        return 0

    def close_round(self, steps_taken: int) -> int:
        """Aggregate this round into the central model; returns bytes all-reduced."""
        self.round.contribute(self.worker, self.subnet)
        return self.round.close(steps_taken)

    def on_iteration_start(self, iteration: int) -> Optional[int]:
        """Call before every optimizer step; returns aggregation bytes when a round just closed."""
        return self.clock.on_iteration_start(iteration)

    def finish(self, iteration: int) -> Optional[int]:
        """Call once after the last step: folds the (possibly partial) last round in."""
        return self.clock.finish(iteration)
