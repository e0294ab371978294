"""Where a subnet's micro-batches come from.

A batch is addressed by (global step, slot): slot s of ``num_slots`` at step
t reads samples ``(t * num_slots + s) * micro_batch_size + i``. TwIST uses
slot = subnet index, so a subnet sees the same data whichever rank trains
it, which is what lets a single process reproduce a multi-rank run.

Batches are built on the CPU on purpose (host-side data, and a CPU generator gives the same
synthetic tokens on every device); the trainers move them to the model's device in one place,
optim/step.py ``batch_to_device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Protocol

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
            out[key] = torch.stack([torch.as_tensor(np.asarray(it[key]), device="cpu") for it in items])  # host data
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
        g = torch.Generator(device="cpu").manual_seed(seed)  # CPU: the same tokens whatever the device
        self.next_token = torch.randint(0, vocab_size, (vocab_size, 4), generator=g, device="cpu")

    def get(self, step: int, slot: int, num_slots: int) -> Dict[str, torch.Tensor]:
        # Built on the CPU (see the module docstring), moved by optim/step.py batch_to_device.
        g = torch.Generator(device="cpu").manual_seed(hash((self.seed, step * num_slots + slot)) & 0x7FFFFFFF)
        seqs = torch.empty(self.mbs, self.seq + 1, dtype=torch.long, device="cpu")
        seqs[:, 0] = torch.randint(0, self.vocab, (self.mbs,), generator=g, device="cpu")
        choice = torch.randint(0, 4, (self.mbs, self.seq), generator=g, device="cpu")
        for t in range(self.seq):
            seqs[:, t + 1] = self.next_token[seqs[:, t], choice[:, t]]
        return {
            "tokens": seqs[:, :-1].contiguous(),
            "labels": seqs[:, 1:].contiguous(),
            "loss_mask": torch.ones(self.mbs, self.seq, device="cpu"),
        }


class TrainingData:
    """The training data of a run, validated before any process group exists; batches are built
    lazily (``batches(model, train, twist)``) once the model and its sizes are known.

    ``meta`` is recorded in checkpoints (the tokenizer's sha256: data from another tokenizer is
    refused at --load); ``vocab_size`` sizes the model (taken from the data, or 512 for mock data)."""

    def __init__(self, data_path: Optional[str] = None, mock: bool = False, vocab_size: Optional[int] = None):
        from ..errors import ConfigError

        self.data_path, self.mock = data_path, mock
        if mock:
            self.meta, self.vocab_size = {"mock": True}, vocab_size or 512
            return
        if not data_path:
            raise ConfigError("no data: pass --data-path DIR (from `twist prepare-data --output DIR`) or --mock-data")
        from . import load_manifest

        manifest = load_manifest(data_path)
        if vocab_size is not None and vocab_size != manifest.vocab_size:
            raise ConfigError(
                f"--vocab-size {vocab_size} contradicts the data: {data_path} was tokenized with a "
                f"{manifest.vocab_size}-token vocabulary, which the model takes from the data; drop "
                "--vocab-size (it sizes --mock-data only)"
            )
        self.train_tokens = manifest.splits["train"].tokens
        self.meta = {
            "path": str(Path(data_path).resolve()),
            "tokenizer_sha256": manifest.tokenizer_sha256,
            "vocab_size": manifest.vocab_size,
        }
        self.vocab_size = manifest.vocab_size

    def check_fits(self, seq_length: int) -> None:
        """One training sample needs seq_length + 1 tokens (refused before any process group exists)."""
        from ..errors import DataError

        if not self.mock and self.train_tokens < seq_length + 1:
            raise DataError(
                f"the training data in {self.data_path!r} has {self.train_tokens} tokens, fewer than "
                f"seq_length + 1 = {seq_length + 1} needed for one sample; use a shorter --seq-length or "
                "prepare more text"
            )

    def batches(self, model, train, twist) -> BatchSource:
        if self.mock:
            return SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=train.seed)
        from . import build_gpt_dataset

        num_samples = train.train_iters * twist.num_subnets * train.micro_batch_size
        dataset = build_gpt_dataset(self.data_path, model.seq_length, num_samples, seed=train.seed)
        return MegatronBatches(dataset, train.micro_batch_size)
