"""The ``twist`` command (also ``python -m megatron_twist``).

    twist prepare-data  corpus -> sentencepiece tokenizer + Megatron indexed dataset
    twist train         TwIST training (single process, or one subnet per rank under torchrun)
    twist plan          check a layout and size it per GPU before a job is queued (same flags as train)
    twist extract       cut a dense smaller model out of a central checkpoint
    twist import-hf     a local HuggingFace Llama / GPT-2 checkpoint -> a central checkpoint to train on
    twist export-hf     a central or cut-out model -> a HuggingFace directory (config, safetensors, tokenizer)
    twist eval          held-out perplexity; the last line printed is a JSON object

Every command validates its inputs before it starts any work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .arguments import (add_model_args, add_training_args, add_twist_args, model_config_from_args,
                        train_config_from_args, validate_twist_args)
from . import outputs
from .config import ConfigError


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- prepare-data
def cmd_prepare_data(args) -> int:
    from .data import stdlib_documents, text_documents  # light: a bad corpus is refused before Megatron loads

    outputs.check_output(args.output, (outputs.PREPARED_DATA,), "--output", args.overwrite)  # before any work

    if args.input:
        docs = text_documents(args.input, json_field=args.json_field)
        if args.split_paragraphs:
            from .data.corpus import paragraph_documents

            docs = paragraph_documents(docs)
        docs = list(docs)
        train_docs, valid_docs = _split_documents(docs, args.valid_fraction)
        source = f"{len(args.input)} input path(s)"
    else:
        train_docs = stdlib_documents("train", max_bytes=args.max_bytes)
        valid_docs = stdlib_documents("valid", max_bytes=None)
        source = "python standard library"
    _log(f"[prepare-data] {source}: {len(train_docs)} train / {len(valid_docs)} valid documents")
    if args.tokenizer_model and args.hf_tokenizer:
        raise ConfigError("pass either --tokenizer-model or --hf-tokenizer, not both")
    reuse = args.tokenizer_model or args.hf_tokenizer
    from .data import prepare_data

    manifest = prepare_data(args.output, train_docs, valid_docs,
                            vocab_size=None if reuse else args.vocab_size,
                            tokenizer_model=args.tokenizer_model, hf_tokenizer=args.hf_tokenizer,
                            overwrite=args.overwrite)
    _log(f"[prepare-data] wrote {args.output}: {json.dumps(_as_dict(manifest), default=str)}")
    return 0


def _split_documents(docs, valid_fraction: float):
    """Deterministic split: every k-th document goes to validation."""
    if not 0 < valid_fraction < 1:
        raise ConfigError(f"--valid-fraction must lie in (0, 1), got {valid_fraction}")
    if len(docs) < 2:
        raise ConfigError(f"need at least 2 documents to make a train/validation split, the input has {len(docs)}; "
                          "pass more text (each file is a document; with --split-paragraphs each paragraph is one)")
    every = max(2, round(1 / valid_fraction))
    valid = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, valid


def _as_dict(obj):
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# ---------------------------------------------------------------------- train
def cmd_train(args) -> int:
    # Everything the user typed is validated first; Megatron (seconds to import) comes after.
    twist = validate_twist_args(args)
    ds_config = None
    if args.deepspeed or args.deepspeed_config:
        from .integrations.ds_config import twist_config_from_ds, twist_section

        if not (args.deepspeed and args.deepspeed_config):
            raise ConfigError("DeepSpeed needs both --deepspeed and --deepspeed_config FILE")
        twist_section(args.deepspeed_config)  # refuses a missing or invalid file, naming it
        ds_config = json.loads(Path(args.deepspeed_config).read_text())
        twist = twist_config_from_ds(args.deepspeed_config, args, args.parser)
        if args.tensor_model_parallel_size > 1 or args.pipeline_model_parallel_size > 1:
            raise ConfigError("with --deepspeed this release supports TP/PP size 1 only; for tensor or pipeline "
                              "parallel layouts use `twist train` without --deepspeed (Megatron-core's own path)")
    train = train_config_from_args(args)
    if ds_config is not None:
        from .integrations.ds_config import engine_settings
        from .checkpoint.resume import explicit_dests

        # The config's optimizer, clipping, fp16, offload, scheduler: honoured or refused, never ignored.
        explicit = explicit_dests(args.parser, _train_argv(args))
        train = engine_settings(args.deepspeed_config, train, explicit)
    data_meta, batches_factory, vocab = _data_for_training(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    series = _series_mode(args)
    if args.load:
        args.load = _resolve_load(args, series)  # a save directory's latest pointer; None: nothing saved yet
    if args.load:
        from .config import TwistConfig
        from .checkpoint.resume import check_resume, explicit_dests

        saved, model = _read_central_meta(os.path.join(args.load, "central") if ds_config is not None else args.load)
        imported = saved.get("origin", {}).get("format") == "huggingface" and saved["step"] == 0
        # Flags that contradict the checkpoint, data from another tokenizer: refused before anything runs.
        check_resume(saved, args.load, args, explicit_dests(args.parser, _train_argv(args)), data_meta,
                     twist_from_checkpoint=not imported)
        if imported:
            # An imported pretrained model: the starting weights; TwIST settings come from this command.
            _log(f"[twist] starting from the imported model {args.load}")
        else:
            # A resumed run keeps its identity: TwIST settings (sampler seed, balance shards, ...) come
            # from the checkpoint, so it continues exactly as the uninterrupted run would.
            twist = TwistConfig.from_dict(saved["twist"])
            _log(f"[twist] resuming {args.load} at step {saved['step']}; TwIST settings from the checkpoint")
        # A pretrained model's embedding table may be padded beyond its tokenizer; ours match exactly.
        if vocab is not None and (vocab > model.vocab_size if imported else vocab != model.vocab_size):
            raise ConfigError(f"{args.load} has vocabulary {model.vocab_size}, the data {vocab}: wrong tokenizer? "
                              "Prepare the data with the model's tokenizer (`twist prepare-data --hf-tokenizer "
                              "DIR` for an imported model)")
    else:
        model = model_config_from_args(args, vocab)
    from .distributed.layout import ParallelLayout, check_model_layout  # pure arithmetic, no Megatron import

    import dataclasses

    try:
        twist = dataclasses.replace(twist, balance_shards=twist.shards_for(tp))  # recorded in checkpoints
        check_model_layout(model, twist, tp, pp)
    except ConfigError as e:
        if not args.load:
            raise
        raise ConfigError(f"--load {args.load} cannot continue at tensor parallel {tp} x pipeline parallel {pp}: {e} "
                          f"(the checkpoint's subnets are balanced over {twist.balance_shards or tp} shard(s); "
                          "choose sizes that divide the saved model and that number)") from None
    _check_reliability_flags(args, twist, series)
    _check_train_outputs(args, series, ds_config is not None)  # nothing of the user's is replaced
    _check_data_fits(args, model)
    from .distributed.runtime import discover_launcher

    discover_launcher()  # torchrun, deepspeed, srun or mpirun: WORLD_SIZE is known from here on
    ParallelLayout.for_world(int(os.environ.get("WORLD_SIZE", "1")), twist.num_subnets, tp, pp)
    if ds_config is not None:
        train, ds_config = _resolve_ds_batches(args, ds_config, train, twist, explicit)

    from .distributed.runtime import init_distributed, shutdown

    init_distributed(timeout_s=args.distributed_timeout_minutes * 60)
    from .distributed.watchdog import Watchdog

    watchdog = Watchdog.for_job(args.distributed_timeout_minutes * 60)  # heartbeats; None for one process
    try:
        with watchdog.guard() if watchdog is not None else contextlib.nullcontext():
            return _train_in_group(args, model, twist, train, tp, pp, ds_config, data_meta, batches_factory, series,
                                   watchdog)
    finally:
        shutdown()


def _train_in_group(args, model, twist, train, tp, pp, ds_config, data_meta, batches_factory, series,
                    watchdog) -> int:
    """Everything that runs inside the process group (under the watchdog's guard on multi-rank jobs)."""
    import torch

    from .cpu_shim import seed_everything
    from .distributed.runtime import build_twist_groups
    from .training.twist_trainer import TwistTrainer, build_central

    groups = build_twist_groups(twist, tp, pp)
    seed_everything(train.seed)  # Megatron's RNG tracker, whichever way the central model is made
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    if ds_config is not None:  # the engine path builds and loads its own central model
        import dataclasses

        # one batch of micro x accumulation samples per (step, subnet slot), split into micro-batches
        ga = ds_config.get("gradient_accumulation_steps", 1)
        batches = batches_factory(model, dataclasses.replace(train, micro_batch_size=train.micro_batch_size * ga),
                                  twist)
        return _train_deepspeed(args, model, twist, train, groups, batches, ds_config, data_meta, watchdog, series)
    batches = batches_factory(model, train, twist)
    if args.load and _is_dist_checkpoint(args.load):
        from .checkpoint.torch_dist import load_central_dist

        central = load_central_dist(args.load, model, tp, pp)[0]  # Megatron reshards to this layout
    else:
        central = build_central(model, train.seed, tp, pp)
    if args.load and not _is_dist_checkpoint(args.load):
        from .distributed.full_state import layer_range
        from .checkpoint.models import fill_central

        fill_central(central, args.load, groups.tp_rank, tp, layer_range(model, groups.pp_rank, pp)[0])
    trainer = TwistTrainer(model, twist, train, groups, batches, central=central, log=_log, watchdog=watchdog)
    records, saved_at = [], [None]

    def on_round_end(rec):
        records.append(rec)
        if series and args.save_interval and trainer.central.step % args.save_interval == 0:
            _save_central(args, trainer, twist, train, data_meta, groups, series)  # collective
            saved_at[0] = trainer.central.step

    result = trainer.run(on_round_end=on_round_end)
    if args.save and saved_at[0] != result.central.step:
        _save_central(args, trainer, twist, train, data_meta, groups, series)  # collective
    if groups.is_logging_rank and args.metrics_file:
        _write_json(args.metrics_file, {
            "rounds": [r.__dict__ for r in records],
            "loss_curve": result.loss_curve(),
            "model": model.to_dict(), "twist": twist.to_dict(), "train": train.to_dict(),
            "world_size": groups.world_size,
        })
    return 0


def _save_central(args, trainer, twist, train, data_meta, groups, series: bool) -> None:
    """Collective: the central model to --save, a plain checkpoint directory or (``series``) the next
    SAVE_DIR/iter_XXXXXXX, after which the latest pointer moves (checkpoint_series.py)."""
    from .checkpoint import series as checkpoint_series

    central, step = trainer.central, trainer.central.step
    target = checkpoint_series.iteration_dir(args.save, step) if series else Path(args.save)
    if args.ckpt_format == "torch_dist":
        from .checkpoint.torch_dist import save_central_dist

        if series and groups.is_logging_rank:
            checkpoint_series.prepare(args.save)
        save_central_dist(target, central, twist, train, extra={"data": data_meta},  # collective, atomic
                          overwrite=args.overwrite and not series)
        if series and groups.is_logging_rank:
            checkpoint_series.publish(args.save, step, args.keep_checkpoints)
        if groups.is_logging_rank:
            _log(f"[twist] saved central model (torch_dist) to {target}")
        return
    full_state = trainer.full_central_state()  # a collective on sharded runs
    if groups.is_logging_rank:
        from .checkpoint.models import save_central

        def write(path):
            save_central(str(path), central, twist, train, data=data_meta, full_state=full_state,
                         overwrite=args.overwrite and not series)

        if series:
            checkpoint_series.save_iteration(args.save, step, write, args.keep_checkpoints)
        else:
            write(target)
        _log(f"[twist] saved central model to {target}")


def _series_mode(args) -> bool:
    """--save is a directory of iter_ checkpoints with a latest pointer (not one checkpoint); on the
    DeepSpeed path each iter_ holds engine/ + central/."""
    if not args.save:
        return False
    from .checkpoint.series import is_series

    return args.save_interval is not None or is_series(args.save)


def _resolve_load(args, series: bool) -> Optional[str]:
    """The checkpoint --load means: a save directory's latest, the directory itself, or None when
    --load and --save name the same series with nothing saved yet (Megatron-LM's restart idiom)."""
    from .checkpoint.series import POINTER, read_pointer, resolve_load

    root = Path(args.load)
    if read_pointer(root) is not None:
        target = resolve_load(root)
        _log(f"[twist] {root}: the latest complete checkpoint is {target.name}")
        return str(target)
    fresh = not _holds_checkpoint(root)
    if series and fresh and args.save and root.resolve() == Path(args.save).resolve():
        _log(f"[twist] {root} holds no complete checkpoint yet (no {POINTER}): starting at step 0")
        return None
    return str(root)


def _check_train_outputs(args, series: bool, deepspeed: bool) -> None:
    """--save and --metrics-file may replace only what megatron-twist wrote there (or --overwrite)."""
    if args.save:
        kind = outputs.SAVE_DIR if series else outputs.DEEPSPEED_SAVE if deepspeed else outputs.CENTRAL
        outputs.check_output(args.save, (kind,), "--save", args.overwrite)
    if args.metrics_file:
        outputs.check_output_file(args.metrics_file, "--metrics-file", args.overwrite)


def _check_reliability_flags(args, twist, series: bool) -> None:
    if args.distributed_timeout_minutes <= 0:
        raise ConfigError(f"--distributed-timeout-minutes must be positive, got {args.distributed_timeout_minutes}")
    if args.keep_checkpoints < 0:
        raise ConfigError(f"--keep-checkpoints must be 0 (keep all) or more, got {args.keep_checkpoints}")
    if args.save_interval is None:
        return
    if not args.save:
        raise ConfigError("--save-interval needs --save DIR (the directory of the periodic checkpoints)")
    k = twist.local_steps
    if args.save_interval < 1 or args.save_interval % k:
        raise ConfigError(f"--save-interval {args.save_interval} must be a positive multiple of --local-steps {k}: "
                          f"checkpoints are taken at round boundaries (e.g. --save-interval {k * max(1, round(args.save_interval / k))})")
    if _holds_checkpoint(args.save):
        raise ConfigError(f"--save {args.save} is a checkpoint, not a save directory; with --save-interval pass a new "
                          "or existing save directory (it will hold iter_XXXXXXX checkpoints and a latest pointer)")


def _resolve_ds_batches(args, ds_config: dict, train, twist, explicit):
    """DeepSpeed's batch sizes for this layout (ds_config.check_batch_consistency), before any work: the
    micro-batch size comes from the config (an explicit --micro-batch-size that disagrees is refused);
    gradient accumulation is honoured (a round is --local-steps OPTIMIZER steps, each of
    gradient_accumulation_steps micro-batches). The resolved sizes are written into the config DeepSpeed
    gets, so its arithmetic and TwIST's agree."""
    import dataclasses

    from .integrations.ds_config import check_batch_consistency

    flag = train.micro_batch_size if ("micro_batch_size" in explicit or not (
        {"train_micro_batch_size_per_gpu", "train_batch_size"} & set(ds_config))) else None
    sizes = check_batch_consistency(args.deepspeed_config, flag, int(os.environ.get("WORLD_SIZE", "1")), twist)
    train = dataclasses.replace(train, micro_batch_size=sizes["train_micro_batch_size_per_gpu"])
    ds_config = dict(ds_config, **{k: sizes[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                         "gradient_accumulation_steps")})
    return train, ds_config


def _check_data_fits(args, model) -> None:
    """One training sample needs seq_length + 1 tokens (refused before any process group exists)."""
    if args.mock_data or not args.data_path:
        return
    from .data import load_manifest
    from .errors import DataError

    tokens = load_manifest(args.data_path).splits["train"].tokens
    if tokens < model.seq_length + 1:
        raise DataError(f"the training data in {args.data_path!r} has {tokens} tokens, fewer than seq_length + 1 = "
                        f"{model.seq_length + 1} needed for one sample; use a shorter --seq-length or prepare more text")


def _train_argv(args) -> List[str]:
    """The command-line words after `train` (to tell flags the user typed from defaults)."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    return argv[argv.index("train") + 1:] if "train" in argv else argv


def _train_deepspeed(args, model, twist, train, groups, batches, ds_config, data_meta, watchdog=None,
                     series: bool = False) -> int:
    from .training.deepspeed_trainer import train_with_deepspeed

    central, losses, engine = train_with_deepspeed(model, twist, train, groups, batches, ds_config, log=_log,
                                                   load=args.load, save=args.save, data_meta=data_meta,
                                                   watchdog=watchdog, series=series,
                                                   save_interval=args.save_interval,
                                                   keep_checkpoints=args.keep_checkpoints)
    all_losses = _gather(losses)
    if groups.is_logging_rank:
        _log(f"[twist-ds] done at step {central.step}: ZeRO {engine.zero_optimization_stage()}, final loss per rank "
             f"{[round(x[-1], 4) for x in all_losses]}")
        if args.save:
            _log(f"[twist] saved engine checkpoint and central model to {args.save}")
        if args.metrics_file:
            from .integrations.deepspeed_engine import _torch_optimizer

            group = _torch_optimizer(engine).param_groups[0]
            _write_json(args.metrics_file, {"losses_per_rank": all_losses, "twist": twist.to_dict(),
                                            "zero_stage": engine.zero_optimization_stage(), "train": train.to_dict(),
                                            "engine_global_steps": engine.global_steps,
                                            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                                            "optimizer": {"betas": list(group["betas"]), "eps": group["eps"],
                                                          "weight_decay": group["weight_decay"]}})
    return 0


def _gather(obj):
    from .distributed.runtime import all_gather_objects

    return all_gather_objects(obj)


def _holds_checkpoint(path) -> bool:
    """A checkpoint directory of either format, or of the DeepSpeed path (engine/ + central/), not a
    save directory of iter_ checkpoints."""
    return any((Path(path) / f).exists() for f in ("meta.json", "metadata.json", "central/meta.json"))


def _is_dist_checkpoint(path: str) -> bool:
    """Megatron dist_checkpointing writes metadata.json; megatron-twist's safetensors format meta.json."""
    return (Path(path) / "metadata.json").is_file() and not (Path(path) / "meta.json").is_file()


def _read_central_meta(path: str):
    """(meta dict, ModelConfig) of a central checkpoint in either format, without building anything."""
    from .checkpoint.files import model_config_of

    if _is_dist_checkpoint(path):
        from .checkpoint.torch_dist import read_common

        common = read_common(path)
        return common, model_config_of(common, path)
    from .checkpoint.files import load_checkpoint

    meta = load_checkpoint(path, kind="central", tensors=False)[0]
    return meta, model_config_of(meta, path)


def _data_for_training(args):
    """Validate the data source before any process group exists; return a lazy batch factory."""
    if args.mock_data:
        def mock_factory(model, train, twist):
            from .data.batches import SyntheticBatches

            return SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=train.seed)

        return {"mock": True}, mock_factory, args.vocab_size or 512
    if not args.data_path:
        raise ConfigError("no data: pass --data-path DIR (from `twist prepare-data --output DIR`) or --mock-data")
    from .data import build_gpt_dataset, load_manifest

    manifest = load_manifest(args.data_path)

    def factory(model, train, twist):
        from .data.batches import MegatronBatches

        num_samples = train.train_iters * twist.num_subnets * train.micro_batch_size
        dataset = build_gpt_dataset(args.data_path, model.seq_length, num_samples, seed=train.seed)
        return MegatronBatches(dataset, train.micro_batch_size)

    if args.vocab_size is not None and args.vocab_size != manifest.vocab_size:
        raise ConfigError(f"--vocab-size {args.vocab_size} contradicts the data: {args.data_path} was tokenized with a "
                          f"{manifest.vocab_size}-token vocabulary, which the model takes from the data; drop "
                          "--vocab-size (it sizes --mock-data only)")
    data_meta = {"path": str(Path(args.data_path).resolve()), "tokenizer_sha256": manifest.tokenizer_sha256,
                 "vocab_size": manifest.vocab_size}
    return data_meta, factory, manifest.vocab_size


