"""The Megatron-LM adapter's pieces in one process, with an argparse Namespace as Megatron-LM's
`get_args()`: sizes from Megatron-LM's arguments, the wrapped model provider, and every refusal
(before any work). Megatron-LM's real loop runs in test_megatron_lm_pretrain.py.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_twist.config import MODEL_PRESETS, ConfigError, ModelConfig
from megatron_twist.integrations.megatron_lm import TwistMegatronLM, model_config_from_megatron_args, overlay
from megatron_twist.model.gpt import build_gpt_model, count_parameters

TINY = ModelConfig(**MODEL_PRESETS["tiny"])


def megatron_args(**twist_flags) -> argparse.Namespace:
    """What Megatron-LM's parser (with our extra_args_provider) would give for the tiny model."""
    parser = argparse.ArgumentParser()
    TwistMegatronLM.extra_args_provider(parser)
    args = parser.parse_args(
        [
            f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k.replace('_', '-')}"
            for k, v in twist_flags.items()
        ]
    )
    args.__dict__.update(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        group_query_attention=True,
        ffn_hidden_size=128,
        padded_vocab_size=512,
        seq_length=64,
        swiglu=True,
        kv_channels=None,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        use_distributed_optimizer=False,
        fp16=False,
        bf16=False,
        curr_iteration=0,
        seed=1234,
        save=None,
        load=None,
    )
    return args


def provider_for(args):
    """A user's model_provider: builds a GPTModel from (possibly overlaid) Megatron args."""

    def model_provider(pre_process=True, post_process=True):
        return build_gpt_model(model_config_from_megatron_args(args))

    return model_provider


def test_model_config_from_args_and_overlay():
    args = megatron_args()
    assert model_config_from_megatron_args(args) == TINY
    with overlay(args, num_attention_heads=2, kv_channels=16):
        assert model_config_from_megatron_args(args).num_attention_heads == 2
    assert args.num_attention_heads == 4 and args.kv_channels is None


def test_wrapped_provider_builds_central_and_smaller_subnet(mcore):
    args = megatron_args(keep_ratio=0.5, num_subnets=1, no_coverage=True)
    twist_lm = TwistMegatronLM(provider_for(args), get_args=lambda: args)
    subnet = twist_lm.model_provider(True, True)
    assert count_parameters(subnet) < count_parameters(twist_lm.central.module)
    assert subnet.decoder.layers[0].self_attention.linear_proj.weight.shape == (64, 32)  # 2 of 4 heads x 16
    assert subnet.decoder.layers[0].mlp.linear_fc2.weight.shape == (64, 64)  # 64 of 128 neurons


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(use_distributed_optimizer=True), "--use-distributed-optimizer shards Adam's state"),
        (dict(fp16=True), "--fp16 scales the loss"),
        (dict(use_torch_fsdp2=True), "--use-torch-fsdp2"),
        (dict(save="ckpt", save_interval=6), "--save-interval 6 is not a multiple of --local-steps 4"),
        (dict(save="ckpt", exit_interval=3), "use --exit-interval 4 or 8"),
        (dict(exit_duration_in_mins=5), "--exit-duration-in-mins may stop mid-round"),
        (dict(finetune=True), "--finetune starts from Megatron-LM weights"),
        (dict(data_parallel_size=3), "3 data-parallel ranks cannot each train one of --num-subnets 2"),
    ],
)
def test_unsupported_megatron_settings_are_refused(flags, match):
    args = megatron_args(keep_ratio=0.5, num_subnets=2, local_steps=4)
    args.__dict__.update(flags)
    with pytest.raises(ConfigError, match=match):
        TwistMegatronLM(provider_for(args), get_args=lambda: args).validate(args)
    args = megatron_args(keep_ratio=0.5, num_subnets=2, whole_layers="0")
    with pytest.raises(ConfigError, match="--whole-layers"):
        TwistMegatronLM(provider_for(args), get_args=lambda: args).validate(args)


def test_resume_without_twist_state_is_refused(tmp_path):
    """A Megatron-LM checkpoint that holds no TwIST state for its iteration: refused, naming it."""
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("8")
    args = megatron_args(keep_ratio=0.5, num_subnets=2, local_steps=4)
    args.load = str(tmp_path)
    with pytest.raises(ConfigError, match="iteration 8.*twist/iter_0000008.*is missing"):
        TwistMegatronLM(provider_for(args), get_args=lambda: args).validate(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusals apply without CUDA")
def test_gpu_only_megatron_settings_are_refused_on_cpu():
    args = megatron_args(keep_ratio=0.5, num_subnets=2, local_steps=4)
    args.transformer_impl = "transformer_engine"
    with pytest.raises(ConfigError, match="--transformer-impl local"):
        TwistMegatronLM(provider_for(args), get_args=lambda: args).validate(args)
