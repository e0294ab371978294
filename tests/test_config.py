"""Bad input is refused with a clear error naming the fix, before any work starts."""

from __future__ import annotations

import time

import pytest

from megatron_twist.config import MODEL_PRESETS, ConfigError, ModelConfig, TwistConfig


@pytest.mark.parametrize("kappa", [0.0, -0.5, 1.5])
def test_keep_ratio_outside_unit_interval(kappa):
    with pytest.raises(ConfigError, match=r"--keep-ratio must lie in \(0, 1\]"):
        TwistConfig(keep_ratio=kappa, num_subnets=8)


def test_keep_ratio_times_heads_not_whole():
    model = ModelConfig(**MODEL_PRESETS["small"])  # 8 heads in 4 KV groups: 2 heads per group
    with pytest.raises(ConfigError, match="not a whole, positive number of heads.*multiple of 1/2"):
        TwistConfig(keep_ratio=0.25, num_subnets=4).check_against_model(model)


def test_keep_ratio_times_neurons_not_whole():
    model = ModelConfig(
        family="gpt2",
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=30,
        vocab_size=64,
        seq_length=8,
    )
    with pytest.raises(ConfigError, match="MLP neurons"):
        TwistConfig(keep_ratio=0.25, num_subnets=4, split="mlp").check_against_model(model)


def test_heads_not_divisible_over_tensor_parallel():
    model = ModelConfig(
        family="llama",
        num_layers=1,
        hidden_size=96,
        num_attention_heads=6,
        num_query_groups=3,
        ffn_hidden_size=64,
        vocab_size=64,
        seq_length=8,
    )
    with pytest.raises(ConfigError, match="does not divide over tensor parallel size 2"):
        TwistConfig(keep_ratio=0.5, num_subnets=2).check_against_model(model, tensor_parallel_size=2)


def test_fewer_than_one_head_per_tp_shard_is_refused():
    model = ModelConfig(
        family="gpt2",
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=64,
        vocab_size=64,
        seq_length=8,
    )
    with pytest.raises(ConfigError, match="heads per tensor-parallel shard"):
        TwistConfig(keep_ratio=0.25, num_subnets=4).check_against_model(model, tensor_parallel_size=4)


def test_subnets_times_kappa_below_one_with_coverage():
    with pytest.raises(ConfigError, match="raise --num-subnets to at least 4 or pass --no-coverage"):
        TwistConfig(keep_ratio=0.25, num_subnets=3)
    TwistConfig(keep_ratio=0.25, num_subnets=3, coverage=False)  # allowed without coverage


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("local_steps", 0, "--local-steps must be at least 1"),
        ("num_subnets", 0, "--num-subnets must be at least 1"),
        ("split", "rows", "--twist-split"),
        ("correction", "magic", "--activation-correction"),
        ("lr_scale", 0, "--twist-lr-scale must be a positive number or one of"),
        ("lr_scale", "cube", "--twist-lr-scale must be a positive number or one of"),
        ("lr_scale", float("nan"), "--twist-lr-scale"),
    ],
)
def test_other_twist_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TwistConfig(**{field: value})


def test_lr_scale_default_rule_and_old_checkpoints():
    # sqrt(num_subnets) unless given; stored resolved, so a checkpoint's config names the number it ran at
    assert TwistConfig(num_subnets=2).lr_scale == pytest.approx(1.4142135623730951)
    assert TwistConfig(num_subnets=4, keep_ratio=0.25).lr_scale == 2.0
    assert TwistConfig(num_subnets=1, keep_ratio=1.0).lr_scale == 1.0  # one subnet: plain training's lr
    assert TwistConfig(num_subnets=4, keep_ratio=0.25, lr_scale=1.5).lr_scale == 1.5
    assert TwistConfig.from_dict(TwistConfig(num_subnets=4, keep_ratio=0.25).to_dict()).lr_scale == 2.0
    # written before the flag existed: resumed as it was trained, at --lr itself
    old = {k: v for k, v in TwistConfig(num_subnets=4, keep_ratio=0.25).to_dict().items() if k != "lr_scale"}
    assert TwistConfig.from_dict(old).lr_scale == 1.0


def test_lr_scale_flag():
    import argparse

    from megatron_twist.arguments import add_twist_args, validate_twist_args

    parser = add_twist_args(argparse.ArgumentParser())
    assert validate_twist_args(parser.parse_args(["--num-subnets", "4", "--keep-ratio", "0.25"])).lr_scale == 2.0
    assert validate_twist_args(parser.parse_args(["--twist-lr-scale", "1"])).lr_scale == 1.0
    assert validate_twist_args(parser.parse_args(["--num-subnets", "3", "--twist-lr-scale", "sqrt"])).lr_scale == (
        pytest.approx(3**0.5)
    )
    with pytest.raises(ConfigError, match="got 'fast'"):
        validate_twist_args(parser.parse_args(["--twist-lr-scale", "fast"]))


def test_model_shape_errors():
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        ModelConfig(hidden_size=100, num_attention_heads=8)
    with pytest.raises(ConfigError, match="not a multiple of num_query_groups"):
        ModelConfig(num_attention_heads=8, num_query_groups=3)


def test_whole_layer_index_out_of_range():
    with pytest.raises(ConfigError, match="outside a 4-layer model"):
        TwistConfig(whole_layers=(4,)).whole_layer_set(4)


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--data-path", "/nonexistent/twist-data"], "run `twist prepare-data --output"),
        (["train"], "no data: pass --data-path"),
        (["train", "--mock-data", "--keep-ratio", "1.5"], "--keep-ratio must lie in"),
        (
            ["train", "--mock-data", "--model-preset", "small", "--keep-ratio", "0.25", "--num-subnets", "4"],
            "not a whole, positive number of heads",
        ),
        (
            ["train", "--mock-data", "--model-preset", "tiny", "--num-subnets", "2", "--keep-ratio", "0.25"],
            "coverage needs",
        ),
        (["eval", "--load", "/nonexistent/ckpt", "--mock-data"], "does not exist"),
    ],
)
def test_cli_refuses_bad_input_before_any_work(run_twist, args, match):
    t0 = time.perf_counter()
    proc = run_twist(args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr
    assert "[twist] round" not in proc.stdout, "no training may start"
    assert time.perf_counter() - t0 < 60
