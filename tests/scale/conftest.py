"""Fixtures for the Slurm recipes: a clean environment and a runner for `slurm/*.sh`.

The recipes read every size from an environment variable with a default, so a stray variable in
the caller's environment (or Slurm's own, or torchrun's) must not leak into a test: ``script_env``
starts from the suite's subprocess environment without any variable a recipe reads (found by
parsing the recipes' ``VAR=${VAR:-default}`` lines), any SLURM_* variable, or MASTER_ADDR.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Z][A-Z_0-9]*)=\$\{\1[:-]", re.M)


def recipe_variables() -> set:
    names = {"TWIST_REPO"}
    for script in SLURM.glob("*.sh"):
        names.update(_ASSIGN.findall(script.read_text()))
    return names


def clean_env(**overrides) -> dict:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("SLURM_") or name in recipe_variables() or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(name)
    env.update(
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
        VENV=str(Path(sys.executable).parents[1]),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="session")
def script_env():
    return clean_env


@pytest.fixture(scope="session")
def run_script():
    """run_script("twist_70b.sh", "--plan", "--json", TP=16) -> CompletedProcess (no assertion)."""

    def run(name, *args, timeout: float = 120, env=None, **overrides) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SLURM / name), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=env if env is not None else clean_env(**overrides),
        )

    return run


@pytest.fixture(scope="session")
def script_plan(run_script):
    """The JSON plan of a recipe (`bash slurm/NAME --plan --json`), asserting it is accepted."""

    def plan(name, **overrides) -> dict:
        proc = run_script(name, "--plan", "--json", **overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return plan
