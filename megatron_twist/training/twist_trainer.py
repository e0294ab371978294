"""The TwIST loop: sample -> refill -> local steps -> aggregate, round after round.

Control flow of one round r (docs/ARCHITECTURE.md has the picture):
1. every rank draws the plans of ALL subnets for round r (no communication);
2. for each subnet s this rank owns: refill the materialized worker from the
   central model, take ``local_steps`` optimizer steps on subnet s's data,
   scatter-add its weights (and moments) into the aggregation buffer;
3. one all-reduce of the buffer over the aggregation group;
4. every rank writes the per-unit averages into its central copy.
Steps 1, 3 and 4 and the refill are twist/rounds.py's ``ReplicatedRound``, shared with the host-loop
hook (integrations/round_hook.py); this loop adds the local steps, the data and the non-finite checks.

Non-finite subnets (docs/ARCHITECTURE.md "Reliability"): a subnet whose loss or gradient norm is
not finite stops for the rest of its round and adds nothing to the buffer; one small all-reduce
(MAX, over all ranks) of a per-subnet flag vector makes every rank leave the same subnets out of
the holder counts. ``--nonfinite-policy skip`` (default) goes on with the others; ``stop`` raises
:class:`NonFiniteError` with the central model as it was before the round; if every subnet of a
round is non-finite, both policies stop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .. import faults
from ..config import ModelConfig, TrainConfig, TrainingError, TwistConfig
from ..cpu_shim import seed_everything
from ..data.batches import BatchSource
from ..distributed.full_state import layer_range
from ..distributed.layout import check_model_layout  # noqa: F401  (re-exported: cli, tests)
from ..distributed.runtime import TwistGroups
from ..distributed.sharded_central import ShardedCentral
from ..distributed.sharded_round import ShardedRound
from ..model.gpt import build_gpt_model, count_parameters
from ..optim.step import StepParallelism, pipeline_bubble
from ..twist.central import CentralModel
from ..twist.rounds import LocalPlans, ReplicatedRound
from ..twist.worker import SubnetWorker


@dataclass
class RoundRecord:
    round: int
    first_step: int
    steps: int
    losses: List[List[float]]  # [subnet][local step], complete on every rank
    seconds: float
    tokens: int
    aggregation_bytes: int  # payload this rank all-reduced at aggregation (counted at the collective)
    dense_dp_bytes: int  # what dense data parallel would all-reduce in the same steps (gradients, every step)
    excluded: List[int] = field(default_factory=list)  # non-finite subnets left out of the aggregation

    def mean_loss(self) -> float:
        """Mean over subnets and steps; an excluded subnet's NaN entries are left out."""
        flat = [x for row in self.losses for x in row if math.isfinite(x)]
        return sum(flat) / len(flat) if flat else math.nan


class NonFiniteError(TrainingError):
    """A round's subnets became non-finite and the policy (or their number) says stop."""


@dataclass
class TrainResult:
    """What a trainer's ``run()`` returns (both engines)."""

    central: object  # CentralModel, or the DeepSpeed path's ShardedCentral
    rounds: List[RoundRecord] = field(default_factory=list)  # the Megatron path's round records
    losses: List[float] = field(default_factory=list)  # the DeepSpeed path: this rank's per-step losses

    def loss_curve(self) -> List[float]:
        """Mean loss over subnets at each global step."""
        out = []
        for r in self.rounds:
            for t in range(r.steps):
                finite = [row[t] for row in r.losses if math.isfinite(row[t])]
                out.append(sum(finite) / len(finite) if finite else math.nan)
        return out


def build_central(
    model: ModelConfig, seed: int, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1
) -> CentralModel:
    # Same seed on every rank before building: CPU init draws from the default RNG.
    seed_everything(seed)
    return CentralModel(
        model,
        build_gpt_model(
            model, tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size
        ),
    )


def build_sharded_central(
    model: ModelConfig, seed: int, group, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1
) -> ShardedCentral:
    """``build_central``'s weights, kept as this rank's 1/DP shard (--twist-shard-central). Only the
    module's fp32 weights exist in full, briefly; the Adam moments start as zero shards."""
    seed_everything(seed)
    module = build_gpt_model(
        model, tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size
    )
    device = next(module.parameters()).device
    return ShardedCentral.from_full(model, dict(module.named_parameters()), group, device=device)


