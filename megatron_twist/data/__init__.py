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

import importlib

from ..errors import DataError

# Names are resolved on first use (PEP 562): `import megatron_twist.data` stays cheap, so a
# command can validate its input and report a DataError before Megatron (seconds) is imported.
_EXPORTS = {
    "DEFAULT_TRAIN_MAX_BYTES": "corpus",
    "DEFAULT_VALID_MAX_BYTES": "corpus",
    "HELDOUT_MODULES": "corpus",
    "Document": "corpus",
    "corpus_documents": "corpus",
    "describe_stdlib": "corpus",
    "stdlib_documents": "corpus",
    "text_documents": "corpus",
    "build_gpt_dataset": "dataset",
    "load_token_stream": "dataset",
    "Manifest": "prepare",
    "SplitStats": "prepare",
    "check_tokenizer": "prepare",
    "load_manifest": "prepare",
    "load_tokenizer": "prepare",
    "prepare_data": "prepare",
    "SentencePieceTokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
