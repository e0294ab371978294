"""The central model sharded over a process group (the DeepSpeed path's central model).

Every rank of ``group`` (all data-parallel ranks: subnets x replicas) holds
1/W of every central tensor: parameter ``name`` is flattened, padded to a
multiple of W, and rank k keeps elements [k*ps, (k+1)*ps), ps = ceil(N/W),
for the weights and both Adam moments. This is ZeRO-3's per-parameter
partitioning, applied to the model that no rank trains.

Why: with a replicated central model every rank paid for the full model
three times (weights, two moments) plus a full aggregation buffer, which
made TwIST under ZeRO use MORE memory per rank than dense training
(docs/RESULTS.md). Sharded, the central model costs 3N/W per rank, and the
largest transient is one parameter (gathered one at a time at refill, or
reduced one at a time at aggregation; see integrations/zero_round_hook.py).

Its shards, and every buffer gathered from them, live on ``device``: that of
the subnet model it serves (the collectives run over the group's backend, NCCL
on GPUs). Its checkpoints (one safetensors file per rank, resharded on load)
are written and read by checkpoint/sharded.py, through the CPU.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..optim.optimizer import ADAM_MOMENTS

FIELDS = ("param",) + ADAM_MOMENTS


def _size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


class ShardedCentral:
    def __init__(
        self,
        config: ModelConfig,
        shapes: Dict[str, torch.Size],
        group: Optional[dist.ProcessGroup],
        *,
        device: Union[torch.device, str],
    ):
        self.config = config
        self.group = group
        self.device = torch.device(device)
        self.shard_count = _size(group)
        self.shard_index = _rank(group)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.shards: Dict[str, Dict[str, torch.Tensor]] = {
            f: {n: torch.zeros(self.shard_numel(n), device=self.device) for n in self.shapes} for f in FIELDS
        }
        self.step = 0
        self.round = 0

    # -- geometry -------------------------------------------------------------------------------------------
    def shard_numel(self, name: str) -> int:
        return -(-self.shapes[name].numel() // self.shard_count)

    def shard_positions(self, name: str) -> torch.Tensor:
        """Flat positions in the full tensor of this rank's shard elements (past the end = padding)."""
        ps = self.shard_numel(name)
        return torch.arange(self.shard_index * ps, (self.shard_index + 1) * ps, device=self.device)

    def num_parameters(self) -> int:
        return sum(s.numel() for s in self.shapes.values())

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_full(
        cls,
        config: ModelConfig,
        tensors: Dict[str, torch.Tensor],
        group,
        moments: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
        *,
        device: Union[torch.device, str],
    ) -> "ShardedCentral":
        """Keep this rank's shard of full tensors (every rank passes the same values), on ``device``."""
        central = cls(config, {n: t.shape for n, t in tensors.items()}, group, device=device)
        for field in FIELDS:
            source = tensors if field == "param" else (moments or {}).get(field)
            if source is None:
                continue
            for name in central.shapes:
                central.shards[field][name].copy_(central.cut(name, source[name]))
        return central

    def cut(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``full`` (on any device: a checkpoint's CPU tensor is copied over), on ``device``."""
        ps = self.shard_numel(name)
        flat = full.detach().reshape(-1).float()
        out = torch.zeros(ps, device=self.device)
        lo = self.shard_index * ps
        n = max(0, min(ps, flat.numel() - lo))
        out[:n].copy_(flat[lo : lo + n])  # copy_: across devices too
        return out

    # -- collectives ----------------------------------------------------------------------------------------
    def gather(self, name: str, field: str = "param") -> torch.Tensor:
        """The full tensor (collective over the group: every rank calls it for the same name, in order)."""
        shard = self.shards[field][name]
        if self.shard_count == 1:
            return shard[: self.shapes[name].numel()].view(self.shapes[name]).clone()
        full = torch.empty(shard.numel() * self.shard_count, device=shard.device)
        dist.all_gather_into_tensor(full, shard, group=self.group)
        return full[: self.shapes[name].numel()].view(self.shapes[name])

    def reduce_scatter(self, buffer: torch.Tensor) -> torch.Tensor:
        """Sum ``buffer`` (a tensor's full flat size, padded: shard_numel x shard_count) over the group;
        this rank receives the sums of its own shard (collective)."""
        if self.shard_count == 1:
            return buffer
        out = torch.empty(buffer.numel() // self.shard_count, device=buffer.device)
        dist.reduce_scatter_tensor(out, buffer, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def full_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
        """(weights, moments), full size, on every rank (collective; for tests and small models)."""
        weights = {n: self.gather(n) for n in self.shapes}
        moments = {m: {n: self.gather(n, m) for n in self.shapes} for m in ADAM_MOMENTS}
        return weights, moments

    @torch.no_grad()
    def squared_norms(self, requests: Dict[str, str]) -> Dict[str, torch.Tensor]:
        """Squared norms of the 'rows' or 'columns' of 2-D central weights ({name: which}), each rank's
        shard scattered onto the rows/columns its elements lie in, then one SUM all-reduce for all of
        them (collective; --twist-pin-cut's scores, twist/pin.py)."""
        parts = []
        for name, which in requests.items():
            rows, cols = self.shapes[name]
            positions = self.shard_positions(name)
            inside = positions < rows * cols  # the last shard's padding lies past the end
            values = self.shards["param"][name][inside].pow(2)
            index = positions[inside] // cols if which == "rows" else positions[inside] % cols
            out = torch.zeros(rows if which == "rows" else cols, device=self.device)
            parts.append(out.index_add_(0, index, values))
        flat = torch.cat(parts)
        if self.shard_count > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        return dict(zip(requests, flat.split([p.numel() for p in parts])))

    def barrier(self) -> None:
        if self.shard_count > 1:
            dist.barrier(group=self.group)

    def all_gather_objects(self, obj) -> list:
        if self.shard_count == 1:
            return [obj]
        out = [None] * self.shard_count
        dist.all_gather_object(out, obj, group=self.group)
        return out
