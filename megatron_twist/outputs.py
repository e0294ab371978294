"""What a command may write over: only an output of the same kind that megatron-twist wrote.

Every writer of this project (checkpoints in both formats, sharded central models, HF exports,
prepared data, save directories, metrics files, benchmark folders) publishes through a temporary
sibling and a swap, or writes files into a directory. Both would destroy a user's own directory
given by mistake as ``--save`` / ``--output`` / ``--out``. So:

* :func:`check_output` runs FIRST in every command, before any work: a target that exists, is
  not empty and is not a megatron-twist output of an accepted kind is refused with a
  :class:`OutputError` naming the path and the fix (another path, or ``--overwrite``).
* :func:`check_replaceable` runs again where a writer is about to swap a directory in (library
  callers that skipped the CLI meet the same rule).
* Temporary and set-aside directories are made by :func:`make_temporary`, which leaves a marker
  file in them; :func:`remove_temporary` deletes only directories holding that marker, so a
  user's folder that happens to carry such a name is never removed.

What an output "is" is read from the files each format already writes (``meta.json`` with the
``megatron-twist`` stamp, torch_dist's ``metadata.json`` + ``common.pt``, an HF export's
``twist_export.json``, a prepared directory's ``manifest.json``, a save directory's pointer) or,
for directories that have no such file of their own (prepared data while being written, benchmark
folders, DeepSpeed save directories), from :data:`MARKER`, written when the directory is claimed.

No torch import here: refusals stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .config import ConfigError

MARKER = ".megatron-twist-output"  # {"kind": ...} in a directory this project claimed
TEMPORARY_MARKER = ".megatron-twist-partial"  # in a temporary / set-aside directory this project made

# Kinds an output can be (what ``output_kind`` returns).
CENTRAL = "central"  # a central checkpoint: safetensors, sharded or torch_dist
EXTRACTED = "extracted"  # a cut-out model
HF_EXPORT = "hf-export"  # `twist export-hf`
PREPARED_DATA = "prepared-data"  # `twist prepare-data`
SAVE_DIR = "save-dir"  # `--save DIR --save-interval N`: iter_XXXXXXX + latest pointer
DEEPSPEED_SAVE = "deepspeed-save"  # `twist train --deepspeed --save DIR`: engine tags + DIR/central
METRICS = "metrics"  # `--metrics-file`


class OutputError(ConfigError):
    """A target the command would destroy; the message names the path and the fix."""


def _json(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def output_kind(path) -> Optional[str]:
    """The kind of megatron-twist output ``path`` is; None if it is none of them (or does not exist)."""
    root = Path(path)
    if not root.is_dir():
        return None
    marker = _json(root / MARKER)
    if marker and isinstance(marker.get("kind"), str):
        return marker["kind"]
    meta = _json(root / "meta.json")
    if meta and meta.get("format") == "megatron-twist" and meta.get("kind") in (CENTRAL, EXTRACTED):
        return meta["kind"]
    dist_meta = _json(root / "metadata.json")
    if dist_meta and dist_meta.get("sharded_backend") == "torch_dist" and (root / "common.pt").is_file():
        return CENTRAL  # checkpoint/torch_dist.py's format (its common state is read, vetted, on load)
    if (root / "twist_export.json").is_file() and (root / "config.json").is_file():
        return HF_EXPORT
    manifest = _json(root / "manifest.json")
    if manifest and {"format_version", "tokenizer_sha256", "splits"} <= manifest.keys():
        return PREPARED_DATA
    if (root / "latest_checkpointed_iteration.txt").is_file():
        return SAVE_DIR
    if output_kind(root / "central") == CENTRAL and (root / "engine" / "latest").is_file():
        return DEEPSPEED_SAVE  # written before save directories were marked
    return None


def _is_empty_dir(root: Path) -> bool:
    return root.is_dir() and next(root.iterdir(), None) is None


def check_output(
    path, kinds: Iterable[str], flag: str, overwrite: bool = False, overwrite_flag: Optional[str] = "--overwrite"
) -> None:
    """Refuse, before any work, a target that writing would destroy.

    Allowed: a path that does not exist, an empty directory, a megatron-twist output of one of
    ``kinds`` (replaced atomically by the writer), or anything with ``overwrite=True`` (the user
    asked, by ``--overwrite``). ``flag`` names the option in the message."""
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        return
    kinds = tuple(kinds)
    if not root.is_dir():
        raise OutputError(
            f"{flag} {path} is an existing file, not a directory; nothing was written. Pass a new directory path"
        )
    if overwrite or _is_empty_dir(root):
        return
    found = output_kind(root)
    if found in kinds:
        return
    what = f"a megatron-twist {found} output" if found else "a non-empty directory megatron-twist did not write"
    fix = f", or add {overwrite_flag} to replace it" if overwrite_flag else " (or move it away)"
    raise OutputError(
        f"{flag} {path} is {what}; it would be replaced, so nothing was written. Pass a new "
        f"path{fix} (expected {' or '.join(kinds)})"
    )


def check_replaceable(final: Path, kind: str, overwrite: bool = False) -> None:
    """The last check before a writer swaps a complete ``tmp`` in for ``final`` (see check_output)."""
    check_output(final, (kind,), "the target", overwrite)


def check_output_file(path, flag: str, overwrite: bool = False) -> None:
    """A JSON file this project writes (``--metrics-file``): refuse replacing another file."""
    file = Path(path)
    if file.is_dir():
        raise OutputError(f"{flag} {path} is a directory; pass a file path")
    if not file.exists() or overwrite:
        return
    obj = _json(file)
    if obj is not None and (
        obj.get("megatron_twist") == METRICS or ("twist" in obj and ({"rounds", "losses_per_rank"} & obj.keys()))
    ):
        return  # stamped, or written by a release from before the stamp
    raise OutputError(
        f"{flag} {path} is an existing file megatron-twist did not write; it would be replaced, so "
        "nothing was written. Pass a new path, or add --overwrite to replace it"
    )


def claim_directory(path, kind: str) -> Path:
    """Create ``path`` (after :func:`check_output`) and mark it as this project's ``kind`` output."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if _json(marker) != {"kind": kind}:
        tmp = root / f"{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"kind": kind}))
        os.replace(tmp, marker)
    return root


