"""Checkpoints: atomic writes, safe loads, corrupt and mismatched files refused."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_twist.checkpoint.files import CheckpointError, load_checkpoint, save_checkpoint


def _tensors(v=1.0):
    return {"model": {"a": torch.full((3, 2), v), "b": torch.arange(4.0)}}


def test_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), {"kind": "central", "step": 1}, _tensors(1.0))
    save_checkpoint(str(path), {"kind": "central", "step": 2}, _tensors(2.0))
    meta, tensors = load_checkpoint(str(path), kind="central")
    assert meta["step"] == 2 and torch.equal(tensors["model"]["a"], torch.full((3, 2), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary directories left behind"


def test_crash_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), {"kind": "central", "step": 1}, _tensors(1.0))
    import megatron_twist.checkpoint.files as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(str(path), {"kind": "central", "step": 2}, _tensors(2.0))
    meta, _ = load_checkpoint(str(path))
    assert meta["step"] == 1


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), {"kind": "central"}, _tensors())
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(str(path))


def test_wrong_kind_and_foreign_directory(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), {"kind": "extracted"}, _tensors())
    with pytest.raises(CheckpointError, match="needs a 'central' one"):
        load_checkpoint(str(path), kind="central")
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a megatron-twist checkpoint"):
        load_checkpoint(str(other))
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(str(tmp_path))


def test_pickle_payload_is_never_unpickled(tmp_path):
    """A torch.save pickle renamed .safetensors must fail as unreadable, not execute."""
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), {"kind": "central"}, _tensors())
    f = path / "model.safetensors"
    torch.save({"a": torch.zeros(1)}, f)
    meta = json.loads((path / "meta.json").read_text())
    import hashlib

    meta["files"]["model.safetensors"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(str(path))