class TwistTrainer:
    def __init__(
        self,
        model: ModelConfig,
        twist: TwistConfig,
        train: TrainConfig,
        groups: TwistGroups,
        batches: BatchSource,
        central: Optional[CentralModel] = None,
        log: Callable[[str], None] = print,
        watchdog=None,
        checkpointer=None,
        metrics=None,
        teacher=None,
    ):
        """``checkpointer`` (checkpoint/manager.py) saves at round ends and at the end; ``metrics``
        (training/metrics.py) gets the run's record on the logging rank; both optional."""
        self.model_config, self.twist, self.train, self.groups = model, twist, train, groups
        self.watchdog = watchdog  # distributed/watchdog.py: told the step, for the heartbeat
        self.checkpointer, self.metrics = checkpointer, metrics
        self.batches = batches
        self.log = log if groups.is_logging_rank else (lambda _msg: None)
        tp, pp = groups.tp_size, groups.pp_size
        check_model_layout(model, twist, tp, pp)
        self.local_subnets = groups.local_subnets(twist.num_subnets)
        # This rank's shard of every model: TP shard tp_rank, PP stage pp_rank (twist/sharding.py).
        self.first_layer, self.num_local_layers = layer_range(model, groups.pp_rank, pp)
        self.local_plans = LocalPlans(model, twist, groups.tp_rank, tp, self.first_layer, self.num_local_layers)
        self.sampler, self.geometry = self.local_plans.sampler, self.local_plans.geometry
        self.central = central if central is not None else build_central(model, train.seed, tp, pp)
        self.num_microbatches = train.microbatches(groups.layout.replicas)
        self.worker = SubnetWorker(
            model,
            twist,
            train,
            self.sampler.subnet_layer_sizes(),
            geometry=self.geometry,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            parallel=step_parallelism(groups),
            num_microbatches=self.num_microbatches,
            teacher=teacher,  # --distill-teacher (optim/distill.py)
        )
        if isinstance(self.central, ShardedCentral):  # --twist-shard-central: 1/DP of it on this rank
            self.device = self.central.device
            self.round = ShardedRound(
                self.local_plans, self.central, twist, groups.replica_index, groups.model_parallel_group
            )
        else:
            self.device = next(self.central.module.parameters()).device
            self.round = ReplicatedRound(
                self.local_plans, self.central, twist, groups.aggregation_group, groups.model_parallel_group
            )
        self.aggregator = getattr(self.round, "aggregator", None)  # the replicated round's buffer
        self.fields = self.round.fields

    def describe(self) -> str:
        sharded = isinstance(self.central, ShardedCentral)
        full = self.central.num_parameters() if sharded else count_parameters(self.central.module)
        sub = count_parameters(self.worker.module)
        return (
            f"[twist] central {full:,} params | subnet {sub:,} params ({sub / full:.2f}x) | "
            f"{self.twist.num_subnets} subnets, kappa {self.twist.keep_ratio}, {self.twist.local_steps} local steps | "
            f"rank {self.groups.rank}/{self.groups.world_size} trains subnets {list(self.local_subnets)} | "
            f"aggregation payload {self.round.payload_bytes() / 2**20:.1f} MiB per round"
            + (f" (central model sharded over {self.central.shard_count} data-parallel ranks)" if sharded else "")
            + " | "
            f"{self.num_microbatches} micro-batch(es) of {self.train.micro_batch_size} per step"
            + (
                f", pipeline bubble {pipeline_bubble(self.groups.pp_size, self.num_microbatches):.0%} (1F1B)"
                if self.groups.pp_size > 1
                else ""
            )
        )

    def local(self, plan):
        """``plan`` in this rank's TP shard / PP stage indices."""
        return self.local_plans.local(plan)

    def full_central_state(self):
        """(weights, moments) of the whole central model, gathered over TP/PP (a collective)."""
        from megatron.core import parallel_state

        from ..distributed.full_state import gather_full_state

        g = self.groups
        if isinstance(self.central, ShardedCentral):
            params, moments = self.central.full_state()  # gathered over data parallel (at save time only)
        else:
            params, moments = dict(self.central.params), self.central.moments
        if g.tp_size == 1 and g.pp_size == 1:
            return params, moments
        tp_group = parallel_state.get_tensor_model_parallel_group() if g.tp_size > 1 else None
        pp_group = parallel_state.get_pipeline_model_parallel_group() if g.pp_size > 1 else None

        def gather(tensors):
            return gather_full_state(
                tensors, self.model_config, g.tp_rank, g.tp_size, self.first_layer, tp_group, pp_group
            )

        return gather(params), {m: gather(t) for m, t in moments.items()}

    def run_round(self) -> RoundRecord:
        central, twist = self.central, self.twist
        first = central.step
        steps = min(twist.local_steps, self.train.train_iters - first)
        self.round.open()
        # on the model's device: NCCL reduces only CUDA tensors
        losses = torch.zeros(twist.num_subnets, steps, dtype=torch.float64, device=self.device)
        # 1 + the step at which a subnet became non-finite; 0: finite (agreed over all ranks below)
        bad_at = torch.zeros(twist.num_subnets, dtype=torch.float64, device=self.device)
        t0 = time.perf_counter()
        for s in self.local_subnets:
            self.round.refill(self.worker, s)
            # Replicas of a subnet read disjoint data (slot s * replicas + replica).
            reps = self.groups.layout.replicas
            slot, num_slots = s * reps + self.groups.replica_index, twist.num_subnets * reps
            for t in range(steps):
                if self.watchdog is not None:
                    self.watchdog.beat(first + t)
                faults.at_step(self.groups.rank, first + t)
                batch = self.batches.get(first + t, slot, num_slots)
                undo = faults.poison_subnet(self.worker.module, s, first + t)
                loss = self.worker.step(batch, first + t)
                if undo is not None:
                    undo()
                losses[s, t] = loss
                if not math.isfinite(loss) and not bad_at[s]:
                    bad_at[s] = first + t + 1  # excluded; rank-local (replicas see their own loss)
                if not math.isfinite(self.worker.last_grad_norm):
                    # The gradient norm is the same on every rank of this subnet (TP/PP-global, after
                    # replica averaging), so they all leave the loop here together: no collective
                    # inside a step is left unmatched.
                    bad_at[s] = bad_at[s] or first + t + 1
                    losses[s, t + 1 :] = math.nan
                    break
            # a collective on a sharded central model: every rank contributes, a non-finite subnet zeros
            self.round.contribute(self.worker, s, valid=not bad_at[s])
        excluded = self._agree_on_nonfinite(bad_at, central.round)
        moved = self.round.close(steps)
        if self.groups.world_size > 1:
            # Each rank filled in only its own subnets' losses; a sum completes the table.
            dist.all_reduce(losses, group=self.groups.aggregation_group)
        seconds = time.perf_counter() - t0
        tokens = (
            steps
            * twist.num_subnets
            * self.groups.layout.replicas
            * self.train.micro_batch_size
            * self.num_microbatches
            * self.model_config.seq_length
        )
        dense_dp = 0
        if self.groups.dp_size > 1:  # dense DP all-reduces this rank's gradient shard at every step
            shapes = central.shapes if isinstance(central, ShardedCentral) else central.shapes()
            dense_dp = steps * sum(4 * s.numel() for s in shapes.values())  # fp32 gradients
        return RoundRecord(central.round - 1, first, steps, losses.tolist(), seconds, tokens, moved, dense_dp, excluded)

    def _agree_on_nonfinite(self, bad_at: torch.Tensor, round_index: int) -> List[int]:
        """Every rank learns which subnets went non-finite (MAX over all ranks), applies the policy,
        and drops them from the holder counts. Returns the excluded subnets."""
        if self.groups.world_size > 1:
            dist.all_reduce(bad_at, op=dist.ReduceOp.MAX)
        excluded = [s for s, v in enumerate(bad_at.tolist()) if v > 0]
        if not excluded:
            return []
        where = ", ".join(f"subnet {s} at step {int(bad_at[s]) - 1}" for s in excluded)
        policy = self.train.nonfinite_policy
        if policy == "stop" or len(excluded) == self.twist.num_subnets:
            why = (
                "--nonfinite-policy stop"
                if policy == "stop"
                else "every subnet of the round is non-finite, nothing is left to aggregate"
            )
            raise NonFiniteError(
                f"non-finite loss or gradient in round {round_index} ({where}); {why}. The central model is "
                f"left as it was before this round (step {self.central.step}). Resume from the latest checkpoint "
                "(--load SAVE_DIR), e.g. with a lower --lr or a smaller --clip-grad"
                + ("" if policy == "skip" else ", or use --nonfinite-policy skip to leave such subnets out")
            )
        self.round.drop(excluded)
        self.log(
            f"[twist] round {round_index}: non-finite loss or gradient ({where}); left out of the "
            f"aggregation (--nonfinite-policy skip): {len(excluded)} of {self.twist.num_subnets} subnets"
        )
        return excluded

    def run(self, on_round_end: Optional[Callable[[RoundRecord], None]] = None) -> TrainResult:
        result = TrainResult(self.central)
        self.log(self.describe())
        total_rounds = math.ceil(self.train.train_iters / self.twist.local_steps)
        start = time.perf_counter()
        stop_at = min(self.train.train_iters, self.train.exit_interval or self.train.train_iters)
        while self.central.step < stop_at:
            rec = self.run_round()
            result.rounds.append(rec)
            if self.checkpointer is not None:
                self.checkpointer.on_round_end(self.central, self.full_central_state)  # collective
            if on_round_end is not None:
                on_round_end(rec)
            if (rec.round + 1) % max(
                1, self.train.log_interval // self.twist.local_steps
            ) == 0 or self.central.step >= stop_at:
                per_subnet = " ".join(f"{sum(r) / len(r):.3f}" for r in rec.losses)
                self.log(
                    f"[twist] round {rec.round + 1}/{total_rounds} step {self.central.step}/{self.train.train_iters} "
                    f"| loss {rec.mean_loss():.4f} (subnets {per_subnet}) "
                    f"| lr {self.worker.optimizer.param_groups[0]['lr']:.2e} "
                    f"| {rec.tokens / rec.seconds:,.0f} tok/s | agg {rec.aggregation_bytes / 2**20:.1f} MiB "
                    f"(dense DP {rec.dense_dp_bytes / 2**20:.1f} MiB) "
                    f"| {time.perf_counter() - start:.0f}s"
                )
        if self.checkpointer is not None:
            self.checkpointer.finish(self.central, self.full_central_state)  # collective
        if self.metrics is not None and self.groups.is_logging_rank:
            self.metrics.write(
                {
                    "rounds": [r.__dict__ for r in result.rounds],
                    "loss_curve": result.loss_curve(),
                    "model": self.model_config.to_dict(),
                    "twist": self.twist.to_dict(),
                    "train": self.train.to_dict(),
                    "world_size": self.groups.world_size,
                    "num_microbatches": self.num_microbatches,
                    "pipeline_bubble": pipeline_bubble(self.groups.pp_size, self.num_microbatches),
                }
            )
        return result


