"""Vetting of pickled checkpoint parts that other tools unpickle: DeepSpeed engine checkpoints (below)
and torch_dist's ``.metadata`` and byte items (at the end: ``vet_pickled_parts``).

A DeepSpeed engine checkpoint is vetted before DeepSpeed unpickles it.

Why: ``engine.load_checkpoint`` reads its ``*.pt`` files with ``torch.load(weights_only=False)``
(the files hold a few DeepSpeed objects besides tensors), so a checkpoint from someone else could
run arbitrary code at ``twist train --deepspeed --load``. Before the engine touches the directory,
every file of the tag it would load is read here with ``torch.load(weights_only=True)`` under an
allow-list of the few non-tensor classes DeepSpeed legitimately writes (``ALLOWED_GLOBALS``). A
file that names anything else (``os.system``, ``builtins.eval``, an unknown class) is refused by
name, before it is unpickled with code execution. The allow-listed classes are plain data holders
(enums, named tuples, a loss-scaler record): the restricted unpickler only creates them and sets
their fields, it never calls arbitrary functions.

Vetting is one read and DeepSpeed's load is another: a file swapped between the two would run.
So DeepSpeed's own read is restricted as well (:func:`load_vetted`): during
``engine.load_checkpoint`` every ``torch.load`` in the process is forced to ``weights_only=True``
(torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which overrides even an explicit
``weights_only=False``) under the same allow-list, and the tag is the vetted one, passed
explicitly (DeepSpeed does not read ``latest`` again). Why this and not the alternatives:

* copying the tag into a private temporary directory and loading the copy still ends in an
  unrestricted unpickler, and is only as safe as that directory's permissions; it also costs a
  second copy of the engine files on disk;
* a custom DeepSpeed checkpoint engine covers only the reads that go through
  ``engine.checkpoint_engine.load``; DeepSpeed 0.19.8 also calls ``torch.load(weights_only=False)``
  directly (``base_optimizer.py``, ``zero/stage3.py``, universal checkpoints), and a later
  version may add more;
* forcing ``weights_only`` at torch's level covers every read DeepSpeed makes, however it is
  routed, with no second copy: the bytes DeepSpeed unpickles are vetted by the unpickler that
  reads them. The up-front pass stays, to refuse a bad checkpoint by name before the engine
  touches anything.

While the load runs nothing else in the process reads with ``torch.load`` (the watchdog thread
does not), so forcing it process-wide for that span changes nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import faults
from .files import CheckpointError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def allowed_globals() -> list:
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
        raise CheckpointError(
            f"{engine_dir} has no 'latest' file: not a DeepSpeed engine checkpoint written by "
            "`twist train --deepspeed --save`; pass the directory that --save wrote"
        )
    return latest.read_text().strip()


def vet_deepspeed_checkpoint(engine_dir, tag: Optional[str] = None) -> List[Path]:
    """Read every ``*.pt`` of the tag with ``weights_only=True`` + the allow-list; raise CheckpointError
    naming the first file that holds anything else. Returns the files vetted."""
    engine_dir = Path(engine_dir)
    tag_dir = engine_dir / checkpoint_tag(engine_dir, tag)
    files = sorted(tag_dir.glob("*.pt")) if tag_dir.is_dir() else []
    if not files:
        raise CheckpointError(
            f"{tag_dir} holds no DeepSpeed checkpoint files (*.pt): the engine checkpoint is "
            "incomplete; load an earlier checkpoint"
        )
    with torch.serialization.safe_globals(allowed_globals()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated, corrupt or hostile
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise CheckpointError(
                    f"{path} is not plain checkpoint data ({type(e).__name__}: {first}); it was not "
                    "unpickled with code execution and is not loaded. Load only engine checkpoints "
                    "written by `twist train --deepspeed --save`"
                ) from None
    return files


@contextlib.contextmanager
def restricted_unpickling():
    """Every ``torch.load`` inside is ``weights_only=True`` with the allow-list, whatever it asks for."""
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before


def load_vetted(engine, engine_dir, tag: Optional[str] = None) -> Tuple[Optional[str], Optional[dict]]:
    """Vet the tag's files, then ``engine.load_checkpoint`` of that very tag with DeepSpeed's reads
    restricted (see module docstring). A file that is no longer plain data when DeepSpeed reads it
    (swapped after vetting) is refused like one that failed vetting. Returns what
    ``load_checkpoint`` returns."""
    engine_dir = Path(engine_dir)
    tag = checkpoint_tag(engine_dir, tag)
    files = vet_deepspeed_checkpoint(engine_dir, tag)
    faults.after_vetting(files)  # fault injection (tests/reliability); a no-op otherwise
    try:
        with restricted_unpickling():
            return engine.load_checkpoint(str(engine_dir), tag=tag)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"a file of {engine_dir / tag} is not plain checkpoint data when DeepSpeed reads it "
            f"(UnpicklingError: {first}); was it changed after it was vetted? It was not unpickled "
            "with code execution and is not loaded. Load only engine checkpoints written by "
            "`twist train --deepspeed --save`"
        ) from None


# ------------------------------------------------------------------ torch_dist's pickled parts
# What torch.distributed.checkpoint's .metadata pickle may name: EXACT (module, name) pairs, found by
# logging find_class on the .metadata of real llama and gpt2 torch_dist checkpoints (torch 2.13), plus
# torch's dtypes. No whole-module entries and no dotted names: a protocol-4 pickle can ask for
# ``(allowed module, "os.system")``, which pickle's own find_class would walk to, and call. torch reads
# .metadata with plain pickle.load, so it is vetted with this list first.
METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an enum (memory format)
        ("torch.distributed.checkpoint.planner", "SavePlan"),
        ("torch.distributed.checkpoint.planner", "TensorWriteData"),
        ("torch.distributed.checkpoint.planner", "WriteItem"),
        ("torch.distributed.checkpoint.planner", "WriteItemType"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # layout from its name ("torch.strided"): torch's own
        ("torch", "Size"),
    }
) | frozenset(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles only the exact globals a checkpoint's .metadata legitimately holds; anything else
    (os.system, builtins.eval, a dotted path through an allowed module, ...) is refused before it is
    looked up, let alone called."""

    def find_class(self, module, name):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return getattr(importlib.import_module(module), name)  # one attribute: never a dotted walk


