"""Process groups for TwIST and their lifecycle.

Layout: world = tensor (TP) x pipeline (PP) x data parallel (DP) ranks, from
Megatron's ``parallel_state``; DP = subnet slots x replicas (see
:class:`ParallelLayout`). Ranks training the same subnet form a SUBNET group
(gradients averaged every step); ranks at the same TP/PP position and replica
index across subnets form an AGGREGATION group (weights exchanged only at the
end of a round). A single process (no torchrun) is the dp=1 case of the
same code, which is what makes the single-process run a bit-exact reference
for the multi-rank one.

Groups are built once here and passed explicitly to whatever uses them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..config import ConfigError, TwistConfig
from ..cpu_shim import apply_cpu_shim, cuda_absent
from .layout import ParallelLayout, twist_group_members  # pure arithmetic, shared with `twist plan`


@dataclass(frozen=True)
class TwistGroups:
    """This rank's place in the layout and the groups TwIST communicates over.

    subnet_group:       ranks training the same subnet at the same TP/PP position
                        (gradients are averaged among them every step; DeepSpeed's data-parallel
                        group); a single rank without replicas; None when ranks take subnets in turn.
    aggregation_group:  ranks at the same TP/PP position and replica index across subnets;
                        weights are exchanged among them only at the end of a round.
    data_parallel_group: every data-parallel rank at this TP/PP position (subnets x replicas);
                        the DeepSpeed path shards its central model over it.
    model_parallel_group: the TP x PP ranks holding one copy of the model (None at TP = PP = 1);
                        --twist-pin-cut sums its unit scores over it.
    """

    rank: int
    world_size: int
    layout: ParallelLayout
    tp_rank: int
    pp_rank: int
    dp_rank: int
    aggregation_group: Optional[dist.ProcessGroup]
    subnet_group: Optional[dist.ProcessGroup] = None
    data_parallel_group: Optional[dist.ProcessGroup] = None
    model_parallel_group: Optional[dist.ProcessGroup] = None

    @property
    def dp_size(self) -> int:
        return self.layout.data_parallel

    @property
    def tp_size(self) -> int:
        return self.layout.tensor_parallel

    @property
    def pp_size(self) -> int:
        return self.layout.pipeline_parallel

    @property
    def replica_index(self) -> int:
        return self.dp_rank % self.layout.replicas

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def local_subnets(self, num_subnets: int) -> tuple:
        if num_subnets != self.layout.num_subnets:
            raise ConfigError(f"groups were built for {self.layout.num_subnets} subnets, not {num_subnets}")
        if self.layout.data_parallel >= num_subnets:
            return (self.dp_rank // self.layout.replicas,)
        return assign_subnets(num_subnets, self.dp_rank, self.layout.data_parallel)


def assign_subnets(num_subnets: int, dp_rank: int, dp_size: int) -> tuple:
    if num_subnets % dp_size:
        raise ConfigError(
            f"--num-subnets {num_subnets} does not divide over {dp_size} data-parallel ranks; "
            f"use a multiple of {dp_size} subnets or launch {num_subnets} ranks"
        )
    return tuple(s for s in range(num_subnets) if s % dp_size == dp_rank)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def discover_launcher() -> str:
    """Set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for launchers that don't.

    torchrun and the ``deepspeed`` launcher set them. ``srun`` sets SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID (MASTER_ADDR must come from the sbatch script, which
    takes it from ``scontrol show hostnames``). ``mpirun`` sets its own variables: ranks
    are read through mpi4py, and rank 0 chooses MASTER_ADDR (unless set; local runs set
    127.0.0.1) and a free MASTER_PORT, broadcast over MPI. Returns the launcher's name.
    """
    env = os.environ
    if launched_by_torchrun():
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in env:
            raise ConfigError(
                "under srun, export MASTER_ADDR (the first host of `scontrol show hostnames "
                "$SLURM_JOB_NODELIST`) before launching"
            )
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_PORT", "29500")
        return "srun"
    if any(v in env for v in _MPI_RANK_VARS):
        from mpi4py import MPI  # the MPI library that launched us (mpich / Open MPI)

        comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            return "single"
        rank = comm.Get_rank()
        local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        addr, port = None, None
        if rank == 0:
            import socket

            addr = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            port = env.get("MASTER_PORT")
            if port is None:
                with socket.socket() as s:
                    s.bind((addr, 0))
                    port = str(s.getsockname()[1])
        addr, port = comm.bcast((addr, port), root=0)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(comm.Get_size()),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR=addr,
            MASTER_PORT=port,
        )
        return "mpirun"
    return "single"


_timeout_s: Optional[float] = None  # the job's collective timeout, for every group made after init


def collective_timeout() -> Optional[datetime.timedelta]:
    """The timeout given to init_distributed (None before it): Megatron's and TwIST's groups use it too."""
    return None if _timeout_s is None else datetime.timedelta(seconds=_timeout_s)


def init_distributed(timeout_s: float = 300.0) -> None:
    """Create the default process group: from torchrun's env, or a 1-rank group in-process.

    ``timeout_s`` bounds every collective wait (``twist train --distributed-timeout-minutes``), on
    this group and on the groups created later (Megatron's, TwIST's subnet and aggregation groups)."""
    global _timeout_s
    if dist.is_initialized():
        return
    _timeout_s = float(timeout_s)
    backend = "gloo" if cuda_absent() else "nccl"
    if cuda_absent():
        apply_cpu_shim()
    timeout = datetime.timedelta(seconds=timeout_s)
    if discover_launcher() != "single":
        if not cuda_absent():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        # One process, no rendezvous: an in-memory store, nothing listens on any port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def build_twist_groups(
    twist: TwistConfig, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1
) -> TwistGroups:
    """Initialise Megatron's parallel_state and build TwIST's groups on top of it (once).

    Every rank learns every rank's (tp, pp, dp) coordinates with one all-gather,
    so group membership does not depend on Megatron's internal rank order; all
    ranks then create all groups in the same order, as torch.distributed requires.
    """
    world = dist.get_world_size()
    layout = ParallelLayout.for_world(world, twist.num_subnets, tensor_parallel_size, pipeline_parallel_size)
    if not parallel_state.model_parallel_is_initialized():
        _initialize_megatron(tensor_parallel_size, pipeline_parallel_size)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    rank = dist.get_rank()
    dp_group = parallel_state.get_data_parallel_group()
    mp_group = parallel_state.get_model_parallel_group() if tensor_parallel_size * pipeline_parallel_size > 1 else None
    place = dict(rank=rank, world_size=world, layout=layout, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)
    common = dict(place, data_parallel_group=dp_group, model_parallel_group=mp_group)
    if layout.data_parallel < layout.num_subnets:  # subnets taken in turn: no per-subnet group exists
        return TwistGroups(aggregation_group=dp_group, **common)

    coords = all_gather_objects((rank, tp_rank, pp_rank, dp_rank))
    my_subnet_group = my_aggregation_group = None
    for kind, members in twist_group_members(layout, coords):  # the same order on every rank
        g = dist.new_group(members, timeout=collective_timeout())
        if rank in members:
            if kind == "subnet":
                my_subnet_group = g
            else:
                my_aggregation_group = g
    return TwistGroups(aggregation_group=my_aggregation_group, subnet_group=my_subnet_group, **common)


def init_model_parallel(seed: int = 1234, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> None:
    """Megatron's parallel_state plus seeded RNG states: what any model forward needs."""
    from ..cpu_shim import seed_everything

    if not parallel_state.model_parallel_is_initialized():
        _initialize_megatron(tensor_parallel_size, pipeline_parallel_size)
    seed_everything(seed)


def _initialize_megatron(tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    timeout = collective_timeout()
    extra = {} if timeout is None else {"distributed_timeout_minutes": timeout.total_seconds() / 60}
    parallel_state.initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size, **extra)


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


@contextlib.contextmanager
def single_process_group(seed: int = 1234):
    """A one-rank group with Megatron's parallel state, for the tools that run in one process on saved
    models (extract, eval, import-hf); torn down on the way out, whatever happens."""
    init_distributed()
    try:
        init_model_parallel(seed=seed)
        yield
    finally:
        shutdown()
