"""Central-model checkpoints in Megatron's ``dist_checkpointing`` format (TP resharding).

A checkpoint written here at tensor/pipeline-parallel sizes ``k``/``p`` loads
at any sizes ``j``/``q`` that divide the model: Megatron stores every
parameter as one *global* tensor (``ShardedTensor`` / ``ShardedTensorFactory``
entries from ``GPTModel.sharded_state_dict()``; layers stacked along a
prepended axis indexed by the GLOBAL layer number) and each rank reads back
just the slice its current layout needs.

What is in a checkpoint directory (backend ``torch_dist``, common ``torch``)::

    metadata.json   Megatron's backend marker (written last by Megatron's save)
    common.pt       the JSON-able "common" state, under the key ``twist``:
                    format, kind, step, round, model/twist/train configs,
                    tensor/pipeline sizes it was saved with, ``extra``
    .metadata, __*_*.distcp   torch.distributed.checkpoint files with
                    model.*                         GPTModel weights (Megatron keys)
                    twist_optimizer.exp_avg.*       Adam first moments
                    twist_optimizer.exp_avg_sq.*    Adam second moments

The Adam moments of ``CentralModel.moments`` are saved with EXACTLY the
sharding of their parameter: each moment entry is the parameter's own
``ShardedTensor`` (or, for the SwiGLU ``linear_fc1`` weight, its
``ShardedTensorFactory``, whose build function chunks whatever tensor it is
given into gate/up halves) with only ``key`` and ``data`` replaced. Resharding
of the moments is therefore whatever Megatron does for the weights.

Writes are atomic: every rank writes into one temporary sibling directory;
after a barrier (every rank finished, Megatron wrote ``metadata.json``)
rank 0 alone moves an existing checkpoint aside, renames the temporary
directory into place and only then deletes the old one. A crash at any point
before that rename leaves the previous checkpoint untouched and loadable; a
stale temporary directory is removed by the next save. One writer per path.

Both functions are collective: every rank of the default process group calls
them. ``parallel_state`` must be initialised (``init_model_parallel``) with the
sizes passed to :func:`load_central_dist`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.torch import (
    TorchDistLoadShardedStrategy,
    TorchDistSaveShardedStrategy,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from .. import outputs
from ..config import ConfigError, ModelConfig, TrainConfig, TwistConfig
from ..model.gpt import build_gpt_model
from ..optim.optimizer import ADAM_MOMENTS
from ..twist.central import CentralModel
from .files import CheckpointError, swap_in
from .torch_dist_state import MODEL_PREFIX, central_sharded_state_dict, in_process_write_results_queue
from .vetting import first_line, vet_pickled_parts

FORMAT = "megatron-twist-dist"
FORMAT_VERSION = 1
BACKEND = "torch_dist"
COMMON_KEY = "twist"  # top-level key of the common (non-sharded) state in common.pt

# What fixes tensor shapes or the module tree: a checkpoint is refused when the
# requested model differs from the saved one in any of these (head_dim covers kv_channels).
ARCHITECTURE_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "head_dim",
)


# ----------------------------------------------------------------------------------------------
# collective helpers
# ----------------------------------------------------------------------------------------------


def _require_process_group() -> None:
    if not dist.is_initialized():
        raise ConfigError(
            "distributed checkpoints need a process group: call "
            "megatron_twist.distributed.runtime.init_distributed() first"
        )


def _agree(ok: bool, message: str = "", own_error: Optional[BaseException] = None) -> None:
    """Collective: raise the first failing rank's message on EVERY rank (no rank is left waiting).

    A rank that failed itself re-raises ``own_error`` when given (keeping its type).
    """
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, (bool(ok), message))
    if not ok and own_error is not None:
        raise own_error
    for rank, (r_ok, r_msg) in enumerate(results):
        if not r_ok:
            raise CheckpointError(r_msg if rank == dist.get_rank() else f"rank {rank}: {r_msg}")


def _on_rank0(fn: Callable[[], None], what: str) -> None:
    """Run ``fn`` on rank 0 only and make every rank agree on whether it worked."""
    ok, msg = True, ""
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - must reach the other ranks, or they wait forever
            ok, msg = False, f"{what} failed: {type(e).__name__}: {e}"
    _agree(ok, msg)


def temporary_path(final: Path) -> Path:
    """A marked directory (outputs.make_temporary) holding the checkpoint being written, as
    ``checkpoint_in(temporary_path(final))``: Megatron writes into an empty directory of its own,
    and only a directory carrying our marker is ever deleted."""
    return final.parent / f".{final.name}.dist-tmp"


def checkpoint_in(tmp: Path) -> Path:
    return tmp / "checkpoint"


def old_path(final: Path) -> Path:
    return final.parent / f".{final.name}.dist-old"


def publish_checkpoint(tmp: Path, final: Path, overwrite: bool = False) -> None:
    """Rename the complete checkpoint in ``tmp`` to ``final`` (not collective; rank 0 calls it), through
    the one atomic publish routine (files.swap_in).

    An existing ``final`` (a megatron-twist central checkpoint, or anything with ``overwrite``) is
    moved to ``old_path(final)`` first and deleted only after the new one is in place, so at every
    instant a complete checkpoint exists under ``final`` or (between the two renames) under
    ``old_path(final)``, which :func:`read_common` points to.
    """
    outputs.check_replaceable(final, outputs.CENTRAL, overwrite)
    swap_in(checkpoint_in(tmp), final, old=old_path(final))
    outputs.remove_temporary(tmp)


def _prepare_temporary(tmp: Path, final: Path, overwrite: bool) -> None:
    outputs.check_replaceable(final, outputs.CENTRAL, overwrite)  # before any rank writes
    final.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_in(outputs.make_temporary(tmp)).mkdir()  # a leftover of a crashed save is removed


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


def _common_state(central: CentralModel, twist: TwistConfig, train: TrainConfig, extra: Optional[dict]) -> dict:
    common = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "central",
        "step": int(central.step),
        "round": int(central.round),
        "model": central.config.to_dict(),
        "twist": twist.to_dict(),
        "train": train.to_dict(),
        "tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "world_size": dist.get_world_size(),
        "extra": dict(extra or {}),
    }
    try:
        # Plain JSON types only: common.pt is read back with torch.load(weights_only=True).
        return json.loads(json.dumps(common))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"the checkpoint's extra state must be JSON-serialisable ({e}); "
            "pass plain dicts, lists, strings and numbers"
        ) from None


def save_central_dist(
    path,
    central: CentralModel,
    twist: TwistConfig,
    train: TrainConfig,
    extra: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Collective: write ``central`` (weights, Adam moments, step, round, configs) to ``path``.

    Every rank calls it with its own shards. Returns the final path.
    """
    _require_process_group()
    if not parallel_state.model_parallel_is_initialized():
        raise ConfigError(
            "Megatron's parallel_state is not initialised: call "
            "megatron_twist.distributed.runtime.init_model_parallel(...) before saving"
        )
    final = Path(path).resolve()
    tmp = temporary_path(final)
    common = _common_state(central, twist, train, extra)  # refuse bad `extra` before touching disk
    # Every rank must write into the same directory: make sure they all name the same one.
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, str(final))
    if len(set(paths)) != 1:
        raise CheckpointError(
            f"ranks disagree on the checkpoint path ({sorted(set(paths))}); pass the same path on every rank"
        )

    _on_rank0(lambda: _prepare_temporary(tmp, final, overwrite), f"creating {tmp}")
    state = central_sharded_state_dict(central)
    state[COMMON_KEY] = common
    ok, msg = True, ""
    try:
        # A fresh strategy per save: the registered default instance caches save plans.
        with in_process_write_results_queue():
            dist_checkpointing.save(
                state, str(checkpoint_in(tmp)), sharded_strategy=TorchDistSaveShardedStrategy(BACKEND, 1)
            )
    # torch's CheckpointException (a write failure on some rank, raised on every rank by Megatron's
    # finalize step) derives from BaseException, not Exception.
    except (Exception, TorchCheckpointException) as e:  # noqa: BLE001 - reported on every rank by _agree
        ok, msg = False, f"writing the distributed checkpoint into {tmp} failed: {type(e).__name__}: {e}"
    # Barrier: every rank has finished writing (Megatron's save ends with one too).
    _agree(ok, msg)
    _on_rank0(lambda: publish_checkpoint(tmp, final, overwrite), f"renaming {tmp} to {final}")
    return final


