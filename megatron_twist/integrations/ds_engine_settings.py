"""The ds_config's optimisation settings that `twist train --deepspeed` honours or refuses, never
ignores (the ``"twist"`` section and the batch sizes: ds_config.py)."""

from __future__ import annotations

from ..config import ConfigError
from .ds_config import DsConfig, json_text, load_config

#: optimizer "params" TwIST maps onto its torch AdamW (name in the block -> TrainConfig field)
_ADAM_PARAMS = {"lr": "lr", "weight_decay": "weight_decay", "eps": "adam_eps"}
#: params that may appear with these values only (what torch AdamW does); torch_adam picks a kernel
_ADAM_FIXED = {"bias_correction": True, "amsgrad": False, "adam_w_mode": True}
_ADAM_TYPES = ("adam", "adamw")  # DeepSpeed's names are case-insensitive; its "Adam" is AdamW unless adam_w_mode=false
_FLAG_OF = {"lr": "--lr", "weight_decay": "--weight-decay", "clip_grad": "--clip-grad"}


def _enabled(block) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def _offloads(zero: dict) -> list:
    out = []
    for key in ("offload_optimizer", "offload_param"):
        block = zero.get(key)
        if block is not None and (not isinstance(block, dict) or str(block.get("device", "none")).lower() != "none"):
            out.append(key)
    out += [key for key in ("cpu_offload", "cpu_offload_param") if zero.get(key)]  # DeepSpeed's deprecated names
    return out


def engine_settings(ds_config: DsConfig, train, explicit=frozenset()):
    """Honour or refuse the ds_config's optimisation settings; return ``train`` with its values.

    TwIST builds the subnet's optimizer itself (a torch AdamW whose per-parameter moments the round
    hook reads and writes fragment by fragment) and sets the learning rate every step from its own
    schedule (subnets jump between rounds). So, before any work:

    * ``optimizer``: type Adam / AdamW (DeepSpeed's Adam is AdamW unless ``adam_w_mode`` is false):
      ``lr``, ``betas``, ``eps``, ``weight_decay`` become the torch AdamW's (``lr`` is the peak of
      TwIST's warmup + cosine schedule); a flag typed on the command line (``explicit``: argparse
      dests) that disagrees is refused, naming both; any other type or param is refused;
    * ``scheduler``: refused (TwIST's schedule would override it every step; use --lr, --min-lr,
      --lr-warmup-iters);
    * ``gradient_clipping``: the engine clips with it; an explicit --clip-grad that disagrees is
      refused; the TrainConfig records the config's value;
    * ``fp16``: refused (dynamic loss scaling skips optimizer steps on overflow, so a subnet's step
      count, Adam's bias correction and the round boundaries would drift apart between subnets;
      DeepSpeed also refuses fp16 on CPU): use bf16;
    * ZeRO-Offload (``offload_optimizer`` / ``offload_param`` with a device other than "none"):
      refused (it requires DeepSpeed's own CPU Adam, whose state lives outside the fragments the
      round hook reads and writes).
    """
    import dataclasses

    ds, name = load_config(ds_config)
    if _enabled(ds.get("fp16")):
        raise ConfigError(
            f'"fp16" is enabled in {name}: TwIST on DeepSpeed does not run fp16 (its dynamic loss '
            "scaling skips optimizer steps on overflow, so subnets' step counts, Adam's bias correction "
            "and the round boundaries would drift apart; DeepSpeed also refuses fp16 on CPU); use "
            '"bf16": {"enabled": true} (ds_configs/zero2_bf16.json) or fp32 (remove the "fp16" block)'
        )
    zero = ds.get("zero_optimization") or {}
    offloads = _offloads(zero) if isinstance(zero, dict) else []
    if offloads:
        raise ConfigError(
            f"ZeRO-Offload ({', '.join(offloads)} in zero_optimization of {name}) is not supported "
            "with TwIST: offload requires DeepSpeed's CPU Adam, which keeps master weights and Adam "
            "moments outside the fragments TwIST's round hook reads and writes at every round; remove "
            f'{" and ".join(offloads)} (or set its "device": "none"); to save accelerator memory '
            'use "stage": 3 and more replicas per subnet'
        )
    if ds.get("scheduler") is not None:
        raise ConfigError(
            f'the "scheduler" block in {name} would be overridden: TwIST sets the learning rate every '
            "step from its own schedule (linear warmup, cosine decay over --train-iters; subnets jump "
            'between rounds); remove the "scheduler" block and use --lr, --min-lr, --lr-warmup-iters'
        )
    values = {}
    opt = ds.get("optimizer")
    if opt is not None:
        kind = opt.get("type") if isinstance(opt, dict) else None
        if not isinstance(kind, str) or kind.lower() not in _ADAM_TYPES:
            raise ConfigError(
                f"optimizer {json_text(kind)} in {name} is not supported with TwIST: TwIST reads and writes "
                "Adam's moments (exp_avg, exp_avg_sq) of every subnet fragment and averages them at each "
                'round; use "optimizer": {"type": "AdamW", "params": {"lr": ..., "betas": [..., ...], '
                '"eps": ..., "weight_decay": ...}} or remove the block (AdamW from --lr, --weight-decay)'
            )
        params = opt.get("params", {}) or {}
        if not isinstance(params, dict):
            raise ConfigError(f'"optimizer": {{"params": ...}} in {name} must be a JSON object')
        for key, value in params.items():
            if key in _ADAM_PARAMS:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ConfigError(
                        f"optimizer param {key!r} in {name} must be a non-negative number, got {json_text(value)}"
                    )
                values[_ADAM_PARAMS[key]] = float(value)
            elif key == "betas":
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in value)
                ):
                    raise ConfigError(
                        f'optimizer param "betas" in {name} must be two numbers like [0.9, 0.95], got '
                        f"{json_text(value)}"
                    )
                values["adam_beta1"], values["adam_beta2"] = float(value[0]), float(value[1])
            elif key in _ADAM_FIXED:
                if value != _ADAM_FIXED[key]:
                    raise ConfigError(
                        f'optimizer param "{key}": {json_text(value)} in {name} is not supported with TwIST '
                        f"(its optimizer is torch AdamW: {key} = {json_text(_ADAM_FIXED[key])}); remove it"
                    )
            elif key != "torch_adam":  # which kernel DeepSpeed would pick: TwIST's AdamW is torch's anyway
                raise ConfigError(
                    f"optimizer param {key!r} in {name} is not supported with TwIST (it would be "
                    "ignored); the params TwIST maps onto its torch AdamW are lr, betas, eps, "
                    "weight_decay; remove it"
                )
    if "gradient_clipping" in ds:
        clip = ds["gradient_clipping"]
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
            raise ConfigError(f"gradient_clipping in {name} must be a non-negative number, got {json_text(clip)}")
        values["clip_grad"] = float(clip)
    else:
        values["clip_grad"] = 0.0  # DeepSpeed's default: no clipping
    for field, value in values.items():
        if field in _FLAG_OF and field in explicit and float(getattr(train, field)) != value:
            where = "gradient_clipping" if field == "clip_grad" else f'"optimizer": {{"params": {{"{field}"}}}}'
            raise ConfigError(
                f"{_FLAG_OF[field]} {getattr(train, field)} conflicts with {where} = {value} in {name}; "
                "set it in one place"
            )
    return dataclasses.replace(train, **values)
