"""Parallel layouts as pure arithmetic: no torch, no process group.

* :class:`ParallelLayout`: world = TP x PP x DP, DP = subnet slots x replicas,
  validated from the world size alone (before any group exists);
* :func:`check_model_layout`: does a model split over TP x PP at this keep ratio;
* :func:`twist_group_members`: which global ranks form every subnet group and
  every aggregation group, given every rank's (tp, pp, dp) coordinates.

``distributed/runtime.py`` builds the real process groups from these, and
``planning/`` (``twist plan``) uses them to check a layout on a laptop, so
the two can never disagree. Imports nothing heavier than ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

from ..config import ConfigError, ModelConfig, TwistConfig


@dataclass(frozen=True)
class ParallelLayout:
    """world = tensor x pipeline x data parallel; data parallel = subnet slots x replicas.

    With at least as many data-parallel ranks as subnets, each subnet is trained
    by ``replicas = dp / num_subnets`` ranks (ordinary data parallel among them).
    With fewer, each rank trains ``num_subnets / dp`` subnets in turn.
    """

    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    num_subnets: int

    @property
    def replicas(self) -> int:
        return max(1, self.data_parallel // self.num_subnets)

    @property
    def subnets_per_rank(self) -> int:
        return max(1, self.num_subnets // self.data_parallel)

    @classmethod
    def for_world(
        cls, world_size: int, num_subnets: int, tensor_parallel: int = 1, pipeline_parallel: int = 1
    ) -> "ParallelLayout":
        """Validate a layout before any group exists; the error says how to fix it."""
        mp = tensor_parallel * pipeline_parallel
        if tensor_parallel < 1 or pipeline_parallel < 1:
            raise ConfigError("tensor and pipeline parallel sizes must be at least 1")
        if world_size % mp:
            raise ConfigError(
                f"{world_size} ranks do not divide into tensor parallel {tensor_parallel} x pipeline parallel "
                f"{pipeline_parallel}; launch a multiple of {mp} ranks"
            )
        dp = world_size // mp
        if dp >= num_subnets and dp % num_subnets:
            raise ConfigError(
                f"{dp} data-parallel ranks do not divide into {num_subnets} subnets; launch "
                f"{mp * num_subnets * max(1, dp // num_subnets)} ranks or use a number of subnets that divides {dp}"
            )
        if dp < num_subnets and num_subnets % dp:
            raise ConfigError(
                f"--num-subnets {num_subnets} does not divide over {dp} data-parallel ranks; "
                f"use a multiple of {dp} subnets or launch {num_subnets * mp} ranks"
            )
        return cls(tensor_parallel, pipeline_parallel, dp, num_subnets)


def check_model_layout(
    model: ModelConfig, twist: TwistConfig, tensor_parallel_size: int, pipeline_parallel_size: int
) -> None:
    """Refuse a model that cannot be split over the parallel layout (before any work)."""
    twist.check_against_model(model, tensor_parallel_size)
    if model.vocab_size % tensor_parallel_size:
        raise ConfigError(
            f"vocabulary {model.vocab_size} does not divide over tensor parallel size "
            f"{tensor_parallel_size}; use a vocabulary size that is a multiple of it"
        )
    if model.num_layers % pipeline_parallel_size:
        raise ConfigError(
            f"{model.num_layers} layers do not divide over pipeline parallel size "
            f"{pipeline_parallel_size}; use a layer count that is a multiple of it"
        )
    if pipeline_parallel_size > 1 and model.family == "gpt2":
        raise ConfigError(
            "the gpt2 family ties embedding and output weights, which this release does not "
            "support across pipeline stages; use pipeline parallel size 1 or the llama family"
        )


Coordinates = Tuple[int, int, int, int]  # (global rank, tp rank, pp rank, dp rank)


def twist_group_members(layout: ParallelLayout, coords: Iterable[Coordinates]) -> List[Tuple[str, List[int]]]:
    """Every subnet and aggregation group as ``(kind, [global ranks])``, in creation order.

    ``coords`` holds every rank's (rank, tp_rank, pp_rank, dp_rank), as Megatron's
    parallel_state reports them. For each TP/PP position (sorted by (pp, tp)), the
    subnet groups come first (subnet s: dp ranks ``s*R .. s*R+R-1``, R = replicas),
    then the aggregation groups (replica r: dp ranks ``r, R + r, 2R + r, ...``).
    Every rank must create groups in the same order; ``build_twist_groups`` walks
    this list. Empty when ranks take subnets in turn (DP < subnets): the
    aggregation group is then Megatron's data-parallel group and no subnet group exists.
    """
    if layout.data_parallel < layout.num_subnets:
        return []
    by_position = {}
    for r, t, p, d in coords:
        by_position.setdefault((p, t), {})[d] = r
    n, reps = layout.num_subnets, layout.replicas
    out: List[Tuple[str, List[int]]] = []
    for position in sorted(by_position):
        ranks_by_dp = by_position[position]
        if sorted(ranks_by_dp) != list(range(layout.data_parallel)):
            raise ValueError(
                f"TP/PP position {position} has data-parallel ranks {sorted(ranks_by_dp)}, "
                f"expected 0..{layout.data_parallel - 1}"
            )
        for s in range(n):  # replicas of one subnet
            out.append(("subnet", [ranks_by_dp[s * reps + r] for r in range(reps)]))
        for r in range(reps):  # one replica of every subnet
            out.append(("aggregation", [ranks_by_dp[s * reps + r] for s in range(n)]))
    return out


def groups_of(rank: int, members: Sequence[Tuple[str, List[int]]]) -> dict:
    """{kind: members} of the groups ``rank`` belongs to (one of each kind)."""
    return {kind: list(m) for kind, m in members if rank in m}


__all__ = ["ParallelLayout", "check_model_layout", "twist_group_members", "groups_of"]
