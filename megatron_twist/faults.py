"""Fault injection for the reliability tests (tests/reliability/), driven by environment variables.

Why this exists: the guarantees of docs/ARCHITECTURE.md "Reliability" (a dead rank stops the run
with a message naming it, a crash while writing a checkpoint loses nothing, a non-finite subnet
is kept out of the central model) are only worth something if they are checked against REAL
failures in real processes: a rank that receives SIGKILL, a writer killed between two renames, a
loss that really turns NaN inside a Megatron forward. These hooks make such failures happen at a
chosen point. Every hook is a no-op unless its variable is set, costs one dictionary lookup, and
no production code path sets them. All hooks live in this one module.

``TWIST_FAULT_KILL_RANK=R`` and ``TWIST_FAULT_KILL_AT_STEP=T``
    global rank R sends itself SIGKILL just before global step T: no cleanup, no message, its
    sockets closed by the kernel (what a lost node looks like to the others).
``TWIST_FAULT_HANG_RANK=R`` and ``TWIST_FAULT_HANG_AT_STEP=T``
    global rank R stops making progress just before global step T, while staying alive (its main
    thread sleeps forever; its heartbeat thread goes on): a rank stuck in I/O or a deadlock, which
    the heartbeat cannot see and only the collective timeout reveals.
``TWIST_FAULT_KILL_IN_SAVE=POINT[:N]``
    the process sends itself SIGKILL the N-th time (default 1) it reaches checkpoint-write point
    POINT: ``files-written`` (tensor files complete in the temporary directory, meta.json not
    written, nothing renamed) or ``before-pointer`` (the iteration directory is complete and in
    place, the ``latest`` pointer not yet moved).
``TWIST_FAULT_SWAP_AFTER_VET=FILE``
    right after a DeepSpeed engine checkpoint is vetted (checkpoint/vetting.py) and
    before DeepSpeed reads it, the vetted file with FILE's name is replaced by FILE's bytes: the
    swap between two reads that loading must not be fooled by.
``TWIST_FAULT_NAN_SUBNETS=S[,S...]|all``, ``TWIST_FAULT_NAN_AT_STEP=T``, ``TWIST_FAULT_NAN_KIND``
    before global step T, poison those subnets. Kind ``loss`` (default) fills one transformer-layer
    weight of the materialized subnet with NaN, so the loss and every gradient become NaN;
    ``grad`` turns that weight's gradient into NaN for this one step while the loss stays finite.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Optional

import torch

_save_points_hit: dict = {}


def _kill_self(what: str) -> None:
    # The wall-clock time lets a test measure how long the survivors take to stop.
    print(f"[fault] {what}: SIGKILL to pid {os.getpid()} at {time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(rank: int, step: int) -> None:
    """``TWIST_FAULT_KILL_RANK`` / ``TWIST_FAULT_KILL_AT_STEP``: die before this global step."""
    target = os.environ.get("TWIST_FAULT_KILL_RANK")
    if target is None:
        return
    if int(target) == rank and int(os.environ.get("TWIST_FAULT_KILL_AT_STEP", "0")) == step:
        _kill_self(f"rank {rank} before step {step}")


def at_step(rank: int, step: int) -> None:
    """The per-step fault points (kill, hang), called by the training loops before each step."""
    kill_at_step(rank, step)
    hang_at_step(rank, step)


def hang_at_step(rank: int, step: int) -> None:
    """``TWIST_FAULT_HANG_RANK`` / ``TWIST_FAULT_HANG_AT_STEP``: stop making progress before this step."""
    target = os.environ.get("TWIST_FAULT_HANG_RANK")
    if target is None or int(target) != rank or int(os.environ.get("TWIST_FAULT_HANG_AT_STEP", "0")) != step:
        return
    print(f"[fault] rank {rank} hangs before step {step} at {time.time():.3f}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def checkpoint_write_point(point: str) -> None:
    """``TWIST_FAULT_KILL_IN_SAVE=POINT[:N]``: die the N-th time this point of a checkpoint write is reached."""
    spec = os.environ.get("TWIST_FAULT_KILL_IN_SAVE")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _save_points_hit[point] = _save_points_hit.get(point, 0) + 1
    if _save_points_hit[point] == int(nth or 1):
        _kill_self(f"checkpoint write at {point!r} (occurrence {_save_points_hit[point]})")


def after_vetting(files) -> None:
    """``TWIST_FAULT_SWAP_AFTER_VET=FILE``: replace the vetted file named like FILE by FILE's bytes."""
    source = os.environ.get("TWIST_FAULT_SWAP_AFTER_VET")
    if not source:
        return
    for path in files:
        if os.path.basename(str(path)) == os.path.basename(source):
            tmp = f"{path}.swap-{os.getpid()}"
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, path)
            print(f"[fault] swapped {path} after vetting", file=sys.stderr, flush=True)


def poison_subnet(module: torch.nn.Module, subnet: int, step: int) -> Optional[Callable[[], None]]:
    """``TWIST_FAULT_NAN_*``: make this subnet's step ``step`` non-finite. Returns an undo for the
    per-step part (the gradient hook), or None when nothing was injected."""
    subnets = os.environ.get("TWIST_FAULT_NAN_SUBNETS")
    if not subnets or int(os.environ.get("TWIST_FAULT_NAN_AT_STEP", "-1")) != step:
        return None
    if subnets != "all" and subnet not in {int(s) for s in subnets.split(",")}:
        return None
    # A transformer-layer weight: every token of every batch passes through it (an embedding row
    # might not be used by the batch), on every pipeline stage.
    name, param = next((n, p) for n, p in module.named_parameters() if ".layers." in n)
    kind = os.environ.get("TWIST_FAULT_NAN_KIND", "loss")
    print(f"[fault] subnet {subnet} step {step}: NaN {kind} through {name}", file=sys.stderr, flush=True)
    if kind == "grad":
        handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))
        return handle.remove
    if kind != "loss":
        raise ValueError(f"TWIST_FAULT_NAN_KIND must be 'loss' or 'grad', got {kind!r}")
    with torch.no_grad():
        param.fill_(float("nan"))
    return lambda: None
