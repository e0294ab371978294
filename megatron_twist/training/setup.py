"""`twist train`'s flags -> a validated :class:`TrainingJob`, before any work.

Everything the user typed is checked here, in this order, before a process group exists or a
file is written: the TwIST and DeepSpeed settings (ds_config's ``"twist"`` section, its
optimizer, clipping, fp16, offload: honoured or refused), the data, what ``--load`` means and
whether the flags contradict it (a resumed run takes its TwIST settings from the checkpoint), the
layout (TP x PP over the model, subnets over the ranks), the checkpoint flags, and whether
``--save`` / ``--metrics-file`` would replace something megatron-twist did not write.
Megatron and DeepSpeed (seconds to import) come after.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional, Set

from .. import outputs
from ..arguments import model_config_from_args, train_config_from_args, validate_twist_args
from ..checkpoint import detect
from ..checkpoint import series as checkpoint_series
from ..config import ConfigError, ModelConfig, RunConfig, TrainConfig, TwistConfig
from ..data.batches import TrainingData
from ..distributed.layout import ParallelLayout, check_model_layout


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """Everything `twist train` will do, validated: one config object per concern."""

    model: ModelConfig
    twist: TwistConfig
    train: TrainConfig
    run: RunConfig
    data: TrainingData
    ds_config: Optional[dict] = None  # the DeepSpeed path: the resolved ds_config (batch sizes filled in)


def prepare_job(args, explicit: Set[str], log: Callable[[str], None] = print) -> TrainingJob:
    """``explicit``: the destinations of the flags the user typed (arguments.explicit_dests)."""
    from ..integrations.ds_config import resolve_deepspeed

    validate_twist_args(args)  # the flags alone first, also when a ds_config's "twist" section overrides them
    twist, ds_config = resolve_deepspeed(args, explicit)
    run = _run_config(args, ds_config is not None)
    _check_precision(args, ds_config is not None)
    train = train_config_from_args(args)
    if ds_config is not None:
        from ..integrations.ds_engine_settings import engine_settings

        # The config's optimizer, clipping, fp16, offload, scheduler: honoured or refused, never ignored.
        train = engine_settings(args.deepspeed_config, train, explicit)
    data = TrainingData(args.data_path, args.mock_data, args.vocab_size)
    run = dataclasses.replace(run, load=_resolve_load(run, log) if run.load else None)
    if run.load:
        model, twist = _resumed(args, explicit, run, data, twist, log)
    else:
        model = model_config_from_args(args, data.vocab_size)
    tp, pp = run.tensor_parallel_size, run.pipeline_parallel_size
    try:
        twist = dataclasses.replace(twist, balance_shards=twist.shards_for(tp))  # recorded in checkpoints
        check_model_layout(model, twist, tp, pp)
    except ConfigError as e:
        if not run.load:
            raise
        raise ConfigError(
            f"--load {run.load} cannot continue at tensor parallel {tp} x pipeline parallel {pp}: {e} "
            f"(the checkpoint's subnets are balanced over {twist.balance_shards or tp} shard(s); "
            "choose sizes that divide the saved model and that number)"
        ) from None
    _check_distillation(train, run, model)
    _check_save_interval(run, twist)
    _check_outputs(run)  # nothing of the user's is replaced
    data.check_fits(model.seq_length)
    from ..distributed.runtime import discover_launcher

    discover_launcher()  # torchrun, deepspeed, srun or mpirun: WORLD_SIZE is known from here on
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.for_world(world, twist.num_subnets, tp, pp)
    if ds_config is not None and train.global_batch_size is not None:
        raise ConfigError(
            "--global-batch-size is the Megatron path's; under --deepspeed the batch comes from the ds_config: "
            "set train_batch_size or gradient_accumulation_steps there"
        )
    train.microbatches(layout.replicas)  # a global batch that does not divide is refused here
    if ds_config is not None:
        train, ds_config = _resolve_ds_batches(run, ds_config, train, twist, explicit, world)
    return TrainingJob(model, twist, train, run, data, ds_config)


def _check_precision(args, deepspeed: bool) -> None:
    if getattr(args, "fp16", False):
        raise ConfigError(
            ("--bf16 and --fp16 together: choose one; " if args.bf16 else "")
            + "--fp16 is not supported (fp16 needs loss scaling, which TwIST's subnet steps do not do): use --bf16"
        )
    if deepspeed and args.bf16:
        raise ConfigError(
            "--bf16 is the Megatron path's; under --deepspeed precision comes from the ds_config: "
            'set "bf16": {"enabled": true} there'
        )


def _check_distillation(train: TrainConfig, run: RunConfig, model: ModelConfig) -> None:
    """--distill-teacher: a layout with full logits on every rank, and a teacher of the same vocabulary."""
    teacher = train.distill_teacher
    if teacher is None:
        return
    where = None
    if run.deepspeed:
        where = "--deepspeed"
    elif run.shard_central and teacher == "central":
        where = "--twist-shard-central"
    elif run.tensor_parallel_size > 1 or run.pipeline_parallel_size > 1:
        where = "tensor or pipeline parallelism"
    if where:
        raise ConfigError(
            f"--distill-teacher is not supported with {where}: distillation needs the full logits of a whole "
            "teacher on every rank; train at TP = PP = 1 on the Megatron path, or drop --distill-teacher"
        )
    if teacher == "central":
        return
    if not detect.holds_checkpoint(Path(teacher)):
        raise ConfigError(
            f"--distill-teacher {teacher} holds no central checkpoint: pass a directory written by "
            "`twist train --save` or `twist import-hf`, or 'central' for TwIST's own central model"
        )
    _, teacher_model = detect.read_central_meta(teacher)
    if teacher_model.vocab_size != model.vocab_size:
        raise ConfigError(
            f"--distill-teacher {teacher} has vocabulary {teacher_model.vocab_size}, the model trained "
            f"{model.vocab_size}: the teacher must share the student's tokenizer"
        )


def _run_config(args, deepspeed: bool) -> RunConfig:
    series = bool(args.save) and (args.save_interval is not None or checkpoint_series.is_series(args.save))
    return RunConfig(
        tensor_parallel_size=args.tensor_model_parallel_size,
        pipeline_parallel_size=args.pipeline_model_parallel_size,
        save=args.save,
        load=args.load,
        series=series,
        save_interval=args.save_interval,
        keep_checkpoints=args.keep_checkpoints,
        ckpt_format=args.ckpt_format,
        metrics_file=args.metrics_file,
        overwrite=args.overwrite,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        deepspeed_config=args.deepspeed_config if deepspeed else None,
        shard_central=getattr(args, "twist_shard_central", False),
    )


def _resolve_load(run: RunConfig, log) -> Optional[str]:
    """The checkpoint --load means: a save directory's latest, the directory itself, or None when
    --load and --save name the same series with nothing saved yet (Megatron-LM's restart idiom)."""
    root = Path(run.load)
    if checkpoint_series.read_pointer(root) is not None:
        target = checkpoint_series.resolve_load(root)
        log(f"[twist] {root}: the latest complete checkpoint is {target.name}")
        return str(target)
    fresh = not detect.holds_checkpoint(root)
    if run.series and fresh and run.save and root.resolve() == Path(run.save).resolve():
        log(f"[twist] {root} holds no complete checkpoint yet (no {checkpoint_series.POINTER}): starting at step 0")
        return None
    return str(root)


def _resumed(args, explicit, run: RunConfig, data: TrainingData, twist: TwistConfig, log):
    """(model, TwIST settings) of a run continuing from ``run.load``; flags that contradict the
    checkpoint and data from another tokenizer are refused."""
    from ..checkpoint.resume import check_resume

    central_dir = os.path.join(run.load, detect.DEEPSPEED_CENTRAL) if run.deepspeed else run.load
    saved, model = detect.read_central_meta(central_dir)
    if run.deepspeed:
        _check_deepspeed_resume_layout(saved, run)
    imported = saved.get("origin", {}).get("format") == "huggingface" and saved["step"] == 0
    check_resume(saved, run.load, args, explicit, data.meta, twist_from_checkpoint=not imported)
    if imported:
        # An imported pretrained model: the starting weights; TwIST settings come from this command.
        log(f"[twist] starting from the imported model {run.load}")
    else:
        # A resumed run keeps its identity: TwIST settings (sampler seed, balance shards, ...) come
        # from the checkpoint, so it continues exactly as the uninterrupted run would.
        twist = TwistConfig.from_dict(saved["twist"])
        log(f"[twist] resuming {run.load} at step {saved['step']}; TwIST settings from the checkpoint")
    # A pretrained model's embedding table may be padded beyond its tokenizer; ours match exactly.
    vocab = data.vocab_size
    if vocab is not None and (vocab > model.vocab_size if imported else vocab != model.vocab_size):
        raise ConfigError(
            f"{run.load} has vocabulary {model.vocab_size}, the data {vocab}: wrong tokenizer? "
            "Prepare the data with the model's tokenizer (`twist prepare-data --hf-tokenizer "
            "DIR` for an imported model)"
        )
    return model, twist


def _check_deepspeed_resume_layout(saved: dict, run: RunConfig) -> None:
    """A DeepSpeed checkpoint holds one set of engine files per TP rank and its central model's shards per
    TP position: it resumes at the tensor-parallel size it was saved at (checked before any work)."""
    saved_tp = int((saved.get("sharded") or {}).get("tensor_parallel", 1))
    if saved_tp != run.tensor_parallel_size:
        raise ConfigError(
            f"--load {run.load} was saved by a DeepSpeed run at tensor parallel {saved_tp}, this run is at "
            f"{run.tensor_parallel_size}: DeepSpeed's engine files are per TP rank, so it resumes only at its "
            f"own layout; pass --tensor-model-parallel-size {saved_tp}"
        )


def _check_save_interval(run: RunConfig, twist: TwistConfig) -> None:
    if run.save_interval is None:
        return
    k = twist.local_steps
    if run.save_interval < 1 or run.save_interval % k:
        raise ConfigError(
            f"--save-interval {run.save_interval} must be a positive multiple of --local-steps {k}: "
            f"checkpoints are taken at round boundaries (e.g. --save-interval "
            f"{k * max(1, round(run.save_interval / k))})"
        )
    if detect.holds_checkpoint(run.save):
        raise ConfigError(
            f"--save {run.save} is a checkpoint, not a save directory; with --save-interval pass a new "
            "or existing save directory (it will hold iter_XXXXXXX checkpoints and a latest pointer)"
        )


def _check_outputs(run: RunConfig) -> None:
    """--save and --metrics-file may replace only what megatron-twist wrote there (or --overwrite)."""
    if run.save:
        kind = outputs.SAVE_DIR if run.series else outputs.DEEPSPEED_SAVE if run.deepspeed else outputs.CENTRAL
        outputs.check_output(run.save, (kind,), "--save", run.overwrite)
    if run.metrics_file:
        outputs.check_output_file(run.metrics_file, "--metrics-file", run.overwrite)


def _resolve_ds_batches(run: RunConfig, ds_config: dict, train: TrainConfig, twist: TwistConfig, explicit, world: int):
    """DeepSpeed's batch sizes for this layout (ds_config.check_batch_consistency), before any work: the
    micro-batch size comes from the config (an explicit --micro-batch-size that disagrees is refused);
    gradient accumulation is honoured (a round is --local-steps OPTIMIZER steps, each of
    gradient_accumulation_steps micro-batches). The resolved sizes are written into the config DeepSpeed
    gets, so its arithmetic and TwIST's agree."""
    from ..integrations.ds_config import check_batch_consistency

    flag = (
        train.micro_batch_size
        if (
            "micro_batch_size" in explicit
            or not ({"train_micro_batch_size_per_gpu", "train_batch_size"} & set(ds_config))
        )
        else None
    )
    sizes = check_batch_consistency(run.deepspeed_config, flag, world, twist, tensor_parallel=run.tensor_parallel_size)
    train = dataclasses.replace(train, micro_batch_size=sizes["train_micro_batch_size_per_gpu"])
    ds_config = dict(
        ds_config,
        **{k: sizes[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")},
    )
    return train, ds_config
