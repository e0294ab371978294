"""Optimizer, LR schedule and Adam-state access shared by TwIST and dense training.

Dense and TwIST training build their optimizer here, with the same parameter
groups and Megatron's OptimizerParamScheduler, so that TwIST with one subnet
at kappa=1 reproduces dense training bit for bit (a test checks it).
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config import TrainConfig

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def param_groups(model: torch.nn.Module):
    """Megatron's convention: no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [
        {"params": decay, "wd_mult": 1.0},
        {"params": no_decay, "wd_mult": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model),
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        foreach=False,  # the same kernel path everywhere keeps runs comparable bit for bit
    )


def build_scheduler(optimizer, train: TrainConfig, lr_scale: float = 1.0) -> OptimizerParamScheduler:
    """Megatron's warm-up and cosine decay from ``train``; ``lr_scale`` (TwIST's subnets,
    TwistConfig.lr_scale) multiplies the peak and the floor, not the shape."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr * lr_scale,
        min_lr=min(train.min_lr, train.lr) * lr_scale,
        lr_warmup_steps=min(train.lr_warmup_iters, train.train_iters - 1),
        lr_decay_steps=train.train_iters,
        lr_decay_style="cosine",
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters,
        wd_incr_style="constant",
    )


def set_group_lr_bounds(param_groups, max_lr: float, min_lr: float) -> None:
    """Give every param group this peak and floor lr, the keys Megatron's OptimizerParamScheduler reads
    before its own max_lr/min_lr: TwIST's subnet lr (--lr x --twist-lr-scale) under an optimizer and
    scheduler that Megatron-LM built. Absolute values, so setting them again after a resume (which brings
    the groups back from the checkpoint) does not compound."""
    for group in param_groups:
        group["max_lr"], group["min_lr"] = max_lr, min_lr


def set_schedule_step(scheduler: OptimizerParamScheduler, global_step: int) -> float:
    """Put lr / wd at the value for ``global_step`` (subnets jump between steps)."""
    scheduler.num_steps = global_step
    scheduler.step(0)
    return scheduler.optimizer.param_groups[0]["lr"]


def read_adam_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """{moment: {param name: tensor}} of an AdamW that has taken at least one step."""
    out = {m: {} for m in ADAM_MOMENTS}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        for m in ADAM_MOMENTS:
            out[m][name] = state[m]
    return out


@torch.no_grad()
def write_adam_param_state(optimizer, p, moments: Dict[str, torch.Tensor], step: int, group_of=None) -> None:
    """Install one parameter's moments and the step count (which sets Adam's bias correction); a refill
    writes each parameter as it goes, so no subnet-sized copy of all moments exists at once."""
    group_of = group_of if group_of is not None else {id(q): g for g in optimizer.param_groups for q in g["params"]}
    state = optimizer.state[p]
    # Adam's step count lives where torch's Adam keeps it: on the parameter's device for a fused or
    # capturable group, else on the CPU (a host scalar for bias correction; build_optimizer's AdamW).
    group = group_of.get(id(p), {})
    where = p.device if group.get("fused") or group.get("capturable") else "cpu"
    state["step"] = torch.tensor(float(step), dtype=torch.float32, device=where)
    for m in ADAM_MOMENTS:
        value = moments[m]
        if m in state and state[m].shape == value.shape:
            state[m].copy_(value)
        else:
            state[m] = value.clone().to(p.dtype)
