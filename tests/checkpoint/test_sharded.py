"""The sharded central model's checkpoints, in one process (shard count 1).

Multi-rank saving, resharding 2 -> 1 and a corrupt shard are covered by the DeepSpeed resume test
(tests/integrations/test_deepspeed_engine.py); these cover atomicity and refusals.
"""

from __future__ import annotations

import pytest
import torch

from megatron_twist.checkpoint import sharded as sharded_checkpoint
from megatron_twist.checkpoint.files import CheckpointError
from megatron_twist.checkpoint.models import read_central
from megatron_twist.checkpoint.sharded import load_sharded, save_sharded
from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.distributed.sharded_central import ShardedCentral
from megatron_twist.model.gpt import build_gpt_model

MODEL = ModelConfig(**MODEL_PRESETS["tiny"])
TWIST, TRAIN = TwistConfig(), TrainConfig()


def _central(seed: int) -> ShardedCentral:
    torch.manual_seed(seed)
    weights = dict(build_gpt_model(MODEL).named_parameters())
    moments = {m: {n: torch.randn(t.shape) for n, t in weights.items()} for m in ("exp_avg", "exp_avg_sq")}
    central = ShardedCentral.from_full(MODEL, weights, None, moments, device="cpu")
    central.step, central.round = 8, 2
    return central


def test_save_load_round_trip_and_consolidated_read(mcore, tmp_path):
    a = _central(0)
    save_sharded(a, str(tmp_path / "c"), TWIST, TRAIN)
    b = ShardedCentral(MODEL, a.shapes, None, device="cpu")
    load_sharded(b, str(tmp_path / "c"))
    assert (b.step, b.round) == (8, 2)
    meta, weights, moments = read_central(str(tmp_path / "c"))
    for n in a.shapes:
        assert torch.equal(b.gather(n), a.gather(n)) and torch.equal(weights[n], a.gather(n))
        assert torch.equal(moments["exp_avg"][n], a.gather(n, "exp_avg"))


def test_crash_during_save_leaves_previous_checkpoint(mcore, tmp_path, monkeypatch):
    save_sharded(_central(0), str(tmp_path / "c"), TWIST, TRAIN)

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(sharded_checkpoint, "write_tensor_file", crash)
    with pytest.raises(OSError, match="injected"):
        save_sharded(_central(1), str(tmp_path / "c"), TWIST, TRAIN)
    monkeypatch.undo()
    survivor = ShardedCentral(MODEL, _central(0).shapes, None, device="cpu")
    load_sharded(survivor, str(tmp_path / "c"))  # still the first save, complete and verified
    first = _central(0)
    assert all(torch.equal(survivor.gather(n), first.gather(n)) for n in first.shapes)
    save_sharded(_central(1), str(tmp_path / "c"), TWIST, TRAIN)  # the next save clears the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_mismatched_model_is_refused(mcore, tmp_path):
    save_sharded(_central(0), str(tmp_path / "c"), TWIST, TRAIN)
    other = ModelConfig(**dict(MODEL_PRESETS["tiny"], ffn_hidden_size=MODEL.ffn_hidden_size * 2))
    with pytest.raises(CheckpointError, match="different sizes"):
        load_sharded(ShardedCentral(other, {}, None, device="cpu"), str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sharded(ShardedCentral(MODEL, {}, None, device="cpu"), str(tmp_path / "missing"))
