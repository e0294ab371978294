"""Where a subnet's micro-batches come from.

A batch is addressed by (global step, slot): slot s of ``num_slots`` at step
t reads samples ``(t * num_slots + s) * micro_batch_size + i``. TwIST uses
slot = subnet index, so a subnet sees the same data whichever rank trains
it, which is what lets a single process reproduce a multi-rank run.
"""
from __future__ import annotations

from typing import Dict, Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    def get(self, step: int, slot: int, num_slots: int) -> Dict[str, torch.Tensor]:
        """{'tokens': [b, s], 'labels': [b, s], 'loss_mask': [b, s]}"""


class MegatronBatches:
    """Micro-batches from a Megatron GPTDataset (``megatron_twist.data.build_gpt_dataset``)."""

    def __init__(self, dataset, micro_batch_size: int):
        self.dataset = dataset
        self.mbs = micro_batch_size

    def get(self, step: int, slot: int, num_slots: int) -> Dict[str, torch.Tensor]:
        first = (step * num_slots + slot) * self.mbs
        items = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.mbs)]
        out = {}
        for key in ("tokens", "labels", "loss_mask"):
            out[key] = torch.stack([torch.as_tensor(np.asarray(it[key])) for it in items])
        out["tokens"] = out["tokens"].long()
        out["labels"] = out["labels"].long()
        out["loss_mask"] = out["loss_mask"].float()
        return out


class SyntheticBatches:
    """Deterministic token sequences for tests and dry runs (no data files needed).

    Sequences follow a fixed random bigram table, so they are learnable and a
    falling loss means the model learns.
    """

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, seed: int = 0):
        self.vocab, self.seq, self.mbs, self.seed = vocab_size, seq_length, micro_batch_size, seed
        g = torch.Generator().manual_seed(seed)
        self.next_token = torch.randint(0, vocab_size, (vocab_size, 4), generator=g)

    def get(self, step: int, slot: int, num_slots: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(hash((self.seed, step * num_slots + slot)) & 0x7FFFFFFF)
        seqs = torch.empty(self.mbs, self.seq + 1, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, self.vocab, (self.mbs,), generator=g)
        choice = torch.randint(0, 4, (self.mbs, self.seq), generator=g)
        for t in range(self.seq):
            seqs[:, t + 1] = self.next_token[seqs[:, t], choice[:, t]]
        return {
            "tokens": seqs[:, :-1].contiguous(),
            "labels": seqs[:, 1:].contiguous(),
            "loss_mask": torch.ones(self.mbs, self.seq),
        }
