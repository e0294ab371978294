"""Sampler properties, property-based: coverage, equal sizes, determinism, TP balance, GQA validity."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_twist.config import ConfigError, ModelConfig, TwistConfig
from megatron_twist.twist.sampler import SubnetSampler, deal_units


@st.composite
def layouts(draw):
    """A model, a TP size and a TwIST config that are valid together."""
    tp = draw(st.sampled_from([1, 2, 4]))
    gqa = draw(st.booleans())
    if gqa:
        groups = tp * draw(st.integers(1, 2))
        per_group = draw(st.sampled_from([2, 4]))
        heads, bucket = groups * per_group, per_group
    else:
        heads = tp * draw(st.sampled_from([2, 4]))
        groups, bucket = heads, heads // tp
    ffn_per_shard = draw(st.sampled_from([8, 12, 16]))
    # keep ratio must give whole units in a head bucket and in an FFN shard
    kappas = [Fraction(k, bucket) for k in range(1, bucket + 1)]
    kappas = [k for k in kappas if (k * ffn_per_shard).denominator == 1]
    kappa = draw(st.sampled_from(kappas))
    min_subnets = int(np.ceil(1 / kappa))
    n = draw(st.integers(min_subnets, min_subnets + 3))
    model = ModelConfig(
        family="llama",
        num_layers=draw(st.integers(1, 3)),
        hidden_size=8 * heads,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn_per_shard * tp,
        vocab_size=64,
        seq_length=8,
    )
    twist = TwistConfig(keep_ratio=float(kappa), num_subnets=n, local_steps=1, seed=draw(st.integers(0, 10**6)))
    return model, tp, twist


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(layouts(), st.integers(0, 50))
@SETTINGS
def test_equal_sizes_coverage_and_no_duplicates(layout, round_index):
    model, tp, twist = layout
    plans = SubnetSampler(model, twist, tp).sample(round_index)
    assert len(plans) == twist.num_subnets
    for layer in range(model.num_layers):
        head_sets = [p.layers[layer].heads for p in plans]
        neuron_sets = [p.layers[layer].neurons for p in plans]
        assert len({len(h) for h in head_sets}) == 1, "subnets differ in head count"
        assert len({len(n) for n in neuron_sets}) == 1, "subnets differ in neuron count"
        assert len(head_sets[0]) == round(model.num_attention_heads * twist.keep_ratio)
        assert len(neuron_sets[0]) == round(model.ffn_hidden_size * twist.keep_ratio)
        for h in head_sets + neuron_sets:
            assert list(h) == sorted(set(h)), "indices must be sorted and distinct"
        assert set().union(*head_sets) == set(range(model.num_attention_heads)), "a head is in no subnet"
        assert set().union(*neuron_sets) == set(range(model.ffn_hidden_size)), "a neuron is in no subnet"


@given(layouts(), st.integers(0, 50))
@SETTINGS
def test_deterministic_from_seed_and_round(layout, round_index):
    model, tp, twist = layout
    a = SubnetSampler(model, twist, tp).sample(round_index)
    b = SubnetSampler(model, twist, tp).sample(round_index)  # a fresh sampler, as on another rank
    assert a == b


@given(layouts(), st.integers(0, 50))
@SETTINGS
def test_tensor_parallel_shards_balanced(layout, round_index):
    model, tp, twist = layout
    heads_per_shard = model.num_attention_heads // tp
    ffn_per_shard = model.ffn_hidden_size // tp
    for plan in SubnetSampler(model, twist, tp).sample(round_index):
        for lu in plan.layers:
            h = np.bincount(np.asarray(lu.heads) // heads_per_shard, minlength=tp)
            f = np.bincount(np.asarray(lu.neurons) // ffn_per_shard, minlength=tp)
            assert (h == h[0]).all() and h[0] == round(heads_per_shard * twist.keep_ratio)
            assert (f == f[0]).all() and f[0] == round(ffn_per_shard * twist.keep_ratio)


@given(layouts(), st.integers(0, 50))
@SETTINGS
def test_grouped_query_attention_validity(layout, round_index):
    model, tp, twist = layout
    for plan in SubnetSampler(model, twist, tp).sample(round_index):
        for lu, size in zip(plan.layers, plan.layer_sizes(model)):
            assert size.num_attention_heads % size.num_query_groups == 0
            assert size.num_query_groups % tp == 0, "KV groups must still divide over TP"
            if model.heads_per_group > 1:
                assert size.num_query_groups == model.num_query_groups, "GQA keeps every KV group"
                per_group = np.bincount(np.asarray(lu.heads) // model.heads_per_group, minlength=model.num_query_groups)
                assert (per_group == per_group[0]).all() and per_group[0] >= 1


@given(layouts(), st.integers(0, 50), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.booleans())
@SETTINGS
def test_cut_share_keeps_sizes_balance_and_its_share_of_the_pinned_cut(layout, round_index, share, coverage):
    """--twist-cut-share F around a pinned plan: subnet 0 is the plan, every subnet holds its quota of distinct
    units in every bucket (so TP shards and GQA groups stay balanced), the draw is the same on every rank, and
    with F > 0 each other subnet holds round(F x quota) units of the cut per bucket, more only where the
    bucket's units outside the cut are fewer than its remaining slots (tests/twist/test_pin_cut.py: by hand)."""
    model, tp, twist = layout
    twist = dataclasses.replace(twist, cut_share=share, coverage=coverage)
    pinned = SubnetSampler(model, dataclasses.replace(twist, num_subnets=1, coverage=False, seed=1), tp).sample(0)[0]
    sampler = SubnetSampler(model, twist, tp)
    plans = sampler.sample(round_index, pinned)
    assert plans == SubnetSampler(model, twist, tp).sample(round_index, pinned) and plans[0] == pinned
    for layer in range(model.num_layers):
        for kind, buckets in (("heads", sampler.head_buckets()), ("neurons", sampler.neuron_buckets())):
            cut = set(getattr(pinned.layers[layer], kind))
            for bucket in buckets:
                bucket = set(bucket.tolist())
                quota = round(len(bucket) * twist.keep_ratio)
                n_cut = int(round(share * quota))
                for plan in plans[1:]:
                    held = set(getattr(plan.layers[layer], kind)) & bucket
                    assert len(held) == quota
                    if share > 0:
                        assert len(held & cut) == max(n_cut, quota - len(bucket - cut))


