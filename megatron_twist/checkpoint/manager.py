"""When and where the Megatron path saves its central model: the trainer's checkpointer.

``--save DIR`` is one checkpoint (written at the end, or at ``--exit-interval``), or, as a series
(``--save-interval N``, or a DIR that already has a latest pointer), a save directory of
``iter_XXXXXXX`` checkpoints written every N steps and at the end, the pointer moved after each
complete write (series.py). Formats: safetensors (gathered to rank 0 over TP/PP) or torch_dist
(Megatron dist_checkpointing, every rank writes its shards). Every save is collective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig, TrainConfig, TwistConfig
from ..distributed.sharded_central import ShardedCentral
from . import series as checkpoint_series


class CentralCheckpointer:
    """``on_round_end`` after every round (periodic saves), ``finish`` once at the end.

    ``full_state``: a collective returning (weights, moments) of the whole central model (gathered
    over TP/PP), for the safetensors format."""

    def __init__(
        self,
        run: RunConfig,
        twist: TwistConfig,
        train: TrainConfig,
        data_meta: dict,
        is_logging_rank: bool,
        log: Callable[[str], None] = print,
        position=(0, 1, 0, 1),
    ):
        """``position``: this rank's (tp_rank, tp, pp_rank, pp), for a sharded central model's files."""
        self.run, self.twist, self.train, self.data_meta = run, twist, train, data_meta
        self.is_logging_rank = is_logging_rank
        self.log = log
        self.saved_at: Optional[int] = None
        self.position = position

    def on_round_end(self, central, full_state: Callable) -> None:
        interval = self.run.save_interval
        if self.run.series and interval and central.step % interval == 0:
            self.save(central, full_state)

    def finish(self, central, full_state: Callable) -> None:
        if self.run.save and self.saved_at != central.step:
            self.save(central, full_state)

    def save(self, central, full_state: Callable) -> None:
        """Collective: the central model to --save (a checkpoint), or the next iter_ of the series."""
        run, step = self.run, central.step
        target = checkpoint_series.iteration_dir(run.save, step) if run.series else Path(run.save)
        overwrite = run.overwrite and not run.series  # iter_ directories are always ours
        if isinstance(central, ShardedCentral):  # --twist-shard-central: every rank writes its own shard
            from .sharded import save_sharded

            if run.series and self.is_logging_rank:
                checkpoint_series.prepare(run.save)
            save_sharded(central, str(target), self.twist, self.train, self.data_meta, overwrite, self.position)
            if run.series and self.is_logging_rank:
                checkpoint_series.publish(run.save, step, run.keep_checkpoints)
            if self.is_logging_rank:
                self.log(f"[twist] saved central model (sharded: one file per rank) to {target}")
        elif run.ckpt_format == "torch_dist":
            from .torch_dist import save_central_dist

            if run.series and self.is_logging_rank:
                checkpoint_series.prepare(run.save)
            save_central_dist(
                target, central, self.twist, self.train, extra={"data": self.data_meta}, overwrite=overwrite
            )  # collective, atomic
            if run.series and self.is_logging_rank:
                checkpoint_series.publish(run.save, step, run.keep_checkpoints)
            if self.is_logging_rank:
                self.log(f"[twist] saved central model (torch_dist) to {target}")
        else:
            state = full_state()  # a collective on sharded runs
            if self.is_logging_rank:
                from .models import save_central

                def write(path):
                    save_central(
                        str(path),
                        central,
                        self.twist,
                        self.train,
                        data=self.data_meta,
                        full_state=state,
                        overwrite=overwrite,
                    )

                if run.series:
                    checkpoint_series.save_iteration(run.save, step, write, run.keep_checkpoints)
                else:
                    write(target)
                self.log(f"[twist] saved central model to {target}")
        self.saved_at = step
