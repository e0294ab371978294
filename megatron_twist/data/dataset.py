"""Read a prepared data directory: Megatron GPT training samples and held-out token streams.

Training samples come from Megatron-core's own ``GPTDataset`` built through
``BlendedMegatronDatasetBuilder`` - the same code path Megatron-LM uses - so
document packing, shuffling, epoch handling and the on-disk index cache are
Megatron's, not a re-implementation.

Distributed behaviour (megatron-core 0.16.1, read from its sources):
``BlendedMegatronDatasetBuilder.build_generic_dataset`` builds on rank 0
first (if ``is_built_on_rank()``), then ``torch.distributed.barrier()``, then
builds on every other rank whose ``is_built_on_rank()`` is True; a rank whose
predicate is False gets ``None``. ``GPTDataset`` writes its index cache
(document/sample/shuffle ``.npy`` files) only on rank 0 and the other ranks,
arriving after the barrier, load it. Hence:

* the default predicate is *True on every rank*: every data-parallel rank
  needs the dataset; the "rank 0 builds, the rest load" ordering is done by
  Megatron itself. (A predicate ``get_rank() == 0`` would leave every other
  rank with ``None``.)
* :func:`build_gpt_dataset` is collective when torch.distributed is
  initialised: call it on every rank, with the same arguments.
* Samples depend only on (data, seq_length, num_samples, seed), so every rank
  sees the same samples in the same order; sharding them across
  data-parallel ranks is the sampler's job.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ..errors import DataError
from .hf_tokenizer import open_tokenizer
from .prepare import CACHE_DIR, check_tokenizer, load_manifest
from .tokenizer import SentencePieceTokenizer


def _built_on_every_rank() -> bool:
    """Megatron's ``is_built_on_rank``: every rank needs the samples (see module doc)."""
    return True


def build_gpt_dataset(
    data_dir: str,
    seq_length: int,
    num_samples: int,
    seed: int,
    tokenizer: Optional[SentencePieceTokenizer] = None,
    cache_dir: Optional[str] = None,
    *,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Optional[GPTDataset]:
    """Megatron ``GPTDataset`` over the whole ``train`` split of a prepared directory.

    Each item is a dict of ``tokens``, ``labels`` (``tokens`` shifted left by
    one), ``loss_mask`` (all ones: eod is a target like any other token) and
    ``position_ids``, every one a tensor of length ``seq_length``. No
    attention mask: the model applies the causal mask itself, and positions
    and attention run across document boundaries (eod separates documents),
    as in standard GPT pre-training.

    Args:
        data_dir: a directory written by :func:`prepare_data`.
        seq_length: tokens per sample (each sample reads ``seq_length + 1``).
        num_samples: at least this many samples are indexed (Megatron goes
            over the data for as many epochs as that needs, reshuffling each);
            ``len(dataset) >= num_samples``.
        seed: shuffling seed; same seed and arguments give the same samples
            in the same order, on every rank and in every run.
        tokenizer: defaults to the directory's own; either way it is checked
            against the manifest.
        cache_dir: where Megatron caches its sample indices (default
            ``data_dir/cache``). A subdirectory named after the dataset's
            content fingerprint is used, so re-preparing the data never
            reuses stale indices.
        is_built_on_rank: Megatron's predicate; default True on every rank.
            A rank where it returns False gets ``None``.

    Raises:
        DataError: unprepared/inconsistent directory, mismatched tokenizer,
            bad sizes, or fewer than ``seq_length + 1`` training tokens.
    """
    if seq_length < 1:
        raise DataError(f"seq_length must be at least 1, got {seq_length}")
    if num_samples < 1:
        raise DataError(f"num_samples must be at least 1, got {num_samples}")
    manifest = load_manifest(data_dir)
    if tokenizer is None:
        tokenizer = open_tokenizer(manifest.tokenizer_path)
    check_tokenizer(manifest, tokenizer)

    # Absolute: the prefix is part of Megatron's cache key, so every rank must
    # spell it identically.
    prefix = os.path.abspath(manifest.prefix("train"))
    # Keep the IndexedDataset referenced while its arrays are read: they are
    # views into an mmap that the object's __del__ closes (reading them after
    # that is a segfault, not an exception).
    index = IndexedDataset(prefix)
    num_tokens = int(numpy.sum(index.sequence_lengths, dtype=numpy.int64))
    del index
    if num_tokens < seq_length + 1:
        raise DataError(
            f"the training data in {data_dir!r} has {num_tokens} tokens, fewer than "
            f"seq_length + 1 = {seq_length + 1} needed for one sample; use a shorter "
            "--seq-length or prepare more text"
        )

    cache_root = cache_dir if cache_dir is not None else os.path.join(data_dir, CACHE_DIR)
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=([prefix], None),
        # One prefix, all of it for training: the held-out split lives in its
        # own files (valid.bin), not in a slice of train.bin.
        split="100,0,0",
        path_to_cache=os.path.join(os.path.abspath(cache_root), manifest.fingerprint),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    train, _valid, _test = BlendedMegatronDatasetBuilder(
        GPTDataset,
        [int(num_samples), None, None],
        is_built_on_rank or _built_on_every_rank,
        config,
    ).build()
    return train


def load_token_stream(data_dir: str, split: str = "valid") -> torch.Tensor:
    """All token ids of ``split``, documents concatenated in order (eod between them).

    For held-out perplexity over non-overlapping windows: unlike GPTDataset
    samples this is unshuffled and visits every token exactly once.

    Returns:
        A 1-D ``torch.int64`` tensor with ``manifest.splits[split].tokens`` ids.
    """
    manifest = load_manifest(data_dir)
    dataset = IndexedDataset(manifest.prefix(split), mmap=True)
    count = len(dataset)
    if count:
        parts = dataset[0:count]  # contiguous slice: one read of the whole .bin
        stream = numpy.concatenate(parts).astype(numpy.int64)  # copy: detach from the mmap
    else:  # pragma: no cover - prepare_data never writes an empty split
        stream = numpy.zeros(0, dtype=numpy.int64)
    del dataset
    if stream.size != manifest.splits[split].tokens:
        raise DataError(
            f"{manifest.prefix(split)}.bin holds {stream.size} tokens but the manifest says "
            f"{manifest.splits[split].tokens}; re-run `twist prepare-data --output {data_dir}`"
        )
    return torch.from_numpy(stream)
