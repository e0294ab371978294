"""TwIST with a DeepSpeed engine training each rank's subnet (ZeRO stage 0-3).

Same model, data addressing, optimizer, schedule and round hook as
`twist train`; only the step goes through the engine (``engine.backward``,
``engine.step``: ZeRO partitioning, gradient reduction over the subnet's
replicas, gradient clipping from the ds_config).
"""

from __future__ import annotations

import os
import time
from typing import Callable, List, Optional

from .. import faults
from ..checkpoint.deepspeed import DeepSpeedCheckpointer
from ..checkpoint.sharded import load_sharded, open_own_shard
from ..checkpoint.vetting import load_vetted
from ..config import ConfigError, ModelConfig, TrainConfig, TwistConfig
from ..cpu_shim import seed_everything
from ..distributed.runtime import TwistGroups
from ..distributed.sharded_central import ShardedCentral
from ..integrations.deepspeed_engine import TwistMpu
from ..integrations.ds_config import strip_twist_section
from ..integrations.zero_round_hook import ZeroRoundHook
from ..model.gpt import build_gpt_model, default_device, gpt_forward
from ..optim.optimizer import build_optimizer, build_scheduler, set_schedule_step
from ..optim.step import batch_to_device, masked_mean_loss
from ..twist.sampler import SubnetSampler
from .metrics import MetricsFile
from .twist_trainer import TrainResult