def test_rounds_differ():
    model = ModelConfig(
        family="llama",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,
        ffn_hidden_size=64,
        vocab_size=64,
        seq_length=8,
    )
    sampler = SubnetSampler(model, TwistConfig(keep_ratio=0.5, num_subnets=2, seed=3))
    assert len({tuple(sampler.sample(r)) for r in range(8)}) > 1, "resampling must change subnets across rounds"


def test_disjoint_partition_when_quota_times_subnets_equals_units():
    rng = np.random.default_rng(0)
    parts = deal_units(range(12), num_subnets=3, quota=4, rng=rng, coverage=True)
    assert sorted(np.concatenate(parts).tolist()) == list(range(12)), "IST case: an exact partition"


def test_no_coverage_draws_independently_and_allows_few_subnets():
    model = ModelConfig(
        family="llama",
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=1,
        ffn_hidden_size=16,
        vocab_size=64,
        seq_length=8,
    )
    with pytest.raises(ConfigError, match="coverage needs"):
        TwistConfig(keep_ratio=0.25, num_subnets=2)
    twist = TwistConfig(keep_ratio=0.25, num_subnets=2, coverage=False)
    plans = SubnetSampler(model, twist).sample(0)
    assert all(len(p.layers[0].heads) == 1 and len(p.layers[0].neurons) == 4 for p in plans)


def test_whole_layers_hold_every_unit():
    model = ModelConfig(
        family="llama",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=16,
        vocab_size=64,
        seq_length=8,
    )
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, whole_layers=(0, -1))
    for plan in SubnetSampler(model, twist).sample(5):
        sizes = plan.layer_sizes(model)
        assert sizes[0].num_attention_heads == 4 and sizes[3].ffn_hidden_size == 16
        assert sizes[1].num_attention_heads == 2 and sizes[2].ffn_hidden_size == 8
