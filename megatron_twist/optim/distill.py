"""Knowledge distillation in the training step (--distill-teacher; issue #15).

The student's per-token loss becomes ``(1 - w) * CE(student, labels) + w * T^2 * KL(teacher_T ||
student_T)``, where ``_T`` is the softmax at temperature T (Hinton et al.: the T^2 keeps the soft
term's gradient scale independent of T). The teacher runs forward only, without gradients, on the
same tokens; its logits are a constant of the step.

Two teachers (training/launch.py picks): a frozen dense checkpoint (Minitron-style prune-and-retrain
with distillation from the unpruned model), or TwIST's own central model as it stood at the start
of the round (distillation inside a round). Full logits are needed on every rank, so distillation
runs at TP = PP = 1 only (training/setup.py refuses other layouts before any work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.gpt import gpt_forward


@dataclass
class Teacher:
    module: torch.nn.Module  # a full-vocabulary GPT; never stepped here
    weight: float  # w: the share of the soft (teacher) term
    temperature: float  # T

    def loss(self, student: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] of ``student`` on ``tokens``."""
        with torch.no_grad():
            teacher_logits = gpt_forward(self.module, tokens).float()
        return distillation_loss(
            gpt_forward(student, tokens).float(), teacher_logits, labels, self.weight, self.temperature
        )


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float, temperature: float
) -> torch.Tensor:
    """Per-token ``(1 - w) * CE + w * T^2 * KL(p_teacher || p_student)`` [b, s] from logits [b, s, v]."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "differ: the teacher must have the student's vocabulary"
        )
    ce = F.cross_entropy(student_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    t = temperature
    teacher_logp = F.log_softmax(teacher_logits / t, dim=-1)
    student_logp = F.log_softmax(student_logits / t, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return (1.0 - weight) * ce + weight * t * t * kl
