"""One optimizer step on one or more micro-batches: the only training step in the project.

Dense training and every TwIST subnet call this same function, so the two
differ only in what model and optimizer state they are handed.

Parallel context (:class:`StepParallelism`), all optional:
* pipeline parallel: forward/backward go through Megatron-core's 1F1B
  schedule (``get_forward_backward_func``); the loss is broadcast from the
  last stage so every stage reports it;
* replicas of a subnet: gradients are averaged over the subnet group;
* tensor/pipeline parallel: the gradient norm for clipping is summed over
  the model-parallel groups (sharded parameters once, replicated ones once).
Without any of these the step is plain PyTorch (and bit-identical to it).

Mixed precision (``compute``, Megatron's --bf16): ``model`` holds the fp32 master weights the
optimizer steps, ``compute`` a bf16 twin of it. Each step copies the masters into the twin (rounding
to bf16), runs forward and backward on the twin (bf16 activations and gradients), and hands the
gradients back to the masters in fp32; replica averaging, clipping and the optimizer step then run
in fp32 exactly as without it. Whoever reads or writes ``model`` (refill, aggregation, checkpoints)
sees fp32 only.

Micro-batches (``num_microbatches`` N, Megatron's --global-batch-size): the step's batch is split
into N equal micro-batches, rows in order; their gradients accumulate before one optimizer step,
each micro-batch's mean loss weighted 1/N (Megatron's rule; with equal token counts per micro-batch
it is the mean over the whole batch). With PP the N micro-batches go through the 1F1B schedule, so
a stage idles (PP - 1) / (N + PP - 1) of the step (``pipeline_bubble``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..model.gpt import gpt_forward
from .distill import Teacher
from .optimizer import set_schedule_step


@dataclass(frozen=True)
class StepParallelism:
    subnet_group: Optional[dist.ProcessGroup] = None  # replicas of this subnet: average gradients
    norm_groups: Sequence[dist.ProcessGroup] = ()  # TP and PP groups: sum squared grad norms
    pipeline_group: Optional[dist.ProcessGroup] = None  # set when PP > 1
    pipeline_last_rank: int = 0  # global rank of the last stage in this rank's pipeline

    @property
    def trivial(self) -> bool:
        return self.subnet_group is None and not self.norm_groups and self.pipeline_group is None


def batch_to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Where a training batch (built on the CPU by the data sources, data/batches.py) moves to the
    device of the model it feeds; both trainers' steps go through here."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def masked_mean_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def train_step(
    model,
    optimizer,
    scheduler,
    batch: Dict[str, torch.Tensor],
    global_step: int,
    clip_grad: float,
    parallel: Optional[StepParallelism] = None,
    stats: Optional[dict] = None,
    num_microbatches: int = 1,
    compute: Optional[torch.nn.Module] = None,
    teacher: Optional[Teacher] = None,
) -> float:
    """Returns the loss. ``stats``: if given, receives ``grad_norm``, the gradient norm before clipping
    (over TP/PP shards, after replica averaging: the same value on every rank of the subnet).
    ``teacher`` (optim/distill.py, TP = PP = 1): the loss mixes in distillation from it."""
    set_schedule_step(scheduler, global_step)
    batch = batch_to_device(batch, next(model.parameters()).device)
    optimizer.zero_grad(set_to_none=True)
    parallel = parallel or StepParallelism()
    runner = model if compute is None else _refresh_twin(model, compute)
    micro = split_microbatches(batch, num_microbatches)
    if parallel.pipeline_group is not None:
        loss = _pipelined_forward_backward(runner, micro, parallel)
    else:
        loss = 0.0
        for mb in micro:
            if teacher is None:
                per_token = gpt_forward(runner, mb["tokens"], mb["labels"])
            else:
                per_token = teacher.loss(runner, mb["tokens"], mb["labels"])
            loss_t = masked_mean_loss(per_token, mb["loss_mask"])
            (loss_t / num_microbatches if num_microbatches > 1 else loss_t).backward()
            loss += loss_t.item() / num_microbatches
    if compute is not None:
        _gradients_to_masters(compute, model)
    params = [p for p in model.parameters() if p.grad is not None]
    if parallel.subnet_group is not None:
        _average_gradients(params, parallel.subnet_group)
    norm = None
    if clip_grad > 0:
        if parallel.norm_groups:
            norm = _clip_by_global_norm(params, clip_grad, parallel.norm_groups)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    elif stats is not None and params:
        norm = _global_norm(params, parallel.norm_groups)
    if stats is not None:
        stats["grad_norm"] = float(norm) if norm is not None else 0.0
    optimizer.step()
    return loss


@torch.no_grad()
def _refresh_twin(master: torch.nn.Module, twin: torch.nn.Module) -> torch.nn.Module:
    """The bf16 twin holding the masters' current values (copy_ rounds fp32 to bf16)."""
    for m, t in zip(master.parameters(), twin.parameters()):
        t.copy_(m)
        t.grad = None
    return twin


@torch.no_grad()
def _gradients_to_masters(twin: torch.nn.Module, master: torch.nn.Module) -> None:
    for m, t in zip(master.parameters(), twin.parameters()):
        m.grad = None if t.grad is None else t.grad.float()
        t.grad = None


def split_microbatches(batch: Dict[str, torch.Tensor], num_microbatches: int):
    """A step's batch as ``num_microbatches`` equal micro-batches (rows in order)."""
    rows = batch["tokens"].shape[0]
    if rows % num_microbatches:
        raise ValueError(f"a batch of {rows} rows does not split into {num_microbatches} equal micro-batches")
    if num_microbatches == 1:
        return [batch]
    size = rows // num_microbatches
    return [{k: v[j * size : (j + 1) * size] for k, v in batch.items()} for j in range(num_microbatches)]


def pipeline_bubble(pipeline_parallel_size: int, num_microbatches: int) -> float:
    """The fraction of a 1F1B step a stage idles: (PP - 1) / (N + PP - 1)."""
    return (pipeline_parallel_size - 1) / (num_microbatches + pipeline_parallel_size - 1)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = gpt_forward(model, batch["tokens"], batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask, output_tensor):
    loss = masked_mean_loss(output_tensor, loss_mask)
    # a copy: the schedule divides the returned loss by num_microbatches in place
    return loss, {"loss": loss.detach().clone()}


def _pipelined_forward_backward(model, micro, parallel: StepParallelism) -> float:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = micro[0]["tokens"].shape
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    loss = torch.zeros(1, dtype=torch.float64, device=micro[0]["tokens"].device)
    if parallel_state.is_pipeline_last_stage():
        loss[0] = sum(x["loss"].item() for x in losses) / len(losses)
    dist.broadcast(loss, src=parallel.pipeline_last_rank, group=parallel.pipeline_group)
    return loss.item()


@torch.no_grad()
def _average_gradients(params, group) -> None:
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


@torch.no_grad()
def _global_norm(params, groups) -> torch.Tensor:
    """The gradient norm over all model-parallel shards (each sharded parameter once)."""
    if not groups:
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq = torch.zeros(1, dtype=torch.float32, device=params[0].device)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.float().pow(2).sum()
    for g in groups:
        dist.all_reduce(sq, group=g)
    return sq.sqrt()


@torch.no_grad()
def _clip_by_global_norm(params, max_norm: float, groups) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s rule, with the norm taken over all model-parallel shards."""
    norm = _global_norm(params, groups)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm
