"""TwIST's state in a Megatron-LM job's checkpoints: what ``--save`` / ``--load`` add.

Megatron-LM's checkpoint (``SAVE/iter_XXXXXXX``, its own format) holds the subnet each rank
trains, its optimizer, the LR schedule, the iteration and the data position. TwIST adds the
central model (weights, Adam moments, step, round: the sampler's next round follows from it) as
a megatron-twist save directory beside it, ``SAVE/twist/iter_XXXXXXX`` + its latest pointer,
which `twist extract --load SAVE/twist` reads at any TP/PP.

Order: the round ending at the save is aggregated first, the central model is written (and its
pointer moved) BEFORE Megatron-LM writes its checkpoint and moves its pointer, so whatever
iteration Megatron-LM's pointer names, TwIST's state for it exists. Saves happen at round
boundaries only (``--save-interval`` a multiple of ``--local-steps``, checked before any work):
a resumed job opens its first round from the central model, as the uninterrupted one did, so
the subnet Megatron-LM restores is replaced at once by the same refill.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

TWIST_SUBDIR = "twist"


def twist_save_dir(megatron_save: str) -> Path:
    return Path(megatron_save) / TWIST_SUBDIR


def megatron_loaded_iteration(load_dir: str) -> Optional[int]:
    """The iteration Megatron-LM's ``--load`` will resume from (its tracker file), None if none."""
    tracker = Path(load_dir) / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else None


def check_save_args(args, local_steps: int) -> None:
    """Saves and exits at round boundaries only; a resume needs TwIST's state for the iteration."""
    for dest, flag in (("save_interval", "--save-interval"), ("exit_interval", "--exit-interval")):
        value = getattr(args, dest, None)
        if getattr(args, "save", None) and value and value % local_steps:
            lower = max(local_steps, value // local_steps * local_steps)
            raise ConfigError(
                f"{flag} {value} is not a multiple of --local-steps {local_steps}: TwIST saves its central "
                f"model at round boundaries; use {flag} {lower} or {lower + local_steps}"
            )
    if getattr(args, "exit_duration_in_mins", None):
        raise ConfigError(
            "--exit-duration-in-mins may stop mid-round, where TwIST has no central model to save; "
            "use --exit-interval (a multiple of --local-steps)"
        )
    for dest, flag in (("finetune", "--finetune"), ("pretrained_checkpoint", "--pretrained-checkpoint")):
        if getattr(args, dest, None):
            raise ConfigError(
                f"{flag} starts from Megatron-LM weights, but TwIST trains from its central model (built from "
                "--seed, or resumed with --load from a directory this script saved): drop the flag"
            )
    if getattr(args, "load", None):
        iteration = megatron_loaded_iteration(args.load)
        if iteration is not None and iteration > 0:
            path = resume_path(args.load, iteration)
            if not (path / "meta.json").is_file():
                raise ConfigError(
                    f"--load {args.load} resumes Megatron-LM at iteration {iteration}, but {path} (TwIST's "
                    "central model for it) is missing: load a directory saved by examples/pretrain_gpt_twist.py"
                )


def resume_path(load_dir: str, iteration: int) -> Path:
    from ..checkpoint.series import iteration_dir

    return iteration_dir(twist_save_dir(load_dir), iteration)


def save_central_series(save_dir: Path, iteration: int, central, twist, train, full_state, is_logging_rank) -> None:
    """Collective (``full_state`` gathers over TP/PP); rank 0 writes ``iter_XXXXXXX`` and moves the
    pointer."""
    from ..checkpoint import series
    from ..checkpoint.models import save_central

    state = full_state()
    if is_logging_rank:

        def write(path):
            save_central(str(path), central, twist, train, data={"megatron_lm": True}, full_state=state)

        series.save_iteration(save_dir, iteration, write)


def save_central_once(path: str, central, twist, train, full_state, is_logging_rank) -> None:
    """Collective: one checkpoint at ``path`` (``--twist-save``)."""
    from ..checkpoint.models import save_central

    state = full_state()
    if is_logging_rank:
        save_central(path, central, twist, train, data={"megatron_lm": True}, full_state=state)
        print(f"[twist] central model saved to {path}; cut it with `twist extract --load {path}`", flush=True)


def resume_central(load_dir: str, iteration: int, central, twist, tp_rank: int, tp: int, first_layer: int) -> None:
    """Fill this rank's shard / stage of ``central`` from TwIST's state at ``iteration``."""
    from ..checkpoint.models import fill_central
    from ..config import TwistConfig

    path = resume_path(load_dir, iteration)
    meta = fill_central(central, str(path), tp_rank, tp, first_layer)
    saved = TwistConfig.from_dict(meta["twist"])
    if saved != twist:
        raise ConfigError(
            f"--load {load_dir}: TwIST settings differ from the checkpoint's ({saved} vs {twist}); "
            "resume with the flags it was saved with"
        )
    if central.step != iteration:
        raise ConfigError(
            f"{path} holds the central model at step {central.step}, not Megatron-LM's iteration {iteration}; "
            f"the directory was written by another job: load a save directory of one job"
        )


def ensure_dir(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
