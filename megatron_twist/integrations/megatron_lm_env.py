"""Where Megatron-LM's training package comes from, and getting it ready to import.

Megatron-LM (``megatron/training``, ``pretrain_gpt.py``) is not on any package index and not a
dependency of this project: it is the user's own checkout. Its location, in order:

1. ``MEGATRON_LM_PATH`` (the checkout's root: the folder holding ``pretrain_gpt.py``);
2. a ``megatron.training`` already importable (the checkout is on ``PYTHONPATH`` or is the
   working directory, as in Megatron-LM's own instructions);
3. ``../shared/megatron-lm`` relative to this repository's root (the tested extract).

``megatron.core`` always comes from the installed megatron-core wheel: ``megatron`` is a
namespace package in both places, and a checkout that ships its own ``megatron/core`` is only
used if it comes first on the path (the user's choice).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

ENV_VAR = "MEGATRON_LM_PATH"
# The tested extract's place beside this repository (not inside it: Megatron-LM is the user's).
DEFAULT_RELATIVE = Path("..") / "shared" / "megatron-lm"


def repository_root() -> Path:
    return Path(__file__).resolve().parents[2]


def megatron_lm_path() -> Optional[Path]:
    """The Megatron-LM checkout to use, or None if Megatron-LM is already importable as it is."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not (path / "pretrain_gpt.py").is_file():
            raise ConfigError(
                f"{ENV_VAR}={explicit} holds no pretrain_gpt.py; point it at the root of a Megatron-LM "
                "checkout (tag core_v0.16.1 is the one tested)"
            )
        return path
    if importlib.util.find_spec("pretrain_gpt") is not None:
        return None
    default = (repository_root() / DEFAULT_RELATIVE).resolve()
    if (default / "pretrain_gpt.py").is_file():
        return default
    raise ConfigError(
        f"Megatron-LM not found: set {ENV_VAR} to the root of a Megatron-LM checkout (the folder "
        f"holding pretrain_gpt.py; tag core_v0.16.1 is the one tested), or put it on PYTHONPATH "
        f"(looked for {default})"
    )


def use_megatron_lm() -> Optional[Path]:
    """Put Megatron-LM first on ``sys.path`` and, without CUDA, apply the run-time CPU shim.

    Returns the checkout added to the path (None if it was importable already)."""
    path = megatron_lm_path()
    if path is not None and str(path) not in sys.path:
        sys.path.insert(0, str(path))
    _use_prebuilt_dataset_helpers()
    from .megatron_lm_cpu import apply_megatron_lm_cpu_shim

    apply_megatron_lm_cpu_shim()
    return path


def _use_prebuilt_dataset_helpers() -> None:
    """``initialize_megatron`` runs ``make`` in megatron/core/datasets to build its C++ index
    helpers, as in a Megatron-LM checkout; the megatron-core wheel ships them built
    (``helpers_cpp``) and without the Makefile, so ``make`` fails and the run exits. When the
    built helpers import, that compile step has nothing to do (GPU or CPU alike)."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let Megatron-LM compile them as usual
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: None
