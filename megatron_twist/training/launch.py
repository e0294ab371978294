"""`twist train` as one library call: ``train(job)`` runs a validated job (training/setup.py).

Launch and shutdown live here and nowhere else: the process group (its timeout is
``--distributed-timeout-minutes``), the watchdog that names a lost rank (exit code 75), the
TwIST groups, seeding, then the trainer of the job's engine, which owns its checkpointer and
metrics: ``TwistTrainer`` (Megatron-core's TP x PP path) or ``DeepSpeedTrainer``. Both have the
same shape: ``run() -> TrainResult``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable

from .setup import TrainingJob


def train(job: TrainingJob, log: Callable[[str], None] = print):
    """Run ``job`` in this process's place of the job's process group; returns the TrainResult."""
    from ..distributed.runtime import init_distributed, shutdown
    from ..distributed.watchdog import Watchdog

    init_distributed(timeout_s=job.run.timeout_s)
    watchdog = Watchdog.for_job(job.run.timeout_s)  # heartbeats; None for one process
    try:
        with watchdog.guard() if watchdog is not None else contextlib.nullcontext():
            return build_trainer(job, log, watchdog).run()
    finally:
        shutdown()


def build_trainer(job: TrainingJob, log: Callable[[str], None], watchdog=None):
    """The trainer of the job's engine, with its checkpointer and metrics (inside the process group)."""
    import torch

    from ..cpu_shim import seed_everything
    from ..distributed.runtime import build_twist_groups
    from .metrics import MetricsFile

    model, twist, train_config, run = job.model, job.twist, job.train, job.run
    groups = build_twist_groups(twist, run.tensor_parallel_size, run.pipeline_parallel_size)
    seed_everything(train_config.seed)  # Megatron's RNG tracker, whichever way the central model is made
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    metrics = MetricsFile(run.metrics_file) if run.metrics_file else None
    if run.deepspeed:
        from ..checkpoint.deepspeed import DeepSpeedCheckpointer
        from .deepspeed_trainer import DeepSpeedTrainer

        # One batch of micro x accumulation samples per (step, subnet slot), split into micro-batches.
        accumulation = job.ds_config.get("gradient_accumulation_steps", 1)
        batches = job.data.batches(
            model,
            dataclasses.replace(train_config, micro_batch_size=train_config.micro_batch_size * accumulation),
            twist,
        )
        checkpointer = DeepSpeedCheckpointer(run, twist, train_config, groups, job.data.meta, log)
        return DeepSpeedTrainer(
            model,
            twist,
            train_config,
            groups,
            batches,
            job.ds_config,
            load=run.load,
            checkpointer=checkpointer,
            metrics=metrics,
            log=log,
            watchdog=watchdog,
        )
    from ..checkpoint.manager import CentralCheckpointer
    from .twist_trainer import TwistTrainer

    if run.shard_central and not run.load:  # 1/DP per rank (distributed/sharded_round.py)
        from .twist_trainer import build_sharded_central

        tp, pp = run.tensor_parallel_size, run.pipeline_parallel_size
        central = build_sharded_central(model, train_config.seed, groups.data_parallel_group, tp, pp)
    elif run.shard_central:  # this rank's own file of a sharded checkpoint of this layout, else read whole
        from ..checkpoint.sharded import open_own_shard
        from ..distributed.sharded_round import shard_central
        from ..model.gpt import default_device

        tp, pp = run.tensor_parallel_size, run.pipeline_parallel_size
        position = (groups.tp_rank, tp, groups.pp_rank, pp)
        group = groups.data_parallel_group
        central = open_own_shard(run.load, model, group, position, default_device())
        if central is not None and groups.is_logging_rank:
            log(f"[twist] every rank read only its own shard of {run.load} (same layout)")
        if central is None:
            central = shard_central(load_or_build_central(job, groups), group)
    else:
        central = load_or_build_central(job, groups)
    checkpointer = CentralCheckpointer(
        run,
        twist,
        train_config,
        job.data.meta,
        groups.is_logging_rank,
        log,
        position=(groups.tp_rank, run.tensor_parallel_size, groups.pp_rank, run.pipeline_parallel_size),
    )
    # One batch of micro x micro-batches samples per (step, subnet slot); train_step splits it.
    rows = train_config.micro_batch_size * train_config.microbatches(groups.layout.replicas)
    return TwistTrainer(
        model,
        twist,
        train_config,
        groups,
        job.data.batches(model, dataclasses.replace(train_config, micro_batch_size=rows), twist),
        central=central,
        log=log,
        watchdog=watchdog,
        checkpointer=checkpointer,
        metrics=metrics,
        teacher=build_teacher(train_config, central),
    )


def build_teacher(train_config, central):
    """--distill-teacher (optim/distill.py): TwIST's own central model (its module is what aggregation
    writes, so a round's steps see the central model of the round's start), or a frozen checkpoint."""
    from ..optim.distill import Teacher

    source = train_config.distill_teacher
    if source is None:
        return None
    if source == "central":
        module = central.module
    else:
        from ..checkpoint.models import load_central

        module = load_central(source)[0].module
        module.requires_grad_(False)
    return Teacher(module.eval(), train_config.distill_weight, train_config.distill_temperature)


def load_or_build_central(job: TrainingJob, groups):
    """This rank's TP shard / PP stage of the central model: fresh from the seed, or from --load (a
    torch_dist checkpoint is resharded by Megatron; a safetensors one is cut to this layout)."""
    from ..checkpoint import detect
    from .twist_trainer import build_central

    model, run = job.model, job.run
    tp, pp = run.tensor_parallel_size, run.pipeline_parallel_size
    if run.load and detect.is_torch_dist(run.load):
        from ..checkpoint.torch_dist import load_central_dist

        return load_central_dist(run.load, model, tp, pp)[0]
    central = build_central(model, job.train.seed, tp, pp)
    if run.load:
        from ..checkpoint.models import fill_central
        from ..distributed.full_state import layer_range

        fill_central(central, run.load, groups.tp_rank, tp, layer_range(model, groups.pp_rank, pp)[0])
    return central
