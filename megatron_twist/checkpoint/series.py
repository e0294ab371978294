"""Periodic checkpoints: ``SAVE_DIR/iter_XXXXXXX/`` directories and a ``latest`` pointer file.

Layout of a save directory (``twist train --save SAVE_DIR --save-interval N``)::

    SAVE_DIR/latest_checkpointed_iteration.txt   the iteration of the newest COMPLETE checkpoint
    SAVE_DIR/iter_0000004/                       a checkpoint (checkpoint/files.py or torch_dist format)
    SAVE_DIR/iter_0000008/

The name of the pointer file is Megatron-LM's. Order of a save, each step durable before the next:

1. stale temporaries of earlier, interrupted saves are removed (one writer per save directory);
2. the checkpoint is written into a temporary sibling and renamed to ``iter_XXXXXXX`` by the
   atomic writer of its format (``files.save_checkpoint`` / ``save_central_dist``);
3. the pointer is rewritten: temporary file, fsync, ``os.replace``, fsync of the directory;
4. only then are checkpoints older than the newest ``keep`` removed.

A crash before 3 leaves the pointer naming the previous checkpoint, which is untouched; a crash
inside 2 leaves at most a temporary directory (ignored by readers, removed by the next save); an
``iter_`` directory newer than the pointer (a crash between 2 and 3) is complete but not used:
the resumed run writes it again. ``--load SAVE_DIR`` reads the pointer; ``--load`` of a plain
checkpoint directory works as before.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

from .. import faults, outputs
from .files import CheckpointError, fsync_dir

POINTER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7,})$")
_TEMPORARY = re.compile(r"^\.iter_\d{7,}\.(tmp-\d+|dist-tmp|ds-tmp)$")


def iteration_dir(save_dir, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def is_series(path) -> bool:
    return (Path(path) / POINTER).is_file()


def read_pointer(save_dir) -> Optional[int]:
    """The iteration the pointer names; None without a pointer file."""
    file = Path(save_dir) / POINTER
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise CheckpointError(
            f"{file} does not hold an iteration number ({text[:40]!r}): it is corrupt; write the "
            f"iteration of a complete checkpoint in {save_dir} into it (e.g. `echo 4 > {file}` "
            "for iter_0000004), or load that iter_ directory directly"
        )
    return int(text)


def resolve_load(path) -> Path:
    """The checkpoint directory ``--load PATH`` means: the pointer's iteration in a save directory,
    else PATH itself."""
    root = Path(path)
    iteration = read_pointer(root)
    if iteration is None:
        return root
    target = iteration_dir(root, iteration)
    if not target.is_dir():
        raise CheckpointError(
            f"{root / POINTER} names iteration {iteration}, but {target} does not exist; "
            f"point it at a complete checkpoint in {root} (one of {list_iterations(root)})"
        )
    return target


def list_iterations(save_dir) -> List[int]:
    root = Path(save_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER.match(p.name)))


def write_pointer(save_dir, iteration: int) -> None:
    """Atomically make ``iteration`` the latest: readers see the old number or the new one."""
    root = Path(save_dir)
    tmp = root / f".{POINTER}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / POINTER)
    fsync_dir(root)


def remove_stale_temporaries(save_dir) -> List[str]:
    """Temporary directories of interrupted saves (``.iter_XXXXXXX.tmp-PID``, ``.dist-tmp``, ``.ds-tmp``)
    that this project made (marked, outputs.make_temporary); anything else is left alone."""
    removed = []
    root = Path(save_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and _TEMPORARY.match(p.name) and (p / outputs.TEMPORARY_MARKER).is_file():
                outputs.remove_temporary(p)
                removed.append(p.name)
    return removed


def prune(save_dir, keep: int, current: int) -> List[int]:
    """Remove checkpoints older than the newest ``keep`` (``keep <= 0``: keep all). Never ``current``
    (what the pointer names) nor anything newer, nor an ``iter_`` directory that is not a
    megatron-twist checkpoint (a central one, or a DeepSpeed engine + central directory)."""
    if keep <= 0:
        return []
    older = [i for i in list_iterations(save_dir) if i < current]
    doomed = [
        i
        for i in older[: max(0, len(older) - (keep - 1))]
        if outputs.output_kind(iteration_dir(save_dir, i)) in (outputs.CENTRAL, outputs.DEEPSPEED_SAVE)
    ]
    for i in doomed:
        shutil.rmtree(iteration_dir(save_dir, i))
    return doomed


def prepare(save_dir) -> Path:
    """Step 1 of a save: the directory exists (claimed as a save directory), temporaries of
    interrupted saves are gone."""
    root = outputs.claim_directory(save_dir, outputs.SAVE_DIR)
    remove_stale_temporaries(root)
    return root


def publish(save_dir, iteration: int, keep: int = 0) -> None:
    """Steps 3 and 4, once ``iter_XXXXXXX`` is complete and in place."""
    faults.checkpoint_write_point("before-pointer")
    write_pointer(save_dir, iteration)
    prune(save_dir, keep, iteration)


def save_iteration(save_dir, iteration: int, write: Callable[[Path], None], keep: int = 0) -> Path:
    """Write one checkpoint of the series from ONE process (the safetensors format: rank 0 writes).

    ``write(path)`` must write a complete checkpoint to ``path`` atomically. A collective writer
    (torch_dist, the DeepSpeed path) calls :func:`prepare` on rank 0, writes on every rank, then
    :func:`publish` on rank 0."""
    root = prepare(save_dir)
    target = iteration_dir(root, iteration)
    write(target)
    publish(root, iteration, keep)
    return target
