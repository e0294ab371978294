"""Shared pieces of the reliability tests: one tiny run, and how its checkpoints are compared.

Every multi-process test here runs the `tiny` preset on mock data for 8 steps (4 rounds of 2 local
steps, 2 subnets): the work is small, the processes are real. The uninterrupted reference run is
made once per session and is what interrupted runs must reproduce bit for bit. Helpers reach the
tests through the ``rel`` fixture (test modules cannot import a conftest in importlib mode).
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = [
    "train",
    "--model-preset",
    "tiny",
    "--mock-data",
    "--train-iters",
    "8",
    "--local-steps",
    "2",
    "--micro-batch-size",
    "2",
    "--num-subnets",
    "2",
    "--keep-ratio",
    "0.5",
    "--log-interval",
    "2",
]
POINTER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, run_twist):
    """An uninterrupted single-process run saving every 4 steps: SAVE_DIR with iter_0000004, iter_0000008."""
    save = tmp_path_factory.mktemp("reference") / "save"
    proc = run_twist([*ARGS, "--save", save, "--save-interval", "4"], timeout=300)
    # More subnets than ranks is supported: one process trains both subnets in turn.
    assert "rank 0/1 trains subnets [0, 1]" in proc.stdout
    assert (save / POINTER).read_text().strip() == "8"
    return save


def tensors(ckpt: Path) -> dict:
    return {stem: load_file(str(Path(ckpt) / f"{stem}.safetensors")) for stem in ("model", "optimizer")}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    for stem in ta:
        assert ta[stem].keys() == tb[stem].keys()
        for k in ta[stem]:
            assert torch.equal(ta[stem][k], tb[stem][k]), f"{stem}:{k} differs between {a} and {b}"


def file_hashes(root: Path) -> dict:
    """Every file under ``root`` (names and contents): to show that a refused command wrote nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


@pytest.fixture(scope="session")
def rel():
    return types.SimpleNamespace(
        ARGS=ARGS,
        POINTER=POINTER,
        tensors=tensors,
        assert_same_tensors=assert_same_tensors,
        file_hashes=file_hashes,
        meta=meta,
    )


@pytest.fixture
def in_process_cli(monkeypatch, capsys):
    """`twist ...` in this process, for commands that must be refused BEFORE any process group exists:
    if one got as far as init_distributed, the test fails there (and the session's group is untouched)."""
    import megatron_twist.distributed.runtime as runtime
    from megatron_twist.cli import main

    def forbidden(*a, **k):
        raise AssertionError("the command was not refused: it went on to create a process group")

    monkeypatch.setattr(runtime, "init_distributed", forbidden)

    def run(args):
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run
