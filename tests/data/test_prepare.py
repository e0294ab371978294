"""Tokenizer training/wrapping and prepared-directory writing/reading."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_twist.data import (
    DataError,
    Document,
    SentencePieceTokenizer,
    check_tokenizer,
    load_manifest,
    load_tokenizer,
    prepare_data,
    train_sentencepiece,
)
from megatron_twist.data.tokenizer import EOS_ID, UNK_ID

CODE = (
    "class Stack:\n"
    '    """A stack.\n\n    With a docstring.\n    """\n\n'
    "    def push(self, item):\n"
    "        if item is None:\n"
    "            raise ValueError('no None')   \n"  # trailing spaces
    "\tself._items.append(item)  # tab-indented line\n"
    "\n\n"
    "        return {'π': 3.14159, 'ok': '✓'}\n"  # characters absent from training -> byte fallback
    "x  =  [1,2 ,  3]\r\n"
)


def _copy(manifest, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(manifest.data_dir, dst)
    return str(dst)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_code_with_indentation(prepared):
    tok = SentencePieceTokenizer(prepared.tokenizer_path)
    ids = tok.tokenize(CODE)
    assert tok.detokenize(ids) == CODE
    assert UNK_ID not in ids  # byte fallback: nothing is lost
    assert tok.eod not in ids  # eod only ever comes from prepare_data
    assert tok.detokenize(numpy.asarray(ids)) == CODE
    assert tok.tokenize("") == [] and tok.detokenize([]) == ""
    # Indentation is learned as pieces, not spelled out space by space.
    assert len(tok.tokenize("        return x\n")) < 10


def test_tokenizer_properties_and_pickling(prepared):
    tok = SentencePieceTokenizer(prepared.tokenizer_path)
    with open(prepared.tokenizer_path, "rb") as f:
        assert tok.model_sha256 == hashlib.sha256(f.read()).hexdigest()
    assert tok.vocab_size == prepared.vocab_size == 500
    assert tok.eod == tok.eos == EOS_ID
    with pytest.raises(NotImplementedError):
        tok.pad  # noqa: B018 - Megatron then pads with -1, which never collides
    assert len(tok.vocab) == tok.vocab_size and tok.inv_vocab[EOS_ID] == "</s>"
    assert tok.unique_identifiers["model_sha256"] == tok.model_sha256
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(CODE) == tok.tokenize(CODE) and clone.model_sha256 == tok.model_sha256


def test_tokenizer_training_is_deterministic(tmp_path, small_docs, prepared):
    train, _ = small_docs
    a = SentencePieceTokenizer(train_sentencepiece(train, str(tmp_path / "a"), 500))
    b = SentencePieceTokenizer(train_sentencepiece(train, str(tmp_path / "b"), 500))
    assert a.model_sha256 == b.model_sha256 == prepared.tokenizer_sha256
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temp files left


def test_tokenizer_training_errors(tmp_path):
    tiny = [Document("t", "def f():\n    pass\n")]
    with pytest.raises(DataError, match="vocab size"):
        train_sentencepiece(tiny, str(tmp_path / "big"), 5000)
    with pytest.raises(DataError, match="empty corpus"):
        train_sentencepiece([], str(tmp_path / "none"), 300)
    assert not list(tmp_path.iterdir())


def test_loading_something_that_is_not_a_model(tmp_path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(DataError) as info:
        SentencePieceTokenizer(str(junk))
    assert str(junk) in str(info.value) and "not a SentencePiece model" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))


# ---------------------------------------------------------------- prepare_data


def test_prepare_writes_megatron_indexed_datasets_with_exact_ids(prepared, small_docs):
    tok = SentencePieceTokenizer(prepared.tokenizer_path)
    for split, docs in zip(("train", "valid"), small_docs):
        dataset = IndexedDataset(prepared.prefix(split))
        assert dataset.index.dtype == numpy.uint16  # optimal for a 500-piece vocab
        assert len(dataset) == len(docs) == prepared.splits[split].documents
        assert dataset.document_indices.tolist() == list(range(len(docs) + 1))
        expected_tokens = 0
        for i, doc in enumerate(docs):
            expected = tok.tokenize(doc.text) + [tok.eod]
            assert dataset[i].tolist() == expected
            expected_tokens += len(expected)
        stats = prepared.splits[split]
        assert stats.tokens == expected_tokens
        assert stats.bytes == sum(d.nbytes for d in docs)
        with open(prepared.prefix(split) + ".bin", "rb") as f:
            assert stats.bin_sha256 == hashlib.sha256(f.read()).hexdigest()
        del dataset
    assert sorted(os.listdir(prepared.data_dir)) == [
        ".megatron-twist-output",  # the claim marker: only prepare-data may rewrite this directory
        "manifest.json",
        "tokenizer.model",
        "train.bin",
        "train.idx",
        "valid.bin",
        "valid.idx",
    ]  # atomic writes leave no temporary files behind


def test_manifest_round_trip_and_contents(prepared):
    loaded = load_manifest(prepared.data_dir)
    assert loaded == prepared
    with open(os.path.join(prepared.data_dir, "manifest.json")) as f:
        raw = json.load(f)
    assert raw["format_version"] == 1 and raw["vocab_size"] == 500 and raw["eod_id"] == EOS_ID
    assert raw["source"] == "test corpus" and raw["dtype"] == "uint16"
    assert load_tokenizer(prepared.data_dir).model_sha256 == prepared.tokenizer_sha256


def test_prepare_with_an_existing_tokenizer_and_progress(tmp_path, small_docs, prepared, capsys):
    train, valid = small_docs
    out = tmp_path / "reuse"
    manifest = prepare_data(
        str(out), iter(train), iter(valid), tokenizer_model=prepared.tokenizer_path, progress_every=5
    )
    assert manifest.tokenizer_sha256 == prepared.tokenizer_sha256
    assert manifest.splits == prepared.splits  # same tokenizer, same documents, same bytes
    err = capsys.readouterr().err
    assert "train: 5 documents" in err and "MB/s" in err and "done in" in err


def test_check_tokenizer_refuses_another_tokenizer(tmp_path, small_docs, prepared):
    train, _ = small_docs
    other_vocab = SentencePieceTokenizer(train_sentencepiece(train, str(tmp_path / "v450"), 450))
    with pytest.raises(DataError, match="sha256") as info:
        check_tokenizer(prepared, other_vocab)
    assert prepared.tokenizer_path in str(info.value)
    # Same size, different training text: still refused (ids mean different things).
    other_text = SentencePieceTokenizer(train_sentencepiece(train[::-1][:6], str(tmp_path / "v500"), 500))
    assert other_text.vocab_size == prepared.vocab_size
    with pytest.raises(DataError):
        check_tokenizer(prepared, other_text)
    check_tokenizer(prepared, SentencePieceTokenizer(prepared.tokenizer_path))  # the right one passes


def test_prepare_argument_errors(tmp_path, small_docs, prepared):
    train, valid = small_docs
    with pytest.raises(DataError, match="exactly one"):
        prepare_data(str(tmp_path / "a"), train, valid)
    with pytest.raises(DataError, match="exactly one"):
        prepare_data(str(tmp_path / "b"), train, valid, vocab_size=500, tokenizer_model=prepared.tokenizer_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.model"):
        prepare_data(str(tmp_path / "c"), train, valid, tokenizer_model=str(junk))


def test_failed_prepare_leaves_no_manifest(tmp_path, small_docs, prepared):
    train, _ = small_docs
    data_dir = _copy(prepared, tmp_path)
    load_manifest(data_dir)  # valid before
    with pytest.raises(DataError, match="valid split has no documents"):
        prepare_data(data_dir, train, [], tokenizer_model=prepared.tokenizer_path, progress=False)
    # The old manifest was withdrawn first, so the half-rewritten directory is refused.
    with pytest.raises(DataError, match="prepare-data"):
        load_manifest(data_dir)
    assert not [n for n in os.listdir(data_dir) if n.startswith(".") and n != ".megatron-twist-output"]


def test_load_manifest_errors_name_the_fix(tmp_path, prepared):
    missing = tmp_path / "never-prepared"
    with pytest.raises(DataError, match=f"twist prepare-data --output {missing}"):
        load_manifest(str(missing))

    data_dir = _copy(prepared, tmp_path)
    os.unlink(os.path.join(data_dir, "valid.idx"))
    with pytest.raises(DataError, match="valid.idx"):
        load_manifest(data_dir)

    shutil.rmtree(data_dir)
    data_dir = _copy(prepared, tmp_path)
    with open(os.path.join(data_dir, "train.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="inconsistent"):
        load_manifest(data_dir)

    manifest_path = os.path.join(data_dir, "manifest.json")
    with open(manifest_path, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="malformed"):
        load_manifest(data_dir)
    raw = prepared.to_dict()
    del raw["vocab_size"]
    with open(manifest_path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(DataError, match="vocab_size"):
        load_manifest(data_dir)
    raw = dict(prepared.to_dict(), format_version=99)
    with open(manifest_path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(DataError, match="format_version 99"):
        load_manifest(data_dir)


def test_hf_tokenizer_directory_that_is_not_one_is_refused(tmp_path, small_docs):
    (tmp_path / "not-a-tokenizer").mkdir()
    train, valid = small_docs
    with pytest.raises(DataError, match="is not a HuggingFace tokenizer directory"):
        prepare_data(
            str(tmp_path / "out"), train, valid, hf_tokenizer=str(tmp_path / "not-a-tokenizer"), progress=False
        )
    with pytest.raises(DataError, match="exactly one of"):
        prepare_data(str(tmp_path / "out"), train, valid, vocab_size=300, hf_tokenizer=str(tmp_path), progress=False)
