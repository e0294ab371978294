"""Megatron-LM's training package (``megatron/training``) on a machine without CUDA.

Megatron-LM's ``pretrain()`` loop is written for GPUs: it asserts CUDA, gates process-group set-up
on ``torch.cuda.device_count()``, moves every model and batch with ``.cuda()``, and builds its
bookkeeping tensors (timestamps, loss sums, flags) with ``device="cuda"``. None of that is maths;
on CPU these are the ONLY changes needed for the loop to train a GPTModel with gloo. They are
applied at run time, only when CUDA is absent (the GPU path runs Megatron-LM untouched), and no
file of Megatron-LM is edited or copied. Megatron-core's own CPU patches stay in
``megatron_twist/cpu_shim.py``; this module adds what Megatron-LM's package needs on top.

Patches (:data:`PATCHES`, each with its reason below):

1. ``triton``: ``megatron.training.initialize`` imports megatron-core's batch-invariant Triton
   kernels at module level, and Triton is a GPU compiler that is not installed here. A stub
   ``triton`` module stands in for that ONE import (removed from ``sys.modules`` right after), so
   its ``@triton.jit`` decorators evaluate; the kernels are never called (``--batch-invariant-mode``
   is refused, :func:`check_cpu_args`).
2. ``initialize_megatron(allow_no_cuda=True)``: its first line asserts CUDA.
3. ``torch.cuda.device_count() == 1`` as ``megatron.training.initialize`` sees it (see 5): it
   builds the model-parallel groups and seeds the RNG tracker only "if device_count > 0" (on CPU:
   none built, nothing seeded); its ``torch.cuda.set_device`` is a no-op.
4. ``Tensor.cuda()`` / ``Module.cuda()`` return the CPU tensor: ``get_model`` moves the model and
   ``get_batch_on_this_tp_rank`` moves each batch with ``.cuda()``.
5. ``device="cuda"`` factories and ``torch.cuda.*`` calls in Megatron-LM's training modules and in
   megatron-core's optimizer (timestamps, loss sums, the grad norm, streams, memory statistics)
   land on CPU / do nothing: their ``torch`` name is a proxy (``cpu_shim.TorchOnCpu``) whose
   ``cuda`` is :class:`CudaOnCpu`. torch itself is not changed for other modules. The device
   reports architecture 0, and ``CUDA_DEVICE_MAX_CONNECTIONS`` defaults to 1 (Megatron-LM's rule
   for TP on GPUs before Blackwell, about CUDA streams a CPU does not have).
6. ``Tensor.type()`` reports ``torch.cuda.*`` names inside megatron-core's optimizer set-up and
   grad clipping only: they assert ``param.type() == 'torch.cuda.FloatTensor'`` to pick the fp32 /
   fp16 path, a device check and not a dtype one.
7. ``fused_kernels.load`` (as ``megatron.training.initialize`` sees it) does nothing: it looks for
   ``nvcc`` to compile CUDA kernels and fails without CUDA_HOME; nothing on CPU uses them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import types

import torch

from ..cpu_shim import TorchOnCpu, apply_cpu_shim, cuda_absent, redirect_cuda_factories
from ..errors import ConfigError

PATCHES = (
    "triton stub for megatron.core.transformer.custom_layers.batch_invariant_kernels' import only",
    "initialize_megatron(allow_no_cuda=True)",
    "torch.cuda.device_count() == 1 and set_device a no-op, as megatron.training.initialize sees them",
    "Tensor.cuda() / Module.cuda() -> the CPU tensor",
    "device='cuda' factories and torch.cuda.* in megatron.training and megatron.core.optimizer -> CPU",
    "Tensor.type() -> 'torch.cuda.*' inside megatron-core's optimizer set-up and grad clipping",
    "megatron.training.initialize's fused_kernels.load -> no-op (nvcc builds CUDA kernels)",
)

_APPLIED = False
# Megatron-LM's training modules and megatron-core's optimizer modules whose bookkeeping tensors
# and torch.cuda calls are redirected (patch 5).
_REDIRECTED = (
    "megatron.training.training",
    "megatron.training.utils",
    "megatron.training.checkpointing",
    "megatron.training.initialize",
    "megatron.training.global_vars",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
)


class CudaOnCpu:
    """``torch.cuda`` as Megatron-LM's bookkeeping sees it on a CPU machine: streams are no-op
    contexts, caches and memory statistics are empty, the device is the CPU. Anything not listed
    is torch.cuda's own (and raises as it would)."""

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    def current_stream(self, *args):
        return CudaOnCpu.Stream()

    @contextlib.contextmanager
    def stream(self, s):
        yield

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1  # patch 3: one device, the CPU (Megatron-LM sets up groups and seeds only if >= 1)

    def set_device(self, *args):
        pass

    def empty_cache(self):
        pass

    def synchronize(self, *args):
        pass

    def memory_allocated(self, *args):
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    def memory_stats(self, *args):
        return {}

    def get_device_properties(self, *args):
        # validate_args asks the architecture (TP's CUDA_DEVICE_MAX_CONNECTIONS rule); no CUDA arch here
        return types.SimpleNamespace(major=0, minor=0, name="cpu", total_memory=0)

    def get_rng_state(self, *args):
        # checkpointing saves it beside the CPU state; the CPU state is what restores randomness here
        return torch.get_rng_state()

    def set_rng_state(self, state, *args):
        pass

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchAndCudaOnCpu(TorchOnCpu):
    _cuda = CudaOnCpu()

    def __getattr__(self, name):
        if name == "cuda":
            return self._cuda
        return super().__getattr__(name)


