"""Checkpoints of central and cut-out models: safe format, atomic writes, checked loads.

Layout of a checkpoint directory::

    meta.json           what it is: kind ('central' | 'extracted'), configs, step,
                        round, layer sizes, kept units, sha256 of every tensor file
    model.safetensors   weights, by Megatron-core parameter name
    optimizer.safetensors   (central only) Adam moments, 'exp_avg/<name>', 'exp_avg_sq/<name>'

Writes go to a temporary sibling directory that is renamed into place only
when complete, so a crash mid-write never leaves a half checkpoint under the
final name. Loads use safetensors (no unpickling) and verify checksums,
format version and shapes before anything is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import faults, outputs
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError  # noqa: F401  (CheckpointError re-exported)

FORMAT = "megatron-twist"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensor_file(file: Path, named: Dict[str, torch.Tensor]) -> str:
    """Write one safetensors file durably; returns its sha256 for meta.json."""
    save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(file))
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    return sha256_file(file)


def swap_in(tmp: Path, final: Path, old: Optional[Path] = None) -> None:
    """The ONE atomic publish routine: rename the complete directory ``tmp`` to ``final``. An existing
    ``final`` (already checked with ``outputs.check_replaceable``) is set aside to ``old`` (default
    ``.NAME.old-PID``) first and removed only once the new one is in place."""
    old = old or final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        outputs.remove_temporary(old)  # a leftover of an interrupted swap (marked), never anything else
        outputs.set_aside(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    outputs.seal_temporary(final)
    outputs.remove_temporary(old)  # also one left by a swap interrupted between the two renames


def publish_directory(tmp: Path, final: Path, meta: dict, overwrite: bool = False) -> None:
    """Write meta.json (with the format stamp) into the complete directory ``tmp`` and swap it in for
    ``final``: readers see the old checkpoint or the new one, never a half-written one. ``final`` must
    be absent, empty or a checkpoint of the same kind (``overwrite``: anything)."""
    outputs.check_replaceable(final, meta["kind"], overwrite)
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    swap_in(tmp, final)


def save_checkpoint(
    path: str, meta: dict, tensors: Dict[str, Dict[str, torch.Tensor]], overwrite: bool = False
) -> Path:
    """Atomically write ``{file stem: {name: tensor}}`` plus meta.json into ``path``."""
    final = Path(path).resolve()
    outputs.check_replaceable(final, meta["kind"], overwrite)  # before any work
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.make_temporary(final.parent / f".{final.name}.tmp-{os.getpid()}")
    files = {}
    for stem, named in tensors.items():
        file = tmp / f"{stem}.safetensors"
        files[file.name] = write_tensor_file(file, named)
    faults.checkpoint_write_point("files-written")  # fault injection (tests/reliability); a no-op otherwise
    publish_directory(tmp, final, dict(meta, files=files), overwrite)
    return final


def load_checkpoint(
    path: str, kind: Optional[str] = None, tensors: bool = True
) -> Tuple[dict, Dict[str, Dict[str, torch.Tensor]]]:
    """Read and verify a checkpoint. Returns (meta, {file stem: {name: tensor}}).

    ``tensors=False``: check meta.json only and return no tensors (callers that read one file)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint directory {root} does not exist; pass the directory `twist train --save` wrote"
        )
    meta_file = root / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing: {root} is not a megatron-twist checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); restore it or re-create the checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{root} is not a megatron-twist checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{root} has format version {meta.get('format_version')}, this release reads {FORMAT_VERSION}"
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{root} holds a {meta.get('kind')!r} model, this command needs a {kind!r} one")
    out = {}
    if not tensors:
        return meta, out
    for name, digest in meta.get("files", {}).items():
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file} does not match its checksum in meta.json: the file is corrupt or truncated")
        try:
            out[file.name[: -len(".safetensors")]] = load_file(str(file))
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    return meta, out


def model_config_of(meta: dict, path) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's meta.json (or torch_dist common state); a clear
    CheckpointError if it is missing or invalid. No Megatron import: refusals stay fast."""
    try:
        return ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}/meta.json has no valid model config ({e})") from None
