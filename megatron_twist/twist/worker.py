"""A materialized subnet: a physically smaller Megatron-core GPTModel.

Two parts, because a host training loop (Megatron-LM, a user's loop) owns the
training step but not TwIST's round boundary:

* ``SubnetState``: moves a subnet's state from and to the central model -
  weights, Adam moments and step according to the optimizer-state policy,
  and the activation correction of the round's plan. It needs only the
  module and its torch optimizer, whoever built them.
* ``SubnetWorker``: what ``twist train`` adds - it builds the module (once
  per rank: every subnet of every round has the same sizes, see sampler.py),
  its optimizer and LR schedule, and takes training steps. A rank that trains
  several subnets in turn reuses the same model and optimizer.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import ModelConfig, TrainConfig, TwistConfig
from ..model.gpt import build_gpt_model
from ..optim.distill import Teacher
from ..optim.optimizer import (
    ADAM_MOMENTS,
    build_optimizer,
    build_scheduler,
    read_adam_state,
    write_adam_param_state,
)
from ..optim.step import StepParallelism, train_step
from .central import CentralModel
from .hooks import CorrectionHooks
from .sampler import SubnetPlan
from .slicing import slice_for, take


class SubnetState:
    """A subnet module + its torch optimizer, refilled from and read back into the central model.

    ``geometry`` is this rank's TP shard / PP stage of the central model (how to slice), see
    twist/sharding.py; plans are in its local indices.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        geometry: ModelConfig,
        twist: TwistConfig,
        compute_module: Optional[torch.nn.Module] = None,
    ):
        """``compute_module``: the module that runs forward, when it is not ``module`` (a bf16 twin of the
        fp32 masters, optim/step.py); the activation correction hooks go on it."""
        self.module, self.optimizer, self.geometry, self.twist = module, optimizer, geometry, twist
        self.plan: SubnetPlan = None
        self.hooks = CorrectionHooks(compute_module if compute_module is not None else module, geometry, twist)

    @torch.no_grad()
    def load(self, central: CentralModel, plan: SubnetPlan) -> None:
        """Refill weights (and moments) from the central model for ``plan``."""
        self.plan = plan
        aggregate = self.twist.optimizer_state == "aggregate"
        step = central.step if aggregate else 0
        group_of = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        for name, p in self.module.named_parameters():  # one tensor at a time: no subnet-sized transient
            source = central.params[name]
            spec = slice_for(self.geometry, name, plan, device=source.device)
            p.copy_(take(source, spec))
            moments = {
                # 'reset': every round starts from fresh moments
                m: take(central.moments[m][name], spec) if aggregate else torch.zeros_like(p, dtype=torch.float32)
                for m in ADAM_MOMENTS
            }
            write_adam_param_state(self.optimizer, p, moments, step, group_of)
        self.hooks.apply(plan)

    def contribution(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """What this subnet hands to aggregation: weights, and moments if they are aggregated."""
        out = {"param": dict(self.module.named_parameters())}
        if self.twist.optimizer_state == "aggregate":
            out.update(read_adam_state(self.optimizer, self.module))
        return out


class SubnetWorker:
    """``model`` and ``layer_sizes`` are global (what to build); ``geometry`` is this rank's
    TP shard / PP stage of the central model (how to slice), see twist/sharding.py."""

    def __init__(
        self,
        model: ModelConfig,
        twist: TwistConfig,
        train: TrainConfig,
        layer_sizes,
        geometry: ModelConfig = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        parallel: StepParallelism = None,
        num_microbatches: int = 1,
        teacher: Optional[Teacher] = None,
    ):
        """``teacher``: distil from it in every step (optim/distill.py)."""
        self.model_config = geometry or model
        self.teacher = teacher
        self.twist = twist
        self.train = train
        self.parallel = parallel
        self.num_microbatches = num_microbatches  # per optimizer step (optim/step.py)
        layout = dict(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
        # fp32: the weights the optimizer steps and the round refills and reads (the masters under --bf16)
        self.module = build_gpt_model(model, layer_sizes, **layout)
        # --bf16: a bf16 twin runs forward and backward (optim/step.py); None: the fp32 module does
        self.compute = None
        if train.bf16:
            # .bfloat16() as Megatron's Float16Module does: the torch norms make fp32 weights whatever params_dtype
            self.compute = build_gpt_model(model, layer_sizes, params_dtype=torch.bfloat16, **layout).bfloat16()
        self.optimizer = build_optimizer(self.module, train)
        self.scheduler = build_scheduler(self.optimizer, train, twist.lr_scale)
        self.state = SubnetState(self.module, self.optimizer, self.model_config, twist, self.compute)

    @property
    def plan(self) -> SubnetPlan:
        return self.state.plan

    def load(self, central: CentralModel, plan: SubnetPlan) -> None:
        """Refill weights (and moments) from the central model for ``plan`` (in this rank's local indices)."""
        self.state.load(central, plan)

    def step(self, batch: Dict[str, torch.Tensor], global_step: int) -> float:
        """One optimizer step; returns the loss, and leaves the gradient norm in ``last_grad_norm``."""
        stats = {}
        loss = train_step(
            self.module,
            self.optimizer,
            self.scheduler,
            batch,
            global_step,
            self.train.clip_grad,
            self.parallel,
            stats=stats,
            num_microbatches=self.num_microbatches,
            compute=self.compute,
            teacher=self.teacher,
        )
        self.last_grad_norm = stats["grad_norm"]
        return loss

    def contribution(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """What this subnet hands to aggregation: weights, and moments if they are aggregated."""
        return self.state.contribution()
