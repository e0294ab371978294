"""An independent reference for TwIST training at kappa < 1: the masked full model.

Test code only (the package never imports it). It shares NO code with the
package's sampler consumers, slicing, aggregation, hooks, worker, optimizer or
train step. Its only inputs from the code under test are the sampler's plans
(which heads / neurons each subnet keeps in each layer, as plain index lists),
the initial central weights and the batch source (data, not method).

What it does instead of the materialized path:
* one FULL-size Megatron model per subnet and round; a 0/1 mask per unit
  (query head, MLP neuron) built from the plan's index lists, expanded to a
  0/1 mask per element of every parameter from Megatron's documented layouts;
* the forward zeroes unheld units by multiplying the inputs of the output
  projections (`linear_proj`: concatenated head outputs, `linear_fc2`: neuron
  activations) by the unit mask times the activation-correction scale;
* gradients multiplied by the element mask, clipped by the norm of the
  subnet's (masked) gradients, and AdamW written out by hand, applied only
  where the mask is 1;
* aggregation: for every element, the mean over the subnets whose mask holds
  it (unheld elements keep their value), written as a loop over subnets with
  elementwise sums.

Semantics reproduced (read from docs/ARCHITECTURE.md, design decisions 3-5,
and the code of optim/optimizer.py, optim/step.py, twist/worker.py):
* LR: Megatron's linear warmup from 0 over min(warmup, train_iters - 1)
  steps, then cosine to min_lr at train_iters, evaluated at the GLOBAL step,
  both times TwistConfig.lr_scale (--twist-lr-scale);
* weight decay: decoupled (AdamW), on parameters with more than one
  dimension only (biases and norm weights have none);
* Adam step count: `aggregate` continues from the global step (moments
  sliced from the central model); `reset` starts every round from zero
  moments AND step 0 (fresh bias correction);
* clipping: torch's rule, max_norm / (norm + 1e-6) capped at 1, where norm
  is over the subnet's own gradients;
* `rescale`: a layer's kept head outputs are multiplied by heads / kept
  heads, its kept neuron outputs by neurons / kept neurons; `none`: no scale;
* subnet s at global step t reads batch (t, slot s of num_subnets).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
EPS = 1e-8  # AdamW's eps in the project (optim.build_optimizer)


# ---------------------------------------------------------------- masks from index lists


@dataclass
class SubnetUnits:
    """One subnet of one round as plain lists: kept heads and neurons per layer."""

    heads: List[List[int]]
    neurons: List[List[int]]

    @classmethod
    def from_plan(cls, plan) -> "SubnetUnits":
        return cls([list(lu.heads) for lu in plan.layers], [list(lu.neurons) for lu in plan.layers])


def unit_mask(kept: Sequence[int], total: int) -> torch.Tensor:
    mask = torch.zeros(total)
    for u in kept:
        mask[u] = 1.0
    return mask


def qkv_row_mask(head_mask: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Megatron's fused QKV rows, per KV group g: [query heads of g | key of g | value of g].

    A query row is held with its head; a group's key/value rows are held when
    any of the group's query heads is (GQA keeps every group; MHA: one head per group).
    """
    per_group = len(head_mask) // groups
    rows = []
    for g in range(groups):
        group_heads = head_mask[g * per_group : (g + 1) * per_group]
        for h in range(per_group):
            rows += [float(group_heads[h])] * head_dim
        kv = 1.0 if float(group_heads.sum()) > 0 else 0.0
        rows += [kv] * (2 * head_dim)
    return torch.tensor(rows)


