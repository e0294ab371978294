"""benchmarks/mean_probe.py (issue #15 item 5): the mean correction it measures is what it claims.

Reference that does not share the probe's arithmetic: the central model's own projections, run once
as they are and once with the dropped units' inputs zeroed (a pre-hook); the mean over the tokens of
the difference of their outputs is what dropping those units costs on average, and must equal the
probe's constant (computed from the weights and the mean inputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TwistConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_mean_compensation_equals_the_mean_output_of_the_dropped_units(mcore):
    from mean_probe import compensation, projection_input_means

    from megatron_twist.model.gpt import build_gpt_model, gpt_forward
    from megatron_twist.twist.central import CentralModel
    from megatron_twist.twist.extraction import select_plan

    model = ModelConfig(**MODEL_PRESETS["tiny"])
    torch.manual_seed(0)
    central = CentralModel(model, build_gpt_model(model))
    twist = TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False)
    plan = select_plan(model, twist, central.params, 0.5)
    tokens = torch.randint(0, model.vocab_size, (6, model.seq_length))
    means = projection_input_means(central.module, tokens)
    comp = compensation(model, central.module, plan, means)

    hd = model.head_dim
    layer0 = central.module.decoder.layers[0]
    kept_heads, kept_neurons = plan.layers[0].heads, plan.layers[0].neurons
    assert len(kept_heads) < model.num_attention_heads and len(kept_neurons) < model.ffn_hidden_size
    keep_cols = torch.zeros(model.num_attention_heads * hd, dtype=torch.bool)
    for h in kept_heads:
        keep_cols[h * hd : (h + 1) * hd] = True
    keep_neurons = torch.zeros(model.ffn_hidden_size, dtype=torch.bool)
    keep_neurons[list(kept_neurons)] = True

    def mean_output(zero_kind):
        seen = {}

        def pre(key, mask):
            def hook(mod, inputs):
                return (inputs[0] * mask.to(inputs[0].dtype),) + tuple(inputs[1:]) if key == zero_kind else None

            return hook

        def post(key):
            def hook(mod, inputs, output):
                y = output[0].detach().double()
                seen[key] = y.reshape(-1, y.shape[-1]).mean(0)

            return hook

        # one kind zeroed per run: the projection's other inputs are then the same as in the plain run
        subs = {"proj": (layer0.self_attention.linear_proj, keep_cols), "fc2": (layer0.mlp.linear_fc2, keep_neurons)}
        handles = [sub.register_forward_pre_hook(pre(k, mask)) for k, (sub, mask) in subs.items()]
        handles += [sub.register_forward_hook(post(k)) for k, (sub, _) in subs.items()]
        with torch.no_grad():
            gpt_forward(central.module, tokens)
        for h in handles:
            h.remove()
        return seen

    full = mean_output(None)
    for kind in ("proj", "fc2"):
        lost = full[kind] - mean_output(kind)[kind]
        assert lost.abs().max() > 1e-4  # the dropped units do contribute on average
        torch.testing.assert_close(comp[0][kind], lost, rtol=1e-4, atol=1e-6)
