"""TwIST on a DeepSpeed engine: the subnet is the engine's model, ZeRO partitions it.

* ``TwistMpu``: DeepSpeed's ``mpu`` protocol over TwIST's groups. Its
  data-parallel group is the SUBNET group (the replicas of one subnet), so
  ZeRO partitions a subnet's master weights and Adam moments over its own
  replicas only, and gradients are reduced among them every step. Model
  parallel is Megatron's tensor-parallel group: the engine's model is this
  rank's TP shard of the subnet (Megatron-core's ColumnParallel /
  RowParallel layers do their own TP communication in forward and
  backward), and DeepSpeed's gradient norm for clipping counts a parameter
  Megatron marks ``tensor_model_parallel`` on every TP rank and a replicated
  one (norms) on TP rank 0 only, summed over this group: the Megatron path's
  rule (optim/step.py). Pipeline parallelism is not offered (the engine runs
  its model's whole forward and backward in one call; config.py
  ``DEEPSPEED_NO_PP``).
* ``EngineFragments``: which part of each subnet parameter THIS rank holds,
  and how to write it, at every ZeRO stage, through DeepSpeed's tensor
  fragment API:
    - ZeRO 1/2 (and the bf16 optimizer): ``param._hp_mapping``, the
      fragment of the flattened parameter in this rank's partition
      (``lp_fragment_address``: start, numel) with its fp32 master copy
      (``get_hp_fragment``) and Adam state (``get_optim_state_fragment``);
    - ZeRO 3: ``safe_get/set_local_fp32_param`` and
      ``safe_get/set_local_optimizer_state``, the rank's partition
      [q*ps, (q+1)*ps) of each parameter, q = rank in the subnet group;
    - ZeRO 0 (plain tensors, torch optimizer state): every replica holds the
      whole parameter; replica q contributes the q-th of R equal ranges so
      each element is still contributed once.
  The round hook (zero_round_hook.py) aggregates these fragments straight
  into the sharded central model: no rank assembles a full parameter of its
  subnet, let alone the full model, to aggregate.

The frozen-parameter trap (../shared notes): a subnet's optimizer only ever
holds the units of its subnet, so nothing outside it can drift; units of the
central model a subnet does not hold live only in the central model.

DeepSpeed 0.19.8 links optimizer-state fragments lazily after the step of the
FIRST parameter group, before later groups have any state: the fragments of
the second group (no weight decay) stay empty. ``relink_optimizer_state``
links them again after the first step (a documented workaround).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..distributed.runtime import TwistGroups


class TwistMpu:
    """DeepSpeed's model-parallel-unit protocol, with the subnet group as data parallel."""

    def __init__(self, groups: TwistGroups):
        if groups.subnet_group is None:
            raise ValueError(
                "DeepSpeed needs one subnet per data-parallel rank group: launch at least "
                "num_subnets data-parallel ranks"
            )
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
        return 1  # refused before any work at PP > 1 (config.DEEPSPEED_NO_PP)

    def get_pipeline_model_parallel_rank(self):
        return 0


def relink_optimizer_state(engine) -> None:
    """Link every parameter group's Adam state to the fragments (see module docstring)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def torch_optimizer(engine):
    """The torch optimizer whose per-tensor state holds Adam's step count."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


class EngineFragments:
    """This rank's fragments of the engine's parameters (weights and Adam moments), ZeRO stage 0-3."""

    def __init__(self, engine):
        self.engine = engine
        self.zero_stage = engine.zero_optimization_stage()
        mpu = engine.mpu
        self.replica_rank = mpu.get_data_parallel_rank()
        self.replicas = mpu.get_data_parallel_world_size()

    @staticmethod
    def _kind(p: torch.nn.Parameter) -> str:
        if hasattr(p, "ds_id"):
            return "zero3"
        if hasattr(p, "_hp_mapping"):
            return "fragment"
        return "whole"

    def _whole_range(self, numel: int):
        chunk = -(-numel // self.replicas)
        start = min(numel, self.replica_rank * chunk)
        return start, min(numel, start + chunk) - start

    def _zero3_range(self, p):
        ps = p.ds_tensor.numel()
        start = min(p.ds_numel, self.replica_rank * ps)
        return start, min(p.ds_numel, start + ps) - start

    def held(self, p: torch.nn.Parameter, field: str = "param") -> Optional[Tuple[int, torch.Tensor]]:
        """(start, values) of the range of flattened ``p`` (or of its Adam moment ``field``) that this
        rank contributes; None if it holds none of it."""
        kind = self._kind(p)
        if kind == "fragment":
            mapping = p._hp_mapping
            if mapping is None:
                return None
            values = mapping.get_hp_fragment() if field == "param" else mapping.get_optim_state_fragment(field)
            return mapping.lp_fragment_address.start, values.detach().reshape(-1).float()
        if kind == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            start, n = self._zero3_range(p)
            part = safe_get_local_fp32_param(p) if field == "param" else safe_get_local_optimizer_state(p, field)
            return (start, part.detach().reshape(-1)[:n].float()) if n > 0 else None
        full = p if field == "param" else torch_optimizer(self.engine).state[p][field]
        start, n = self._whole_range(p.numel())
        return (start, full.detach().reshape(-1)[start : start + n].float()) if n > 0 else None

    @torch.no_grad()
    def write(self, p: torch.nn.Parameter, value: torch.Tensor, field: str = "param") -> None:
        """Set ``p`` (or its Adam moment ``field``) to ``value`` (full subnet shape): this rank's
        fragment of the fp32 master copy / state, and the working copy the next forward uses."""
        kind = self._kind(p)
        flat = value.reshape(-1).float()
        if kind == "whole":
            target = p if field == "param" else torch_optimizer(self.engine).state[p][field]
            target.copy_(value.reshape(target.shape))
            return
        if kind == "fragment":
            if field == "param":
                p.data.copy_(value.reshape(p.shape).to(p.dtype))  # ZeRO 1/2 keep the working copy whole
            mapping = p._hp_mapping
            if mapping is not None:
                a = mapping.lp_fragment_address
                target = mapping.get_hp_fragment() if field == "param" else mapping.get_optim_state_fragment(field)
                target.copy_(flat[a.start : a.start + a.numel])
            return
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        start, n = self._zero3_range(p)
        part = torch.zeros(p.ds_tensor.numel(), device=p.ds_tensor.device)  # on the partition it fills
        part[:n].copy_(flat[start : start + n])
        if field == "param":
            safe_set_local_fp32_param(p, part)
            p.ds_tensor.data.copy_(part.to(p.ds_tensor.dtype))  # the partitioned working copy
            if p.data.numel() == flat.numel():  # a persistent (small) parameter stays whole in p.data
                p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
        else:
            safe_set_local_optimizer_state(p, part, field)

    def set_step(self, step: int) -> None:
        """Adam's step count (bias correction) in every state of the torch optimizer, kept where the
        optimizer keeps it (torch: the CPU, or the parameter's device when fused / capturable)."""
        for state in torch_optimizer(self.engine).state.values():
            if "step" in state:
                old = state["step"]
                state["step"] = (
                    torch.tensor(float(step), dtype=torch.float32, device=old.device)
                    if isinstance(old, torch.Tensor)
                    else step
                )
