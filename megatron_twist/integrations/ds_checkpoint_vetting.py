"""Vet a DeepSpeed engine checkpoint before DeepSpeed unpickles it.

Why: ``engine.load_checkpoint`` reads its ``*.pt`` files with ``torch.load(weights_only=False)``
(the files hold a few DeepSpeed objects besides tensors), so a checkpoint from someone else could
run arbitrary code at ``twist train --deepspeed --load``. Before the engine touches the directory,
every file of the tag it would load is read here with ``torch.load(weights_only=True)`` under an
allow-list of the few non-tensor classes DeepSpeed legitimately writes (``ALLOWED_GLOBALS``). A
file that names anything else (``os.system``, ``builtins.eval``, an unknown class) is refused by
name, before it is unpickled with code execution. The allow-listed classes are plain data holders
(enums, named tuples, a loss-scaler record): the restricted unpickler only creates them and sets
their fields, it never calls arbitrary functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from ..checkpointing import CheckpointError


def _allowed_globals() -> list:
    """DeepSpeed's own non-tensor types in its checkpoints (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, fp32 and bf16 checkpoints of
    deepspeed 0.19): the ZeRO stage enum, the (numel, start) record of a parameter's slice, the
    loss-scaler record in the optimizer state."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


def checkpoint_tag(engine_dir: Path, tag: Optional[str] = None) -> str:
    if tag is not None:
        return tag
    latest = engine_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{engine_dir} has no 'latest' file: not a DeepSpeed engine checkpoint written by "
                              "`twist train --deepspeed --save`; pass the directory that --save wrote")
    return latest.read_text().strip()


def vet_deepspeed_checkpoint(engine_dir, tag: Optional[str] = None) -> List[Path]:
    """Read every ``*.pt`` of the tag with ``weights_only=True`` + the allow-list; raise CheckpointError
    naming the first file that holds anything else. Returns the files vetted."""
    engine_dir = Path(engine_dir)
    tag_dir = engine_dir / checkpoint_tag(engine_dir, tag)
    files = sorted(tag_dir.glob("*.pt")) if tag_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed checkpoint files (*.pt): the engine checkpoint is "
                              "incomplete; load an earlier checkpoint")
    with torch.serialization.safe_globals(_allowed_globals()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated, corrupt or hostile
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise CheckpointError(f"{path} is not plain checkpoint data ({type(e).__name__}: {first}); it was not "
                                      "unpickled with code execution and is not loaded. Load only engine checkpoints "
                                      "written by `twist train --deepspeed --save`") from None
    return files
