"""Which checkpoint a path means, whatever layout this project wrote there.

A user passes the directory a command wrote; they should not have to know its layout:

* a checkpoint directory: safetensors + ``meta.json`` (central, sharded central, or cut-out), or
  Megatron ``dist_checkpointing`` (``metadata.json``, the torch_dist format);
* a save directory of ``iter_XXXXXXX`` checkpoints with a latest pointer (``--save-interval``):
  the checkpoint the pointer names;
* a DeepSpeed save directory (``twist train --deepspeed --save DIR``): ``DIR/central``, next to
  the engine's own files in ``DIR/engine``.

:func:`locate` resolves any of these to the directory that holds the model; anything else is
refused with what was found and the path to pass instead. No torch import: refusals stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from ..config import ModelConfig
from ..errors import CheckpointError
from . import series
from .files import load_checkpoint, model_config_of

DEEPSPEED_CENTRAL = "central"  # the central model inside a DeepSpeed save directory (or its iter_)


def is_torch_dist(path) -> bool:
    """Megatron dist_checkpointing writes metadata.json; this project's safetensors format meta.json."""
    return (Path(path) / "metadata.json").is_file() and not (Path(path) / "meta.json").is_file()


def holds_checkpoint(path) -> bool:
    """A checkpoint directory of either format, or of the DeepSpeed path (engine/ + central/); not a
    save directory of iter_ checkpoints."""
    return any((Path(path) / f).exists() for f in ("meta.json", "metadata.json", f"{DEEPSPEED_CENTRAL}/meta.json"))


def locate(path) -> Path:
    """The directory holding the model that ``path`` means (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint directory {root} does not exist; pass the directory `twist train --save`, "
            "`twist extract --save` or `twist import-hf --save` wrote"
        )
    if (root / "meta.json").is_file() or is_torch_dist(root):
        return root
    if series.read_pointer(root) is not None:
        return locate(series.resolve_load(root))
    if (root / DEEPSPEED_CENTRAL / "meta.json").is_file():
        return root / DEEPSPEED_CENTRAL
    found = sorted(p.name for p in root.iterdir())[:6]
    raise CheckpointError(
        f"{root}/meta.json is missing: {root} is not a megatron-twist checkpoint (it holds "
        f"{found or 'nothing'}); pass the directory `twist train --save` (or `extract --save`) "
        "wrote: a checkpoint, a save directory with latest_checkpointed_iteration.txt, or a "
        "DeepSpeed save directory with central/"
    )


def read_central_meta(path) -> Tuple[dict, ModelConfig]:
    """(meta dict, ModelConfig) of the central checkpoint ``path`` means, in either format, without
    building anything."""
    root = locate(path)
    if is_torch_dist(root):
        from .torch_dist import read_common

        common = read_common(root)
        return common, model_config_of(common, root)
    meta = load_checkpoint(str(root), kind="central", tensors=False)[0]
    return meta, model_config_of(meta, root)
