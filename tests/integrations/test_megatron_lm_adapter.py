"""The Megatron-LM adapter's pieces, with Megatron-LM's `get_args` and `train_step` stood in.

Megatron-LM itself is not installed here (only megatron-core is a dependency), so its two
touch points are injected: an argparse Namespace as `get_args()` and a module-like object
whose `train_step` runs the project's step. Everything else is the real code.
"""

from __future__ import annotations

import argparse
import types

import pytest
import torch

from megatron_twist.config import MODEL_PRESETS, ConfigError, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.cpu_shim import seed_everything
from megatron_twist.data.batches import SyntheticBatches
from megatron_twist.distributed.runtime import build_twist_groups
from megatron_twist.integrations.megatron_lm import TwistMegatronLM, model_config_from_megatron_args, overlay
from megatron_twist.model.gpt import build_gpt_model, count_parameters
from megatron_twist.optim.optimizer import build_optimizer, build_scheduler
from megatron_twist.optim.step import train_step
from megatron_twist.training.twist_trainer import TwistTrainer

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
        (dict(use_distributed_optimizer=True), "without --use-distributed-optimizer"),
        (dict(bf16=True), "drop --fp16/--bf16"),
    ],
)
def test_unsupported_megatron_settings_are_refused(flags, match):
    args = megatron_args(keep_ratio=0.5, num_subnets=2)
    args.__dict__.update(flags)
    with pytest.raises(ConfigError, match=match):
        TwistMegatronLM(provider_for(args), get_args=lambda: args).validate(args)
    args = megatron_args(keep_ratio=0.5, num_subnets=2, whole_layers="0")
    with pytest.raises(ConfigError, match="--whole-layers"):
        TwistMegatronLM(provider_for(args), get_args=lambda: args).validate(args)


def test_installed_train_step_hook_equals_twist_trainer(mcore):
    """Megatron-LM's loop shape (args.curr_iteration, train_step(...)) with the hook installed."""
    train = TrainConfig(train_iters=10, micro_batch_size=2, log_interval=100)
    args = megatron_args(keep_ratio=0.5, num_subnets=1, no_coverage=True, local_steps=4)
    twist_lm = TwistMegatronLM(provider_for(args), get_args=lambda: args)
    seed_everything(train.seed)
    subnet = twist_lm.model_provider(True, True)
    optimizer = build_optimizer(subnet, train)
    scheduler = build_scheduler(optimizer, train)
    batches = SyntheticBatches(TINY.vocab_size, TINY.seq_length, train.micro_batch_size, seed=train.seed)
    calls = []

    def megatron_train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config):
        it = args.curr_iteration
        calls.append(it)
        return train_step(model[0], optimizer.optimizer, opt_param_scheduler, batches.get(it, 0, 1), it, 1.0)

    training = types.SimpleNamespace(train_step=megatron_train_step)
    twist_lm.install(training)
    megatron_optimizer = types.SimpleNamespace(optimizer=optimizer)  # Megatron's FP32Optimizer wraps torch Adam
    losses = []
    for iteration in range(train.train_iters):  # Megatron-LM's train(): sets curr_iteration, calls train_step
        args.curr_iteration = iteration
        losses.append(training.train_step(None, None, [subnet], megatron_optimizer, scheduler, None))
    twist_lm.hook.finish(train.train_iters)
    assert calls == list(range(10))

    twist = TwistConfig(keep_ratio=0.5, num_subnets=1, local_steps=4, coverage=False)
    ref = TwistTrainer(TINY, twist, train, build_twist_groups(twist), batches, log=lambda m: None).run()
    assert losses == ref.loss_curve()
    assert twist_lm.central.step == 10 and twist_lm.central.round == 3
    for name, p in ref.central.params.items():
        assert torch.equal(twist_lm.central.params[name], p), name
