"""Aggregation on hand-computed overlapping cases."""

from __future__ import annotations

import torch

from megatron_twist.config import ModelConfig
from megatron_twist.twist.aggregation import RoundAggregator
from megatron_twist.twist.sampler import LayerUnits, SubnetPlan

MODEL = ModelConfig(
    family="gpt2", num_layers=1, hidden_size=4, num_attention_heads=2, ffn_hidden_size=3, vocab_size=8, seq_length=4
)
FC2 = "decoder.layers.0.mlp.linear_fc2.weight"  # [hidden, ffn]: one column per neuron
FC2_BIAS = "decoder.layers.0.mlp.linear_fc2.bias"  # shared by every subnet
PROJ = "decoder.layers.0.self_attention.linear_proj.weight"  # [hidden, heads*head_dim]


def plan(heads, neurons):
    return SubnetPlan((LayerUnits(tuple(heads), tuple(neurons)),))


def test_overlapping_neurons_are_averaged_over_their_holders():
    shapes = {FC2: torch.Size([4, 3]), FC2_BIAS: torch.Size([4])}
    a, b = plan([0, 1], [0, 1]), plan([0, 1], [1, 2])  # neuron 1 held by both, 0 only by a, 2 only by b
    agg = RoundAggregator(MODEL, shapes, fields=("param",), device="cpu")
    agg.begin_round([a, b])
    agg.add_subnet(a, {"param": {FC2: torch.tensor([[1.0, 2.0]] * 4), FC2_BIAS: torch.full((4,), 1.0)}})
    agg.add_subnet(b, {"param": {FC2: torch.tensor([[4.0, 8.0]] * 4), FC2_BIAS: torch.full((4,), 3.0)}})
    central = {FC2: torch.full((4, 3), -1.0), FC2_BIAS: torch.zeros(4)}
    agg.write_average("param", central)
    # neuron 0: only a -> 1; neuron 1: (2 + 4) / 2 = 3; neuron 2: only b -> 8
    assert torch.equal(central[FC2], torch.tensor([[1.0, 3.0, 8.0]] * 4))
    assert torch.equal(central[FC2_BIAS], torch.full((4,), 2.0))  # shared: mean over all subnets


def test_units_no_subnet_held_keep_their_central_value():
    shapes = {PROJ: torch.Size([4, 4])}  # 2 heads x head_dim 2
    a = plan([1], [0, 1, 2])
    agg = RoundAggregator(MODEL, shapes, fields=("param",), device="cpu")
    agg.begin_round([a])
    agg.add_subnet(a, {"param": {PROJ: torch.full((4, 2), 5.0)}})
    central = {PROJ: torch.arange(16.0).view(4, 4)}
    before = central[PROJ].clone()
    agg.write_average("param", central)
    assert torch.equal(central[PROJ][:, :2], before[:, :2]), "head 0 was held by no subnet"
    assert torch.equal(central[PROJ][:, 2:], torch.full((4, 2), 5.0))


def test_three_subnets_mixed_holders_and_fields():
    shapes = {FC2: torch.Size([4, 3])}
    plans = [plan([0, 1], [0, 1]), plan([0, 1], [0, 2]), plan([0, 1], [0, 1])]
    values = [torch.tensor([[3.0, 6.0]] * 4), torch.tensor([[6.0, 9.0]] * 4), torch.tensor([[9.0, 12.0]] * 4)]
    agg = RoundAggregator(MODEL, shapes, fields=("param", "exp_avg"), device="cpu")
    agg.begin_round(plans)
    for p, v in zip(plans, values):
        agg.add_subnet(p, {"param": {FC2: v}, "exp_avg": {FC2: 2 * v}})
    central, moments = {FC2: torch.zeros(4, 3)}, {FC2: torch.zeros(4, 3)}
    agg.write_average("param", central)
    agg.write_average("exp_avg", moments)
    # neuron 0: (3+6+9)/3 = 6; neuron 1: (6+12)/2 = 9 (subnets 0, 2); neuron 2: 9 (subnet 1 only)
    assert torch.equal(central[FC2], torch.tensor([[6.0, 9.0, 9.0]] * 4))
    assert torch.equal(moments[FC2], 2 * central[FC2])