class DeepSpeedTrainer:
    """TwIST with each rank's subnet trained by a DeepSpeed engine: ``run() -> TrainResult``.

    The central model is sharded over every data-parallel rank (distributed/sharded_central.py).
    ``load``: a DeepSpeed checkpoint directory (``engine/`` + ``central/``); training continues
    exactly as the uninterrupted run. Its engine files are vetted before DeepSpeed unpickles them
    (checkpoint/vetting.py). ``checkpointer`` (checkpoint/deepspeed.py) saves at round
    boundaries and at the end; ``metrics`` (training/metrics.py) gets the run's record on the
    logging rank. ``watchdog``: distributed/watchdog.py, told the step for its heartbeat.
    """

    def __init__(
        self,
        model: ModelConfig,
        twist: TwistConfig,
        train: TrainConfig,
        groups: TwistGroups,
        batches,
        ds_config: dict,
        *,
        load: Optional[str] = None,
        checkpointer: Optional[DeepSpeedCheckpointer] = None,
        metrics: Optional[MetricsFile] = None,
        log: Callable[[str], None] = print,
        watchdog=None,
    ):
        self.model, self.twist, self.train, self.groups = model, twist, train, groups
        self.batches, self.ds_config, self.load = batches, ds_config, load
        self.checkpointer, self.metrics, self.log, self.watchdog = checkpointer, metrics, log, watchdog
        self.engine = None

    def run(self) -> TrainResult:
        import deepspeed

        model, twist, train, groups, batches = self.model, self.twist, self.train, self.groups, self.batches
        ds_config, load, log, watchdog = self.ds_config, self.load, self.log, self.watchdog

        # Chosen once, passed down: this rank's accelerator (its launcher set it), where DeepSpeed puts the
        # engine too (ZeroRoundHook checks); the central shards, buffers and batches live there.
        device = default_device()
        if load is not None:
            central = load_engine_central(os.path.join(load, "central"), model, train.seed, groups, device)
        else:
            central = build_sharded_central(model, train.seed, groups, device)
        subnet = build_gpt_model(
            model,
            SubnetSampler(model, twist, groups.tp_size).subnet_layer_sizes(),
            tensor_parallel_size=groups.tp_size,
            device=device,
        )
        client_optimizer = build_optimizer(subnet, train)
        scheduler = build_scheduler(client_optimizer, train, twist.lr_scale)
        if groups.world_size == 1:
            # DeepSpeed's engine reads LOCAL_RANK to choose its device and refuses to start without it;
            # a single process without a launcher is local rank 0. Set here, only for the engine's sake:
            # set earlier (at launcher discovery) it would leak into every child process (accelerate,
            # for one, then tries an env:// rendezvous).
            os.environ.setdefault("LOCAL_RANK", "0")
        engine, _, _, _ = deepspeed.initialize(
            model=subnet, optimizer=client_optimizer, config=strip_twist_section(ds_config), mpu=TwistMpu(groups)
        )
        hook = ZeroRoundHook(model, twist, groups, central, engine)
        # Gradient accumulation: a step (of --train-iters, --local-steps, the LR schedule, Adam's count)
        # is one OPTIMIZER step of `accumulation` micro-batches; the engine steps at the boundary only.
        accumulation = engine.gradient_accumulation_steps()
        if accumulation != ds_config.get("gradient_accumulation_steps", 1):
            raise ConfigError(
                f"DeepSpeed resolved gradient_accumulation_steps {accumulation}, TwIST "
                f"{ds_config.get('gradient_accumulation_steps', 1)}: set it explicitly in the ds_config"
            )
        if load is not None:
            # The engine's checkpoint brings the optimizer-state structure; the round hook then refills
            # weights and moments from the central model at the round boundary we stopped at.
            # DeepSpeed reads its files with torch.load(weights_only=False): vet them first, then let
            # DeepSpeed read only with the restricted unpickler (vetting.load_vetted: the
            # bytes it unpickles are vetted as they are read). All ranks read, so all ranks vet.
            load_vetted(engine, os.path.join(load, "engine"))
            hook.mark_state_present()
        reps = groups.layout.replicas
        slot, num_slots = hook.subnet * reps + groups.replica_index, twist.num_subnets * reps
        losses: List[float] = []
        t0 = time.perf_counter()
        stop_at = min(train.train_iters, train.exit_interval or train.train_iters)
        if stop_at % twist.local_steps and stop_at != train.train_iters:
            raise ConfigError(
                f"--exit-interval {stop_at} must be a multiple of --local-steps {twist.local_steps} "
                "with DeepSpeed (checkpoints are taken at round boundaries)"
            )
        for it in range(central.step, stop_at):
            # Close the round that ends here (if any), save at the boundary, open the next one. The
            # checkpoint holds the engine as the round left it, the state the final save has too.
            moved = hook.finish(it) if it % twist.local_steps == 0 else None
            if moved is not None and self.checkpointer is not None:
                self.checkpointer.on_round_end(engine, central)
            before = hook.bytes_moved
            hook.on_iteration_start(it)
            if moved is not None:
                moved += hook.bytes_moved - before
                record_round(engine, groups, central, hook.subnet, losses, moved)
            set_schedule_step(scheduler, it)
            if watchdog is not None:
                watchdog.beat(it)
            faults.at_step(groups.rank, it)  # fault injection (tests/reliability); a no-op otherwise
            batch = batch_to_device(batches.get(it, slot, num_slots), device)  # micro x accumulation samples
            step_losses = []
            for micro in _micro_batches(batch, accumulation):
                loss = masked_mean_loss(gpt_forward(engine, micro["tokens"], micro["labels"]), micro["loss_mask"])
                engine.backward(loss)  # scaled by 1 / accumulation inside the engine
                engine.step()  # the optimizer steps at the accumulation boundary only
                step_losses.append(loss.item())
            hook.after_step()
            losses.append(step_losses[0] if accumulation == 1 else sum(step_losses) / accumulation)
            if moved is not None and groups.is_logging_rank:
                log(
                    f"[twist-ds] round {central.round} step {it}/{train.train_iters} | loss {losses[-1]:.4f} | "
                    f"ZeRO {engine.zero_optimization_stage()} | agg {moved / 2**20:.1f} MiB | "
                    f"{time.perf_counter() - t0:.0f}s"
                )
        moved = hook.finish(stop_at)
        if moved is not None:
            record_round(engine, groups, central, hook.subnet, losses, moved)
        if self.checkpointer is not None:
            self.checkpointer.finish(engine, central)
        self.engine = engine
        self._report(central, losses, engine)
        return TrainResult(central, losses=losses)

    def _report(self, central, losses: List[float], engine) -> None:
        """The closing line and the metrics file (a small collective: every rank's losses)."""
        from ..distributed.runtime import all_gather_objects
        from ..integrations.deepspeed_engine import torch_optimizer

        all_losses = all_gather_objects(losses)
        if not self.groups.is_logging_rank:
            return
        self.log(
            f"[twist-ds] done at step {central.step}: ZeRO {engine.zero_optimization_stage()}, final loss per "
            f"rank {[round(x[-1], 4) for x in all_losses]}"
        )
        if self.metrics is not None:
            group = torch_optimizer(engine).param_groups[0]
            self.metrics.write(
                {
                    "losses_per_rank": all_losses,
                    "twist": self.twist.to_dict(),
                    "zero_stage": engine.zero_optimization_stage(),
                    "train": self.train.to_dict(),
                    "engine_global_steps": engine.global_steps,
                    "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                    "optimizer": {
                        "betas": list(group["betas"]),
                        "eps": group["eps"],
                        "weight_decay": group["weight_decay"],
                    },
                }
            )


