"""A prepared dataset whose vocabulary (512) is the tiny presets', so a model trained on it exports
with its real sentencepiece tokenizer."""

from __future__ import annotations

import pytest

from megatron_twist.data import prepare_data, stdlib_documents


@pytest.fixture(scope="session")
def prepared512(tmp_path_factory):
    train = stdlib_documents("train", max_bytes=100_000)
    valid = stdlib_documents("valid", max_bytes=150_000)
    out = tmp_path_factory.mktemp("prepared512")
    return prepare_data(str(out), train, valid, vocab_size=512, progress=False, source="hf tests")
