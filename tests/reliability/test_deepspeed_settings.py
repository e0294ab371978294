"""A ds_config's settings on `twist train --deepspeed` are honoured or refused, never ignored (issue #13).

* Refused before any work (exit code 2, a message naming the fix, nothing written): fp16,
  ZeRO-Offload (offload_optimizer / offload_param, and DeepSpeed's deprecated cpu_offload), an
  optimizer TwIST cannot read Adam moments from, an optimizer param it would not honour, a
  "scheduler" block (TwIST's schedule sets the LR every step), and command-line flags that
  contradict the config (--lr, --clip-grad, --micro-batch-size). In this process, with
  init_distributed forbidden: a refusal that came after a process group would fail the test.
* Honoured, with 2 real torchrun ranks (ZeRO-2): gradient_accumulation_steps 2 with micro-batch 1
  equals micro-batch 2 without accumulation (the same samples: the accumulation done by hand) to
  1e-6, losses and central model; a round is --local-steps OPTIMIZER steps (the engine's global
  steps, the central model's step); an AdamW optimizer block's betas, eps, weight decay and peak lr
  reach the torch AdamW.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_twist.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[2]
JOB = ["train", "--model-preset", "tiny", "--mock-data", "--train-iters", "8"]
ADAMW = {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.02}}


def _config(tmp_path: Path, name: str, **changes) -> Path:
    config = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    for key, value in changes.items():
        if key == "zero":
            config["zero_optimization"].update(value)
        else:
            config[key] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


REFUSED = {
    "fp16": ({"fp16": {"enabled": True}}, [], ['"fp16" is enabled', '"bf16": {"enabled": true}']),
    "offload_optimizer": (
        {"zero": {"offload_optimizer": {"device": "cpu"}}},
        [],
        ["ZeRO-Offload (offload_optimizer", "remove offload_optimizer"],
    ),
    "offload_param": (
        {"zero": {"stage": 3, "offload_param": {"device": "cpu"}}},
        [],
        ["ZeRO-Offload (offload_param", "remove offload_param"],
    ),
    "cpu_offload": ({"zero": {"cpu_offload": True}}, [], ["ZeRO-Offload (cpu_offload", "remove cpu_offload"]),
    "lamb": (
        {"optimizer": {"type": "Lamb", "params": {"lr": 0.001}}},
        [],
        ['optimizer "Lamb"', "is not supported with TwIST", '"type": "AdamW"'],
    ),
    "adam_l2": (
        {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}},
        [],
        ['"adam_w_mode": false', "remove it"],
    ),
    "unknown_param": (
        {"optimizer": {"type": "AdamW", "params": {"lr": 0.001, "momentum": 0.9}}},
        [],
        ["optimizer param 'momentum'", "lr, betas, eps, weight_decay; remove it"],
    ),
    "scheduler": (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}},
        [],
        ['"scheduler" block', "--lr, --min-lr, --lr-warmup-iters"],
    ),
    "lr_conflict": ({"optimizer": ADAMW}, ["--lr", "0.005"], ["--lr 0.005 conflicts with", "set it in one place"]),
    "clip_conflict": ({}, ["--clip-grad", "0.5"], ["--clip-grad 0.5 conflicts with gradient_clipping = 1.0"]),
    "micro_batch_conflict": (
        {},
        ["--micro-batch-size", "4"],
        ["--micro-batch-size 4 conflicts with train_micro_batch_size_per_gpu 2", "set them equal"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_settings_are_refused_before_any_work(case, tmp_path, in_process_cli, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # launcher discovery writes RANK/WORLD_SIZE
    changes, flags, expected = REFUSED[case]
    config = _config(tmp_path, case, **changes)
    before = config.read_bytes()
    rc, out, err = in_process_cli(
        [
            *JOB,
            "--deepspeed",
            "--deepspeed_config",
            config,
            *flags,
            "--save",
            tmp_path / "save",
            "--metrics-file",
            tmp_path / "m.json",
        ]
    )
    assert rc == 2, err
    assert err.startswith("twist train: error: "), err
    for text in expected:
        assert text in err, err
    assert str(config) in err, "the message names the config file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name] and config.read_bytes() == before


def test_adamw_block_is_mapped_and_templates_pass():
    from megatron_twist.integrations.ds_engine_settings import engine_settings

    train = engine_settings({"optimizer": ADAMW, "gradient_clipping": 0.3}, TrainConfig(), set())
    assert (train.lr, train.adam_beta1, train.adam_beta2, train.adam_eps, train.weight_decay, train.clip_grad) == (
        0.002,
        0.8,
        0.9,
        1e-7,
        0.02,
        0.3,
    )
    # the same value typed on the command line is no conflict; DeepSpeed's "Adam" is AdamW by default
    assert (
        engine_settings({"optimizer": {"type": "adam", "params": {"lr": 0.002}}}, TrainConfig(lr=0.002), {"lr"}).lr
        == 0.002
    )
    assert engine_settings({}, TrainConfig(), set()).clip_grad == 0.0  # DeepSpeed's default: no clipping
    assert engine_settings({"zero_optimization": {"offload_optimizer": {"device": "none"}}}, TrainConfig(), set())
    for template in sorted((REPO / "ds_configs").glob("*.json")):
        engine_settings(template, TrainConfig(), set())  # every template is honoured as it is
    with pytest.raises(ConfigError, match="betas"):
        engine_settings({"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}}, TrainConfig(), set())


@pytest.mark.multiprocess
def test_gradient_accumulation_equals_the_same_batches_by_hand(tmp_path, run_torchrun):
    from megatron_twist.checkpoint.models import read_central

    runs = {}
    for name, micro, accumulation in (("accumulated", 1, 2), ("by_hand", 2, 1)):
        config = _config(
            tmp_path,
            name,
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=accumulation,
            optimizer=ADAMW,
        )
        run_torchrun(
            2,
            [
                "-m",
                "megatron_twist",
                *JOB,
                "--deepspeed",
                "--deepspeed_config",
                config,
                "--save",
                tmp_path / name,
                "--metrics-file",
                tmp_path / f"{name}-metrics.json",
            ],
            timeout=300,
        )
        runs[name] = json.loads((tmp_path / f"{name}-metrics.json").read_text())
    acc, ref = runs["accumulated"], runs["by_hand"]
    assert acc["gradient_accumulation_steps"] == 2 and ref["gradient_accumulation_steps"] == 1
    # 8 optimizer steps in 2 rounds of 4, whatever the accumulation
    assert acc["engine_global_steps"] == ref["engine_global_steps"] == 8
    assert acc["train"]["micro_batch_size"] == 1 and ref["train"]["micro_batch_size"] == 2
    for a, b in zip(acc["losses_per_rank"], ref["losses_per_rank"]):
        assert len(a) == len(b) == 8
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    meta_a, weights_a, moments_a = read_central(str(tmp_path / "accumulated" / "central"))
    _, weights_b, moments_b = read_central(str(tmp_path / "by_hand" / "central"))
    assert meta_a["step"] == 8 and meta_a["round"] == 2
    for k in weights_b:
        torch.testing.assert_close(weights_a[k], weights_b[k], atol=1e-6, rtol=0, msg=k)
        torch.testing.assert_close(moments_a["exp_avg"][k], moments_b["exp_avg"][k], atol=1e-6, rtol=0, msg=k)
    # the optimizer block reached the torch AdamW (the peak lr is the schedule's)
    assert acc["optimizer"] == {"betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.02}
    assert acc["train"]["lr"] == 0.002 and acc["train"]["adam_eps"] == 1e-7
