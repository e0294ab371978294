"""Checkpoints and HuggingFace directories from outside are never unpickled (issue #8, item 5).

Two kinds of check: the package's source is scanned for ways to unpickle (every `torch.load` must
say `weights_only=True`; no `pickle.load(s)`; a `pickle.Unpickler` subclass only with a restricting
`find_class`), and hostile files whose unpickling would create a marker file are put where the
loaders look: the marker must never appear.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_twist.checkpoint.files import CheckpointError, load_checkpoint
from megatron_twist.checkpoint.models import read_central

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_twist"


class _Payload:
    """Unpickling this creates (opens for writing) the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(marker: Path) -> bytes:
    return pickle.dumps({"weight": _Payload(marker)})


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _offenders(source: str, where: str) -> list:
    out = []
    for node in ast.walk(ast.parse(source)):
        at = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name == "torch.load" or name.endswith(".torch.load"):
                if not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                ):
                    out.append(f"{at}: {name} without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load"):
                out.append(f"{at}: {name}")
            if name in ("numpy.load", "np.load") and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                out.append(f"{at}: {name} with allow_pickle")
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(b, ast.Attribute) and b.attr == "Unpickler")
            or (isinstance(b, ast.Name) and b.id == "Unpickler")
            for b in node.bases
        ):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                out.append(f"{at}: Unpickler subclass {node.name} without a restricting find_class")
        if (
            isinstance(node, ast.ImportFrom)
            and node.module in ("pickle", "dill")
            and any(a.name in ("load", "loads", "Unpickler") for a in node.names)
        ):
            out.append(f"{at}: from {node.module} import ...")
    return out


def test_package_source_never_unpickles_unrestricted():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        offenders += _offenders(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert offenders == []


def test_the_scan_catches_what_it_forbids():
    bad = (
        "import torch, pickle\nfrom pickle import loads\ntorch.load('x')\n"
        "torch.load('x', weights_only=False)\npickle.loads(b'')\nclass U(pickle.Unpickler):\n    pass\n"
    )
    assert len(_offenders(bad, "bad.py")) == 5
    assert _offenders("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n", "ok.py") == []


def test_the_payload_is_live(tmp_path):
    """The hostile files below really would run code if unpickled."""
    pickle.loads(_hostile(tmp_path / "fired"))
    assert (tmp_path / "fired").exists()


def test_hostile_pickle_files_in_a_checkpoint_are_never_executed(tmp_path, reference):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference / "iter_0000008", ckpt)
    # 1. Pickle files lying next to the safetensors ones are not read at all.
    for name in ("pytorch_model.bin", "model.pt", "optimizer.bin"):
        (ckpt / name).write_bytes(_hostile(marker))
    meta, weights, _ = read_central(str(ckpt))
    assert meta["step"] == 8 and weights and not marker.exists()
    # 2. meta.json naming a pickle file, with its correct checksum: refused as not safetensors, not run.
    evil = _hostile(marker)
    (ckpt / "model.bin").write_bytes(evil)
    meta["files"] = {"model.bin": hashlib.sha256(evil).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(str(ckpt))
    # 3. torch's own zip format with a hostile object inside, under a .safetensors name.
    buf = io.BytesIO()
    torch.save({"w": _Payload(marker)}, buf)
    (ckpt / "model.safetensors").write_bytes(buf.getvalue())
    meta["files"] = {"model.safetensors": hashlib.sha256(buf.getvalue()).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(str(ckpt))
    assert not marker.exists()


def test_hostile_huggingface_directory_is_never_executed(tmp_path):
    from transformers import LlamaConfig

    from megatron_twist.hf.io import read_hf_weights

    marker = tmp_path / "PWNED"
    hf = tmp_path / "hf"
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    ).save_pretrained(str(hf))
    (hf / "pytorch_model.bin").write_bytes(_hostile(marker))
    with pytest.raises(CheckpointError, match="pickle files, which are never loaded"):
        read_hf_weights(str(hf))
    assert not marker.exists()


def test_hostile_torch_dist_checkpoint_is_never_executed(mcore, tmp_path):
    """torch.distributed.checkpoint itself reads `.metadata` with pickle.load and byte items with
    torch.load(weights_only=False): megatron-twist vets both before Megatron touches the directory."""
    from megatron_twist.checkpoint.torch_dist import read_common, save_central_dist
    from megatron_twist.checkpoint.vetting import MetadataUnpickler
    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.training.twist_trainer import build_central

    model = ModelConfig(**MODEL_PRESETS["tiny"])
    good = tmp_path / "good"
    save_central_dist(good, build_central(model, 1), TwistConfig(), TrainConfig())
    assert read_common(good)["kind"] == "central"
    marker = tmp_path / "PWNED"

    def variant(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    # common.pt holding an object (read with weights_only=True)
    d = variant("common")
    buf = io.BytesIO()
    torch.save({"twist": _Payload(marker)}, buf)
    (d / "common.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="common.pt cannot be read"):
        read_common(d)
    # .metadata replaced by a hostile pickle (torch would pickle.load it)
    d = variant("metadata")
    (d / ".metadata").write_bytes(_hostile(marker))
    with pytest.raises(CheckpointError, match=r"\.metadata cannot be read safely"):
        read_common(d)
    # a legitimate .metadata whose byte item (Megatron's _extra_state) points at a hostile object
    d = variant("byte-item")
    with open(d / ".metadata", "rb") as f:
        metadata = MetadataUnpickler(f).load()
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    idx = next(
        i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    (d / "__evil.distcp").write_bytes(buf.getvalue())
    info = metadata.storage_data[idx]
    info.relative_path, info.offset, info.length = "__evil.distcp", 0, len(buf.getvalue())
    (d / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="is not plain data"):
        read_common(d)
    assert not marker.exists()
