"""Allow-lists cannot be walked around with dotted names (issue #13, item 2).

A protocol-4 pickle names a global as (module, name) with STACK_GLOBAL, and pickle's own
``find_class`` walks a dotted ``name`` attribute by attribute: (an allowed module, "os.system")
reaches ``os.system`` through the module's own ``import os``. An allow-list that admits a whole
module, or checks only the module, is therefore no allow-list. Each payload here is a dotted path
through every module an allow-list names, to ``os.system``, ``builtins.exec`` and
``subprocess.getoutput``, each of which would create a marker file; the paths are found in the
running process (so they are real), each is shown to fire under plain ``pickle.loads``, and then
each is put where a loader vets: the marker never appears and no file of the checkpoint changes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import pickle
import shutil
import subprocess
import types
import zipfile
from pathlib import Path
from typing import Optional

import pytest
import torch

from megatron_twist.checkpoint.files import CheckpointError

# What each payload calls, and the argument that makes it create the marker file {m}.
TARGETS = {
    "os.system": ("system", lambda m: f"touch '{m}'"),
    "builtins.exec": ("exec", lambda m: f"open({str(m)!r}, 'w').close()"),
    "subprocess.getoutput": ("getoutput", lambda m: f"touch '{m}'"),
}
_TARGET_OBJECTS = {
    "os.system": __import__("os").system,
    "builtins.exec": exec,
    "subprocess.getoutput": subprocess.getoutput,
}


def _ustr(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 256
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def stack_global_call(module: str, dotted: str, arg: str) -> bytes:
    """Protocol 4: push module and dotted name, STACK_GLOBAL, call it with (arg,), STOP."""
    return b"\x80\x04" + _ustr(module) + _ustr(dotted) + b"\x93" + _ustr(arg) + b"\x85" + b"R" + b"."


def global_call(module: str, dotted: str, arg: str) -> bytes:
    """The GLOBAL opcode ("module\\nname\\n"), for unpicklers without STACK_GLOBAL (torch's weights_only);
    under protocol 4 pickle walks its dotted name too."""
    return b"\x80\x04c" + f"{module}\n{dotted}\n".encode() + _ustr(arg) + b"\x85" + b"R" + b"."


# Ways a module commonly reaches each target through its own imports, tried first (fast); a short
# breadth-first search over module attributes is the fallback.
_CANDIDATE_PREFIXES = ("", "torch.", "dataclasses.", "io.", "_dynamo.convert_frame.", "torch._dynamo.convert_frame.")
_TARGET_TAILS = {
    "os.system": ("os.system",),
    "builtins.exec": ("builtins.exec",),
    "subprocess.getoutput": ("subprocess.getoutput",),
}


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@functools.lru_cache(maxsize=None)
def dotted_path(module: str, target: str) -> Optional[str]:
    """A dotted attribute path from ``module`` to ``target`` that exists in this process, e.g.
    'os.system' or 'torch.builtins.exec'; None if none is found."""
    import torch._dynamo.convert_frame  # noqa: F401 - makes a path to `subprocess` exist from torch

    want = _TARGET_OBJECTS[target]
    for prefix in _CANDIDATE_PREFIXES:
        for tail in _TARGET_TAILS[target]:
            try:
                if _resolve(module, prefix + tail) is want:
                    return prefix + tail
            except AttributeError:
                pass
    frontier, seen = [("", importlib.import_module(module))], set()
    for _ in range(3):
        nxt = []
        for path, obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for a in dir(obj):
                try:
                    v = getattr(obj, a)
                except Exception:  # noqa: BLE001 - lazy attributes that fail on access
                    continue
                p = f"{path}.{a}" if path else a
                if v is want:
                    return p
                if isinstance(v, types.ModuleType):
                    nxt.append((p, v))
        frontier = nxt
    return None  # this module does not reach the target through attributes


def payloads(modules, marker: Path, opcode=stack_global_call):
    """(module, target, bytes) for every module x target that the module reaches; every target must
    be reached from at least one of ``modules`` (or the test would prove nothing about it)."""
    out = [
        (module, target, opcode(module, dotted_path(module, target), arg(marker)))
        for module in sorted(modules)
        for target, (_, arg) in TARGETS.items()
        if dotted_path(module, target)
    ]
    assert {t for _, t, _ in out} == set(TARGETS), f"some target is unreachable from {sorted(modules)}"
    return out


def file_hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def test_every_dotted_payload_is_live(tmp_path):
    """Control: under plain pickle each payload below really runs (so refusing it means something)."""
    from megatron_twist.checkpoint.vetting import METADATA_GLOBALS, allowed_globals

    modules = {m for m, _ in METADATA_GLOBALS} | {cls.__module__ for cls in allowed_globals()} | {"torch._utils"}
    for opcode in (stack_global_call, global_call):
        for module in sorted(modules):
            for target in TARGETS:
                if dotted_path(module, target) is None:
                    continue
                marker = tmp_path / f"fired-{opcode.__name__}-{module}-{target}"
                pickle.loads(opcode(module, dotted_path(module, target), TARGETS[target][1](marker)))
                assert marker.exists(), f"{module} -> {target} did not fire under plain pickle"


@pytest.fixture(scope="module")
def torch_dist_checkpoint(mcore, tmp_path_factory):
    """A real torch_dist central checkpoint (tiny llama) in the session's single-rank group."""
    from megatron_twist.checkpoint.torch_dist import save_central_dist
    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.training.twist_trainer import build_central

    out = tmp_path_factory.mktemp("torch_dist") / "central"
    save_central_dist(out, build_central(ModelConfig(**MODEL_PRESETS["tiny"]), 1), TwistConfig(), TrainConfig())
    return out


def test_metadata_allow_list_refuses_dotted_names(tmp_path, torch_dist_checkpoint):
    from megatron_twist.checkpoint.torch_dist import read_common
    from megatron_twist.checkpoint.vetting import METADATA_GLOBALS

    assert all("." not in name for _, name in METADATA_GLOBALS), "exact names only"
    marker = tmp_path / "PWNED"
    modules = {m for m, _ in METADATA_GLOBALS}
    assert {"torch.distributed.checkpoint.metadata", "torch"} <= modules
    cases = payloads(modules, marker) + payloads(modules, marker, opcode=global_call)
    assert len(cases) == 2 * 3 * len(modules), "every allowed module reaches every target"
    for module, target, data in cases:
        d = tmp_path / "ckpt"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(torch_dist_checkpoint, d)
        (d / ".metadata").write_bytes(data)
        before = file_hashes(d)
        with pytest.raises(CheckpointError, match=r"\.metadata cannot be read safely.*not allowed"):
            read_common(d)
        assert not marker.exists(), f"{module} -> {target} ran during vetting"
        assert file_hashes(d) == before
    # The legitimate checkpoint still reads.
    assert read_common(torch_dist_checkpoint)["kind"] == "central"


def _torch_file_with_pickle(data: bytes) -> bytes:
    """A torch.save zip archive whose data.pkl is ``data`` (what torch.load unpickles first)."""
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def test_weights_only_allow_lists_refuse_dotted_names(tmp_path, torch_dist_checkpoint):
    """torch's weights_only unpickler, with the DeepSpeed allow-list (ds_checkpoint_vetting) and with
    torch's default list (torch_dist common.pt), looks a global up by its full dotted string in a
    dict of allowed objects: a dotted path through an allowed module matches nothing."""
    from megatron_twist.checkpoint.torch_dist import read_common
    from megatron_twist.checkpoint.vetting import allowed_globals, vet_deepspeed_checkpoint

    marker = tmp_path / "PWNED"
    ds_modules = {cls.__module__ for cls in allowed_globals()}
    assert len(ds_modules) == 3
    engine = tmp_path / "engine"
    (engine / "tag").mkdir(parents=True)
    (engine / "latest").write_text("tag")
    for opcode in (stack_global_call, global_call):
        for module, target, data in payloads(ds_modules | {"torch"}, marker, opcode):
            (engine / "tag" / "mp_rank_00_model_states.pt").write_bytes(_torch_file_with_pickle(data))
            with pytest.raises(CheckpointError, match="is not plain checkpoint data"):
                vet_deepspeed_checkpoint(engine)
            assert not marker.exists(), f"{module} -> {target} ran during DeepSpeed vetting"
        for module, target, data in payloads({"torch", "torch._utils"}, marker, opcode):
            d = tmp_path / "ckpt"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(torch_dist_checkpoint, d)
            (d / "common.pt").write_bytes(_torch_file_with_pickle(data))
            with pytest.raises(CheckpointError, match="common.pt cannot be read"):
                read_common(d)
            assert not marker.exists(), f"{module} -> {target} ran reading common.pt"
