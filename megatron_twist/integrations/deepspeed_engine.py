"""TwIST on a DeepSpeed engine: the subnet is the engine's model, ZeRO partitions it.

* ``TwistMpu``: DeepSpeed's ``mpu`` protocol over TwIST's groups. Its
  data-parallel group is the SUBNET group (the replicas of one subnet), so
  ZeRO partitions a subnet's master weights and Adam moments over its own
  replicas only, and gradients are reduced among them every step. Model
  parallel is Megatron's tensor-parallel group.
* ``ZeroSubnetWorker``: what the round hook (round_hook.py) needs from a
  worker, through DeepSpeed's public tensor-fragment API
  (``safe_get_full_fp32_param`` / ``safe_set_full_fp32_param`` and the
  optimizer-state variants). ``get`` assembles a parameter over the subnet
  group only (never across subnets: with one rank per subnet it is local);
  ``set`` writes each rank's own fragment from the full value, locally.
  Master weights AND the module's working copy are refilled, so the next
  forward sees the new round's weights at every ZeRO stage.

The frozen-parameter trap (../shared notes): a subnet's optimizer only ever
holds the units of its subnet, so nothing outside it can drift; units of the
central model a subnet does not hold live only in the central model.

DeepSpeed 0.19.8 links optimizer-state fragments lazily after the step of the
FIRST parameter group, before later groups have any state: the fragments of
the second group (no weight decay) stay empty. ``relink_optimizer_state``
links them again after the first step (a documented workaround).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, TwistConfig
from ..distributed.runtime import TwistGroups
from ..training.optim import ADAM_MOMENTS
from ..twist.central import CentralModel
from ..twist.hooks import attach_correction, correction_scales, remove_hooks
from ..twist.sampler import SubnetPlan
from ..twist.slicing import slice_for, take


class TwistMpu:
    """DeepSpeed's model-parallel-unit protocol, with the subnet group as data parallel."""

    def __init__(self, groups: TwistGroups):
        if groups.subnet_group is None:
            raise ValueError("DeepSpeed needs one subnet per data-parallel rank group: launch at least "
                             "num_subnets data-parallel ranks")
        self.groups = groups

    def _tp(self):
        from megatron.core import parallel_state

        return parallel_state

    def get_data_parallel_group(self):
        return self.groups.subnet_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.groups.subnet_group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.groups.subnet_group)

    def get_model_parallel_group(self):
        return self._tp().get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self._tp().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._tp().get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_world_size(self):
        return 1


def relink_optimizer_state(engine) -> None:
    """Link every parameter group's Adam state to the fragments (see module docstring)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _torch_optimizer(engine):
    """The torch optimizer whose per-tensor state holds Adam's step count."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


class ZeroSubnetWorker:
    """Round-hook worker for a DeepSpeed engine (ZeRO stage 0-3)."""

    def __init__(self, engine, model: ModelConfig, twist: TwistConfig, geometry: Optional[ModelConfig] = None):
        self.engine = engine
        self.module = engine.module
        self.model_config = geometry or model
        self.twist = twist
        self.zero_stage = engine.zero_optimization_stage()
        self.plan: Optional[SubnetPlan] = None
        self._hooks: list = []
        self._stepped = False

    # The fragment API needs a ZeRO optimizer; stage 0 keeps plain tensors and torch state.
    def _get(self, p: torch.nn.Parameter, moment: Optional[str] = None) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.zero_stage == 0:
            return (p if moment is None else _torch_optimizer(self.engine).state[p][moment]).detach().float()
        t = safe_get_full_fp32_param(p) if moment is None else safe_get_full_optimizer_state(p, moment)
        return t.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)

    @torch.no_grad()
    def _set(self, p: torch.nn.Parameter, value: torch.Tensor, moment: Optional[str] = None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.zero_stage == 0:
            target = p if moment is None else _torch_optimizer(self.engine).state[p][moment]
            target.copy_(value)
            return
        if moment is None:
            safe_set_full_fp32_param(p, value)  # this rank's fragment of the fp32 master weights
            if self.zero_stage < 3:
                p.data.copy_(value.to(p.dtype))  # the working copy the next forward uses
            else:  # ZeRO-3: the working copy is partitioned too; write this rank's partition
                if p.data.numel() == value.numel():  # persistent (small) params stay whole in p.data
                    p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
                part = p.ds_tensor
                offset = self.engine.mpu.get_data_parallel_rank() * part.numel()
                flat = value.reshape(-1).to(part.dtype)
                n = max(0, min(part.numel(), flat.numel() - offset))
                part.data[:n].copy_(flat[offset: offset + n])
        else:
            safe_set_full_optimizer_state(p, value, moment)

    def mark_state_present(self) -> None:
        """After engine.load_checkpoint: Adam state exists, link it to the fragments."""
        relink_optimizer_state(self.engine)
        self._stepped = True

    def after_first_step(self) -> None:
        if not self._stepped:
            relink_optimizer_state(self.engine)
            self._stepped = True

    @torch.no_grad()
    def load(self, central: CentralModel, plan: SubnetPlan) -> None:
        self.plan = plan
        has_state = self._stepped  # before the first step Adam has no state yet: it starts at zero anyway
        if not has_state and central.step > 0:
            raise NotImplementedError("resuming a DeepSpeed TwIST run from a central checkpoint is not supported yet")
        for name, p in self.module.named_parameters():
            spec = slice_for(self.model_config, name, plan)
            self._set(p, take(central.params[name], spec))
            if has_state:
                for m in ADAM_MOMENTS:
                    value = (take(central.moments[m][name], spec) if self.twist.optimizer_state == "aggregate"
                             else torch.zeros_like(self._get(p, m)))
                    self._set(p, value, m)
        if has_state:
            step = central.step if self.twist.optimizer_state == "aggregate" else 0
            for state in _torch_optimizer(self.engine).state.values():
                if "step" in state:
                    state["step"] = torch.tensor(float(step), dtype=torch.float32) \
                        if isinstance(state["step"], torch.Tensor) else step
        remove_hooks(self._hooks)
        self._hooks = attach_correction(self.module, correction_scales(self.model_config, self.twist, plan))

    def contribution(self) -> Dict[str, Dict[str, torch.Tensor]]:
        out = {"param": {n: self._get(p) for n, p in self.module.named_parameters()}}
        if self.twist.optimizer_state == "aggregate":
            for m in ADAM_MOMENTS:
                out[m] = {n: self._get(p, m) for n, p in self.module.named_parameters()}
        return out
