"""Saving and loading TwIST models with their configs (central and cut-out).

Builds on checkpoint/files.py (format, atomicity, verification) and adds what a
model is: its ModelConfig, TwIST config, per-layer sizes and, for a cut-out
model, which central units it kept. Loading rebuilds the exact Megatron-core
GPTModel and refuses weights that do not fit it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from ..config import ConfigError, ModelConfig, TrainConfig, TwistConfig
from ..model.gpt import LayerSize, build_gpt_model, full_layer_sizes
from ..optim.optimizer import ADAM_MOMENTS
from ..twist.central import CentralModel
from ..twist.extraction import load_named_parameters
from ..twist.sampler import LayerUnits, SubnetPlan
from .detect import locate
from .files import CheckpointError, load_checkpoint, model_config_of, save_checkpoint

SHARDED_FIELDS = ("param",) + ADAM_MOMENTS  # what a sharded central checkpoint holds per tensor


def _plan_to_json(plan: SubnetPlan) -> list:
    return [{"heads": list(lu.heads), "neurons": list(lu.neurons)} for lu in plan.layers]


def plan_from_json(layers: list) -> SubnetPlan:
    return SubnetPlan(tuple(LayerUnits(tuple(d["heads"]), tuple(d["neurons"])) for d in layers))


def save_central(
    path: str,
    central: CentralModel,
    twist: TwistConfig,
    train: TrainConfig,
    data: Optional[dict] = None,
    full_state=None,
    extra: Optional[dict] = None,
    overwrite: bool = False,
) -> None:
    """``full_state``: (weights, moments) gathered from a sharded run; default: the central's own.
    ``extra``: more meta.json entries (e.g. ``origin`` of an imported model)."""
    weights, moments = full_state if full_state is not None else (dict(central.params), central.moments)
    meta = {
        "kind": "central",
        "model": central.config.to_dict(),
        "twist": twist.to_dict(),
        "train": train.to_dict(),
        "step": central.step,
        "round": central.round,
        "layer_sizes": [dataclasses.asdict(s) for s in full_layer_sizes(central.config)],
        "data": data or {},
        **(extra or {}),
    }
    tensors = {"model": weights}
    tensors["optimizer"] = {f"{m}/{n}": t for m in ADAM_MOMENTS for n, t in moments[m].items()}
    save_checkpoint(path, meta, tensors, overwrite)


def read_central(path: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
    """(meta, full weights, full Adam moments) of a central checkpoint; a sharded one (written by the
    DeepSpeed path, distributed/sharded_central.py) is consolidated."""
    path = str(locate(path))  # a save directory's latest, a DeepSpeed save's central/, or the checkpoint
    meta, tensors = load_checkpoint(path, kind="central")
    if meta.get("sharded"):
        full = consolidate(meta, tensors)
        return meta, full["param"], {m: full[m] for m in ADAM_MOMENTS}
    optimizer = tensors.get("optimizer", {})
    moments = {m: {k[len(m) + 1 :]: v for k, v in optimizer.items() if k.startswith(m + "/")} for m in ADAM_MOMENTS}
    return meta, tensors["model"], moments


@torch.no_grad()
def fill_central(central: CentralModel, path: str, tp_rank: int = 0, tp: int = 1, first_layer: int = 0) -> dict:
    """Load a single-file central checkpoint into a central model of ANY TP/PP layout."""
    from ..distributed.full_state import load_full_state

    meta, weights, moments = read_central(path)
    saved = model_config_of(meta, path)
    if saved != central.config:
        raise CheckpointError(f"{path} holds a model of different sizes ({saved}) than requested ({central.config})")
    try:
        load_full_state(central.module, weights, central.config, tp_rank, tp, first_layer)
        for m in ADAM_MOMENTS:
            holder = _ParamsView(central.moments[m])
            load_full_state(holder, moments[m], central.config, tp_rank, tp, first_layer)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({e})") from None
    central.step, central.round = int(meta["step"]), int(meta["round"])
    return meta


class _ParamsView(torch.nn.Module):
    """Lets load_full_state fill a {name: tensor} dict as if it were a module's parameters."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        super().__init__()
        self._tensors = tensors

    def named_parameters(self, *args, **kwargs):
        return iter(self._tensors.items())


def load_central(path: str) -> Tuple[CentralModel, TwistConfig, dict]:
    path = str(locate(path))
    meta, weights, moments = read_central(path)
    model = model_config_of(meta, path)
    central = CentralModel(model, build_gpt_model(model))
    _load_weights(central.module, weights, path)
    for m in ADAM_MOMENTS:
        for n in central.moments[m]:
            if n not in moments[m]:
                raise CheckpointError(f"{path}: optimizer state {m}/{n} is missing")
            central.moments[m][n].copy_(moments[m][n])
    central.step, central.round = int(meta["step"]), int(meta["round"])
    return central, TwistConfig.from_dict(meta["twist"]), meta