def element_masks(model, shapes: Dict[str, torch.Size], units: SubnetUnits) -> Dict[str, torch.Tensor]:
    """0/1 per element of every central parameter: does this subnet hold it?"""
    hd, F = model.head_dim, model.ffn_hidden_size
    out = {}
    for name, shape in shapes.items():
        mask = torch.ones(shape)
        m = _LAYER.match(name)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            heads = unit_mask(units.heads[layer], model.num_attention_heads)
            neurons = unit_mask(units.neurons[layer], F)
            if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                rows = qkv_row_mask(heads, model.num_query_groups, hd)
                mask = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
            elif rest == "self_attention.linear_proj.weight":
                mask = heads.repeat_interleave(hd).view(1, -1).expand(shape).clone()
            elif rest in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
                # SwiGLU stacks [gate rows | up rows]: neuron n owns rows n and F + n.
                rows = torch.cat([neurons, neurons]) if model.gated_mlp else neurons
                mask = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
            elif rest == "mlp.linear_fc2.weight":
                mask = neurons.view(1, -1).expand(shape).clone()
            # everything else (norms, output-projection biases) is shared: all ones
        assert mask.shape == shape, name
        out[name] = mask
    return out


def activation_scales(model, correction: str, units: SubnetUnits) -> List[tuple]:
    """Per layer (heads scale, neurons scale) for the kept units; `none` means 1."""
    out = []
    for heads, neurons in zip(units.heads, units.neurons):
        if correction == "rescale":
            out.append((model.num_attention_heads / len(heads), model.ffn_hidden_size / len(neurons)))
        else:
            out.append((1.0, 1.0))
    return out


def attach_unit_masks(module, model, correction: str, units: SubnetUnits) -> list:
    """Multiply the inputs of linear_proj / linear_fc2 by (unit mask x correction scale)."""
    handles = []
    scales = activation_scales(model, correction, units)
    for layer, block in enumerate(module.decoder.layers):
        s_heads, s_neurons = scales[layer]
        heads = unit_mask(units.heads[layer], model.num_attention_heads) * s_heads
        neurons = unit_mask(units.neurons[layer], model.ffn_hidden_size) * s_neurons
        per_column = heads.repeat_interleave(model.head_dim)
        handles.append(block.self_attention.linear_proj.register_forward_pre_hook(_times(per_column)))
        handles.append(block.mlp.linear_fc2.register_forward_pre_hook(_times(neurons)))
    return handles


def _times(vector: torch.Tensor):
    def hook(_module, args):
        return (args[0] * vector,) + tuple(args[1:])

    return hook


# ---------------------------------------------------------------- schedule and loss


