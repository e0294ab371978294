"""The ``twist`` command (also ``python -m megatron_twist``).

    twist prepare-data  corpus -> sentencepiece tokenizer + Megatron indexed dataset
    twist train         TwIST training (single process, or one subnet per rank under torchrun)
    twist plan          check a layout and size it per GPU before a job is queued (same flags as train)
    twist extract       cut a dense smaller model out of a central checkpoint
    twist import-hf     a local HuggingFace Llama / GPT-2 checkpoint -> a central checkpoint to train on
    twist export-hf     a central or cut-out model -> a HuggingFace directory (config, safetensors, tokenizer)
    twist eval          held-out perplexity; the last line printed is a JSON object

Every command validates its inputs before it starts any work. This module only parses, calls one
library function per command and maps errors to exit codes (2: bad input; 1: a run that cannot go on).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from typing import List, Optional

from . import outputs
from .arguments import add_model_args, add_training_args, add_twist_args, explicit_dests
from .errors import CheckpointError, ConfigError, DataError, TrainingError


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- commands
def cmd_prepare_data(args) -> int:
    from .data import corpus_documents  # light: a bad corpus is refused before Megatron loads

    outputs.check_output(args.output, (outputs.PREPARED_DATA,), "--output", args.overwrite)  # before any work
    if args.tokenizer_model and args.hf_tokenizer:
        raise ConfigError("pass either --tokenizer-model or --hf-tokenizer, not both")
    train_docs, valid_docs, source = corpus_documents(
        args.input, args.json_field, args.split_paragraphs, args.valid_fraction, args.max_bytes
    )
    _log(f"[prepare-data] {source}: {len(train_docs)} train / {len(valid_docs)} valid documents")
    from .data import prepare_data

    reuse = args.tokenizer_model or args.hf_tokenizer
    manifest = prepare_data(
        args.output,
        train_docs,
        valid_docs,
        vocab_size=None if reuse else args.vocab_size,
        tokenizer_model=args.tokenizer_model,
        hf_tokenizer=args.hf_tokenizer,
        overwrite=args.overwrite,
    )
    _log(f"[prepare-data] wrote {args.output}: {json.dumps(dataclasses.asdict(manifest), default=str)}")
    return 0


def cmd_train(args, explicit) -> int:
    from .training.setup import prepare_job

    job = prepare_job(args, explicit, log=_log)  # every refusal happens here, before any work
    from .training.launch import train

    train(job, log=_log)
    return 0


def cmd_plan(args, explicit) -> int:
    """Check a layout and size it per GPU (no GPU, no process group); refusals exit 2 like train's."""
    from .planning import format_plan, plan_from_args

    plan = plan_from_args(args, explicit)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan), flush=True)
    return 0


def cmd_extract(args) -> int:
    from .tools import extract

    r = extract(args.load, args.save, args.keep_ratio, args.method, args.overwrite)
    _log(
        f"[extract] keep ratio {r['keep_ratio']} ({r['method']}): {r['parameters']:,} -> {r['cut_parameters']:,} "
        f"parameters ({r['cut_parameters'] / r['parameters']:.3f}x); layer sizes {r['layer_sizes']}; "
        f"saved to {args.save}"
    )
    return 0


def cmd_import_hf(args) -> int:
    from .tools import import_hf

    model = import_hf(args.path, args.save, args.seq_length, args.overwrite)
    _log(
        f"[import-hf] {args.path} -> central checkpoint {args.save} ({model.family}, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, {model.num_attention_heads} heads / {model.num_query_groups} KV groups, "
        f"FFN {model.ffn_hidden_size}, vocab {model.vocab_size}); continue it with `twist train --load "
        f"{args.save}`"
    )
    return 0


def cmd_export_hf(args) -> int:
    from .hf.io import export_hf

    summary = export_hf(args.load, args.save, args.tokenizer, overwrite=args.overwrite)
    sizes = summary["layer_sizes"][0]
    _log(
        f"[export-hf] {args.load} ({summary['kind']}, keep ratio {summary['keep_ratio']}) -> {args.save}: "
        f"{summary['family']}, {sizes['num_attention_heads']} heads / {sizes['num_query_groups']} KV heads, "
        f"FFN {sizes['ffn_hidden_size']}; tokenizer {summary['tokenizer']['kind']} "
        f"({summary['tokenizer']['vocab_size']} tokens)"
    )
    return 0


def cmd_eval(args) -> int:
    from .tools import evaluate

    result = evaluate(
        args.load, args.data_path, args.mock_data, args.split, args.max_tokens, args.batch_size, args.seed
    )
    print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------- main
OVERWRITE_HELP = (
    "replace the target even if it is a non-empty directory that megatron-twist did not write "
    "(refused by default, before any work)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("prepare-data", help="tokenizer + Megatron indexed dataset from a corpus")
    d.add_argument("--output", required=True, help="directory to write")
    d.add_argument(
        "--input",
        nargs="+",
        default=None,
        help="text / JSON-lines files or directories (default: the Python standard library)",
    )
    d.add_argument("--json-field", default="text", help="field of JSON-lines records holding the text")
    d.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer to train")
    d.add_argument("--tokenizer-model", default=None, help="use this sentencepiece model instead of training one")
    d.add_argument(
        "--hf-tokenizer",
        default=None,
        help="use this HuggingFace tokenizer directory (e.g. the model "
        "directory given to `twist import-hf`) instead of training one",
    )
    d.add_argument(
        "--valid-fraction",
        type=float,
        default=0.1,
        help="share of --input documents held out (every k-th document, k = round(1 / fraction))",
    )
    d.add_argument(
        "--split-paragraphs",
        action="store_true",
        help="cut plain-text inputs into one document per "
        "paragraph (blank-line separated), e.g. for a corpus that is one long file",
    )
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
    p.plan_parser = pl
    pl.set_defaults(func=cmd_plan)

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
    i.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="training sequence length (Llama; default: the model's max_position_embeddings)",
    )
    i.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    x = sub.add_parser("export-hf", help="a central or cut-out model -> a HuggingFace directory")
    x.add_argument("--load", required=True, help="central or cut-out checkpoint directory")
    x.add_argument("--save", required=True, help="HF directory to write")
    x.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model, `twist prepare-data` directory or HF "
        "tokenizer directory (default: the training data's tokenizer, recorded in the checkpoint)",
    )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = args.func
    if args.command in ("train", "plan"):
        # The flags the user typed (resume conflicts, ds_config conflicts): told from defaults once, here.
        sub = parser.train_parser if args.command == "train" else parser.plan_parser
        command = functools.partial(command, explicit=explicit_dests(sub, argv[argv.index(args.command) + 1 :]))
    try:
        return command(args)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"twist {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:  # e.g. every subnet of a round non-finite; the last checkpoint is intact
        print(f"twist {args.command}: stopped: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