def make_temporary(tmp: Path) -> Path:
    """A fresh temporary directory at ``tmp`` (a sibling of the final target), marked as ours. A
    leftover of an interrupted save there is removed; anything else is refused, never deleted."""
    if tmp.exists() or tmp.is_symlink():
        remove_temporary(tmp)
    tmp.mkdir(parents=True)
    (tmp / TEMPORARY_MARKER).touch()
    return tmp


def remove_temporary(tmp: Path, missing_ok: bool = True) -> bool:
    """Delete ``tmp`` only if this project made it (its marker is inside). True if removed."""
    if not (tmp.exists() or tmp.is_symlink()):
        if missing_ok:
            return False
        raise FileNotFoundError(tmp)
    if tmp.is_dir() and not tmp.is_symlink() and (tmp / TEMPORARY_MARKER).is_file():
        shutil.rmtree(tmp)
        return True
    raise OutputError(
        f"{tmp} is in the way of a temporary directory megatron-twist needs, but megatron-twist did "
        "not make it; nothing was deleted. Move it away, or write to another path"
    )


def seal_temporary(tmp: Path) -> None:
    """Drop the temporary marker from a complete directory just before it is published."""
    (tmp / TEMPORARY_MARKER).unlink(missing_ok=True)


def set_aside(final: Path, old: Path) -> None:
    """Move the replaced output ``final`` to ``old`` and mark it ours, so that it (or a copy left by a
    crash) can be removed with :func:`remove_temporary`."""
    os.replace(final, old)
    (old / TEMPORARY_MARKER).touch()
