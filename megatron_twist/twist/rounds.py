"""A TwIST round, written once for every training loop.

A round: draw every subnet's plan (no communication), refill the subnets this
rank trains from the central model, let them take their local steps, fold
their weights (and moments) back into the central model. Three pieces, each
used by ``twist train`` (training/twist_trainer.py), the host-loop hook
(integrations/round_hook.py) and the ZeRO hook (integrations/zero_round_hook.py)
unless said otherwise:

* ``LocalPlans``: the round's plans as this rank's TP shard / PP stage sees them.
* ``ReplicatedRound``: open / refill / contribute / drop / close over a
  replicated central model (one all-reduce per round). The trainer and the
  host-loop hook; the ZeRO hook aggregates partitions instead, but with the
  same plans and the same clock.
* ``RoundClock``: when a host loop's iteration closes a round and opens the
  next. ``twist train`` runs whole rounds itself and needs no clock.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple

from ..config import ModelConfig, TwistConfig
from ..optim.optimizer import ADAM_MOMENTS
from .aggregation import RoundAggregator
from .central import CentralModel
from .pin import pinned_plan
from .sampler import SubnetPlan, SubnetSampler
from .sharding import local_model_view, local_plan


def aggregated_fields(twist: TwistConfig) -> Tuple[str, ...]:
    """What a round averages into the central model: weights, and Adam's moments under 'aggregate'."""
    return ("param",) + (ADAM_MOMENTS if twist.optimizer_state == "aggregate" else ())


class LocalPlans:
    """Every subnet's plan for a round in this rank's local indices (TP shard ``tp_rank`` of
    ``tp_size``, pipeline stage holding layers [first_layer, first_layer + num_layers)).

    Every rank draws every subnet's plan: aggregation's holder counts need them all, and the
    sampler is deterministic, so no rank has to tell another."""

    def __init__(
        self,
        model: ModelConfig,
        twist: TwistConfig,
        tp_rank: int = 0,
        tp_size: int = 1,
        first_layer: int = 0,
        num_layers: Optional[int] = None,
    ):
        self.model, self.tp_rank, self.tp_size = model, tp_rank, tp_size
        self.first_layer, self.num_layers = first_layer, num_layers
        self.sampler = SubnetSampler(model, twist, tp_size)
        self.geometry = local_model_view(model, tp_size, first_layer, num_layers)

    def local(self, plan: SubnetPlan) -> SubnetPlan:
        return local_plan(plan, self.model, self.tp_rank, self.tp_size, self.first_layer, self.num_layers)

    def sample(self, round_index: int, pinned: Optional[SubnetPlan] = None) -> List[SubnetPlan]:
        return [self.local(p) for p in self.sampler.sample(round_index, pinned)]

    def pinned(self, central: CentralModel, model_parallel_group, agreement_group) -> Optional[SubnetPlan]:
        """Under --twist-pin-cut, subnet 0's plan for the next round (twist/pin.py), else None."""
        if not self.sampler.twist.pin_cut:
            return None
        return pinned_plan(
            self.model,
            self.sampler.twist,
            central.params,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            first_layer=self.first_layer,
            num_layers=self.num_layers,
            model_parallel_group=model_parallel_group,
            agreement_group=agreement_group,
        )


class Subnet(Protocol):
    """What a round reads and writes of a subnet (twist/worker.py: ``SubnetState``, ``SubnetWorker``)."""

    def load(self, central: CentralModel, plan: SubnetPlan) -> None: ...

    def contribution(self) -> dict: ...


class ReplicatedRound:
    """One round over a central model every rank of the aggregation group holds a copy of.

    ``open()`` draws the plans and zeroes the buffer; for each subnet this rank trains,
    ``refill`` before its steps and ``contribute`` after them (or ``drop`` it on every rank
    if it went non-finite); ``close(steps)`` all-reduces once, averages every field into the
    central model and advances its step and round counters.
    """

    def __init__(
        self,
        plans: LocalPlans,
        central: CentralModel,
        twist: TwistConfig,
        aggregation_group,
        model_parallel_group=None,
    ):
        """``model_parallel_group``: this rank's TP x PP group (None at TP = PP = 1); --twist-pin-cut
        sums the units' scores over it."""
        self.planner, self.central, self.aggregation_group = plans, central, aggregation_group
        self.model_parallel_group = model_parallel_group
        self.twist = twist
        self.fields = aggregated_fields(twist)
        device = next(central.module.parameters()).device
        self.aggregator = RoundAggregator(plans.geometry, central.shapes(), self.fields, device=device)
        self.plans: List[SubnetPlan] = []

    def open(self) -> List[SubnetPlan]:
        pinned = self.planner.pinned(self.central, self.model_parallel_group, self.aggregation_group)
        self.plans = self.planner.sample(self.central.round, pinned)
        self.aggregator.begin_round(self.plans)
        return self.plans

    def refill(self, subnet: Subnet, s: int) -> None:
        subnet.load(self.central, self.plans[s])

    def contribute(self, subnet: Subnet, s: int, valid: bool = True) -> None:
        """Add a subnet's weights (and moments); an invalid (non-finite) one adds nothing."""
        if valid:
            self.aggregator.add_subnet(self.plans[s], subnet.contribution())

    def payload_bytes(self) -> int:
        return self.aggregator.payload_bytes()

    def drop(self, subnets: Sequence[int]) -> None:
        """Leave subnets that added nothing out of the holder counts (the same ones on every rank)."""
        self.aggregator.drop_subnets(subnets)

    def close(self, steps_taken: int) -> int:
        """Aggregate into the central model; returns the bytes this rank all-reduced."""
        before = self.aggregator.bytes_reduced
        self.aggregator.all_reduce(self.aggregation_group)
        for field in self.fields:
            target = self.central.params if field == "param" else self.central.moments[field]
            self.aggregator.write_average(field, target)
        self.central.step += steps_taken
        self.central.round += 1
        return self.aggregator.bytes_reduced - before


class RoundBoundary(Protocol):
    """How a hook opens and closes a round on its subnet; each returns the bytes it moved."""

    def open_round(self) -> int: ...

    def close_round(self, steps_taken: int) -> int: ...


class RoundClock:
    """Round boundaries from a host loop's iteration numbers.

    A host loop only says which iteration it is about to run. The central model's ``step``
    records how far aggregation got, so a resumed loop (starting mid-run at ``central.step``)
    opens its first round without closing one, and iterations replayed below ``central.step``
    close nothing.
    """

    def __init__(self, central, local_steps: int, boundary: RoundBoundary):
        self.central, self.local_steps, self.boundary = central, local_steps, boundary
        self.is_open = False

    def on_iteration_start(self, iteration: int) -> Optional[int]:
        """Call before every optimizer step. Returns the bytes moved when a round closed here
        (closing it and opening the next), None otherwise."""
        moved = None
        if self.is_open and iteration > self.central.step and iteration % self.local_steps == 0:
            moved = self._close(iteration)
        if not self.is_open:
            opened = self.boundary.open_round()
            self.is_open = True  # only once opening succeeded: a refused open leaves no round open
            if moved is not None:
                moved += opened
        return moved

    def finish(self, iteration: int) -> Optional[int]:
        """Call after the last step (``iteration`` = steps taken): folds a partial last round in."""
        if self.is_open and iteration > self.central.step:
            return self._close(iteration)
        return None

    def _close(self, iteration: int) -> int:
        moved = self.boundary.close_round(iteration - self.central.step)
        self.is_open = False
        return moved
