"""Checkpoints of the sharded central model (distributed/sharded_central.py).

``save_sharded`` writes one safetensors file per rank plus meta.json, collectively and
atomically: a marked temporary directory, renamed into place by rank 0 (files.publish_directory)
once every shard is on disk. The directory must be on a filesystem all ranks see, as for
DeepSpeed's own checkpoints. ``models.read_central`` consolidates such a directory for
single-process tools (`twist extract`, `twist eval`). ``load_sharded`` reads this rank's own
file when the shard count matches, and reshards otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .. import outputs
from ..config import TrainConfig, TwistConfig
from ..distributed.sharded_central import FIELDS, ShardedCentral
from ..model.gpt import full_layer_sizes
from .files import CheckpointError, load_checkpoint, model_config_of, publish_directory, sha256_file, write_tensor_file
from .models import position_name, read_central, shard_file_name


def save_sharded(
    central: ShardedCentral,
    path: str,
    twist: TwistConfig,
    train: TrainConfig,
    data: Optional[dict] = None,
    overwrite: bool = False,
    position: Optional[Tuple[int, int, int, int]] = None,
) -> None:
    """Collective, atomic: each rank writes its shard; rank 0 publishes the directory when all are on disk.

    ``position``: (tp_rank, tp, pp_rank, pp) of the Megatron path's sharded central model, whose
    shards are over the data-parallel group of one TP shard / PP stage; at TP x PP > 1 every rank of
    the job writes its file (named with its position) and the directory is published by global rank 0
    once all are on disk (collectives over the default group)."""
    tp_rank, tp, pp_rank, pp = position or (0, 1, 0, 1)
    spread = tp * pp > 1
    where = position_name(tp_rank, pp_rank) if spread else None
    first = (dist.get_rank() == 0) if spread else central.shard_index == 0
    barrier = dist.barrier if spread else central.barrier

    def gather(obj):
        if not spread:
            return central.all_gather_objects(obj)
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    final = Path(path).resolve()
    tmp = final.parent / f".{final.name}.tmp-sharded"
    outputs.check_replaceable(final, outputs.CENTRAL, overwrite)  # every rank, before any writes (shared fs)
    if first:
        final.parent.mkdir(parents=True, exist_ok=True)
        outputs.make_temporary(tmp)  # also clears one left (marked) by a crash during an earlier save
    barrier()
    file = tmp / shard_file_name(central.shard_index, central.shard_count, where)
    digest = write_tensor_file(file, {f"{f}/{n}": t for f in FIELDS for n, t in central.shards[f].items()})
    shapes = {n: list(s) for n, s in central.shapes.items()}
    written = gather((file.name, digest, where, shapes))
    digests = [(name, d) for name, d, _, _ in written]
    layout = {"shapes": shapes}
    if spread:
        layout = {"tensor_parallel": tp, "pipeline_parallel": pp, "positions": {w: s for _, _, w, s in written}}
    if first:  # every shard is on disk: publish the directory
        publish_directory(
            tmp,
            final,
            {
                "kind": "central",
                "model": central.config.to_dict(),
                "twist": twist.to_dict(),
                "train": train.to_dict(),
                "step": central.step,
                "round": central.round,
                "data": data or {},
                "layer_sizes": [dataclasses.asdict(s) for s in full_layer_sizes(central.config)],
                "sharded": {"shard_count": central.shard_count, **layout},
                "files": dict(digests),
            },
            overwrite,
        )
    barrier()


@torch.no_grad()
def open_own_shard(path: str, config, group, position: Tuple[int, int, int, int], device) -> Optional[ShardedCentral]:
    """The Megatron path's resume of a sharded central model written at the SAME layout (TP, PP and data-
    parallel shard count): this rank reads only its own file. None when the checkpoint is not such a
    one (the caller then reads it whole, which works for any checkpoint and layout)."""
    root = Path(path)
    meta = _read_meta(root)
    sharded = meta.get("sharded")
    tp_rank, tp, pp_rank, pp = position
    count = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if not sharded or int(sharded["shard_count"]) != count:
        return None
    if (int(sharded.get("tensor_parallel", 1)), int(sharded.get("pipeline_parallel", 1))) != (tp, pp):
        return None
    if model_config_of(meta, path) != config:
        raise CheckpointError(f"{path} holds a model of different sizes than requested ({config})")
    where = position_name(tp_rank, pp_rank) if tp * pp > 1 else None
    shapes = sharded["positions"][where] if where else sharded["shapes"]
    central = ShardedCentral(config, shapes, group, device=device)
    _fill_own_shard(central, root, shard_file_name(central.shard_index, count, where), meta)
    central.step, central.round = int(meta["step"]), int(meta["round"])
    return central


def _fill_own_shard(central: ShardedCentral, root: Path, name: str, meta: dict) -> None:
    """Copy this rank's file (verified against meta.json's checksum) into its shards."""
    tensors = _verified_file(root, name, meta)
    for field in FIELDS:
        for n in central.shapes:
            key = f"{field}/{n}"
            if key not in tensors or tensors[key].shape != central.shards[field][n].shape:
                raise CheckpointError(f"{root / name}: {key} is missing or has the wrong size")
            central.shards[field][n].copy_(tensors[key])


@torch.no_grad()
def load_sharded(central: ShardedCentral, path: str) -> dict:
    """Fill this rank's shards from a central checkpoint (sharded with any shard count, or single-file)."""
    root = Path(path)
    meta = _read_meta(root)
    saved = model_config_of(meta, path)
    if saved != central.config:
        raise CheckpointError(f"{path} holds a model of different sizes ({saved}) than requested ({central.config})")
    sharded = meta.get("sharded")
    if sharded and sharded["shard_count"] == central.shard_count:  # read only this rank's file
        _fill_own_shard(central, root, shard_file_name(central.shard_index, central.shard_count), meta)
    else:  # another shard count, or a single-file checkpoint: consolidate, then keep this rank's part
        _, weights, moments = read_central(path)
        for field in FIELDS:
            source = weights if field == "param" else moments[field]
            for n in central.shapes:
                if n not in source or source[n].shape != central.shapes[n]:
                    raise CheckpointError(f"{path}: {field} {n} is missing or does not fit the model")
                central.shards[field][n].copy_(central.cut(n, source[n]))
    central.step, central.round = int(meta["step"]), int(meta["round"])
    return meta


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
