"""One optimizer step on one micro-batch: the only training step in the project.

Dense training and every TwIST subnet call this same function, so the two
differ only in what model and optimizer state they are handed.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..model.gpt import gpt_forward
from .optim import set_schedule_step


def masked_mean_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def train_step(model, optimizer, scheduler, batch: Dict[str, torch.Tensor], global_step: int, clip_grad: float) -> float:
    set_schedule_step(scheduler, global_step)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    loss = masked_mean_loss(gpt_forward(model, batch["tokens"], batch["labels"]), batch["loss_mask"])
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
    optimizer.step()
    return loss.item()
