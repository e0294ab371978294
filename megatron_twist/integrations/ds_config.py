"""TwIST settings inside a DeepSpeed JSON config (a ``"twist"`` section).

A DeepSpeed run keeps all of its settings in one JSON file; TwIST's live in
a ``"twist"`` object beside DeepSpeed's own keys::

    {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
     "zero_optimization": {"stage": 2}, "bf16": {"enabled": true},
     "twist": {"keep_ratio": 0.5, "num_subnets": 4, "local_steps": 15, "seed": 1234,
               "split": "both", "whole_layers": [0, -1], "coverage": true,
               "activation_correction": "none", "optimizer_state": "aggregate",
               "balance_shards": 0}}

API
---
``twist_section(ds_config)``
    the ``"twist"`` object (``{}`` when there is none) of a config dict or a
    JSON file path.
``twist_config_from_ds(ds_config, args=None, explicit=())``
    a validated :class:`~megatron_twist.config.TwistConfig` from the section,
    with the command-line flags of :func:`megatron_twist.arguments.add_twist_args`
    filling in keys the section does not set. A flag the user typed (its
    destination is in ``explicit``, see ``arguments.explicit_dests``) that disagrees with
    the section is refused, naming both places; a flag equal to the section's
    value, or left at its default, is fine. ``ds_config=None`` reads the path
    from ``args.deepspeed_config`` (the flag DeepSpeed's
    ``deepspeed.add_config_arguments`` adds).
``strip_twist_section(ds_config)``
    a shallow copy without ``"twist"``, for ``deepspeed.initialize(config=...)``.
``check_batch_consistency(ds_config, micro_batch_size, world_size, twist, *, tensor_parallel=1, pipeline_parallel=1)``
    DeepSpeed's batch arithmetic for the data-parallel group DeepSpeed sees
    under TwIST (the replicas of ONE subnet); returns the resolved sizes.
``resolve_deepspeed(args, explicit=())``
    what ``twist train`` and ``twist plan`` make of ``--deepspeed`` /
    ``--deepspeed_config FILE``: ``(TwistConfig, config dict)`` with both,
    ``(TwistConfig from the flags alone, None)`` with neither; one without
    the other, or a missing or invalid file, is refused.

``ds_engine_settings.engine_settings(ds_config, train, explicit)``
    the ds_config's optimisation settings that `twist train --deepspeed` honours or refuses, never
    ignores: an AdamW-compatible ``optimizer`` block mapped onto TwIST's torch AdamW
    (``lr``, ``betas``, ``eps``, ``weight_decay``), ``gradient_clipping``; refused with the reason and
    the fix: other optimizers, a ``scheduler`` block, ``fp16``, ZeRO-Offload. Returns the TrainConfig
    with the config's values.

Every error is a :class:`~megatron_twist.config.ConfigError` that names the fix.

What DeepSpeed 0.19.8 does with unknown top-level keys (read in
``deepspeed/runtime/config.py`` and checked by running it)
-----------------------------------------------------------------------------------
``DeepSpeedConfig`` reads every top-level setting with ``param_dict.get(KEY,
default)``; nothing iterates over the top-level keys, so an unknown one such
as ``"twist"`` is **silently ignored** (it stays in ``_param_dict`` and is
echoed by ``print_user_config``). Two exceptions: the keys of removed features
(``_REMOVED_TOP_LEVEL_CONFIG_KEYS``: ``amp``, ``elasticity``, ``nebula``,
``sparse_attention``, ...) raise ``DeepSpeedConfigError``, and the
sub-sections that DeepSpeed parses with pydantic (``zero_optimization``,
``bf16``, ``tensorboard``, ``csv_monitor``, ...) forbid unknown keys
*inside* them (``extra="forbid"``). So the ``"twist"`` section is tolerated
as it is; :func:`strip_twist_section` still removes it before the dict reaches
DeepSpeed, so that a future DeepSpeed that starts refusing unknown keys, or a
typo checker, never sees it, and so that DeepSpeed's logs show only its own
settings.

File format: DeepSpeed reads a config file with ``hjson`` (comments and
trailing commas allowed) and refuses duplicate keys. This module reads it as
strict JSON and refuses duplicate keys too; a file with comments is refused
with a message saying so (hjson also "parses" an empty file or a bare word,
which would hide mistakes).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple, Union

from ..arguments import validate_twist_args
from ..config import ConfigError, TwistConfig

SECTION = "twist"

DsConfig = Union[dict, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class _Key:
    name: str  # key in the "twist" section
    field: str  # TwistConfig field
    dest: str  # argparse dest of add_twist_args
    flag: str  # the command-line flag, for messages
    kind: str  # expected JSON type, see _coerce


_KEYS: Tuple[_Key, ...] = (
    _Key("keep_ratio", "keep_ratio", "keep_ratio", "--keep-ratio", "number"),
    _Key("num_subnets", "num_subnets", "num_subnets", "--num-subnets", "int"),
    _Key("local_steps", "local_steps", "local_steps", "--local-steps", "int"),
    _Key("seed", "seed", "twist_seed", "--twist-seed", "int"),
    _Key("split", "split", "twist_split", "--twist-split", "str"),
    _Key("whole_layers", "whole_layers", "whole_layers", "--whole-layers", "int_list"),
    _Key("coverage", "coverage", "twist_coverage", "--no-coverage", "bool"),
    _Key("activation_correction", "correction", "activation_correction", "--activation-correction", "str"),
    _Key("optimizer_state", "optimizer_state", "optimizer_state", "--optimizer-state", "str"),
    _Key("balance_shards", "balance_shards", "twist_balance_shards", "--twist-balance-shards", "nonneg_int"),
    _Key("pin_cut", "pin_cut", "twist_pin_cut", "--no-twist-pin-cut", "bool"),
    _Key("cut_from_step", "cut_from_step", "twist_cut_from_step", "--twist-cut-from-step", "int"),
    _Key("cut_share", "cut_share", "twist_cut_share", "--twist-cut-share", "number"),
    _Key("lr_scale", "lr_scale", "twist_lr_scale", "--twist-lr-scale", "number_or_name"),
)

#: The keys a "twist" section may hold, in documentation order.
ALLOWED_KEYS: Tuple[str, ...] = tuple(k.name for k in _KEYS)

_KIND_TEXT = {
    "number": "a number",
    "number_or_name": 'a number or a rule\'s name such as "sqrt"',
    "int": "an integer",
    "nonneg_int": "a non-negative integer (0: the tensor parallel size)",
    "str": "a string",
    "int_list": "a list of layer indices like [0, -1]",
    "bool": "true or false",
}


# --------------------------------------------------------------------------- reading


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_config(ds_config: Optional[DsConfig]) -> Tuple[dict, str]:
    """(config dict, name for messages) from a dict or a JSON file path."""
    if isinstance(ds_config, dict):
        return ds_config, "the DeepSpeed config"
    if isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(
                f"DeepSpeed config {path} does not exist; pass the path of a JSON file (templates: ds_configs/)"
            ) from None
        except OSError as e:
            raise ConfigError(f"DeepSpeed config {path} cannot be read ({e.strerror}); check the path") from None
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicates)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"DeepSpeed config {path} is not valid JSON ({e.msg} at line {e.lineno} column "
                f"{e.colno}); fix the file (strict JSON: no comments, no trailing commas)"
            ) from None
        except ConfigError as e:
            raise ConfigError(f"DeepSpeed config {path} has a {e}; keep one of them") from None
        if not isinstance(data, dict):
            raise ConfigError(f"DeepSpeed config {path} must hold a JSON object {{...}}, got {type(data).__name__}")
        return data, path
    raise ConfigError(f"a DeepSpeed config must be a dict or a JSON file path, got {type(ds_config).__name__}")


def twist_section(ds_config: DsConfig) -> dict:
    """The ``"twist"`` object of a DeepSpeed config (a copy; ``{}`` if absent).

    ``ds_config`` is a dict or the path of a JSON file; a missing file or
    invalid JSON is a :class:`ConfigError` naming the file.
    """
    section, _ = _section_and_name(ds_config)
    return section


def _section_and_name(ds_config: Optional[DsConfig]) -> Tuple[dict, str]:
    data, name = load_config(ds_config)
    section = data.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(
            f'"{SECTION}" in {name} must be a JSON object like {{"keep_ratio": 0.5, '
            f'"num_subnets": 4}}, got {type(section).__name__}'
        )
    return dict(section), name


def strip_twist_section(ds_config: DsConfig) -> dict:
    """A shallow copy of the config without the ``"twist"`` key, for DeepSpeed."""
    data, _ = load_config(ds_config)
    return {k: v for k, v in data.items() if k != SECTION}


# --------------------------------------------------------------------------- values


def _coerce(key: _Key, value: Any, name: str):
    """Check a section value's JSON type; return it as TwistConfig wants it."""
    kind = key.kind
    ok = False
    if kind in ("number", "number_or_name"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok or (kind == "number_or_name" and isinstance(value, str))
    elif kind in ("int", "nonneg_int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and kind == "nonneg_int":
            ok = value >= 0
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int_list":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(
            f'"{SECTION}": {{"{key.name}": {json_text(value)}}} in {name} must be {_KIND_TEXT[kind]}, '
            f"got {type(value).__name__}; fix {key.name!r} (its flag is {key.flag})"
        )
    return value


def _normalise(key: _Key, value: Any):
    """A flag's value in the form _coerce gives a section value, for comparison."""
    if value is None:
        return None
    if key.kind == "number" or (key.kind == "number_or_name" and not isinstance(value, str)):
        return float(value)
    if key.kind == "int_list":
        return tuple(value)
    return value


def json_text(value: Any) -> str:
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        return repr(value)


def _flag_text(key: _Key, value: Any) -> str:
    """How the user wrote a flag on the command line."""
    if key.kind == "bool":  # --no-coverage and --no-twist-pin-cut turn a default-on switch off
        default = _flag_default(key)
        return key.flag if value != default else f"{key.field} left {'on' if default else 'off'} (no {key.flag})"
    if key.kind == "int_list":
        return f"{key.flag} {','.join(str(v) for v in value) or repr('')}"
    return f"{key.flag} {value}"


_DEFAULT_PARSER: Optional[argparse.ArgumentParser] = None


def _flag_default(key: _Key):
    global _DEFAULT_PARSER
    if _DEFAULT_PARSER is None:
        from ..arguments import add_twist_args

        _DEFAULT_PARSER = add_twist_args(argparse.ArgumentParser(add_help=False))
    return _DEFAULT_PARSER.get_default(key.dest)


def twist_config_from_ds(
    ds_config: Optional[DsConfig], args: Optional[argparse.Namespace] = None, explicit: Iterable[str] = ()
) -> TwistConfig:
    """A validated TwistConfig from the ``"twist"`` section and the command-line flags.

    Per key: the section's value if it has one (a flag the user typed with a
    different value is an error naming both), else the flag's value from
    ``args``, else ``add_twist_args``' default. ``explicit``: the destinations
    of the flags the user typed (``arguments.explicit_dests``). With
    ``ds_config=None`` the path is ``args.deepspeed_config`` (DeepSpeed's
    ``add_config_arguments``); with neither, only the flags count.
    """
    if ds_config is None and args is not None:
        ds_config = getattr(args, "deepspeed_config", None)
    if ds_config is None:
        section, name = {}, "no DeepSpeed config"
    else:
        section, name = _section_and_name(ds_config)

    unknown = sorted(set(section) - set(ALLOWED_KEYS))
    if unknown:
        raise ConfigError(
            f'unknown key(s) {unknown} in "{SECTION}" of {name}; the allowed keys are {list(ALLOWED_KEYS)}'
        )

    values, explicit = {}, set(explicit)
    for key in _KEYS:
        default = _normalise(key, _flag_default(key))
        given = _normalise(key, getattr(args, key.dest, None)) if args is not None else None
        if key.name in section:
            value = _coerce(key, section[key.name], name)
            if key.dest in explicit and given != value:
                raise ConfigError(
                    f'{_flag_text(key, given)} conflicts with "{SECTION}": {{"{key.name}": {json_text(value)}}} in '
                    f"{name}; set it in one place"
                )
        else:
            value = given if given is not None else default
        values[key.field] = value

    try:
        return TwistConfig(**values)
    except ConfigError as e:
        raise ConfigError(f'"{SECTION}" settings from {name} and the command line: {e}') from None


def resolve_deepspeed(args: argparse.Namespace, explicit: Iterable[str] = ()) -> Tuple[TwistConfig, Optional[dict]]:
    """(TwIST settings, the ds_config or None) of `twist train` / `twist plan`: with ``--deepspeed
    --deepspeed_config FILE`` the file's ``"twist"`` section and the flags (conflicts refused, see
    twist_config_from_ds); without, the flags alone. ``explicit``: the flags the user typed."""
    if not (args.deepspeed or args.deepspeed_config):
        return validate_twist_args(args), None
    if not (args.deepspeed and args.deepspeed_config):
        raise ConfigError("DeepSpeed needs both --deepspeed and --deepspeed_config FILE")
    twist_section(args.deepspeed_config)  # refuses a missing or invalid file, naming it
    ds_config = json.loads(Path(args.deepspeed_config).read_text())
    return twist_config_from_ds(args.deepspeed_config, args, explicit), ds_config


# --------------------------------------------------------------------------- batch sizes


def _positive_int(ds: dict, key: str, name: str) -> Optional[int]:
    value = ds.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"{key} in {name} must be a positive integer, got {json_text(value)}; DeepSpeed does not "
            "resolve 'auto' itself: write the number, or leave the key out and let it be derived"
        )
    return value


