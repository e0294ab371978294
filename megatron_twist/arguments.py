"""Command-line arguments, Megatron style.

``add_twist_args(parser)`` adds ONLY TwIST's own flags (kebab-case, no clash
with Megatron-LM's), so it can be passed to Megatron-LM as
``extra_args_provider``; ``validate_twist_args(args)`` turns them into a
validated :class:`TwistConfig`. The model / training flags below reuse
Megatron-LM's names (``--num-layers``, ``--hidden-size``, ``--lr``,
``--train-iters``, ...) for the standalone ``twist`` command.
"""

from __future__ import annotations

import argparse
from typing import Iterable, Set

from .config import (
    CORRECTIONS,
    MODEL_PRESETS,
    OPTIMIZER_STATE_POLICIES,
    SPLIT_UNITS,
    ConfigError,
    ModelConfig,
    TrainConfig,
    TwistConfig,
)


def _int_list(text: str):
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,-1, got {text!r}") from None


def lr_scale_value(text: str):
    """--twist-lr-scale as typed: a number, or a rule's name (TwistConfig checks both, naming the choices)."""
    try:
        return float(text)
    except ValueError:
        return text


def add_twist_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("TwIST", "independent subnetwork training")
    g.add_argument(
        "--keep-ratio",
        type=float,
        default=0.5,
        help="kappa: fraction of attention heads and MLP neurons each subnet keeps",
    )
    g.add_argument("--num-subnets", type=int, default=2, help="subnets trained independently between aggregations")
    g.add_argument("--local-steps", type=int, default=15, help="optimizer steps per subnet between aggregations")
    g.add_argument("--twist-seed", type=int, default=1234, help="seed of the subnet sampler (with the round number)")
    g.add_argument("--twist-split", choices=SPLIT_UNITS, default="both", help="which units are split into subnets")
    g.add_argument(
        "--whole-layers",
        type=_int_list,
        default=(),
        help="comma-separated layer indices kept whole in every subnet (negative: from the end)",
    )
    g.add_argument(
        "--no-coverage",
        dest="twist_coverage",
        action="store_false",
        help="draw each subnet independently instead of dealing every unit to some subnet",
    )
    g.add_argument(
        "--activation-correction",
        choices=CORRECTIONS,
        default="none",
        help="'rescale': scale a subnet's summed unit outputs by 1/kappa (folded in at extraction); "
        "'none' (default; measured better, docs/RESULTS.md)",
    )
    g.add_argument(
        "--optimizer-state",
        choices=OPTIMIZER_STATE_POLICIES,
        default="aggregate",
        help="'aggregate': slice Adam moments with the weights and average them back; "
        "'reset': fresh moments each round",
    )
    g.add_argument(
        "--twist-balance-shards",
        type=int,
        default=0,
        help="draw units with equal quotas from this many blocks (default: the tensor parallel size); "
        "keep it fixed to reproduce a run at another tensor parallel size",
    )
    g.add_argument(
        "--twist-pin-cut",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subnet 0 holds, each round, the units the magnitude cut at --keep-ratio would keep now, "
        "so the final cut trains as one model (default on: measured better in both regimes, "
        "docs/RESULTS.md); --no-twist-pin-cut draws every subnet at random",
    )
    g.add_argument(
        "--twist-cut-from-step",
        type=int,
        default=None,
        metavar="STEP",
        help="from this global step (a multiple of --local-steps) on, every subnet trains the pinned cut: "
        "cut-aware final rounds (the cut trains densely on all subnets' tokens; the other units stay put)",
    )
    g.add_argument(
        "--twist-cut-share",
        type=float,
        default=None,
        metavar="F",
        help="each subnet besides the pinned one takes round(F x quota) of its units from the pinned cut "
        "and the rest from the other units, so the cut trains on more tokens and some other units may sit "
        "a round out (default 0.75 with --twist-pin-cut, measured best for the cut in both regimes, "
        "docs/RESULTS.md); 0: subnets 1.. are dealt the units the cut leaves out first; "
        "1: every subnet trains the cut. Needs --twist-pin-cut",
    )
    g.add_argument(
        "--twist-lr-scale",
        type=lr_scale_value,
        default=None,
        metavar="S",
        help="the subnets' optimizers run at --lr and --min-lr times S: a positive number, or 'sqrt' for "
        "sqrt(--num-subnets) (the default: averaging the subnets' Adam updates shrinks the central model's "
        "step, docs/RESULTS.md); dense training is unaffected",
    )
    return parser