def read_common(path) -> dict:
    """The common state of a checkpoint written by :func:`save_central_dist` (not collective)."""
    root = Path(path)
    if not root.is_dir():
        previous = old_path(root.resolve())
        hint = (
            (
                f"; a save was interrupted while replacing it: the previous checkpoint is complete in "
                f"{previous}, rename that directory to {root}"
            )
            if previous.is_dir()
            else ""
        )
        raise CheckpointError(
            f"checkpoint directory {root} does not exist; pass the directory save_central_dist wrote{hint}"
        )
    if not dist_checkpointing.check_is_distributed_checkpoint(str(root)):
        raise CheckpointError(
            f"{root} is not a Megatron distributed checkpoint (no valid metadata.json); "
            "a megatron-twist safetensors checkpoint loads with model_io.load_central, "
            "otherwise pass the directory save_central_dist wrote"
        )
    try:
        # weights_only=True here, whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD say
        # (Megatron's own load_common_state_dict leaves it to the default).
        state = torch.load(root / COMMON_STATE_FNAME, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/missing common.pt, unpicklable content
        raise CheckpointError(
            f"{root}/common.pt cannot be read ({type(e).__name__}: {first_line(e)}); "
            "the checkpoint is incomplete, corrupt or not plain data: re-create it"
        ) from None
    vet_pickled_parts(root)
    common = state.get(COMMON_KEY) if isinstance(state, dict) else None
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        raise CheckpointError(
            f"{root} is a Megatron distributed checkpoint but not a megatron-twist central "
            "checkpoint; pass a directory written by save_central_dist"
        )
    if common.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{root} has format version {common.get('format_version')}, this release reads {FORMAT_VERSION}"
        )
    if common.get("kind") != "central":
        raise CheckpointError(f"{root} holds a {common.get('kind')!r} model, a 'central' one is needed")
    return common