def learning_rate(train, step: int) -> float:
    """Megatron's warmup + cosine as the project configures it (init 0, decay over train_iters)."""
    warmup = min(train.lr_warmup_iters, train.train_iters - 1)
    min_lr = min(train.min_lr, train.lr)
    if warmup > 0 and step <= warmup:
        return train.lr * step / warmup
    if step > train.train_iters:
        return min_lr
    ratio = (step - warmup) / (train.train_iters - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (train.lr - min_lr)


def mean_token_loss(module, batch) -> torch.Tensor:
    tokens = batch["tokens"]
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    per_token = module(input_ids=tokens, position_ids=positions, attention_mask=None, labels=batch["labels"])
    mask = batch["loss_mask"]
    return (per_token.float() * mask).sum() / mask.sum()


# ---------------------------------------------------------------- training


@dataclass
class SubnetResult:
    """One subnet after its round, in FULL shapes (only masked elements are meaningful)."""

    masks: Dict[str, torch.Tensor]
    weights: Dict[str, torch.Tensor]
    exp_avg: Dict[str, torch.Tensor]
    exp_avg_sq: Dict[str, torch.Tensor]
    losses: List[float]


@dataclass
class ReferenceState:
    weights: Dict[str, torch.Tensor]
    exp_avg: Dict[str, torch.Tensor]
    exp_avg_sq: Dict[str, torch.Tensor]
    step: int = 0
    clipped_steps: int = 0
    history: List[List[SubnetResult]] = field(default_factory=list)


class MaskedReference:
    """TwIST as masked full-model training; ``module`` is a full-size model used as scratch."""

    def __init__(self, model, twist, train, module, initial_weights: Dict[str, torch.Tensor], batches):
        self.model, self.twist, self.train = model, twist, train
        self.module, self.batches = module, batches
        self.params = dict(module.named_parameters())
        assert set(self.params) == set(initial_weights)
        w = {n: t.detach().clone().float() for n, t in initial_weights.items()}
        self.state = ReferenceState(
            w, {n: torch.zeros_like(t) for n, t in w.items()}, {n: torch.zeros_like(t) for n, t in w.items()}
        )

    def run_round(self, plans) -> List[SubnetResult]:
        steps = min(self.twist.local_steps, self.train.train_iters - self.state.step)
        results = [self._train_subnet(s, SubnetUnits.from_plan(p), steps) for s, p in enumerate(plans)]
        self._aggregate(results)
        self.state.step += steps
        self.state.history.append(results)
        return results

    def _train_subnet(self, s: int, units: SubnetUnits, steps: int) -> SubnetResult:
        st = self.state
        shapes = {n: t.shape for n, t in st.weights.items()}
        masks = element_masks(self.model, shapes, units)
        weights = {n: t.clone() for n, t in st.weights.items()}
        if self.twist.optimizer_state == "aggregate":
            m1 = {n: t.clone() for n, t in st.exp_avg.items()}
            m2 = {n: t.clone() for n, t in st.exp_avg_sq.items()}
            adam_count = st.step  # continues from the global step
        else:  # reset: fresh moments and a fresh bias correction every round
            m1 = {n: torch.zeros_like(t) for n, t in weights.items()}
            m2 = {n: torch.zeros_like(t) for n, t in weights.items()}
            adam_count = 0
        hooks = attach_unit_masks(self.module, self.model, self.twist.correction, units)
        losses = []
        try:
            for t in range(steps):
                global_step = st.step + t
                grads, loss = self._masked_gradients(weights, masks, global_step, s)
                losses.append(loss)
                adam_count += 1
                # --twist-lr-scale multiplies the subnets' whole schedule (peak and floor alike)
                lr = learning_rate(self.train, global_step) * self.twist.lr_scale
                self._adam(weights, m1, m2, grads, masks, lr, adam_count)
        finally:
            for h in hooks:
                h.remove()
        return SubnetResult(masks, weights, m1, m2, losses)

    def _masked_gradients(self, weights, masks, global_step: int, s: int):
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
                p.grad = None
        batch = self.batches.get(global_step, s, self.twist.num_subnets)
        loss = mean_token_loss(self.module, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() * masks[n] for n, p in self.params.items()}
        clip = self.train.clip_grad
        if clip > 0:
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
            coef = min(clip / (norm + 1e-6), 1.0)
            if coef < 1.0:
                self.state.clipped_steps += 1
            grads = {n: g * coef for n, g in grads.items()}
        return grads, loss.item()

    def _adam(self, weights, m1, m2, grads, masks, lr: float, count: int) -> None:
        b1, b2 = self.train.adam_beta1, self.train.adam_beta2
        bc1, bc2 = 1 - b1**count, 1 - b2**count
        for n, w in weights.items():
            held = masks[n] > 0
            g = grads[n]
            wd = self.train.weight_decay if w.dim() > 1 else 0.0
            new_m1 = b1 * m1[n] + (1 - b1) * g
            new_m2 = b2 * m2[n] + (1 - b2) * g * g
            update = (lr / bc1) * new_m1 / (new_m2.sqrt() / math.sqrt(bc2) + EPS)
            new_w = w * (1 - lr * wd) - update
            weights[n] = torch.where(held, new_w, w)
            m1[n] = torch.where(held, new_m1, m1[n])
            m2[n] = torch.where(held, new_m2, m2[n])

    def _aggregate(self, results: List[SubnetResult]) -> None:
        """Per element: mean over the subnets whose mask holds it; unheld elements keep their value."""
        st = self.state
        fields = [("weights", st.weights)]
        if self.twist.optimizer_state == "aggregate":
            fields += [("exp_avg", st.exp_avg), ("exp_avg_sq", st.exp_avg_sq)]
        for attr, central in fields:
            for n in list(central):
                total = torch.zeros_like(central[n])
                holders = torch.zeros_like(central[n])
                for r in results:
                    total += r.masks[n] * getattr(r, attr)[n]
                    holders += r.masks[n]
                central[n] = torch.where(holders > 0, total / holders.clamp(min=1), central[n])
