"""Process groups for TwIST and their lifecycle.

Layout (this release: tensor and pipeline parallel size 1): the data-parallel
ranks of Megatron's ``parallel_state`` each train ``num_subnets / dp`` subnets
in turn; subnet ``s`` lives on data-parallel rank ``s % dp``. All
data-parallel ranks form the AGGREGATION group: they exchange weights only at
the end of a round. A single process (no torchrun) is the dp=1 case of the
same code, which is what makes the single-process run a bit-exact reference
for the multi-rank one.

Groups are built once here and passed explicitly to whatever uses them.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..config import ConfigError, TwistConfig
from ..cpu_shim import apply_cpu_shim, cuda_absent


@dataclass(frozen=True)
class TwistGroups:
    """Who trains which subnet and who exchanges weights at aggregation."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    aggregation_group: Optional[dist.ProcessGroup]

    def local_subnets(self, num_subnets: int) -> tuple:
        return assign_subnets(num_subnets, self.dp_rank, self.dp_size)

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def assign_subnets(num_subnets: int, dp_rank: int, dp_size: int) -> tuple:
    if num_subnets % dp_size:
        raise ConfigError(
            f"--num-subnets {num_subnets} does not divide over {dp_size} data-parallel ranks; "
            f"use a multiple of {dp_size} subnets or launch {num_subnets} ranks"
        )
    return tuple(s for s in range(num_subnets) if s % dp_size == dp_rank)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float = 300.0) -> None:
    """Create the default process group: from torchrun's env, or a 1-rank group in-process."""
    if dist.is_initialized():
        return
    backend = "gloo" if cuda_absent() else "nccl"
    if cuda_absent():
        apply_cpu_shim()
    timeout = datetime.timedelta(seconds=timeout_s)
    if launched_by_torchrun():
        if not cuda_absent():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        # One process, no rendezvous: an in-memory store, nothing listens on any port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def build_twist_groups(twist: TwistConfig, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> TwistGroups:
    """Initialise Megatron's parallel_state and derive TwIST's groups from it."""
    if tensor_parallel_size != 1 or pipeline_parallel_size != 1:
        raise ConfigError("this release runs TwIST with tensor and pipeline parallel size 1")
    world = dist.get_world_size()
    # Validate before creating any group so a bad layout costs nothing.
    assign_subnets(twist.num_subnets, 0, world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size)
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    return TwistGroups(
        rank=dist.get_rank(),
        world_size=world,
        dp_rank=dp_rank,
        dp_size=dp_size,
        aggregation_group=dp_group,
    )


def init_model_parallel(seed: int = 1234, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> None:
    """Megatron's parallel_state plus seeded RNG states: what any model forward needs."""
    from ..cpu_shim import seed_everything

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size)
    seed_everything(seed)


def all_gather_objects(obj, group=None) -> List:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def shutdown() -> None:
    """Explicit teardown: without it ~7% of 2-rank gloo runs abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