def vet_pickled_parts(root) -> None:
    """Refuse a torch_dist checkpoint whose pickled parts hold anything but plain data.

    torch.distributed.checkpoint reads ``.metadata`` with ``pickle.load`` and byte items (Megatron's
    ``_extra_state`` objects) with ``torch.load(weights_only=False)``: both could run arbitrary code
    from a checkpoint made by someone else. Before Megatron touches the directory, ``.metadata`` is
    read with an allow-list unpickler and every byte item with ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = Path(root)
    try:
        with open(root / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()
        byte_items = [
            (idx, info)
            for idx, info in metadata.storage_data.items()
            if isinstance(metadata.state_dict_metadata.get(idx.fqn), BytesStorageMetadata)
        ]
    except Exception as e:  # noqa: BLE001 - missing, truncated or hostile metadata
        raise CheckpointError(
            f"{root}/.metadata cannot be read safely ({type(e).__name__}: {first_line(e)}); "
            "the checkpoint is incomplete, corrupt or not a torch_dist checkpoint written by "
            "megatron-twist: it is not loaded"
        ) from None
    for idx, info in byte_items:
        try:
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"transformed byte item ({info.transform_descriptors})")
            with open(root / info.relative_path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{root}: the object {idx.fqn} in {info.relative_path} is not plain data "
                f"({type(e).__name__}: {first_line(e)}); it is not loaded"
            ) from None


def first_line(e: BaseException) -> str:
    """The first line of an error's message, for one-line refusals."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:300]
