"""The embedded stdlib corpus and user text/JSON-lines inputs."""

from __future__ import annotations

import json
import sys
from pathlib import PurePosixPath

import pytest

from megatron_twist.data import (
    DEFAULT_TRAIN_MAX_BYTES,
    HELDOUT_MODULES,
    DataError,
    Document,
    stdlib_documents,
    text_documents,
)
from megatron_twist.data.corpus import EXCLUDED_DIRS

# ---------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_is_deterministic_nonempty_and_capped():
    first = stdlib_documents("train")
    second = stdlib_documents("train")
    assert first == second
    assert len(first) > 50
    names = [d.name for d in first]
    assert names == sorted(names)
    assert all(name.endswith(".py") for name in names)
    assert all(d.text.strip() for d in first)
    total = sum(d.nbytes for d in first)
    # The default cap is used and mostly filled (it is a real corpus, not a stub).
    assert DEFAULT_TRAIN_MAX_BYTES // 2 < total <= DEFAULT_TRAIN_MAX_BYTES


def test_train_and_valid_share_no_file_and_respect_exclusions():
    train = stdlib_documents("train", max_bytes=sys.maxsize)
    valid = stdlib_documents("valid", max_bytes=sys.maxsize)
    train_names = {d.name for d in train}
    valid_names = {d.name for d in valid}
    assert train_names and valid_names
    assert not train_names & valid_names
    for name in valid_names:
        assert PurePosixPath(name).parts[0] in HELDOUT_MODULES
    for name in train_names:
        parts = PurePosixPath(name).parts
        assert parts[0] not in HELDOUT_MODULES
        assert not set(parts[:-1]) & EXCLUDED_DIRS, name
        assert not parts[-1].startswith("_sysconfigdata"), name
    # Every held-out entry that exists in this Python contributes something.
    heldout_seen = {PurePosixPath(n).parts[0] for n in valid_names}
    assert {"json", "email", "http", "argparse.py"} <= heldout_seen


def test_default_valid_cap_keeps_every_heldout_file():
    assert stdlib_documents("valid") == stdlib_documents("valid", max_bytes=sys.maxsize)


def test_smaller_cap_gives_a_prefix():
    small = stdlib_documents("train", max_bytes=100_000)
    big = stdlib_documents("train", max_bytes=1_000_000)
    assert sum(d.nbytes for d in small) <= 100_000
    assert len(small) < len(big)
    assert big[: len(small)] == small


def test_stdlib_bad_arguments():
    with pytest.raises(DataError, match="unknown split"):
        stdlib_documents("test")
    with pytest.raises(DataError, match="positive"):
        stdlib_documents("train", max_bytes=0)
    # argparse.py (the first held-out file) is larger than 10 bytes.
    with pytest.raises(DataError, match="empty"):
        stdlib_documents("valid", max_bytes=10)


def test_selection_rules_on_a_synthetic_tree(tmp_path):
    files = {
        "a.py": "x = 1\n",
        "argparse.py": "def parse(): pass\n",
        "json/__init__.py": "import re\n",
        "pkg/mod.py": "class C:\n    pass\n",
        "pkg/empty.py": "   \n",
        "pkg/tests/test_mod.py": "assert True\n",
        "test/test_a.py": "assert True\n",
        "site-packages/third.py": "y = 2\n",
        "__pycache__/a.py": "z = 3\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "cfg = 1\n",
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    train = stdlib_documents("train", max_bytes=10_000, root=tmp_path)
    valid = stdlib_documents("valid", max_bytes=10_000, root=tmp_path)
    assert [d.name for d in train] == ["a.py", "pkg/mod.py"]
    assert [d.name for d in valid] == ["argparse.py", "json/__init__.py"]
    assert train[1].text == "class C:\n    pass\n"


# ---------------------------------------------------------------- user inputs


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_files_and_directories(tmp_path):
    a = _write(tmp_path / "one.txt", "first document\n")
    root = tmp_path / "corpus"
    _write(root / "b.md", "# title\n")
    _write(root / "sub" / "c.py", "def f():\n    return 1\n")
    _write(root / "skip.bin", "binary-ish")  # wrong suffix: not picked up from a directory
    _write(root / ".hidden" / "d.txt", "hidden")  # hidden dirs are skipped
    _write(root / "blank.txt", " \n\t\n")  # whitespace-only: skipped
    docs = list(text_documents([a, root]))
    assert [d.text for d in docs] == ["first document\n", "# title\n", "def f():\n    return 1\n"]
    assert docs[0].name == str(a)
    assert docs[2].name.endswith("c.py")
    # A single path (not a list) works too, and iteration is repeatable via a new call.
    assert [d.text for d in text_documents(str(a))] == ["first document\n"]


def test_jsonl_with_a_chosen_field(tmp_path):
    records = [{"content": "alpha", "id": 1}, {"content": "beta\n  gamma", "id": 2}, {"content": "  ", "id": 3}]
    path = _write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    docs = list(text_documents([path], json_field="content"))
    assert [d.text for d in docs] == ["alpha", "beta\n  gamma"]
    assert docs[1].name == f"{path}:2"
    # A directory picks up .jsonl files as JSON lines too.
    assert [d.text for d in text_documents(tmp_path, json_field="content")] == ["alpha", "beta\n  gamma"]


def test_jsonl_default_field_is_text_and_missing_field_is_explained(tmp_path):
    ok = _write(tmp_path / "ok.jsonl", json.dumps({"text": "hello"}) + "\n")
    assert [d.text for d in text_documents(ok)] == ["hello"]
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"no 'text' field.*--json-field"):
        list(text_documents(bad))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.jsonl", json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError) as info:
        list(text_documents(path))
    assert f"{path}:2" in str(info.value)


def test_missing_path_is_reported_at_call_time(tmp_path):
    good = _write(tmp_path / "good.txt", "text")
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(DataError) as info:
        text_documents([good, missing])  # no iteration needed
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message and "--input" in message
    assert isinstance(info.value, ValueError)


def test_empty_corpus_raises(tmp_path):
    blank = _write(tmp_path / "blank.txt", "\n   \n")
    with pytest.raises(DataError, match="empty"):
        list(text_documents(blank))
    with pytest.raises(DataError, match="no input paths"):
        text_documents([])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="holds no"):
        text_documents(empty_dir)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(text_documents(path))


def test_document_size_is_utf8_bytes():
    assert Document("x", "é").nbytes == 2


def test_paragraph_documents_cut_plain_text_at_blank_lines_only(tmp_path):
    from megatron_twist.data.corpus import paragraph_documents

    (tmp_path / "play.txt").write_text("A:\nHello.\n\nB:\nHi.\n  \n\n\nC:\nBye.\n")
    (tmp_path / "records.jsonl").write_text('{"text": "one\\n\\ntwo"}\n')
    docs = list(paragraph_documents(text_documents([tmp_path / "play.txt", tmp_path / "records.jsonl"])))
    assert [d.text for d in docs] == ["A:\nHello.\n", "B:\nHi.\n", "C:\nBye.\n", "one\n\ntwo"]
    assert docs[0].name.endswith("play.txt#0") and docs[3].name.endswith("records.jsonl:1")
