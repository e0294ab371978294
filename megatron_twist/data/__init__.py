"""Data for TwIST training: corpus -> tokenizer -> Megatron indexed dataset -> samples.

Typical flow (what ``twist prepare-data`` and training do)::

    from megatron_twist.data import (stdlib_documents, prepare_data,
                                     build_gpt_dataset, load_token_stream)

    manifest = prepare_data("data/", stdlib_documents("train"),
                            stdlib_documents("valid"), vocab_size=8192)
    train = build_gpt_dataset("data/", seq_length=256, num_samples=10_000, seed=1234)
    valid_tokens = load_token_stream("data/", "valid")

Modules, one concern each:

* :mod:`.corpus`    - where text comes from (embedded stdlib corpus, user files)
* :mod:`.tokenizer` - SentencePiece BPE training and the Megatron tokenizer wrapper
* :mod:`.prepare`   - writing/reading a prepared directory and its manifest
* :mod:`.dataset`   - Megatron GPTDataset samples and held-out token streams
* :mod:`.errors`    - :class:`DataError`, raised for every user-fixable problem
"""
from .corpus import (
    DEFAULT_TRAIN_MAX_BYTES,
    DEFAULT_VALID_MAX_BYTES,
    HELDOUT_MODULES,
    Document,
    describe_stdlib,
    stdlib_documents,
    text_documents,
)
from .dataset import build_gpt_dataset, load_token_stream
from .errors import DataError
from .prepare import Manifest, SplitStats, check_tokenizer, load_manifest, load_tokenizer, prepare_data
from .tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "DEFAULT_TRAIN_MAX_BYTES",
    "DEFAULT_VALID_MAX_BYTES",
    "HELDOUT_MODULES",
    "DataError",
    "Document",
    "Manifest",
    "SentencePieceTokenizer",
    "SplitStats",
    "build_gpt_dataset",
    "check_tokenizer",
    "describe_stdlib",
    "load_manifest",
    "load_token_stream",
    "load_tokenizer",
    "prepare_data",
    "stdlib_documents",
    "text_documents",
    "train_sentencepiece",
]
