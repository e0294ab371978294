"""The masked full model is the oracle for the materialized subnet and the cut-out model."""

from __future__ import annotations

import pytest
import torch

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TwistConfig
from megatron_twist.cpu_shim import seed_everything
from megatron_twist.model.gpt import build_gpt_model, count_parameters, gpt_forward
from megatron_twist.twist.central import CentralModel
from megatron_twist.twist.extraction import cut_model, select_plan
from megatron_twist.twist.hooks import attach_correction, attach_mask, correction_scales, remove_hooks
from megatron_twist.twist.sampler import SubnetSampler
from megatron_twist.twist.slicing import slice_for, take

FAMILIES = ["tiny", "tiny-gpt2"]


def _central(preset: str, seed: int = 7):
    model = ModelConfig(**MODEL_PRESETS[preset])
    seed_everything(seed)
    module = build_gpt_model(model)
    with torch.no_grad():  # non-trivial biases/norms so a slicing error in them would show
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, CentralModel(model, module)


def _tokens(model, batch=2):
    return torch.randint(0, model.vocab_size, (batch, model.seq_length), generator=torch.Generator().manual_seed(0))


def _materialize(model, twist, central, plan):
    sub = build_gpt_model(model, plan.layer_sizes(model))
    with torch.no_grad():
        for name, p in sub.named_parameters():
            p.copy_(take(central.params[name], slice_for(model, name, plan, device=central.params[name].device)))
    return sub


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("correction", ["rescale", "none"])
@pytest.mark.parametrize("whole_layers", [(), (0,)])
def test_masked_full_model_equals_materialized_subnet(mcore, preset, correction, whole_layers):
    model, central = _central(preset)
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, correction=correction, whole_layers=whole_layers)
    tokens = _tokens(model)
    for plan in SubnetSampler(model, twist).sample(3):
        sub = _materialize(model, twist, central, plan)
        hooks = attach_correction(sub, correction_scales(model, twist, plan))
        assert count_parameters(sub) < count_parameters(central.module)
        masks = attach_mask(central.module, model, twist, plan)
        try:
            expected = gpt_forward(central.module, tokens)
        finally:
            remove_hooks(masks)
        got = gpt_forward(sub, tokens)
        remove_hooks(hooks)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # and the mask really changes the output (the test would catch a no-op mask)
        assert (gpt_forward(central.module, tokens) - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "preset,keep_ratio,method",
    [
        ("tiny", 0.5, "magnitude"),
        ("tiny", 0.5, "random:3"),
        ("tiny-gpt2", 0.5, "magnitude"),
        ("tiny-gpt2", 0.5, "random:3"),
        ("tiny-gpt2", 0.25, "magnitude"),  # a kappa other than the training one (0.25 of a 2-head GQA group is refused)
    ],
)
def test_extracted_model_equals_masked_central(mcore, preset, keep_ratio, method):
    model, central = _central(preset)
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, correction="rescale")
    plan = select_plan(model, twist, central.params, keep_ratio, method)
    cut, sizes = cut_model(model, twist, central.params, plan)
    assert all(s.num_attention_heads == round(model.num_attention_heads * keep_ratio) for s in sizes)
    tokens = _tokens(model)
    masks = attach_mask(central.module, model, twist, plan)
    try:
        expected = gpt_forward(central.module, tokens)
    finally:
        remove_hooks(masks)
    torch.testing.assert_close(gpt_forward(cut, tokens), expected, atol=1e-5, rtol=1e-5)
    assert not any(m._forward_pre_hooks for m in cut.modules()), "a cut-out model is a plain model"


def test_magnitude_selection_keeps_the_largest_units(mcore):
    model, central = _central("tiny")
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2)
    with torch.no_grad():  # make head 3 and neurons 0..63 of layer 0 dominant
        central.params["decoder.layers.0.self_attention.linear_proj.weight"][:, 3 * 16 : 4 * 16] *= 100
        central.params["decoder.layers.0.mlp.linear_fc2.weight"][:, :64] *= 100
    plan = select_plan(model, twist, central.params, 0.5, "magnitude")
    assert 3 in plan.layers[0].heads
    assert plan.layers[0].neurons == tuple(range(64))