def step_parallelism(groups: TwistGroups) -> StepParallelism:
    """What one training step must synchronise, given this rank's place in the layout."""
    replicas = groups.subnet_group if groups.layout.replicas > 1 else None
    if groups.tp_size == 1 and groups.pp_size == 1 and replicas is None:
        return StepParallelism()
    from megatron.core import parallel_state

    norm_groups = []
    if groups.tp_size > 1:
        norm_groups.append(parallel_state.get_tensor_model_parallel_group())
    pipeline_group, last = None, 0
    if groups.pp_size > 1:
        pipeline_group = parallel_state.get_pipeline_model_parallel_group()
        norm_groups.append(pipeline_group)
        last = parallel_state.get_pipeline_model_parallel_last_rank()
    return StepParallelism(
        subnet_group=replicas, norm_groups=tuple(norm_groups), pipeline_group=pipeline_group, pipeline_last_rank=last
    )


def train_dense(model: ModelConfig, train: TrainConfig, batches: BatchSource, log: Callable[[str], None] = print):
    """Plain training of the full model on slot 0 of 1 (the reference TwIST is compared with)."""
    from ..optim.optimizer import build_optimizer, build_scheduler
    from ..optim.step import train_step

    central = build_central(model, train.seed)
    optimizer = build_optimizer(central.module, train)
    scheduler = build_scheduler(optimizer, train)
    losses = []
    for step in range(train.train_iters):
        losses.append(train_step(central.module, optimizer, scheduler, batches.get(step, 0, 1), step, train.clip_grad))
        if (step + 1) % train.log_interval == 0:
            log(f"[dense] step {step + 1}/{train.train_iters} | loss {losses[-1]:.4f}")
    central.step = train.train_iters
    return central, losses
