"""Checkpoints of the DeepSpeed path: the engine's own files plus the sharded central model.

A DeepSpeed checkpoint directory holds ``engine/`` (``engine.save_checkpoint``: DeepSpeed's
``global_stepN`` + ``latest``) and ``central/`` (the sharded central model, checkpoint/sharded.py:
weights, Adam moments, step, round, TwIST config = the sampler's state). With ``--save-interval``
the save directory is a series of such directories (``iter_XXXXXXX``) with the latest pointer
(series.py). Both saves are collective.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from .. import outputs
from ..config import RunConfig, TrainConfig, TwistConfig
from ..distributed.runtime import TwistGroups
from ..distributed.sharded_central import ShardedCentral
from .sharded import save_sharded


def save_deepspeed_checkpoint(
    path: str, engine, central: ShardedCentral, twist, train, groups: TwistGroups, data_meta: Optional[dict] = None
) -> None:
    """engine.save_checkpoint + the sharded central model (both collective, atomic), at a round boundary.

    Only the ranks of subnet 0 write engine files. Every subnet's engine is DeepSpeed data-parallel
    rank 0..R-1 of its own group, so all subnets would write the same file names into one directory
    at once (interleaved writes of one path); the files differ only in values that resuming
    overwrites from the central model anyway (weights, fp32 masters, Adam moments and step), and
    all subnets have the same sizes, so every subnet's engine loads subnet 0's files."""
    if groups.rank == 0:  # the CLI checked that PATH is new, empty or ours; mark it ours
        outputs.claim_directory(path, outputs.DEEPSPEED_SAVE)
    writer = groups.local_subnets(twist.num_subnets)[0] == 0
    flags = engine.save_non_zero_checkpoint, engine.save_zero_checkpoint
    if not writer:
        engine.save_non_zero_checkpoint = engine.save_zero_checkpoint = False
    try:
        engine.save_checkpoint(
            os.path.join(path, "engine"),
            tag=f"global_step{central.step}",
            client_state={"twist_step": central.step, "twist_round": central.round},
        )
    finally:
        engine.save_non_zero_checkpoint, engine.save_zero_checkpoint = flags
    # At TP > 1 every TP position shards its own central model: files named by position (sharded.py).
    position = (groups.tp_rank, groups.tp_size, 0, 1)
    save_sharded(central, os.path.join(path, "central"), twist, train, data=data_meta, position=position)
    dist.barrier()


def save_deepspeed_series(
    save_dir: str,
    engine,
    central: ShardedCentral,
    twist,
    train,
    groups: TwistGroups,
    data_meta: Optional[dict],
    keep: int = 0,
) -> None:
    """Collective: the next ``SAVE_DIR/iter_XXXXXXX`` of a series (checkpoint/series.py), then the pointer.

    Every rank writes into ``.iter_XXXXXXX.ds-tmp`` (engine files and its central shard, as
    :func:`save_deepspeed_checkpoint`), fsyncs the engine files, and meets the others at a barrier;
    only then does rank 0 rename the directory into place and move the pointer (and prune): a
    crash anywhere before leaves the pointer at the previous complete checkpoint, and at most a
    temporary directory that the next save removes."""
    from . import series as checkpoint_series
    from .files import swap_in

    root = Path(save_dir)
    final = checkpoint_series.iteration_dir(root, central.step)
    tmp = root / f".{final.name}.ds-tmp"
    if final.is_dir() and checkpoint_series.read_pointer(root) == central.step:
        # A resumed run that had nothing left to train: the checkpoint of this step is complete and
        # named by the pointer; rewriting it would open a window where the pointer names nothing.
        return
    if groups.rank == 0:
        checkpoint_series.prepare(root)  # removes (marked) temporaries of interrupted saves
        outputs.make_temporary(tmp)
    dist.barrier()
    save_deepspeed_checkpoint(str(tmp), engine, central, twist, train, groups, data_meta)  # ends in a barrier
    for file in sorted((tmp / "engine").rglob("*")):  # DeepSpeed's torch.save does not fsync
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    dist.barrier()
    if groups.rank == 0:
        # An existing one is newer than the pointer (a crash between rename and pointer): rewritten.
        outputs.check_replaceable(final, outputs.DEEPSPEED_SAVE)
        swap_in(tmp, final)
        checkpoint_series.publish(root, central.step, keep)
    dist.barrier()


class DeepSpeedCheckpointer:
    """The DeepSpeed trainer's checkpointer: ``on_round_end`` at every round boundary (periodic saves
    of a series), ``finish`` once at the end."""

    def __init__(
        self,
        run: RunConfig,
        twist: TwistConfig,
        train: TrainConfig,
        groups: TwistGroups,
        data_meta: Optional[dict],
        log: Callable[[str], None] = print,
    ):
        self.run, self.twist, self.train, self.groups, self.data_meta = run, twist, train, groups, data_meta
        self.log = log
        self.saved_at: Optional[int] = None

    def on_round_end(self, engine, central: ShardedCentral) -> None:
        interval = self.run.save_interval
        if self.run.series and interval and central.step % interval == 0:
            self._save(engine, central)

    def finish(self, engine, central: ShardedCentral) -> None:
        if self.run.save and self.saved_at != central.step:
            self._save(engine, central)
            if self.groups.is_logging_rank:
                self.log(f"[twist] saved engine checkpoint and central model to {self.run.save}")

    def _save(self, engine, central: ShardedCentral) -> None:
        if self.run.series:
            save_deepspeed_series(
                self.run.save,
                engine,
                central,
                self.twist,
                self.train,
                self.groups,
                self.data_meta,
                self.run.keep_checkpoints,
            )
        else:
            save_deepspeed_checkpoint(
                self.run.save, engine, central, self.twist, self.train, self.groups, self.data_meta
            )
        self.saved_at = central.step
