"""A path means the checkpoint a user expects, whatever layout this project wrote (issue #14):
a checkpoint, a save directory's latest, a DeepSpeed save directory's central model."""

from __future__ import annotations

import pytest
import torch

from megatron_twist.checkpoint import detect
from megatron_twist.checkpoint import series as checkpoint_series
from megatron_twist.checkpoint.files import save_checkpoint
from megatron_twist.errors import CheckpointError


def _central(path, step):
    save_checkpoint(str(path), {"kind": "central", "step": step}, {"model": {"w": torch.full((2,), float(step))}})
    return path


def test_locate_every_layout(tmp_path):
    plain = _central(tmp_path / "plain", 1)
    assert detect.locate(plain) == plain
    save = tmp_path / "save"
    for step in (2, 4):
        checkpoint_series.save_iteration(save, step, lambda p, s=step: _central(p, s))
    assert detect.locate(save) == save / "iter_0000004"  # the pointer's checkpoint
    ds = tmp_path / "ds"
    (ds / "engine").mkdir(parents=True)
    _central(ds / "central", 6)
    assert detect.locate(ds) == ds / "central"
    assert detect.holds_checkpoint(ds) and detect.holds_checkpoint(plain) and not detect.holds_checkpoint(save)


def test_a_path_holding_no_checkpoint_is_refused_naming_what_to_pass(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(
        CheckpointError,
        match=r"mine/meta.json is missing: .* \(it holds \['notes.txt'\]\); pass the "
        r"directory `twist train --save`",
    ):
        detect.locate(tmp_path / "mine")
    with pytest.raises(CheckpointError, match="does not exist"):
        detect.locate(tmp_path / "missing")


def test_model_readers_follow_the_layouts(mcore, tmp_path):
    """`twist extract --load DIR` after `twist train --deepspeed --save DIR` reads DIR/central."""
    from megatron_twist.checkpoint.models import read_central, save_central
    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.training.twist_trainer import build_central

    central = build_central(ModelConfig(**MODEL_PRESETS["tiny"]), 3)
    central.step = 9
    (tmp_path / "ds" / "engine").mkdir(parents=True)
    save_central(str(tmp_path / "ds" / "central"), central, TwistConfig(), TrainConfig())
    meta, weights, _ = read_central(str(tmp_path / "ds"))
    assert meta["step"] == 9 and torch.equal(
        weights["embedding.word_embeddings.weight"], central.params["embedding.word_embeddings.weight"]
    )
    assert detect.read_central_meta(tmp_path / "ds")[0]["step"] == 9
