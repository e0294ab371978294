"""`twist plan`'s checks: does a layout split the model, and what to change when it does not.

Each check either returns what it verified, in words (the plan's "checks" lines), or raises a
:class:`~megatron_twist.config.ConfigError` naming the reason and a suggested fix (:func:`refuse`).
"""

from __future__ import annotations

from typing import List, Tuple

from ..config import ConfigError, ModelConfig, TwistConfig
from ..distributed.layout import ParallelLayout, check_model_layout
from ..integrations.ds_config import check_batch_consistency, strip_twist_section


def divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def fmt_list(xs) -> str:
    return ", ".join(str(x) for x in xs)


def refuse(reason: str, fix: str) -> ConfigError:
    return ConfigError(f"{reason}\n  suggested fix: {fix}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def check_units(model: ModelConfig, twist: TwistConfig, tp: int, gpus_per_node: int) -> List[str]:
    """Heads, KV heads and FFN over TP and kappa, in words; ConfigError with a fix if they do not split."""
    H, G, F, k = model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size, twist.keep_ratio
    good_tp = [t for t in divisors(max(gpus_per_node, 1)) if units_split(model, twist, t)]
    tp_fix = (
        f"use --tensor-model-parallel-size in {{{fmt_list(good_tp)}}} (the sizes up to {gpus_per_node} GPUs "
        f"per node that split every unit a subnet keeps)"
        if good_tp
        else "no tensor parallel size up to one node's GPUs splits this model"
        + (f" with --twist-balance-shards {twist.balance_shards}" if twist.balance_shards else "")
        + "; change the model or the keep ratio"
    )
    if H % tp:
        raise refuse(f"{H} query heads do not divide over tensor parallel size {tp}", tp_fix)
    if G % tp:
        raise refuse(
            f"{G} key-value heads do not divide over tensor parallel size {tp}: every TP rank must "
            f"hold whole KV groups",
            tp_fix,
        )
    if F % tp:
        raise refuse(f"FFN size {F} does not divide over tensor parallel size {tp}", tp_fix)
    lines = []
    if twist.splits_heads:
        kept = H * k
        if abs(kept - round(kept)) > 1e-9:
            raise refuse(
                f"keep ratio {k} x {H} query heads = {kept:g} is not a whole number of heads",
                f"use a keep ratio that is a multiple of 1/{model.heads_per_group if G < H else H}",
            )
        kept = int(round(kept))
        if kept % tp:
            raise refuse(
                f"tensor parallel size {tp} does not divide the {kept} query heads a subnet keeps per "
                f"layer (keep ratio {k} x {H} heads): TP shards would hold unequal numbers of heads",
                tp_fix,
            )
        kept_groups = G if G < H else kept
        lines.append(
            f"{H} query heads / {G} KV heads over TP {tp}: a subnet keeps {kept} query heads in "
            f"{plural(kept_groups, 'KV group')} per layer, {plural(kept // tp, 'head')} and "
            f"{plural(kept_groups // tp, 'KV group')} per TP shard"
        )
    if twist.splits_mlp:
        kept = F * k
        if abs(kept - round(kept)) > 1e-9 or int(round(kept)) % tp:
            raise refuse(
                f"keep ratio {k} x FFN {F} = {kept:g} neurons does not split into whole neurons over "
                f"tensor parallel size {tp}",
                tp_fix,
            )
        lines.append(
            f"FFN {F} over TP {tp}: a subnet keeps {int(round(kept))} neurons per layer, "
            f"{int(round(kept)) // tp} per TP shard"
        )
    try:
        twist.check_against_model(model, tp)  # balance shards, per-bucket quotas
    except ConfigError as e:
        raise refuse(str(e), tp_fix) from None
    return lines


def units_split(model: ModelConfig, twist: TwistConfig, tp: int) -> bool:
    try:
        _check_units_quiet(model, twist, tp)
        return True
    except ConfigError:
        return False


def _check_units_quiet(model: ModelConfig, twist: TwistConfig, tp: int) -> None:
    H, G, F, k = model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size, twist.keep_ratio
    if H % tp or G % tp or F % tp or model.vocab_size % tp:
        raise ConfigError("units")
    if twist.splits_heads and (abs(H * k - round(H * k)) > 1e-9 or int(round(H * k)) % tp):
        raise ConfigError("heads")
    if twist.splits_mlp and (abs(F * k - round(F * k)) > 1e-9 or int(round(F * k)) % tp):
        raise ConfigError("ffn")
    twist.check_against_model(model, tp)


def check_layout(
    model: ModelConfig, twist: TwistConfig, world_size: int, tp: int, pp: int, gpus_per_node: int
) -> Tuple[ParallelLayout, List[str]]:
    """The layout's checks in the order a user thinks about them, in words; ConfigError with a fix if one fails."""
    checks = check_units(model, twist, tp, gpus_per_node)
    if model.vocab_size % tp:
        raise refuse(
            f"vocabulary {model.vocab_size} does not divide over tensor parallel size {tp}",
            f"a vocabulary that is a multiple of {tp} (`twist prepare-data --vocab-size "
            f"{-(-model.vocab_size // tp) * tp}`), or a TP size that divides {model.vocab_size}",
        )
    checks.append(f"vocabulary {model.vocab_size} over TP {tp}: {model.vocab_size // tp} rows per shard")
    if model.num_layers % pp:
        good = [p for p in divisors(model.num_layers) if world_size % (tp * p) == 0]
        raise refuse(
            f"{model.num_layers} layers do not divide over pipeline parallel size {pp}",
            f"use --pipeline-model-parallel-size in {{{fmt_list(good)}}} (divides the layers and "
            f"{world_size} GPUs / TP {tp})",
        )
    checks.append(f"{model.num_layers} layers over PP {pp}: {model.num_layers // pp} per stage")
    if world_size % (tp * pp):
        raise refuse(
            f"{world_size} GPUs do not divide into TP {tp} x PP {pp} = {tp * pp}",
            f"use a multiple of {tp * pp} GPUs ({_nodes_for(tp * pp, gpus_per_node)} nodes of "
            f"{gpus_per_node}), or a TP x PP that divides {world_size}",
        )
    dp = world_size // (tp * pp)
    try:
        layout = ParallelLayout.for_world(world_size, twist.num_subnets, tp, pp)
    except ConfigError as e:
        fits = [
            n
            for n in divisors(dp) + [dp * m for m in (2, 3, 4)]
            if n * twist.keep_ratio >= 1 - 1e-9 or not twist.coverage
        ]
        raise refuse(str(e), f"--num-subnets in {{{fmt_list(sorted(set(fits))[:8])}}} for DP {dp}") from None
    check_model_layout(model, twist, tp, pp)  # what `twist train` runs: must agree
    if layout.data_parallel >= twist.num_subnets:
        checks.append(f"DP {dp} over {twist.num_subnets} subnets: {plural(layout.replicas, 'replica')} per subnet")
    else:
        checks.append(
            f"DP {dp} over {twist.num_subnets} subnets: each rank trains {layout.subnets_per_rank} subnets in turn"
        )
    return layout, checks


def _nodes_for(ranks: int, gpus_per_node: int) -> str:
    return str(-(-ranks // gpus_per_node))


def check_deepspeed(ds_config, train, twist, world_size, tp, pp, layout, checks) -> Tuple[str, int]:
    """The DeepSpeed path's checks (its batch line is appended to ``checks``) -> (dtype, ZeRO stage)."""
    if ds_config is None:
        raise ConfigError("the DeepSpeed path needs --deepspeed_config FILE")
    if pp > 1:
        raise refuse(
            "pipeline parallelism is not supported with --deepspeed (a DeepSpeed engine runs its model's "
            "whole forward and backward in one call, so it cannot drive Megatron-core's pipeline schedule)",
            "drop --deepspeed (TwIST on Megatron-core's own TP x PP path), or use TP only",
        )
    if layout.data_parallel < twist.num_subnets:
        raise refuse(
            f"DeepSpeed trains one subnet per rank, but {layout.data_parallel} data-parallel ranks hold "
            f"{twist.num_subnets} subnets",
            f"launch at least {twist.num_subnets} data-parallel ranks or use --num-subnets {layout.data_parallel}",
        )
    sizes = check_batch_consistency(ds_config, train.micro_batch_size, world_size, twist, tensor_parallel=tp)
    checks.append(
        f"batch (DeepSpeed): train_batch_size {sizes['train_batch_size']} = micro batch "
        f"{sizes['train_micro_batch_size_per_gpu']} x accumulation {sizes['gradient_accumulation_steps']} "
        f"x {sizes['data_parallel_size']} replicas of one subnet"
    )
    ds = strip_twist_section(ds_config)
    bf16 = bool((ds.get("bf16") or {}).get("enabled")) or bool((ds.get("bfloat16") or {}).get("enabled"))
    if (ds.get("fp16") or {}).get("enabled"):
        raise refuse("the planner models fp32 and bf16 DeepSpeed runs only", 'use "bf16": {"enabled": true}')
    if sizes["gradient_accumulation_steps"] != 1:
        raise refuse(
            f"gradient_accumulation_steps {sizes['gradient_accumulation_steps']}: the TwIST round hook "
            "counts one engine step per optimizer step",
            "set gradient_accumulation_steps to 1 (raise the micro batch instead)",
        )
    zero = int((ds.get("zero_optimization") or {}).get("stage", 0))
    return ("bf16" if bf16 else "fp32"), zero
