"""Shared fixtures: one small real corpus and one prepared dataset per session.

The corpus is a ~100 kB prefix of the stdlib train split (real Python code,
so tokenizer behaviour on indentation is exercised) and the vocabulary is
tiny, so tokenizer training takes well under a second.
"""

from __future__ import annotations

import pytest

from megatron_twist.data import prepare_data, stdlib_documents

TEST_VOCAB = 500  # 256 byte pieces + <unk> + </s> + ~95 characters + merges
TRAIN_MAX_BYTES = 100_000
VALID_MAX_BYTES = 150_000


@pytest.fixture(scope="session")
def small_docs():
    """(train, valid) document lists."""
    return (
        stdlib_documents("train", max_bytes=TRAIN_MAX_BYTES),
        stdlib_documents("valid", max_bytes=VALID_MAX_BYTES),
    )


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, small_docs):
    """Manifest of a dataset prepared once per session. Treat it as read-only:
    tests that damage a directory copy it first."""
    train, valid = small_docs
    out = tmp_path_factory.mktemp("prepared")
    return prepare_data(str(out), train, valid, vocab_size=TEST_VOCAB, progress=False, source="test corpus")
