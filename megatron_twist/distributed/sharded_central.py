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

Checkpoints: ``save`` writes one safetensors file per rank plus meta.json,
collectively and atomically (a temporary directory renamed into place by rank
0 once every shard is on disk, as in checkpointing.py; the directory must be
on a filesystem all ranks see, as for DeepSpeed's own checkpoints).
``model_io.read_central`` consolidates such a directory for single-process
tools (`twist extract`, `twist eval`). ``load`` reads this rank's own file
when the shard count matches, and reshards otherwise.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .. import outputs
from ..checkpointing import CheckpointError, load_checkpoint, publish_directory, sha256_file, write_tensor_file
from ..config import ModelConfig, TrainConfig, TwistConfig
from ..training.optim import ADAM_MOMENTS

FIELDS = ("param",) + ADAM_MOMENTS


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def _size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


class ShardedCentral:
    def __init__(self, config: ModelConfig, shapes: Dict[str, torch.Size], group: Optional[dist.ProcessGroup]):
        self.config = config
        self.group = group
        self.shard_count = _size(group)
        self.shard_index = _rank(group)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.shards: Dict[str, Dict[str, torch.Tensor]] = {
            f: {n: torch.zeros(self.shard_numel(n)) for n in self.shapes} for f in FIELDS}
        self.step = 0
        self.round = 0

    # -- geometry -------------------------------------------------------------------------------------------
    def shard_numel(self, name: str) -> int:
        return -(-self.shapes[name].numel() // self.shard_count)

    def shard_positions(self, name: str) -> torch.Tensor:
        """Flat positions in the full tensor of this rank's shard elements (past the end = padding)."""
        ps = self.shard_numel(name)
        return torch.arange(self.shard_index * ps, (self.shard_index + 1) * ps)

    def num_parameters(self) -> int:
        return sum(s.numel() for s in self.shapes.values())

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_full(cls, config: ModelConfig, tensors: Dict[str, torch.Tensor], group,
                  moments: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> "ShardedCentral":
        """Keep this rank's shard of full tensors (every rank passes the same values)."""
        central = cls(config, {n: t.shape for n, t in tensors.items()}, group)
        for field in FIELDS:
            source = tensors if field == "param" else (moments or {}).get(field)
            if source is None:
                continue
            for name in central.shapes:
                central.shards[field][name].copy_(central._cut(name, source[name]))
        return central

    def _cut(self, name: str, full: torch.Tensor) -> torch.Tensor:
        ps = self.shard_numel(name)
        flat = full.detach().reshape(-1).float()
        out = torch.zeros(ps)
        lo = self.shard_index * ps
        n = max(0, min(ps, flat.numel() - lo))
        out[:n] = flat[lo: lo + n]
        return out

    # -- collectives ----------------------------------------------------------------------------------------
    def gather(self, name: str, field: str = "param") -> torch.Tensor:
        """The full tensor (collective over the group: every rank calls it for the same name, in order)."""
        shard = self.shards[field][name]
        if self.shard_count == 1:
            return shard[: self.shapes[name].numel()].view(self.shapes[name]).clone()
        full = torch.empty(shard.numel() * self.shard_count)
        dist.all_gather_into_tensor(full, shard, group=self.group)
        return full[: self.shapes[name].numel()].view(self.shapes[name])

    def full_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
        """(weights, moments), full size, on every rank (collective; for tests and small models)."""
        weights = {n: self.gather(n) for n in self.shapes}
        moments = {m: {n: self.gather(n, m) for n in self.shapes} for m in ADAM_MOMENTS}
        return weights, moments

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, path: str, twist: TwistConfig, train: TrainConfig, data: Optional[dict] = None,
             overwrite: bool = False) -> None:
        """Collective, atomic: each rank writes its shard; rank 0 publishes the directory when all are on disk."""
        from ..model.gpt import full_layer_sizes

        final = Path(path).resolve()
        tmp = final.parent / f".{final.name}.tmp-sharded"
        outputs.check_replaceable(final, outputs.CENTRAL, overwrite)  # every rank, before any writes (shared fs)
        if self.shard_index == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            outputs.make_temporary(tmp)  # also clears one left (marked) by a crash during an earlier save
        self._barrier()
        file = tmp / shard_file_name(self.shard_index, self.shard_count)
        digest = write_tensor_file(file, {f"{f}/{n}": t for f in FIELDS for n, t in self.shards[f].items()})
        digests = self._all_gather((file.name, digest))
        if self.shard_index == 0:  # every shard is on disk: publish the directory
            publish_directory(tmp, final, {
                "kind": "central", "model": self.config.to_dict(), "twist": twist.to_dict(), "train": train.to_dict(),
                "step": self.step, "round": self.round, "data": data or {},
                "layer_sizes": [dataclasses.asdict(s) for s in full_layer_sizes(self.config)],
                "sharded": {"shard_count": self.shard_count, "shapes": {n: list(s) for n, s in self.shapes.items()}},
                "files": dict(digests)}, overwrite)
        self._barrier()

    @torch.no_grad()
    def load(self, path: str) -> dict:
        """Fill this rank's shards from a central checkpoint (sharded with any shard count, or single-file)."""
        from ..checkpointing import model_config_of
        from ..model_io import read_central

        root = Path(path)
        meta = _read_meta(root)
        saved = model_config_of(meta, path)
        if saved != self.config:
            raise CheckpointError(f"{path} holds a model of different sizes ({saved}) than requested ({self.config})")
        sharded = meta.get("sharded")
        if sharded and sharded["shard_count"] == self.shard_count:  # read only this rank's file
            name = shard_file_name(self.shard_index, self.shard_count)
            tensors = _verified_file(root, name, meta)
            for field in FIELDS:
                for n in self.shapes:
                    key = f"{field}/{n}"
                    if key not in tensors or tensors[key].shape != self.shards[field][n].shape:
                        raise CheckpointError(f"{root / name}: {key} is missing or has the wrong size")
                    self.shards[field][n].copy_(tensors[key])
        else:  # another shard count, or a single-file checkpoint: consolidate, then keep this rank's part
            _, weights, moments = read_central(path)
            for field in FIELDS:
                source = weights if field == "param" else moments[field]
                for n in self.shapes:
                    if n not in source or source[n].shape != self.shapes[n]:
                        raise CheckpointError(f"{path}: {field} {n} is missing or does not fit the model")
                    self.shards[field][n].copy_(self._cut(n, source[n]))
        self.step, self.round = int(meta["step"]), int(meta["round"])
        return meta

    def _barrier(self) -> None:
        if self.shard_count > 1:
            dist.barrier(group=self.group)

    def _all_gather(self, obj) -> list:
        if self.shard_count == 1:
            return [obj]
        out = [None] * self.shard_count
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _read_meta(root: Path) -> dict:
    return load_checkpoint(str(root), kind="central", tensors=False)[0]


def _verified_file(root: Path, name: str, meta: dict) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    digest = meta.get("files", {}).get(name)
    file = root / name
    if digest is None or not file.is_file():
        raise CheckpointError(f"{file} is missing from the checkpoint")
    if sha256_file(file) != digest:
        raise CheckpointError(f"{file} does not match its checksum in meta.json: the file is corrupt or truncated")
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None


def consolidate(meta: dict, files: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{field: {name: full tensor}} from the shard files of a sharded central checkpoint."""
    sharded = meta["sharded"]
    count = int(sharded["shard_count"])
    stems = [shard_file_name(k, count)[: -len(".safetensors")] for k in range(count)]
    missing = [s for s in stems if s not in files]
    if missing:
        raise CheckpointError(f"sharded central checkpoint lacks {missing[0]}.safetensors")
    out: Dict[str, Dict[str, torch.Tensor]] = {f: {} for f in FIELDS}
    for name, shape in sharded["shapes"].items():
        shape = torch.Size(shape)
        for field in FIELDS:
            key = f"{field}/{name}"
            try:
                flat = torch.cat([files[s][key] for s in stems])
            except KeyError:
                raise CheckpointError(f"sharded central checkpoint lacks {key}") from None
            if flat.numel() < shape.numel():
                raise CheckpointError(f"sharded central checkpoint: {key} is shorter than its shape {list(shape)}")
            out[field][name] = flat[: shape.numel()].view(shape).clone()
    return out