def validate_twist_args(args: argparse.Namespace) -> TwistConfig:
    return TwistConfig(
        keep_ratio=args.keep_ratio,
        num_subnets=args.num_subnets,
        local_steps=args.local_steps,
        seed=args.twist_seed,
        split=args.twist_split,
        whole_layers=args.whole_layers,
        coverage=args.twist_coverage,
        correction=args.activation_correction,
        optimizer_state=args.optimizer_state,
        balance_shards=args.twist_balance_shards,
        pin_cut=args.twist_pin_cut,
        cut_from_step=getattr(args, "twist_cut_from_step", None),
        cut_share=getattr(args, "twist_cut_share", None),
        lr_scale=getattr(args, "twist_lr_scale", None),
    )


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model", "Megatron-core GPTModel sizes (a preset, then overrides)")
    g.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default="small")
    g.add_argument("--model-family", choices=("llama", "gpt2"), default=None)
    for flag in (
        "num-layers",
        "hidden-size",
        "num-attention-heads",
        "num-query-groups",
        "ffn-hidden-size",
        "seq-length",
        "kv-channels",
    ):
        g.add_argument(f"--{flag}", type=int, default=None)
    return parser


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    values = dict(MODEL_PRESETS[args.model_preset])
    overrides = {
        "family": args.model_family,
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "num_query_groups": args.num_query_groups,
        "ffn_hidden_size": args.ffn_hidden_size,
        "seq_length": args.seq_length,
        "kv_channels": args.kv_channels,  # head size, when heads x head size != hidden size
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["family"] == "gpt2" and args.num_query_groups is None:  # MHA: one group per head
        values["num_query_groups"] = None
    values["vocab_size"] = vocab_size
    return ModelConfig(**values)


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = TrainConfig()
    g = parser.add_argument_group("training")
    g.add_argument("--data-path", default=None, help="directory written by `twist prepare-data`")
    g.add_argument(
        "--mock-data",
        action="store_true",
        help="train on synthetic token sequences (no data files; for dry runs and tests)",
    )
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size with --mock-data")
    g.add_argument("--train-iters", type=int, default=d.train_iters)
    g.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="samples per optimizer step of each subnet over its replicas (Megatron's name): micro batch x "
        "replicas x micro-batches per step, run through Megatron's forward-backward schedule (1F1B with "
        "pipeline parallelism); default: one micro-batch per step",
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="subnet forward/backward in bf16 from fp32 master weights (Megatron's flag); the central model, "
        "its Adam moments and aggregation stay fp32",
    )
    g.add_argument(
        "--distill-teacher",
        default=None,
        metavar="CKPT|central",
        help="knowledge distillation in every step: from a dense central checkpoint of the same vocabulary (e.g. "
        "the model a pruned one was cut from), or 'central' (TwIST's central model at the round's start); "
        "TP = PP = 1, without --deepspeed",
    )
    g.add_argument("--distill-weight", type=float, default=d.distill_weight, help="w in (1 - w) CE + w T^2 KL")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature, help="T of the soft targets")
    g.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)  # only to refuse it with the reason
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--lr-warmup-iters", type=int, default=d.lr_warmup_iters)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad)
    g.add_argument("--log-interval", type=int, default=d.log_interval)
    g.add_argument("--seed", type=int, default=d.seed, help="model initialisation and data order")
    g.add_argument("--save", default=None, help="directory for the central checkpoint at the end")
    g.add_argument("--load", default=None, help="central checkpoint to continue from (same sizes)")
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="stop after the round that reaches this step (then --save); resume with --load",
    )
    g.add_argument("--metrics-file", default=None, help="JSON file for per-round losses and timings (rank 0)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="let --save / --metrics-file replace a non-empty directory or file that megatron-twist did "
        "not write (refused by default, before any work)",
    )
    # Reliability (docs/ARCHITECTURE.md "Reliability")
    g.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="also save every N steps (a multiple of --local-steps): --save DIR becomes a directory of "
        "DIR/iter_XXXXXXX checkpoints and a latest_checkpointed_iteration.txt pointer, moved only "
        "after a complete write; --load DIR resumes from what it names",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=0,
        help="with --save-interval: keep the newest K checkpoints (default 0: keep all)",
    )
    g.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10.0,
        help="bound on any collective wait and on a silent rank (heartbeat); a lost rank stops the "
        "others with a message naming it (exit code 75)",
    )
    g.add_argument(
        "--nonfinite-policy",
        choices=("skip", "stop"),
        default=d.nonfinite_policy,
        help="a subnet whose loss or gradient becomes non-finite: 'skip' (default) leaves it out of its "
        "round's aggregation, 'stop' stops the run with the central model of the previous round",
    )
    g.add_argument(
        "--ckpt-format",
        choices=("safetensors", "torch_dist"),
        default="safetensors",
        help="--save format: 'safetensors' (one file set, gathered on rank 0) or 'torch_dist' "
        "(Megatron dist_checkpointing: sharded, reshards to any TP/PP on --load)",
    )
    g.add_argument(
        "--twist-shard-central",
        action="store_true",
        help="shard the central model (fp32 weights and both Adam moments) over data parallel, 1/DP per rank, "
        "instead of a full copy of this TP shard / PP stage on every rank: rounds gather one tensor at a "
        "time and reduce-scatter what each subnet holds (like Megatron's distributed optimizer)",
    )
    # DeepSpeed's own flag names (deepspeed.add_config_arguments), declared here so that parsing
    # the command line does not import DeepSpeed.
    g.add_argument("--deepspeed", action="store_true", help="train each subnet with a DeepSpeed engine (ZeRO 0-3)")
    g.add_argument("--deepspeed_config", default=None, help='ds_config JSON; its "twist" section sets TwIST')
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data_prefix=args.data_path,
        train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=getattr(args, "global_batch_size", None),
        bf16=getattr(args, "bf16", False),
        distill_teacher=getattr(args, "distill_teacher", None),
        distill_weight=getattr(args, "distill_weight", TrainConfig.distill_weight),
        distill_temperature=getattr(args, "distill_temperature", TrainConfig.distill_temperature),
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        log_interval=args.log_interval,
        save=args.save,
        seed=args.seed,
        exit_interval=args.exit_interval,
        nonfinite_policy=getattr(args, "nonfinite_policy", "skip"),
    )


__all__ = [
    "ConfigError",
    "add_twist_args",
    "validate_twist_args",
    "add_model_args",
    "model_config_from_args",
    "add_training_args",
    "train_config_from_args",
]


def explicit_dests(parser: argparse.ArgumentParser, argv: Iterable[str]) -> Set[str]:
    """The destinations of the options actually present in ``argv`` (abbreviations included): the ONE
    way flags the user typed are told from defaults (resume conflicts, ds_config conflicts)."""
    actions = [a for a in parser._actions if a.option_strings]
    saved = [(a, a.default) for a in actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a, d in saved:
            a.default = d
        parser._defaults.update(saved_defaults)
    return set(vars(ns))
