"""`twist plan`'s command line: the machines' flags, and train's flags + them -> a checked Plan."""

from __future__ import annotations

import argparse

from ..arguments import model_config_from_args, train_config_from_args
from ..config import ConfigError
from ..integrations.ds_config import resolve_deepspeed
from .arithmetic import Plan, make_plan


def add_plan_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("plan", "the machines the job would run on")
    g.add_argument("--nodes", type=int, default=None, help="nodes of --gpus-per-node GPUs (or --world-size)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    g.add_argument("--world-size", type=int, default=None, help="total GPUs (ranks); default nodes x GPUs per node")
    g.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=80.0,
        help="memory of one GPU in GiB (default 80); 0 skips the memory check",
    )
    g.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of a table")
    return parser


def plan_from_args(args: argparse.Namespace, explicit=()) -> Plan:
    """The `twist plan` command's arguments (train's flags + add_plan_args) -> a checked Plan;
    ``explicit``: the flags the user typed (arguments.explicit_dests)."""
    if args.world_size is not None and args.nodes is not None and args.world_size != args.nodes * args.gpus_per_node:
        raise ConfigError(
            f"--world-size {args.world_size} is not --nodes {args.nodes} x --gpus-per-node "
            f"{args.gpus_per_node}; give one of them"
        )
    world = args.world_size or (args.nodes or 1) * args.gpus_per_node
    twist, ds_config = resolve_deepspeed(args, explicit)
    path = "megatron" if ds_config is None else "deepspeed"
    train = train_config_from_args(args)
    vocab = args.vocab_size or 512
    if args.data_path and not args.mock_data:
        from ..data import load_manifest  # here, not at the top: it imports Megatron (and torch)

        vocab = load_manifest(args.data_path).vocab_size
    model = model_config_from_args(args, vocab)
    # balance_shards stays as given (0: the TP size, which is what `twist train` records), so that the
    # TP sizes a refusal suggests are judged with their own balance blocks
    return make_plan(
        model,
        twist,
        train,
        world_size=world,
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory_gib,
        path=path,
        ds_config=ds_config,
        shard_central=getattr(args, "twist_shard_central", False),
    )