def save_extracted(
    path: str,
    module: torch.nn.Module,
    model: ModelConfig,
    twist: TwistConfig,
    plan: SubnetPlan,
    keep_ratio: float,
    method: str,
    source: dict,
    overwrite: bool = False,
) -> None:
    meta = {
        "kind": "extracted",
        "model": model.to_dict(),
        "twist": twist.to_dict(),
        "keep_ratio": keep_ratio,
        "method": method,
        "layer_sizes": [dataclasses.asdict(s) for s in plan.layer_sizes(model)],
        "plan": _plan_to_json(plan),
        "source": source,
        "data": source.get("data", {}),
    }
    save_checkpoint(path, meta, {"model": dict(module.named_parameters())}, overwrite)


def load_model(path: str) -> Tuple[torch.nn.Module, dict]:
    """Any megatron-twist model checkpoint (central or cut-out) as a ready GPTModel."""
    path = str(locate(path))
    meta, tensors = load_checkpoint(path)
    model = model_config_of(meta, path)
    try:
        sizes = [LayerSize(**d) for d in meta["layer_sizes"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/meta.json has no valid layer_sizes ({e})") from None
    module = build_gpt_model(model, sizes)
    _load_weights(module, tensors["model"], path)
    return module, meta


def _load_weights(module: torch.nn.Module, tensors: dict, path: str) -> None:
    try:
        load_named_parameters(module, tensors)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def shard_file_name(index: int, count: int, position: Optional[str] = None) -> str:
    """The file of shard ``index`` of ``count`` in a sharded central checkpoint (checkpoint/sharded.py);
    ``position``: the TP shard / PP stage it belongs to (``position_name``) when TP x PP > 1."""
    return ("" if position is None else position + "-") + f"shard-{index:05d}-of-{count:05d}.safetensors"


def position_name(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:03d}-pp{pp_rank:03d}"


def consolidate(meta: dict, files: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{field: {name: full tensor}} from the shard files of a sharded central checkpoint: the data-parallel
    shards of each tensor concatenated, then (written at TP x PP > 1) each TP shard put where it sits in
    the full tensor and each stage's layers renamed to their global index."""
    sharded = meta["sharded"]
    tp, pp = int(sharded.get("tensor_parallel", 1)), int(sharded.get("pipeline_parallel", 1))
    if tp * pp == 1:
        return _consolidate_position(sharded, files, None, sharded["shapes"])
    from ..distributed.full_state import global_name, layer_range, shard_spec

    model = model_config_of(meta, "sharded central checkpoint")
    out: Dict[str, Dict[str, torch.Tensor]] = {f: {} for f in SHARDED_FIELDS}
    for p in range(pp):
        first, _ = layer_range(model, p, pp)
        for t in range(tp):
            position = position_name(t, p)
            if position not in sharded["positions"]:
                raise CheckpointError(f"sharded central checkpoint lacks TP shard {t} of stage {p}")
            local = _consolidate_position(sharded, files, position, sharded["positions"][position])
            for field, tensors in local.items():
                for name, value in tensors.items():
                    full_name = global_name(name, first)
                    spec = shard_spec(model, full_name, t, tp, device="cpu")
                    if spec is None:  # the same on every TP shard: keep TP rank 0's
                        out[field].setdefault(full_name, value)
                        continue
                    dim, index = spec
                    if full_name not in out[field]:
                        shape = list(value.shape)
                        shape[dim] *= tp
                        # checkpoint I/O: consolidated on the CPU, where the files were read
                        out[field][full_name] = torch.zeros(shape, dtype=value.dtype, device="cpu")
                    out[field][full_name].index_copy_(dim, index, value)
    return out


def _consolidate_position(sharded: dict, files, position: Optional[str], shapes: dict):
    count = int(sharded["shard_count"])
    stems = [shard_file_name(k, count, position)[: -len(".safetensors")] for k in range(count)]
    missing = [s for s in stems if s not in files]
    if missing:
        raise CheckpointError(f"sharded central checkpoint lacks {missing[0]}.safetensors")
    out: Dict[str, Dict[str, torch.Tensor]] = {f: {} for f in SHARDED_FIELDS}
    for name, shape in shapes.items():
        shape = torch.Size(shape)
        for field in SHARDED_FIELDS:
            key = f"{field}/{name}"
            try:
                flat = torch.cat([files[s][key] for s in stems])
            except KeyError:
                raise CheckpointError(f"sharded central checkpoint lacks {key}") from None
            if flat.numel() < shape.numel():
                raise CheckpointError(f"sharded central checkpoint: {key} is shorter than its shape {list(shape)}")
            out[field][name] = flat[: shape.numel()].view(shape).clone()
    return out
