"""Knowledge distillation in the training step (--distill-teacher, issue #15 items 4c and 5).

References that do not share the code under test: the loss against a hand computation with Python's
math module; the run against an identity that holds only if teacher and student see the same tokens
and positions (a central teacher at the start of a round is the subnet itself: KL = 0 exactly).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.optim.distill import distillation_loss


def _hand_loss(student, teacher, label, w, t):
    """(1 - w) CE + w T^2 KL(p_t || p_s) for one token, with plain floats."""

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) for x in xs]
        return [v / sum(e) for v in e]

    ce = -math.log(softmax(student)[label])
    pt, ps = softmax([x / t for x in teacher]), softmax([x / t for x in student])
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return (1 - w) * ce + w * t * t * kl


def test_distillation_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g) * 2
    labels = torch.randint(0, 5, (2, 3), generator=g)
    for w, t in ((0.5, 1.0), (0.9, 2.0), (1.0, 0.5)):
        got = distillation_loss(student, teacher, labels, w, t)
        for i in range(2):
            for j in range(3):
                want = _hand_loss(student[i, j].tolist(), teacher[i, j].tolist(), int(labels[i, j]), w, t)
                assert abs(got[i, j].item() - want) < 1e-5, (w, t, i, j)
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(student, teacher[..., :4], labels, 0.5, 1.0)


def test_central_teacher_is_the_round_start(mcore, tmp_path):
    """One subnet holding everything, distilling from 'central' with w = 1/2: at the first step of each
    round the subnet IS the central model (KL = 0), so the loss is half the cross-entropy of the central
    model of the round's start, computed here by Megatron's own loss (not the distillation code). A frozen
    checkpoint of the starting model gives the same round 1 and another round 2."""
    from megatron_twist.checkpoint.models import save_central
    from megatron_twist.data.batches import SyntheticBatches
    from megatron_twist.distributed.runtime import build_twist_groups
    from megatron_twist.model.gpt import gpt_forward
    from megatron_twist.optim.step import masked_mean_loss
    from megatron_twist.training.launch import build_teacher
    from megatron_twist.training.twist_trainer import TwistTrainer, build_central

    model = ModelConfig(**MODEL_PRESETS["tiny"])
    twist = TwistConfig(keep_ratio=1.0, num_subnets=1, local_steps=3)
    batches = SyntheticBatches(model.vocab_size, model.seq_length, 2, seed=5)

    def run(**train):
        train = TrainConfig(micro_batch_size=2, lr=1e-3, min_lr=1e-3, lr_warmup_iters=0, **train)
        central = build_central(model, train.seed)
        groups = build_twist_groups(twist)
        trainer = TwistTrainer(
            model,
            twist,
            train,
            groups,
            batches,
            central=central,
            log=lambda m: None,
            teacher=build_teacher(train, central),
        )
        return central, trainer.run().loss_curve()

    @torch.no_grad()
    def half_ce(central, step):
        batch = batches.get(step, 0, 1)
        return 0.5 * masked_mean_loss(gpt_forward(central.module, batch["tokens"], batch["labels"]), batch["loss_mask"])

    kd = dict(distill_weight=0.5, distill_temperature=2.0)
    _, curve = run(train_iters=6, distill_teacher="central", **kd)
    after_round_1, _ = run(train_iters=3, distill_teacher="central", **kd)
    start = build_central(model, 1234)
    assert abs(curve[0] - half_ce(start, 0)) < 1e-6, curve
    assert abs(curve[3] - half_ce(after_round_1, 3)) < 1e-6, curve

    save_central(str(tmp_path / "teacher"), start, twist, TrainConfig())  # frozen: the starting model
    _, curve_frozen = run(train_iters=6, distill_teacher=str(tmp_path / "teacher"), **kd)
    assert curve_frozen[:3] == curve[:3], "round 1: the frozen teacher is the central model of the round start"
    assert abs(curve_frozen[3] - curve[3]) > 1e-6, "round 2: the frozen teacher no longer is"


@pytest.mark.parametrize(
    "extra, fix",
    [
        (["--distill-teacher", "central", "--tensor-model-parallel-size", "2"], "TP = PP = 1"),
        (["--distill-teacher", "central", "--deepspeed", "--deepspeed_config", "DS"], "with --deepspeed"),
        (["--distill-teacher", "OUT"], "holds no central checkpoint"),
        (["--distill-teacher", "central", "--distill-weight", "0"], "--distill-weight must be in (0, 1]"),
    ],
)
def test_distillation_flags_refused_before_any_work(refused_before_work, extra, fix):
    base = ["--model-preset", "tiny", "--mock-data", "--train-iters", "4", "--local-steps", "2"]
    assert fix in refused_before_work(["train", *base, *extra])