def _write_json(path: str, obj) -> None:
    """The metrics file, stamped so that a rerun may replace it (outputs.check_output_file)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"megatron_twist": outputs.METRICS, **obj}, f, indent=1)
    os.replace(tmp, path)


# -------------------------------------------------------------------- extract
def cmd_extract(args) -> int:
    from .distributed.runtime import init_distributed, init_model_parallel, shutdown
    from .model.gpt import count_parameters
    from .checkpoint.models import load_central, save_extracted
    from .twist.extraction import cut_model, select_plan

    outputs.check_output(args.save, (outputs.EXTRACTED,), "--save", args.overwrite)  # before any work
    init_distributed()
    try:
        init_model_parallel()
        central, twist, meta = load_central(args.load)
        keep = args.keep_ratio if args.keep_ratio is not None else twist.keep_ratio
        plan = select_plan(central.config, twist, central.params, keep, args.method)
        module, sizes = cut_model(central.config, twist, central.params, plan)
        save_extracted(args.save, module, central.config, twist, plan, keep, args.method,
                       source={"checkpoint": str(Path(args.load).resolve()), "step": meta["step"],
                               "data": meta.get("data", {})}, overwrite=args.overwrite)
        full, cut = count_parameters(central.module), count_parameters(module)
        _log(f"[extract] keep ratio {keep} ({args.method}): {full:,} -> {cut:,} parameters "
             f"({cut / full:.3f}x); layer sizes {[(s.num_attention_heads, s.ffn_hidden_size) for s in sizes]}; "
             f"saved to {args.save}")
    finally:
        shutdown()
    return 0


# -------------------------------------------------------------- HuggingFace
def cmd_import_hf(args) -> int:
    from .distributed.runtime import init_distributed, init_model_parallel, shutdown
    from .hf.io import import_hf

    outputs.check_output(args.save, (outputs.CENTRAL,), "--save", args.overwrite)  # before any work
    init_distributed()
    try:
        init_model_parallel()
        model = import_hf(args.path, args.save, args.seq_length, overwrite=args.overwrite)
        _log(f"[import-hf] {args.path} -> central checkpoint {args.save} ({model.family}, {model.num_layers} layers, "
             f"hidden {model.hidden_size}, {model.num_attention_heads} heads / {model.num_query_groups} KV groups, "
             f"FFN {model.ffn_hidden_size}, vocab {model.vocab_size}); continue it with `twist train --load "
             f"{args.save}`")
    finally:
        shutdown()
    return 0


def cmd_export_hf(args) -> int:
    from .hf.io import export_hf

    summary = export_hf(args.load, args.save, args.tokenizer, overwrite=args.overwrite)
    sizes = summary["layer_sizes"][0]
    _log(f"[export-hf] {args.load} ({summary['kind']}, keep ratio {summary['keep_ratio']}) -> {args.save}: "
         f"{summary['family']}, {sizes['num_attention_heads']} heads / {sizes['num_query_groups']} KV heads, "
         f"FFN {sizes['ffn_hidden_size']}; tokenizer {summary['tokenizer']['kind']} "
         f"({summary['tokenizer']['vocab_size']} tokens)")
    return 0


# ----------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .distributed.runtime import init_distributed, init_model_parallel, shutdown
    from .evaluation import perplexity
    from .checkpoint.models import load_model

    init_distributed()
    try:
        init_model_parallel()
        forward = {}
        from .hf.io import is_hf_directory

        if is_hf_directory(args.load):  # an exported (or any local Llama / GPT-2) HuggingFace directory
            from .hf.io import hf_forward, load_hf_model

            module, meta = load_hf_model(args.load)
            forward = {"forward": hf_forward}
        else:
            module, meta = load_model(args.load)
        tokens, seq_length, data_info = _eval_tokens(args, meta)
        t0 = time.perf_counter()
        result = perplexity(module, tokens, seq_length, batch_size=args.batch_size, max_tokens=args.max_tokens,
                            **forward)
        result.update(kind=meta["kind"], keep_ratio=meta.get("keep_ratio", 1.0), checkpoint=args.load,
                      seconds=round(time.perf_counter() - t0, 2), **data_info)
        print(json.dumps(result), flush=True)
    finally:
        shutdown()
    return 0


def _eval_tokens(args, meta):
    import torch

    seq_length = meta["model"]["seq_length"]
    if args.mock_data:
        from .data.batches import SyntheticBatches

        src = SyntheticBatches(meta["model"]["vocab_size"], seq_length, 16, seed=args.seed + 1)
        toks = torch.cat([src.get(i, 0, 1)["tokens"].flatten() for i in range(4)])
        return toks, seq_length, {"data": "mock"}
    if not args.data_path:
        raise ConfigError("no data: pass --data-path DIR (from `twist prepare-data`) or --mock-data")
    from .data import load_manifest, load_token_stream

    manifest = load_manifest(args.data_path)
    trained_with = meta.get("data", {}).get("tokenizer_sha256")
    if trained_with and trained_with != manifest.tokenizer_sha256:
        raise ConfigError(
            f"{args.data_path} was tokenized with a different tokenizer than the model was trained with; "
            "evaluate on data prepared with the model's tokenizer (`twist prepare-data --tokenizer-model`)"
        )
    if manifest.vocab_size > meta["model"]["vocab_size"]:
        raise ConfigError(f"the data's vocabulary ({manifest.vocab_size}) is larger than the model's "
                          f"({meta['model']['vocab_size']}): wrong tokenizer")
    return load_token_stream(args.data_path, args.split), seq_length, {"split": args.split}



# ----------------------------------------------------------------------- plan
def _plan(args) -> int:
    """Check a layout and size it per GPU (no GPU, no process group); refusals exit 2 like train's."""
    from .planning import format_plan, plan_from_args

    plan = plan_from_args(args)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan), flush=True)
    return 0

