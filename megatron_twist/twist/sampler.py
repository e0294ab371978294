"""Subnet sampling: which heads and MLP neurons each subnet holds in a round.

Properties (tested in tests/twist/test_sampler.py):
* equal sizes: every subnet holds the same number of units in every bucket,
  so all subnets (and all rounds) share one shape and a materialized subnet
  model is built once;
* coverage ("balls into hats"): when num_subnets x quota >= bucket size, the
  units of a bucket are first dealt round-robin in a random order, so that
  together the subnets hold EVERY unit; each subnet then fills its remaining
  slots at random with units it does not hold yet;
* determinism: the draw depends only on (seed, round, layer, unit kind), so
  every rank computes every subnet's plan without communicating;
* tensor-parallel balance: units are drawn per bucket, and a bucket never
  straddles a TP shard (a KV group of query heads, or a shard's contiguous
  slice of heads / neurons), so each shard keeps the same number of its own units;
* grouped-query validity: with GQA every KV group is kept and the same number
  of query heads is kept inside each group, which is a valid Llama-style config;
* a pinned subnet (``--twist-pin-cut``): subnet 0 may be given its units (the
  cut extraction would take now); the other subnets are then dealt the units
  it does not hold first, so coverage still holds, and fill up at random;
* a shared cut (``--twist-cut-share F``, with a pinned subnet; tested in
  tests/twist/test_pin_cut.py too, by hand): every other
  subnet takes round(F x quota) of its quota from subnet 0's units and the
  rest from the units subnet 0 does not hold, still dealt round-robin, so
  the cut trains on more tokens; the unpinned units are all held only while
  subnets 1..N-1 have slots enough for them (F = 0: the draw above, bit for
  bit; F = 1: every subnet holds the cut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..config import ModelConfig, TwistConfig
from ..model.gpt import LayerSize

_HEADS, _NEURONS = 0, 1


@dataclass(frozen=True)
class LayerUnits:
    """Units of one layer a subnet holds, as sorted indices into the central model."""

    heads: Tuple[int, ...]
    neurons: Tuple[int, ...]


@dataclass(frozen=True)
class SubnetPlan:
    """One subnet: the units it holds in every layer."""

    layers: Tuple[LayerUnits, ...]

    def layer_sizes(self, model: ModelConfig) -> List[LayerSize]:
        sizes = []
        for lu in self.layers:
            n_heads = len(lu.heads)
            if model.heads_per_group > 1:
                groups = model.num_query_groups  # GQA: every KV group is kept
            else:
                groups = n_heads  # MHA: a head owns its K/V
            sizes.append(LayerSize(n_heads, groups, len(lu.neurons)))
        return sizes

    def num_units(self) -> int:
        return sum(len(lu.heads) + len(lu.neurons) for lu in self.layers)


def deal_units(
    units: Sequence[int], num_subnets: int, quota: int, rng: np.random.Generator, coverage: bool
) -> List[np.ndarray]:
    """Give each of ``num_subnets`` subnets ``quota`` distinct units out of ``units``.

    With ``coverage`` (requires num_subnets * quota >= len(units)) every unit
    goes to at least one subnet. Without it each subnet draws uniformly and
    independently. Returned index arrays are sorted, so a subnet that holds
    every unit is exactly the identity (kappa=1 reproduces dense training bit
    for bit).
    """
    units = np.asarray(units, dtype=np.int64)
    k = len(units)
    if not 0 < quota <= k:
        raise ValueError(f"quota {quota} must be in [1, {k}]")
    if not coverage:
        return [np.sort(rng.choice(units, size=quota, replace=False)) for _ in range(num_subnets)]
    if num_subnets * quota < k:
        raise ValueError(f"{num_subnets} subnets x quota {quota} cannot cover {k} units")
    order = rng.permutation(units)
    first = int(rng.integers(num_subnets))  # rotate who gets the extra units when k % n != 0
    held = [list(order[(np.arange(k) + first) % num_subnets == s]) for s in range(num_subnets)]
    out = []
    for s in range(num_subnets):
        missing = quota - len(held[s])
        if missing:
            others = np.setdiff1d(units, np.asarray(held[s], dtype=np.int64))
            held[s].extend(rng.choice(others, size=missing, replace=False).tolist())
        out.append(np.sort(np.asarray(held[s], dtype=np.int64)))
    return out


def deal_around(
    units: Sequence[int],
    pinned: Sequence[int],
    num_subnets: int,
    quota: int,
    rng: np.random.Generator,
    coverage: bool,
    cut_share: float = 0.0,
) -> List[np.ndarray]:
    """``pinned`` (``quota`` of ``units``) for subnet 0; the other subnets as ``deal_units`` would give
    them, except that with ``coverage`` the units outside ``pinned`` are the ones dealt round-robin.
    ``cut_share`` > 0: see ``_share_the_cut``."""
    units, pinned = np.asarray(units, dtype=np.int64), np.sort(np.asarray(pinned, dtype=np.int64))
    if len(pinned) != quota or not np.isin(pinned, units).all():
        raise ValueError(f"a pinned subnet must hold {quota} of the bucket's units, got {pinned.tolist()}")
    rest, out = np.setdiff1d(units, pinned), [pinned]
    if num_subnets == 1:
        return out
    if cut_share > 0:  # F = 0 keeps the draw below, and its rng consumption, unchanged
        return out + _share_the_cut(pinned, rest, num_subnets - 1, quota, rng, coverage, cut_share)
    if not coverage or len(rest) == 0:
        return out + [np.sort(rng.choice(units, size=quota, replace=False)) for _ in range(num_subnets - 1)]
    for held in np.array_split(rng.permutation(rest), num_subnets - 1):
        missing = quota - len(held)
        if missing < 0:
            raise ValueError(f"{num_subnets - 1} subnets x quota {quota} cannot cover the {len(rest)} unpinned units")
        fill = rng.choice(np.setdiff1d(units, held), size=missing, replace=False) if missing else []
        out.append(np.sort(np.concatenate([held, np.asarray(fill, dtype=np.int64)])))
    return out


def _share_the_cut(
    pinned: np.ndarray,
    rest: np.ndarray,
    others: int,
    quota: int,
    rng: np.random.Generator,
    coverage: bool,
    cut_share: float,
) -> List[np.ndarray]:
    """The ``others`` subnets beside a pinned one under ``--twist-cut-share``: each holds
    n_cut = round(cut_share x quota) units of ``pinned`` drawn at random, and fills its other
    slots from ``rest`` (the unpinned units). With ``coverage`` ``rest`` is dealt round-robin in
    a random order and each subnet keeps as many of its dealt units as it has slots (the rest of
    them sit the round out); without it each subnet draws its units of ``rest`` on its own. A subnet
    short of unpinned units takes more it does not hold, and when ``rest`` runs out (kappa > 0.5)
    pinned units it does not hold: every subnet still holds exactly ``quota`` distinct units."""
    n_cut = int(round(cut_share * quota))
    slots = quota - n_cut
    dealt = np.array_split(rng.permutation(rest), others) if coverage else None
    out = []
    for s in range(others):
        cut = rng.choice(pinned, size=n_cut, replace=False)
        if coverage:
            own = dealt[s][:slots]
        else:
            own = rng.choice(rest, size=min(slots, len(rest)), replace=False)
        parts = [cut, own]
        short = slots - len(own)
        spare = np.setdiff1d(rest, own) if short else rest[:0]
        if len(spare):  # dealt fewer than its slots: unpinned units it does not hold yet
            parts.append(rng.choice(spare, size=min(short, len(spare)), replace=False))
            short -= len(parts[-1])
        if short:  # too few unpinned units in the bucket: pinned ones it does not hold yet
            parts.append(rng.choice(np.setdiff1d(pinned, cut), size=short, replace=False))
        out.append(np.sort(np.concatenate(parts).astype(np.int64)))
    return out


class SubnetSampler:
    """Draws the plans of all subnets for a round, identically on every rank."""

    def __init__(self, model: ModelConfig, twist: TwistConfig, tensor_parallel_size: int = 1):
        twist.check_against_model(model, tensor_parallel_size)
        self.model = model
        self.twist = twist
        # Balance blocks: a property of the run (not of the layout), see TwistConfig.balance_shards.
        self.tp = twist.shards_for(tensor_parallel_size)
        self.whole = twist.whole_layer_set(model.num_layers)

    def _rng(self, round_index: int, layer: int, kind: int) -> np.random.Generator:
        return np.random.default_rng([self.twist.seed, round_index, layer, kind])

    def head_buckets(self) -> List[np.ndarray]:
        m = self.model
        if m.heads_per_group > 1:
            p = m.heads_per_group
            return [np.arange(g * p, (g + 1) * p) for g in range(m.num_query_groups)]
        per = m.num_attention_heads // self.tp
        return [np.arange(t * per, (t + 1) * per) for t in range(self.tp)]

    def neuron_buckets(self) -> List[np.ndarray]:
        per = self.model.ffn_hidden_size // self.tp
        return [np.arange(t * per, (t + 1) * per) for t in range(self.tp)]

    def _draw(self, buckets, round_index, layer, kind, pinned: Optional[Sequence[int]] = None) -> List[np.ndarray]:
        n = self.twist.num_subnets
        rng = self._rng(round_index, layer, kind)
        per_subnet = [[] for _ in range(n)]
        for bucket in buckets:
            quota = int(round(len(bucket) * self.twist.keep_ratio))
            if pinned is None:
                dealt = deal_units(bucket, n, quota, rng, self.twist.coverage)
            else:
                pin = np.intersect1d(bucket, pinned)
                dealt = deal_around(bucket, pin, n, quota, rng, self.twist.coverage, self.twist.cut_share)
            for s, idx in enumerate(dealt):
                per_subnet[s].append(idx)
        return [np.concatenate(parts) for parts in per_subnet]

    def sample(self, round_index: int, pinned: Optional[SubnetPlan] = None) -> List[SubnetPlan]:
        """Every subnet's plan for the round; ``pinned``: subnet 0's units (a plan at the keep ratio,
        e.g. extraction's cut), the others dealt around it."""
        m, n = self.model, self.twist.num_subnets
        if pinned is not None and len(pinned.layers) != m.num_layers:
            raise ValueError(f"a pinned plan needs all {m.num_layers} layers, got {len(pinned.layers)}")
        if pinned is not None and self.twist.cut_only(round_index):  # --twist-cut-from-step: the final rounds
            return [pinned] * n
        all_heads = tuple(range(m.num_attention_heads))
        all_neurons = tuple(range(m.ffn_hidden_size))
        layers_per_subnet = [[] for _ in range(n)]
        for layer in range(m.num_layers):
            whole = layer in self.whole
            pin = pinned.layers[layer] if pinned is not None else None
            if self.twist.splits_heads and not whole:
                drawn = self._draw(self.head_buckets(), round_index, layer, _HEADS, pin and pin.heads)
                heads = [tuple(h.tolist()) for h in drawn]
            else:
                heads = [all_heads] * n
            if self.twist.splits_mlp and not whole:
                drawn = self._draw(self.neuron_buckets(), round_index, layer, _NEURONS, pin and pin.neurons)
                neurons = [tuple(x.tolist()) for x in drawn]
            else:
                neurons = [all_neurons] * n
            for s in range(n):
                layers_per_subnet[s].append(LayerUnits(heads[s], neurons[s]))
        return [SubnetPlan(tuple(layers)) for layers in layers_per_subnet]

    def subnet_layer_sizes(self) -> List[LayerSize]:
        """Sizes shared by every subnet of every round (quotas are fixed)."""
        return self.sample(0)[0].layer_sizes(self.model)

    def full_plan(self) -> SubnetPlan:
        m = self.model
        lu = LayerUnits(tuple(range(m.num_attention_heads)), tuple(range(m.ffn_hidden_size)))
        return SubnetPlan((lu,) * m.num_layers)
