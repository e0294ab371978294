"""TwIST with a DeepSpeed engine training each rank's subnet (ZeRO stage 0-3).

Same model, data addressing, optimizer, schedule and round hook as
`twist train`; only the step goes through the engine (``engine.backward``,
``engine.step``: ZeRO partitioning, gradient reduction over the subnet's
replicas, gradient clipping from the ds_config).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch.distributed as dist

from .. import faults, outputs
from ..config import ConfigError, ModelConfig, TrainConfig, TwistConfig
from ..cpu_shim import seed_everything
from ..distributed.runtime import TwistGroups
from ..distributed.sharded_central import ShardedCentral
from ..integrations.deepspeed_engine import TwistMpu
from ..checkpoint.deepspeed_vetting import load_vetted
from ..checkpoint.sharded import load_sharded, save_sharded
from ..integrations.ds_config import strip_twist_section
from ..integrations.zero_round_hook import ZeroRoundHook
from ..model.gpt import build_gpt_model, gpt_forward
from ..twist.sampler import SubnetSampler
from ..optim.optimizer import build_optimizer, build_scheduler, set_schedule_step
from ..optim.step import masked_mean_loss


def train_with_deepspeed(model: ModelConfig, twist: TwistConfig, train: TrainConfig, groups: TwistGroups, batches,
                         ds_config: dict, log: Callable[[str], None] = print, load: Optional[str] = None,
                         save: Optional[str] = None, data_meta: Optional[dict] = None, watchdog=None,
                         series: bool = False, save_interval: Optional[int] = None, keep_checkpoints: int = 0):
    """Returns (sharded central model, per-step losses of this rank's subnet, engine).

    The central model is sharded over every data-parallel rank (distributed/sharded_central.py).
    ``save``: at the end (or at ``train.exit_interval``, a round boundary) a checkpoint directory
    with the engine's own checkpoint (``engine/``: ``engine.save_checkpoint``, DeepSpeed's
    ``global_stepN`` + ``latest``) and the central model alongside (``central/``, one shard file
    per rank + meta.json: weights, Adam moments, step, round, TwIST config = the sampler's state).
    ``load``: such a directory; training continues exactly as the uninterrupted run. Its engine
    files are vetted before DeepSpeed unpickles them (integrations/ds_checkpoint_vetting.py).
    ``watchdog``: distributed/watchdog.py, told the step for its heartbeat (as in TwistTrainer).
    ``series``: ``save`` is a save directory of ``iter_XXXXXXX`` checkpoints (each an ``engine/`` +
    ``central/`` pair as above) with the latest pointer (checkpoint_series.py), written every
    ``save_interval`` steps (a multiple of ``local_steps``: at round boundaries) and at the end;
    ``keep_checkpoints`` as in `twist train` (0: keep all).
    """
    import deepspeed

    central = build_sharded_central(model, train.seed, groups.data_parallel_group)
    if load is not None:
        load_sharded(central, os.path.join(load, "central"))
    subnet = build_gpt_model(model, SubnetSampler(model, twist, groups.tp_size).subnet_layer_sizes(),
                             tensor_parallel_size=groups.tp_size)
    client_optimizer = build_optimizer(subnet, train)
    scheduler = build_scheduler(client_optimizer, train)
    if groups.world_size == 1:
        # DeepSpeed's engine reads LOCAL_RANK to choose its device and refuses to start without it;
        # a single process without a launcher is local rank 0. Set here, only for the engine's sake:
        # set earlier (at launcher discovery) it would leak into every child process (accelerate,
        # for one, then tries an env:// rendezvous).
        os.environ.setdefault("LOCAL_RANK", "0")
    engine, _, _, _ = deepspeed.initialize(model=subnet, optimizer=client_optimizer,
                                           config=strip_twist_section(ds_config), mpu=TwistMpu(groups))
    hook = ZeroRoundHook(model, twist, groups, central, engine)
    # Gradient accumulation: a step (of --train-iters, --local-steps, the LR schedule, Adam's count)
    # is one OPTIMIZER step of `accumulation` micro-batches; the engine steps at the boundary only.
    accumulation = engine.gradient_accumulation_steps()
    if accumulation != ds_config.get("gradient_accumulation_steps", 1):
        raise ConfigError(f"DeepSpeed resolved gradient_accumulation_steps {accumulation}, TwIST "
                          f"{ds_config.get('gradient_accumulation_steps', 1)}: set it explicitly in the ds_config")
    if load is not None:
        # The engine's checkpoint brings the optimizer-state structure; the round hook then refills
        # weights and moments from the central model at the round boundary we stopped at.
        # DeepSpeed reads its files with torch.load(weights_only=False): vet them first, then let
        # DeepSpeed read only with the restricted unpickler (ds_checkpoint_vetting.load_vetted: the
        # bytes it unpickles are vetted as they are read). All ranks read, so all ranks vet.
        load_vetted(engine, os.path.join(load, "engine"))
        hook.mark_state_present()
    reps = groups.layout.replicas
    slot, num_slots = hook.subnet * reps + groups.replica_index, twist.num_subnets * reps
    losses: List[float] = []
    t0 = time.perf_counter()
    stop_at = min(train.train_iters, train.exit_interval or train.train_iters)
    if stop_at % twist.local_steps and stop_at != train.train_iters:
        raise ConfigError(f"--exit-interval {stop_at} must be a multiple of --local-steps {twist.local_steps} "
                          "with DeepSpeed (checkpoints are taken at round boundaries)")
    saved_at = None
    for it in range(central.step, stop_at):
        # Close the round that ends here (if any), save at the boundary, open the next one. The
        # checkpoint holds the engine as the round left it, the state the final save has too.
        moved = hook.finish(it) if it % twist.local_steps == 0 else None
        if moved is not None and series and save_interval and central.step % save_interval == 0:
            save_deepspeed_series(save, engine, central, twist, train, groups, data_meta, keep_checkpoints)
            saved_at = central.step
        before = hook.bytes_moved
        hook.on_iteration_start(it)
        if moved is not None:
            moved += hook.bytes_moved - before
            record_round(engine, groups, central, hook.subnet, losses, moved)
        set_schedule_step(scheduler, it)
        if watchdog is not None:
            watchdog.beat(it)
        faults.at_step(groups.rank, it)  # fault injection (tests/reliability); a no-op otherwise
        batch = batches.get(it, slot, num_slots)  # micro x accumulation samples
        step_losses = []
        for micro in _micro_batches(batch, accumulation):
            loss = masked_mean_loss(gpt_forward(engine, micro["tokens"], micro["labels"]), micro["loss_mask"])
            engine.backward(loss)  # scaled by 1 / accumulation inside the engine
            engine.step()  # the optimizer steps at the accumulation boundary only
            step_losses.append(loss.item())
        hook.after_step()
        losses.append(step_losses[0] if accumulation == 1 else sum(step_losses) / accumulation)
        if moved is not None and groups.is_logging_rank:
            log(f"[twist-ds] round {central.round} step {it}/{train.train_iters} | loss {losses[-1]:.4f} | "
                f"ZeRO {engine.zero_optimization_stage()} | agg {moved / 2**20:.1f} MiB | {time.perf_counter() - t0:.0f}s")
    moved = hook.finish(stop_at)
    if moved is not None:
        record_round(engine, groups, central, hook.subnet, losses, moved)
    if save is not None and series:
        if saved_at != central.step:
            save_deepspeed_series(save, engine, central, twist, train, groups, data_meta, keep_checkpoints)
    elif save is not None:
        save_deepspeed_checkpoint(save, engine, central, twist, train, groups, data_meta)
    return central, losses, engine


def _micro_batches(batch: dict, accumulation: int):
    """The batch of one optimizer step as ``accumulation`` equal micro-batches (rows in order)."""
    if accumulation == 1:
        yield batch
        return
    rows = batch["tokens"].shape[0]
    mb = rows // accumulation
    for j in range(accumulation):
        yield {k: v[j * mb:(j + 1) * mb] for k, v in batch.items()}


def build_sharded_central(model: ModelConfig, seed: int, group) -> ShardedCentral:
    """The initial central model, sharded. Every rank builds the same full model from the seed (the
    initialisation draws from one RNG stream), keeps its shard and frees the rest: a transient full
    copy of the weights (no moments) at start-up only."""
    seed_everything(seed)
    module = build_gpt_model(model)
    central = ShardedCentral.from_full(model, dict(module.named_parameters()), group)
    del module
    return central


def save_deepspeed_checkpoint(path: str, engine, central: ShardedCentral, twist, train, groups: TwistGroups,
                              data_meta: Optional[dict] = None) -> None:
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
        engine.save_checkpoint(os.path.join(path, "engine"), tag=f"global_step{central.step}",
                               client_state={"twist_step": central.step, "twist_round": central.round})
    finally:
        engine.save_non_zero_checkpoint, engine.save_zero_checkpoint = flags
    save_sharded(central, os.path.join(path, "central"), twist, train, data=data_meta)
    dist.barrier()


def save_deepspeed_series(save_dir: str, engine, central: ShardedCentral, twist, train, groups: TwistGroups,
                          data_meta: Optional[dict], keep: int = 0) -> None:
    """Collective: the next ``SAVE_DIR/iter_XXXXXXX`` of a series (checkpoint_series.py), then the pointer.

    Every rank writes into ``.iter_XXXXXXX.ds-tmp`` (engine files and its central shard, as
    :func:`save_deepspeed_checkpoint`), fsyncs the engine files, and meets the others at a barrier;
    only then does rank 0 rename the directory into place and move the pointer (and prune): a
    crash anywhere before leaves the pointer at the previous complete checkpoint, and at most a
    temporary directory that the next save removes."""
    from ..checkpoint import series as checkpoint_series
    from ..checkpoint.files import swap_in

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


def record_round(engine, groups: TwistGroups, central, subnet: int, losses, moved_bytes: int) -> None:
    """TwIST's own metrics through DeepSpeed's monitors (tensorboard / csv_monitor / wandb blocks).

    DeepSpeed's monitors write on global rank 0 only, so every subnet's last loss is gathered
    there first (a small collective every rank joins); rank 0 then writes each subnet's loss,
    the round number and the aggregation bytes (counted at the collective), at the global step.
    """
    from ..distributed.runtime import all_gather_objects

    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled:
        return
    last = dict(all_gather_objects((subnet, losses[-1])))  # every rank joins, even if its monitor is off
    if groups.rank != 0:
        return
    step = central.step
    events = [(f"Twist/subnet_{s}/loss", loss, step) for s, loss in sorted(last.items())]
    events += [("Twist/round", central.round, step), ("Twist/aggregation_bytes", moved_bytes, step)]
    monitor.write_events(events)
