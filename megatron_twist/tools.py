"""The one-process tools on saved models, as library calls: cut a dense model out of a central
checkpoint (`twist extract`), held-out perplexity (`twist eval`), a HuggingFace import
(`twist import-hf`). Each refuses bad input before any work and runs in a one-rank group
(distributed.runtime.single_process_group).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from . import outputs


def extract(
    load: str, save: str, keep_ratio: Optional[float] = None, method: str = "magnitude", overwrite: bool = False
) -> dict:
    """Cut the dense model at ``keep_ratio`` (default: the training one) out of the central model that
    ``load`` means and save it; returns a summary (keep ratio, parameter counts, layer sizes)."""
    outputs.check_output(save, (outputs.EXTRACTED,), "--save", overwrite)  # before any work
    from .checkpoint.models import load_central, save_extracted
    from .distributed.runtime import single_process_group
    from .model.gpt import count_parameters
    from .twist.extraction import cut_model, select_plan

    with single_process_group():
        central, twist, meta = load_central(load)
        keep = keep_ratio if keep_ratio is not None else twist.keep_ratio
        plan = select_plan(central.config, twist, central.params, keep, method)
        module, sizes = cut_model(central.config, twist, central.params, plan)
        save_extracted(
            save,
            module,
            central.config,
            twist,
            plan,
            keep,
            method,
            source={"checkpoint": str(Path(load).resolve()), "step": meta["step"], "data": meta.get("data", {})},
            overwrite=overwrite,
        )
        return {
            "keep_ratio": keep,
            "method": method,
            "parameters": count_parameters(central.module),
            "cut_parameters": count_parameters(module),
            "layer_sizes": [(s.num_attention_heads, s.ffn_hidden_size) for s in sizes],
        }


def evaluate(
    load: str,
    data_path: Optional[str] = None,
    mock: bool = False,
    split: str = "valid",
    max_tokens: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict:
    """Held-out perplexity of a central, cut-out or HuggingFace model (evaluation.py's windows)."""
    from .checkpoint.models import load_model
    from .distributed.runtime import single_process_group
    from .evaluation import evaluation_tokens, perplexity
    from .hf.io import is_hf_directory

    with single_process_group():
        forward = {}
        if is_hf_directory(load):  # an exported (or any local Llama / GPT-2) HuggingFace directory
            from .hf.io import hf_forward, load_hf_model

            module, meta = load_hf_model(load)
            forward = {"forward": hf_forward}
        else:
            module, meta = load_model(load)
        tokens, seq_length, data_info = evaluation_tokens(meta, data_path, mock, split, seed)
        t0 = time.perf_counter()
        result = perplexity(module, tokens, seq_length, batch_size=batch_size, max_tokens=max_tokens, **forward)
        result.update(
            kind=meta["kind"],
            keep_ratio=meta.get("keep_ratio", 1.0),
            checkpoint=load,
            seconds=round(time.perf_counter() - t0, 2),
            **data_info,
        )
        return result


def import_hf(path: str, save: str, seq_length: Optional[int] = None, overwrite: bool = False):
    """A local HuggingFace Llama / GPT-2 directory -> a central checkpoint; returns its ModelConfig."""
    outputs.check_output(save, (outputs.CENTRAL,), "--save", overwrite)  # before any work
    from .distributed.runtime import single_process_group
    from .hf import io

    with single_process_group():
        return io.import_hf(path, save, seq_length, overwrite=overwrite)