def check_model_matches(saved: dict, model: ModelConfig, path) -> None:
    """Refuse a requested model whose architecture differs from the saved one, naming the fields."""
    try:
        saved_model = ModelConfig.from_dict(saved)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: the saved model config is not valid for this release ({e})") from None
    fields = list(ARCHITECTURE_FIELDS)
    if model.family == "gpt2" or saved_model.family == "gpt2":  # learned positions: seq_length is a shape
        fields.append("seq_length")
    diffs = [
        f"{f}: saved {getattr(saved_model, f)!r}, requested {getattr(model, f)!r}"
        for f in fields
        if getattr(saved_model, f) != getattr(model, f)
    ]
    if diffs:
        raise CheckpointError(
            f"{path} holds a different model ({'; '.join(diffs)}); load it with the "
            "model config it was saved with (common['model'] in the checkpoint)"
        )


def _check_layout(model: ModelConfig, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if not parallel_state.model_parallel_is_initialized():
        raise ConfigError(
            "Megatron's parallel_state is not initialised: call megatron_twist.distributed.runtime."
            f"init_model_parallel(seed, tensor_parallel_size={tp}, pipeline_parallel_size={pp}) "
            "before loading"
        )
    current = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if current != (tp, pp):
        raise ConfigError(
            f"tensor/pipeline parallel sizes {tp}/{pp} differ from parallel_state's {current[0]}/"
            f"{current[1]}; initialise parallel_state with the sizes you load at"
        )
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        if getattr(model, name) % tp:
            raise CheckpointError(
                f"{name} {getattr(model, name)} does not divide over tensor-parallel size "
                f"{tp}; load at a tensor-parallel size that divides it"
            )
    if model.num_layers % pp:
        raise CheckpointError(
            f"num_layers {model.num_layers} does not divide over pipeline-parallel size {pp}; "
            "load at a pipeline-parallel size that divides it"
        )


def load_central_dist(
    path, model: ModelConfig, tensor_parallel_size: int, pipeline_parallel_size: int = 1
) -> Tuple[CentralModel, TwistConfig, TrainConfig, dict]:
    """Collective: build the central model for the current layout and load ``path`` into it.

    The layout (``parallel_state``, initialised by the caller with these sizes)
    may differ from the one the checkpoint was saved with. A pipeline stage
    loads only its own layers. Returns ``(central, twist, train, common)``;
    ``common`` is the saved common state (step, round, configs, the sizes it
    was saved with, ``extra``).
    """
    error: Optional[Exception] = None
    try:
        common = read_common(path)
        _require_process_group()
        check_model_matches(common["model"], model, path)
        _check_layout(model, tensor_parallel_size, pipeline_parallel_size)
        try:
            twist = TwistConfig.from_dict(common["twist"])
            train = TrainConfig(**common["train"])
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{path}: the saved TwIST/train configs are not valid ({e})") from None
    except (CheckpointError, ConfigError) as e:
        if not dist.is_initialized():
            raise
        error = e
    # Every rank refuses together, so none is left waiting in the collective load below.
    _agree(error is None, str(error or ""), own_error=error)

    central = CentralModel(
        model,
        build_gpt_model(
            model, tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size
        ),
    )
    request = central_sharded_state_dict(central)
    try:
        # A fresh strategy per load: the registered default instance keeps the last metadata.
        loaded = dist_checkpointing.load(
            request, str(path), sharded_strategy=TorchDistLoadShardedStrategy(), strict=StrictHandling.RAISE_ALL
        )
    except (Exception, TorchCheckpointException) as e:  # noqa: BLE001 - Megatron raises several types
        raise CheckpointError(
            f"{path} does not fit the requested central model "
            f"({type(e).__name__}: {e}); re-create the checkpoint or load it with the "
            "config it was saved with"
        ) from None

    error = None
    with torch.no_grad():
        try:
            try:
                central.module.load_state_dict(loaded[MODEL_PREFIX], strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{path}: the weights do not fit the model ({e})") from None
            for m in ADAM_MOMENTS:
                for name, dst in central.moments[m].items():
                    src = loaded["optimizer"][m][name]
                    if src.shape != dst.shape:
                        raise CheckpointError(
                            f"{path}: {m} of {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                        )
                    dst.copy_(src)
        except CheckpointError as e:
            error = e
    _agree(error is None, str(error or ""), own_error=error)
    central.step, central.round = int(common["step"]), int(common["round"])
    return central, twist, train, common
