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
def perplexity(
    model,
    tokens: torch.Tensor,
    seq_length: int,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    forward=gpt_forward,
) -> dict:
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


def evaluation_tokens(meta: dict, data_path: Optional[str], mock: bool = False, split: str = "valid", seed: int = 1234):
    """(token stream, seq_length, info) a model (its checkpoint ``meta``) is evaluated on: the held-out
    split of a prepared directory (refused if made with another tokenizer), or synthetic tokens."""
    from .errors import ConfigError

    seq_length = meta["model"]["seq_length"]
    if mock:
        from .data.batches import SyntheticBatches

        src = SyntheticBatches(meta["model"]["vocab_size"], seq_length, 16, seed=seed + 1)
        toks = torch.cat([src.get(i, 0, 1)["tokens"].flatten() for i in range(4)])
        return toks, seq_length, {"data": "mock"}
    if not data_path:
        raise ConfigError("no data: pass --data-path DIR (from `twist prepare-data`) or --mock-data")
    from .data import load_manifest, load_token_stream

    manifest = load_manifest(data_path)
    trained_with = meta.get("data", {}).get("tokenizer_sha256")
    if trained_with and trained_with != manifest.tokenizer_sha256:
        raise ConfigError(
            f"{data_path} was tokenized with a different tokenizer than the model was trained with; "
            "evaluate on data prepared with the model's tokenizer (`twist prepare-data --tokenizer-model`)"
        )
    if manifest.vocab_size > meta["model"]["vocab_size"]:
        raise ConfigError(
            f"the data's vocabulary ({manifest.vocab_size}) is larger than the model's "
            f"({meta['model']['vocab_size']}): wrong tokenizer"
        )
    return load_token_stream(data_path, split), seq_length, {"split": split}
