"""With one subnet and kappa = 1, TwIST training IS plain training, bit for bit."""

from __future__ import annotations

import dataclasses

import torch

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.data.batches import SyntheticBatches
from megatron_twist.distributed.runtime import build_twist_groups
from megatron_twist.training.twist_trainer import TwistTrainer, train_dense


def test_one_subnet_kappa_one_equals_dense_training_exactly(mcore):
    model = ModelConfig(**MODEL_PRESETS["tiny"])
    train = TrainConfig(train_iters=10, micro_batch_size=2, lr=3e-3, lr_warmup_iters=2, log_interval=100)
    twist = TwistConfig(keep_ratio=1.0, num_subnets=1, local_steps=3)  # 4 rounds, the last one partial
    batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=5)
    result = TwistTrainer(model, twist, train, build_twist_groups(twist), batches, log=lambda m: None).run()
    dense, dense_losses = train_dense(model, train, batches, log=lambda m: None)
    assert result.loss_curve() == dense_losses
    for name, p in dense.module.named_parameters():
        assert torch.equal(result.central.params[name], p), name
    assert len(result.rounds) == 4 and result.central.step == 10


def test_lr_scale_is_plain_training_at_the_scaled_lr(mcore):
    # --twist-lr-scale S multiplies the subnets' peak and floor lr and nothing else: one subnet at kappa 1 with
    # S = 2 is dense training at twice --lr and --min-lr (the same warm-up and cosine shape), bit for bit
    model = ModelConfig(**MODEL_PRESETS["tiny"])
    train = TrainConfig(train_iters=8, micro_batch_size=2, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2, log_interval=100)
    twist = TwistConfig(keep_ratio=1.0, num_subnets=1, local_steps=4, lr_scale=2.0)
    batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=5)
    result = TwistTrainer(model, twist, train, build_twist_groups(twist), batches, log=lambda m: None).run()
    doubled = dataclasses.replace(train, lr=6e-3, min_lr=6e-4)
    dense, dense_losses = train_dense(model, doubled, batches, log=lambda m: None)
    assert result.loss_curve() == dense_losses
    for name, p in dense.module.named_parameters():
        assert torch.equal(result.central.params[name], p), name
    # and it is not dense training at --lr (the scale took effect)
    _, plain_losses = train_dense(model, train, batches, log=lambda m: None)
    assert result.loss_curve()[2:] != plain_losses[2:]


def test_twist_with_two_subnets_differs_from_dense_and_learns(mcore):
    model = ModelConfig(**MODEL_PRESETS["tiny"])
    train = TrainConfig(train_iters=30, micro_batch_size=4, lr=3e-3, lr_warmup_iters=3, log_interval=100)
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=5)
    batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=5)
    result = TwistTrainer(model, twist, train, build_twist_groups(twist), batches, log=lambda m: None).run()
    curve = result.loss_curve()
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3, curve