# ----------------------------------------------------------------------- main
OVERWRITE_HELP = ("replace the target even if it is a non-empty directory that megatron-twist did not write "
                  "(refused by default, before any work)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("prepare-data", help="tokenizer + Megatron indexed dataset from a corpus")
    d.add_argument("--output", required=True, help="directory to write")
    d.add_argument("--input", nargs="+", default=None,
                   help="text / JSON-lines files or directories (default: the Python standard library)")
    d.add_argument("--json-field", default="text", help="field of JSON-lines records holding the text")
    d.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer to train")
    d.add_argument("--tokenizer-model", default=None, help="use this sentencepiece model instead of training one")
    d.add_argument("--hf-tokenizer", default=None, help="use this HuggingFace tokenizer directory (e.g. the model "
                   "directory given to `twist import-hf`) instead of training one")
    d.add_argument("--valid-fraction", type=float, default=0.1, help="share of --input documents held out "
                   "(every k-th document, k = round(1 / fraction))")
    d.add_argument("--split-paragraphs", action="store_true", help="cut plain-text inputs into one document per "
                   "paragraph (blank-line separated), e.g. for a corpus that is one long file")
    d.add_argument("--max-bytes", type=int, default=None, help="cap on the standard-library training text")
    d.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    d.set_defaults(func=cmd_prepare_data)

    t = sub.add_parser("train", help="train with TwIST (run under torchrun for one subnet group per rank)")
    p.train_parser = t
    add_model_args(t)
    add_training_args(t)
    add_twist_args(t)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plan", help="check a layout and size memory, compute and traffic per GPU (no GPU needed)")
    from .planning import add_plan_args

    add_model_args(pl)
    add_training_args(pl)
    add_twist_args(pl)
    add_plan_args(pl)
    pl.set_defaults(func=_plan)

    e = sub.add_parser("extract", help="cut a dense smaller model from a central checkpoint")
    e.add_argument("--load", required=True, help="central checkpoint (from `twist train --save`)")
    e.add_argument("--save", required=True, help="directory for the cut-out model")
    e.add_argument("--keep-ratio", type=float, default=None, help="default: the training keep ratio")
    e.add_argument("--method", default="magnitude", help="'magnitude' (default) or 'random:SEED'")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    e.set_defaults(func=cmd_extract)

    i = sub.add_parser("import-hf", help="a local HuggingFace Llama / GPT-2 checkpoint -> a central checkpoint")
    i.add_argument("path", help="HF model directory (config.json + safetensors)")
    i.add_argument("--save", required=True, help="central checkpoint directory to write (`twist train --load` it)")
    i.add_argument("--seq-length", type=int, default=None, help="training sequence length (Llama; default: "
                   "the model's max_position_embeddings)")
    i.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    x = sub.add_parser("export-hf", help="a central or cut-out model -> a HuggingFace directory")
    x.add_argument("--load", required=True, help="central or cut-out checkpoint directory")
    x.add_argument("--save", required=True, help="HF directory to write")
    x.add_argument("--tokenizer", default=None, help="sentencepiece .model, `twist prepare-data` directory or HF "
                   "tokenizer directory (default: the training data's tokenizer, recorded in the checkpoint)")
    x.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    i.set_defaults(func=cmd_import_hf)
    x.set_defaults(func=cmd_export_hf)

    v = sub.add_parser("eval", help="held-out perplexity of a central, cut-out or HF model (last line: JSON)")
    v.add_argument("--load", required=True, help="model checkpoint directory")
    v.add_argument("--data-path", default=None)
    v.add_argument("--mock-data", action="store_true")
    v.add_argument("--split", default="valid", choices=("train", "valid"))
    v.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--seed", type=int, default=1234)
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    # Megatron-core announces at import that optional CUDA libraries are absent; not actionable here.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to tell typed flags from defaults (--load)
    args.parser = parser.train_parser  # to tell flags the user set from defaults (ds_config conflicts)
    from .errors import CheckpointError, DataError, TrainingError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"twist {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:  # e.g. every subnet of a round non-finite; the last checkpoint is intact
        print(f"twist {args.command}: stopped: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
