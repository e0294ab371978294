"""Held-out perplexity.

Windowing (documented, and the same for every form of a model): the token
stream of the held-out split is cut into consecutive NON-overlapping windows
of ``seq_length + 1`` tokens (stride ``seq_length``); each window predicts its
last ``seq_length`` tokens from the ones before, with the context restarting
at every window. A trailing remainder shorter than a window is dropped.
Perplexity is exp(mean negative log-likelihood over all predicted tokens).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .model.gpt import count_parameters, gpt_forward


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_length: int, batch_size: int = 8,
               max_tokens: Optional[int] = None, forward=gpt_forward) -> dict:
    """``forward(model, tokens, labels) -> per-token NLL [b, s]``: gpt_forward for Megatron models,
    hf.io.hf_forward for HuggingFace ones; the windows are the same."""
    model.eval()
    tokens = tokens.long().flatten().to(next(model.parameters()).device)
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n_windows = (len(tokens) - 1) // seq_length
    if n_windows < 1:
        raise ValueError(
            f"held-out data has {len(tokens)} tokens, fewer than one window of {seq_length + 1}; "
            "use more evaluation data or a shorter --seq-length"
        )
    windows = tokens[: n_windows * seq_length + 1]
    total_nll, total = 0.0, 0
    for start in range(0, n_windows, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_windows), device=tokens.device)
        offsets = idx[:, None] * seq_length + torch.arange(seq_length + 1, device=tokens.device)[None, :]
        chunk = windows[offsets]
        nll = forward(model, chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
        total_nll += nll.double().sum().item()
        total += nll.numel()
    model.train()
    loss = total_nll / total
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total, "parameters": count_parameters(model)}
