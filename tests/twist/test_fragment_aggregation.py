"""Fragment-wise aggregation (the ZeRO path) against the whole-tensor rule, in one process.

The DeepSpeed round hook scatters each rank's ZeRO fragment (a contiguous range of a flattened
subnet parameter) into central positions with ``central_flat_index`` and divides shard positions by
``holder_count_at``. Here a subnet's parameters are cut into random fragments, the central tensor
into W shards, and the result must equal RoundAggregator's on the whole tensors, bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TwistConfig
from megatron_twist.model.gpt import build_gpt_model
from megatron_twist.twist.aggregation import RoundAggregator
from megatron_twist.twist.sampler import SubnetSampler
from megatron_twist.twist.slicing import central_flat_index, holder_count, holder_count_at, slice_for, take

CPU = torch.device("cpu")  # these tests run on the CPU; the runtime passes its model's device


def _random_cuts(numel: int, rng: random.Random, pieces: int):
    cuts = sorted(rng.sample(range(1, numel), min(pieces - 1, numel - 1))) if numel > 1 else []
    bounds = [0, *cuts, numel]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("shards", [1, 3, 4])
def test_fragments_and_shards_reproduce_whole_tensor_aggregation(mcore, preset, shards):
    model = ModelConfig(**MODEL_PRESETS[preset])
    twist = TwistConfig(keep_ratio=0.5, num_subnets=3, local_steps=2, coverage=False, seed=7)
    central = dict(build_gpt_model(model).named_parameters())
    plans = SubnetSampler(model, twist).sample(0)
    shapes = {n: p.shape for n, p in central.items()}
    rng = random.Random(shards)
    # Each subnet's trained values: its slice of the central model plus noise.
    subnet_values = [
        {
            n: take(p, slice_for(model, n, plan, device=CPU))
            + torch.randn(take(p, slice_for(model, n, plan, device=CPU)).shape)
            for n, p in central.items()
        }
        for plan in plans
    ]

    reference = RoundAggregator(model, shapes, fields=("param",), device=CPU)
    reference.begin_round(plans)
    for plan, values in zip(plans, subnet_values):
        reference.add_subnet(plan, {"param": values})
    expected = {n: p.detach().clone() for n, p in central.items()}
    reference.write_average("param", expected)

    for name, shape in shapes.items():
        numel = shape.numel()
        ps = -(-numel // shards)
        buffer = torch.zeros(ps * shards)
        for plan, values in zip(plans, subnet_values):  # every subnet, cut into random ZeRO-like fragments
            flat = values[name].reshape(-1)
            for start, n in _random_cuts(flat.numel(), rng, pieces=3):
                buffer.index_add_(
                    0,
                    central_flat_index(slice_for(model, name, plan, device=CPU), shape, start, n, device=CPU),
                    flat[start : start + n],
                )
        full_counts = holder_count(model, name, shape, plans, device=CPU).expand(shape).reshape(-1)
        got = []
        for k in range(shards):
            positions = torch.arange(k * ps, (k + 1) * ps)
            counts = holder_count_at(model, name, shape, plans, positions)
            valid = positions < numel
            assert torch.equal(counts[valid], full_counts[positions[valid]]), name
            assert torch.all(counts[~valid] == 0), "padding is held by nobody"
            old = torch.zeros(ps)
            old[valid] = central[name].detach().reshape(-1)[positions[valid]]
            total = buffer[k * ps : (k + 1) * ps]
            got.append(torch.where(counts > 0, total / counts.clamp(min=1.0), old))
        result = torch.cat(got)[:numel].view(shape)
        assert torch.equal(result, expected[name]), name


def test_central_flat_index_maps_rows_and_columns():
    shape = torch.Size([3, 4])
    cols = (1, torch.tensor([0, 2]))  # subnet keeps columns 0 and 2: subnet shape [3, 2]
    assert central_flat_index(cols, shape, 0, 6, device=CPU).tolist() == [0, 2, 4, 6, 8, 10]
    assert central_flat_index(cols, shape, 3, 2, device=CPU).tolist() == [6, 8]
    rows = (0, torch.tensor([2, 0]))  # rows in the subnet's order
    assert central_flat_index(rows, shape, 0, 8, device=CPU).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    assert central_flat_index(None, shape, 5, 3, device=CPU).tolist() == [5, 6, 7]