def check_batch_consistency(
    ds_config: DsConfig,
    micro_batch_size: Optional[int],
    world_size: int,
    twist: TwistConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> dict:
    """Check DeepSpeed's batch sizes against a TwIST layout; return them resolved.

    DeepSpeed requires ``train_batch_size = train_micro_batch_size_per_gpu x
    gradient_accumulation_steps x data-parallel size`` and derives whichever
    of the three is missing. Under TwIST the data-parallel group DeepSpeed
    averages gradients over is the SUBNET group, the ranks training the same
    subnet (docs/ARCHITECTURE.md, "Process groups")::

        dp = world_size / (tensor_parallel x pipeline_parallel)       # Megatron's data parallel
        data_parallel_size = dp / num_subnets   if dp >= num_subnets  # replicas of one subnet
                           = 1                  otherwise             # a rank trains subnets in turn

    so ``train_batch_size`` counts the samples ONE subnet consumes per
    optimizer step, not the whole job's. ``micro_batch_size`` (Megatron's
    ``--micro-batch-size``; None: not given) must equal
    ``train_micro_batch_size_per_gpu`` when both are set, and stands in for it
    when the config leaves it out. Layouts that do not divide are refused by
    :meth:`ParallelLayout.for_world` with its own message.

    Returns ``{"train_batch_size", "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps", "data_parallel_size"}``.
    """
    from ..distributed.layout import ParallelLayout  # pure arithmetic, no torch

    ds, name = load_config(ds_config)
    layout = ParallelLayout.for_world(world_size, twist.num_subnets, tensor_parallel, pipeline_parallel)
    dp = layout.replicas

    tb = _positive_int(ds, "train_batch_size", name)
    mb = _positive_int(ds, "train_micro_batch_size_per_gpu", name)
    ga = _positive_int(ds, "gradient_accumulation_steps", name)
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be at least 1, got {micro_batch_size}")
        if mb is not None and mb != micro_batch_size:
            raise ConfigError(
                f"--micro-batch-size {micro_batch_size} conflicts with train_micro_batch_size_per_gpu {mb} in "
                f"{name}; set them equal (or leave the config's key out)"
            )
        mb = micro_batch_size

    group = (
        f"x {dp} data-parallel ranks per subnet (world {world_size} / (TP {tensor_parallel} x "
        f"PP {pipeline_parallel}) / {twist.num_subnets} subnets)"
    )
    if tb is None and mb is None:
        raise ConfigError(
            f"{name} sets neither train_micro_batch_size_per_gpu nor train_batch_size; set "
            "train_micro_batch_size_per_gpu (or pass --micro-batch-size)"
        )
    if tb is None:
        ga = ga or 1
        tb = mb * ga * dp
    elif mb is not None and ga is not None:
        if tb != mb * ga * dp:
            raise ConfigError(
                f"train_batch_size {tb} in {name} is not micro batch {mb} x gradient accumulation {ga} {group} "
                f"= {mb * ga * dp}; set train_batch_size to {mb * ga * dp} or leave it out (DeepSpeed derives it)"
            )
    elif mb is not None:
        if tb % (mb * dp):
            raise ConfigError(
                f"train_batch_size {tb} in {name} is not a multiple of micro batch {mb} {group} = {mb * dp}; "
                f"use a multiple of {mb * dp} or leave train_batch_size out"
            )
        ga = tb // (mb * dp)
    else:
        ga = ga or 1
        if tb % (ga * dp):
            raise ConfigError(
                f"train_batch_size {tb} in {name} is not a multiple of gradient accumulation {ga} {group} = "
                f"{ga * dp}; use a multiple of {ga * dp} or set train_micro_batch_size_per_gpu"
            )
        mb = tb // (ga * dp)
    return {
        "train_batch_size": tb,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ga,
        "data_parallel_size": dp,
    }


__all__ = [
    "ALLOWED_KEYS",
    "twist_section",
    "twist_config_from_ds",
    "resolve_deepspeed",
    "strip_twist_section",
    "check_batch_consistency",
]
