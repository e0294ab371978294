"""Lets Megatron-core 0.16.1 run on a machine without CUDA.

Megatron-core assumes CUDA in a handful of places that have nothing to do
with the maths (RNG bookkeeping, device lookups, a synchronize). This module
is the ONE place where the project bends Megatron for CPU. It is applied only
when ``torch.cuda.is_available()`` is False, so the GPU path runs Megatron
untouched. Every patch is listed in :data:`PATCHES` with its reason.

Patches (see docs/ARCHITECTURE.md, "CPU shim"):
1. RNG tracker: Megatron forks a named *CUDA* RNG state around attention
   dropout and TP weight init. On CPU we keep named CPU generator states.
2. ``torch.cuda.current_device()`` is used as a tensor ``device=``; on CPU it
   resolves to ``"cpu"``.
3. Tensor factories called with ``device="cuda"`` inside Megatron's pipeline
   schedules and its default causal-mask helpers land on CPU.
4. ``torch.cuda.synchronize()`` (pipeline p2p) becomes a no-op.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False
PATCHES = (
    "rng-tracker: named CPU RNG states instead of CUDA ones",
    "torch.cuda.current_device -> 'cpu'",
    "cuda tensor factories in pipeline schedules and transformer.utils masks -> cpu",
    "torch.cuda.synchronize -> no-op",
)


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shim() -> bool:
    """Apply the patches once if CUDA is absent. Returns True if applied (now or before)."""
    global _APPLIED
    if _APPLIED:
        return True
    if not cuda_absent():
        return False
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    _install_cpu_rng_tracker()
    _redirect_cuda_factories()
    _APPLIED = True
    return True


def seed_everything(seed: int) -> None:
    """Seed the default RNG and Megatron's named RNG states (device-appropriately).

    Megatron's CPU initialisation draws from the default torch RNG: every rank
    must seed it identically before building a model, or ranks get different weights.
    """
    torch.manual_seed(seed)
    if cuda_absent():
        apply_cpu_shim()
        from megatron.core.tensor_parallel import random as mrandom

        tracker = mrandom.get_cuda_rng_tracker()
        tracker.reset()
        from megatron.core import parallel_state

        tp_rank = (
            parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        )
        # Same offsets as Megatron's model_parallel_cuda_manual_seed, so runs agree across devices.
        tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    else:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named states of the default CPU generator, with Megatron's tracker API."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")  # this tracker replaces the CUDA one on CPU-only runs
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


CUDA_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "rand", "randn", "arange")


class TorchOnCpu:
    """Module proxy: forwards to torch, but moves ``device="cuda"`` factory calls to CPU.

    Installed as the ``torch`` name of a Megatron module (``module.torch = TorchOnCpu()``), so only
    that module's bookkeeping tensors move; torch itself is untouched."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in CUDA_FACTORIES:

            @functools.wraps(attr)
            def on_cpu(*args, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and "cuda" in str(dev):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return on_cpu
        return attr


def redirect_cuda_factories(modules, proxy=None) -> None:
    """Point each module's ``torch`` at a CPU-redirecting proxy (see :class:`TorchOnCpu`)."""
    for module in modules:
        module.torch = proxy if proxy is not None else TorchOnCpu()


def _redirect_cuda_factories() -> None:
    """Megatron builds small bookkeeping tensors (token counts, causal masks) with device='cuda'."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    redirect_cuda_factories((schedules, transformer_utils))
