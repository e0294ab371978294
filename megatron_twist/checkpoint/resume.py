"""What ``twist train --load`` accepts: a checkpoint that matches the command, or a clear refusal.

A resumed run keeps its identity: model sizes and TwIST settings come from the checkpoint. A flag
the user typed that contradicts them used to be ignored silently; it is refused here, before any
process group exists or anything is written, with the saved value and the way out. So is data
tokenized with another tokenizer than the checkpoint's (the same vocabulary size is not enough:
token ids would mean other strings). These checks only read meta.json; the tensors' checksums are
verified when they are loaded (checkpointing.load_checkpoint), still before anything is written.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Set

from ..config import MODEL_PRESETS, ConfigError, resolve_lr_scale

# flag dest -> TwistConfig field
TWIST_FLAGS = {
    "keep_ratio": "keep_ratio",
    "num_subnets": "num_subnets",
    "local_steps": "local_steps",
    "twist_seed": "seed",
    "twist_split": "split",
    "whole_layers": "whole_layers",
    "twist_coverage": "coverage",
    "activation_correction": "correction",
    "optimizer_state": "optimizer_state",
    "twist_balance_shards": "balance_shards",
    "twist_pin_cut": "pin_cut",
    "twist_cut_from_step": "cut_from_step",
    "twist_cut_share": "cut_share",
    "twist_lr_scale": "lr_scale",
}
# flag dest -> ModelConfig field
MODEL_FLAGS = {
    "model_family": "family",
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "ffn_hidden_size": "ffn_hidden_size",
    "seq_length": "seq_length",
    "kv_channels": "kv_channels",
}


# Switches (no value): the form the user typed, by the value it gave.
_SWITCHES = {
    "twist_coverage": {False: "--no-coverage"},
    "twist_pin_cut": {True: "--twist-pin-cut", False: "--no-twist-pin-cut"},
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _typed(dest: str, given) -> str:
    """The flag as the user typed it: a switch's own form, else ``--flag VALUE``."""
    if dest in _SWITCHES:
        return _SWITCHES[dest][given]
    return f"{_flag(dest)} {','.join(map(str, given)) if dest == 'whole_layers' else given}"


def resume_conflicts(
    saved_meta: dict, args: argparse.Namespace, explicit: Set[str], twist_from_checkpoint: bool = True
) -> List[str]:
    """Explicit flags that contradict the checkpoint, one line each (empty: none)."""
    out = []
    if twist_from_checkpoint:
        # written before --twist-lr-scale existed: trained (and resumed, TwistConfig.from_dict) at 1
        saved_twist = {"lr_scale": 1.0, **saved_meta.get("twist", {})}
        for dest, field in TWIST_FLAGS.items():
            if dest not in explicit or field not in saved_twist:
                continue
            given, saved = getattr(args, dest), saved_twist[field]
            if field == "whole_layers":
                given, saved = list(given), list(saved)
            same = given == saved
            if field == "lr_scale":  # 'sqrt' is the number it gives for the checkpoint's subnets
                same = resolve_lr_scale(given, saved_twist.get("num_subnets", 1)) == saved
            if not same:
                out.append(f"{_typed(dest, given)} (the checkpoint was trained with {field}={saved!r})")
    saved_model = saved_meta.get("model", {})
    if "model_preset" in explicit:
        preset = MODEL_PRESETS[args.model_preset]
        diffs = [
            f"{k} {v!r} vs {saved_model.get(k)!r}"
            for k, v in preset.items()
            if k != "vocab_size" and saved_model.get(k) != v and k in saved_model
        ]
        if diffs:
            out.append(f"--model-preset {args.model_preset} ({', '.join(diffs)} saved)")
    for dest, field in MODEL_FLAGS.items():
        if dest in explicit and getattr(args, dest) is not None and field in saved_model:
            if getattr(args, dest) != saved_model[field]:
                out.append(
                    f"{_flag(dest)} {getattr(args, dest)} (the checkpoint's model has {field}={saved_model[field]!r})"
                )
    return out


def check_resume(
    saved_meta: dict,
    path: str,
    args: argparse.Namespace,
    explicit: Set[str],
    data_meta: Optional[Dict],
    twist_from_checkpoint: bool = True,
) -> None:
    """Refuse (ConfigError) a resume whose flags or data contradict the checkpoint at ``path``."""
    conflicts = resume_conflicts(saved_meta, args, explicit, twist_from_checkpoint)
    if conflicts:
        raise ConfigError(
            f"--load {path}: these flags contradict the checkpoint: {'; '.join(conflicts)}. A resumed run keeps the "
            "checkpoint's model sizes and TwIST settings: drop these flags (or give the saved values), or start "
            "a new run without --load"
        )
    saved_sha = (saved_meta.get("data") or {}).get("tokenizer_sha256")
    given_sha = (data_meta or {}).get("tokenizer_sha256")
    if saved_sha and given_sha and saved_sha != given_sha:
        raise ConfigError(
            f"--load {path}: the data in {data_meta.get('path')} was tokenized with another tokenizer (sha256 "
            f"{given_sha[:12]}...) than the checkpoint was trained with ({saved_sha[:12]}...); prepare the data "
            "with the checkpoint's tokenizer: `twist prepare-data --tokenizer-model <the tokenizer.model of the "
            f"original data, {(saved_meta.get('data') or {}).get('path')}>`"
        )
