"""The central model as a Megatron sharded state dict (what checkpoint/torch_dist.py saves and loads),
and the in-process write path Megatron's torch_dist strategy takes here."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
from typing import Dict

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies import filesystem_async

from ..optim.optimizer import ADAM_MOMENTS
from ..twist.central import CentralModel
from .files import CheckpointError

MODEL_PREFIX = "model"  # sub-dict of the sharded state dict with GPTModel's entries
OPTIMIZER_KEY_PREFIX = "twist_optimizer"  # ShardedTensor key prefix of the Adam moments


# ----------------------------------------------------------------------------------------------
# sharded state dicts
# ----------------------------------------------------------------------------------------------


def moment_entry(param_entry, moment: str, tensor: torch.Tensor):
    """The sharded entry of one Adam moment: the parameter's entry with only key and data swapped.

    ``param_entry`` is what ``GPTModel.sharded_state_dict()`` holds for the
    parameter: a ``ShardedTensor`` (same shapes, offsets, fragmentation, replica
    id; dtype follows the moment) or a ``ShardedTensorFactory`` (SwiGLU fc1:
    its build function chunks the tensor it is handed, so the moment is split
    into gate/up halves exactly like the weight, and merged back with ``cat``).
    """
    key = f"{OPTIMIZER_KEY_PREFIX}.{moment}.{param_entry.key}"
    if isinstance(param_entry, ShardedTensor):
        if tuple(tensor.shape) != tuple(param_entry.local_shape):
            raise ValueError(
                f"{moment} of {param_entry.key} has shape {tuple(tensor.shape)}, "
                f"its parameter shard {tuple(param_entry.local_shape)}"
            )
        return dataclasses.replace(param_entry, key=key, data=tensor, dtype=tensor.dtype)
    if isinstance(param_entry, ShardedTensorFactory):
        if tensor.shape != param_entry.data.shape:
            raise ValueError(
                f"{moment} of {param_entry.key} has shape {tuple(tensor.shape)}, "
                f"its parameter shard {tuple(param_entry.data.shape)}"
            )
        return dataclasses.replace(param_entry, key=key, data=tensor)
    raise TypeError(
        f"parameter entry {param_entry.key!r} is a {type(param_entry).__name__}; "
        "expected a ShardedTensor or ShardedTensorFactory"
    )


def central_sharded_state_dict(central: CentralModel) -> dict:
    """``{'model': GPTModel entries, 'optimizer': {moment: {param name: entry}}}`` for this rank."""
    model_sd = central.module.sharded_state_dict()
    optimizer: Dict[str, dict] = {m: {} for m in ADAM_MOMENTS}
    for name in central.params:
        if name not in model_sd:
            raise CheckpointError(
                f"parameter {name} has no entry in GPTModel.sharded_state_dict(); "
                "it cannot be saved in the distributed format"
            )
        for m in ADAM_MOMENTS:
            optimizer[m][name] = moment_entry(model_sd[name], m, central.moments[m][name])
    return {MODEL_PREFIX: model_sd, "optimizer": optimizer}


# ----------------------------------------------------------------------------------------------
# Megatron workaround (not CUDA related; applies on every device, only during our saves)
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def in_process_write_results_queue():
    """WORKAROUND: keep Megatron's torch_dist *synchronous* save from spawning a Manager process.

    ``FileSystemWriterAsync.prepare_write_data`` takes its results queue from
    ``filesystem_async._get_write_results_queue()``, which creates (once per
    process) ``mp.get_context("spawn").Manager().Queue()``. Spawning re-imports
    the ``__main__`` module in a fresh interpreter: a script without an
    ``if __name__ == "__main__"`` guard dies with "An attempt has been made to
    start a new process before the current process has finished its
    bootstrapping phase", and a guarded one pays a full torch/Megatron import
    (seconds) plus a lingering server process on every rank. A synchronous
    save (``AsyncRequest.execute_sync``) puts into and reads from that queue in
    the SAME process (the forked writer processes report through their own
    fork-context queue), so a thread queue is enough. We install one only for
    the duration of our save and restore Megatron's global afterwards, so an
    asynchronous save elsewhere in the process is unaffected. Remove this when
    Megatron takes the queue from the strategy or uses it lazily.
    """
    saved = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = saved