def train_with_deepspeed(
    model: ModelConfig,
    twist: TwistConfig,
    train: TrainConfig,
    groups: TwistGroups,
    batches,
    ds_config: dict,
    log: Callable[[str], None] = print,
    load: Optional[str] = None,
):
    """(sharded central model, this rank's per-step losses, engine) of a run without checkpoints or
    metrics (tests, benchmarks)."""
    trainer = DeepSpeedTrainer(model, twist, train, groups, batches, ds_config, load=load, log=log)
    result = trainer.run()
    return result.central, result.losses, trainer.engine


def _micro_batches(batch: dict, accumulation: int):
    """The batch of one optimizer step as ``accumulation`` equal micro-batches (rows in order)."""
    if accumulation == 1:
        yield batch
        return
    rows = batch["tokens"].shape[0]
    mb = rows // accumulation
    for j in range(accumulation):
        yield {k: v[j * mb : (j + 1) * mb] for k, v in batch.items()}


def build_sharded_central(model: ModelConfig, seed: int, groups: TwistGroups, device) -> ShardedCentral:
    """The initial central model of this rank's TP shard, sharded over the data-parallel ranks of that TP
    position, on ``device``. Every rank builds the same model from the seed (the initialisation draws
    from one RNG stream; Megatron's CPU initialisation cuts each TP shard from the same full tensor, so
    TP ranks hold the shards of one model), keeps its shard and frees the rest: a transient copy of the
    TP shard's weights (no moments) at start-up only."""
    seed_everything(seed)
    module = build_gpt_model(model, tensor_parallel_size=groups.tp_size, device=device)
    central = ShardedCentral.from_full(
        model, dict(module.named_parameters()), groups.data_parallel_group, device=device
    )
    del module
    return central


def load_engine_central(path: str, model: ModelConfig, seed: int, groups: TwistGroups, device) -> ShardedCentral:
    """The central model a DeepSpeed checkpoint saved (``path``: its ``central/``), for this rank. At TP 1
    any shard count is resharded; at TP > 1 the layout must be the saved one (each rank reads its own
    file), as the engine's own files, one set per TP rank, require anyway."""
    if groups.tp_size == 1:
        central = build_sharded_central(model, seed, groups, device)  # its shapes; every value is then loaded
        load_sharded(central, path)
        return central
    position = (groups.tp_rank, groups.tp_size, 0, 1)
    central = open_own_shard(path, model, groups.data_parallel_group, position, device)
    if central is None:
        raise ConfigError(
            f"{path} was not saved at tensor parallel {groups.tp_size} with {groups.dp_size} data-parallel "
            "ranks: a DeepSpeed checkpoint resumes at the layout it was saved at (its engine files are per "
            "TP and ZeRO rank); relaunch with the saved --tensor-model-parallel-size and number of ranks"
        )
    return central


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