def import_without_triton(module_name: str):
    """Import ``module_name`` with a stub ``triton`` if Triton is not installed (patch 1)."""
    try:
        import triton  # noqa: F401  (installed: nothing to stub)

        return importlib.import_module(module_name)
    except ImportError:
        pass
    stub = types.ModuleType("triton")
    language = types.ModuleType("triton.language")

    def jit(fn=None, **kwargs):
        # both @triton.jit and @triton.jit(launch_metadata=...); the kernels are never launched on CPU
        return fn if fn is not None else (lambda f: f)

    stub.jit, stub.cdiv, stub.language = jit, (lambda a, b: -(-a // b)), language
    language.__getattr__ = lambda name: object  # tl.constexpr etc. in annotations
    saved = {k: sys.modules.get(k) for k in ("triton", "triton.language")}
    sys.modules.update({"triton": stub, "triton.language": language})
    try:
        return importlib.import_module(module_name)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@contextlib.contextmanager
def _cuda_type_names():
    """Patch 6: ``Tensor.type()`` (no argument) names the CPU tensor as a CUDA one."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _within(context, owner, name: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def _to_self(t, *args, **kwargs):
    return t


def apply_megatron_lm_cpu_shim() -> bool:
    """Apply the patches once if CUDA is absent; returns True if applied (now or before)."""
    global _APPLIED
    if _APPLIED:
        return True
    if not cuda_absent():
        return False
    apply_cpu_shim()
    # Megatron-LM requires CUDA_DEVICE_MAX_CONNECTIONS=1 with TP on pre-Blackwell GPUs (it orders
    # CUDA streams); a CPU has no streams to order, so the rule is satisfied rather than asserted.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    initialize = import_without_triton("megatron.training.initialize")
    training = importlib.import_module("megatron.training.training")
    _allow_no_cuda(training, initialize)
    initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)  # patch 7
    torch.Tensor.cuda = _to_self  # patch 4 (Module.cuda applies Tensor.cuda to every tensor)
    redirect_cuda_factories([importlib.import_module(m) for m in _REDIRECTED], _TorchAndCudaOnCpu())
    from megatron.core.optimizer import clip_grads, optimizer

    _within(_cuda_type_names, clip_grads, "clip_grad_by_total_norm_fp32")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32  # its own import
    _within(_cuda_type_names, optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _APPLIED = True
    return True


def _allow_no_cuda(training, initialize) -> None:
    """Patch 2: pretrain() calls initialize_megatron through training's own name for it."""
    original = initialize.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    training.initialize_megatron = initialize_megatron


def check_cpu_args(args) -> None:
    """Megatron-LM flags that cannot work without a GPU, refused before any work."""
    if not cuda_absent():
        return
    needs_gpu = {
        "batch_invariant_mode": "--batch-invariant-mode (Triton kernels)",
        "fp16": "--fp16 (dynamic loss scaling on CUDA; use --bf16)",
    }
    for dest, flag in needs_gpu.items():
        if getattr(args, dest, False):
            raise ConfigError(f"{flag} needs a GPU; this machine has no CUDA: drop the flag")
    if getattr(args, "transformer_impl", "local") != "local":
        raise ConfigError("Transformer Engine needs a GPU; pass --transformer-impl local on a CPU machine")
