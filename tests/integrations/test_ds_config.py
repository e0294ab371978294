"""The "twist" section of a DeepSpeed config, the CLI-conflict rule, batch sizes, and the ds_configs/ templates.

Templates are checked three ways: they parse, their "twist" section gives a
valid TwistConfig (that also fits the model the template is for), and the rest
is accepted by DeepSpeed's own ``DeepSpeedConfig``. No process group is needed:
without DeepSpeed's communication backend ``DeepSpeedConfig`` takes a world of
one rank; where a larger data-parallel world is wanted, DeepSpeed is given an
``mpu`` whose data-parallel size is the subnet group's and its rank query is
stood in for (``monkeypatch``), so its real batch arithmetic runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from megatron_twist.arguments import add_training_args, add_twist_args, explicit_dests
from megatron_twist.config import MODEL_PRESETS, ConfigError, ModelConfig, TwistConfig
from megatron_twist.integrations.ds_config import (
    ALLOWED_KEYS,
    check_batch_consistency,
    resolve_deepspeed,
    strip_twist_section,
    twist_config_from_ds,
    twist_section,
)

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO / "ds_configs"
EXPECTED_TEMPLATES = {
    "zero1_bf16.json",
    "zero2_bf16.json",
    "zero3_bf16.json",
    "cpu_zero0.json",
    "cpu_zero1.json",
    "cpu_zero2.json",
    "cpu_zero3.json",
}

FULL_SECTION = {
    "keep_ratio": 0.5,
    "num_subnets": 4,
    "local_steps": 15,
    "seed": 99,
    "split": "mlp",
    "whole_layers": [0, -1],
    "coverage": False,
    "activation_correction": "rescale",
    "optimizer_state": "reset",
    "balance_shards": 2,
    "pin_cut": True,
    "cut_from_step": 30,
    "cut_share": 0.25,
    "lr_scale": 1.5,
}


def ds(**twist) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "twist": twist,
    }


def parse(*argv):
    parser = add_twist_args(argparse.ArgumentParser())
    return parser.parse_args(list(argv)), explicit_dests(parser, argv)


def write(tmp_path: Path, config, name="ds_config.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


# --------------------------------------------------------------------------- the section


def test_all_keys_parsed():
    cfg = twist_config_from_ds(ds(**FULL_SECTION))
    assert cfg == TwistConfig(
        keep_ratio=0.5,
        num_subnets=4,
        local_steps=15,
        seed=99,
        split="mlp",
        whole_layers=(0, -1),
        coverage=False,
        correction="rescale",
        optimizer_state="reset",
        balance_shards=2,
        pin_cut=True,
        cut_from_step=30,
        cut_share=0.25,
        lr_scale=1.5,
    )
    assert set(FULL_SECTION) == set(ALLOWED_KEYS)


def test_all_keys_parsed_from_file(tmp_path):
    path = write(tmp_path, ds(**FULL_SECTION))
    assert twist_section(path) == FULL_SECTION
    assert twist_section(str(path)) == FULL_SECTION
    assert twist_config_from_ds(str(path)).whole_layers == (0, -1)


def test_absent_keys_take_the_defaults():
    assert twist_config_from_ds(ds()) == TwistConfig()
    assert twist_config_from_ds({"train_micro_batch_size_per_gpu": 2}) == TwistConfig()  # no section at all
    cfg = twist_config_from_ds(ds(num_subnets=4, local_steps=7))
    assert (cfg.num_subnets, cfg.local_steps, cfg.keep_ratio, cfg.correction) == (4, 7, 0.5, "none")
    one = twist_config_from_ds(ds(keep_ratio=1, num_subnets=1)).keep_ratio  # a JSON integer is a number too
    assert one == 1.0 and isinstance(one, float)


def test_absent_keys_fall_back_to_flags():
    args, explicit = parse("--local-steps", "9", "--twist-seed", "7", "--no-coverage", "--whole-layers", "0")
    cfg = twist_config_from_ds(ds(keep_ratio=0.25, num_subnets=4), args, explicit)
    assert (cfg.keep_ratio, cfg.num_subnets, cfg.local_steps, cfg.seed, cfg.coverage, cfg.whole_layers) == (
        0.25,
        4,
        9,
        7,
        False,
        (0,),
    )


def test_lr_scale_key_takes_a_number_or_a_rule():
    # four subnets: the default rule and "sqrt" are sqrt(4) = 2; a number is taken as it is; a flag that
    # says the same as the section is no conflict, a different one is refused naming both
    assert twist_config_from_ds(ds(num_subnets=4, keep_ratio=0.25)).lr_scale == 2.0
    assert twist_config_from_ds(ds(num_subnets=4, keep_ratio=0.25, lr_scale="sqrt")).lr_scale == 2.0
    assert twist_config_from_ds(ds(lr_scale=1)).lr_scale == 1.0
    args, explicit = parse("--twist-lr-scale", "1.0")
    assert twist_config_from_ds(ds(lr_scale=1), args, explicit).lr_scale == 1.0
    with pytest.raises(ConfigError, match='--twist-lr-scale sqrt conflicts with "twist": {"lr_scale": 1.0}'):
        twist_config_from_ds(ds(lr_scale=1), *parse("--twist-lr-scale", "sqrt"))
    with pytest.raises(ConfigError, match="--twist-lr-scale must be a positive number or one of"):
        twist_config_from_ds(ds(lr_scale="cube"))


def test_deepspeed_config_flag_supplies_the_path(tmp_path):
    import deepspeed

    parser = deepspeed.add_config_arguments(add_twist_args(argparse.ArgumentParser()))
    path = write(tmp_path, ds(num_subnets=3, keep_ratio=0.5))
    argv = ["--deepspeed", "--deepspeed_config", str(path)]
    assert twist_config_from_ds(None, parser.parse_args(argv), explicit_dests(parser, argv)).num_subnets == 3


def test_unknown_key_refused_with_allowed_keys():
    with pytest.raises(ConfigError) as e:
        twist_config_from_ds(ds(keep_ratio=0.5, num_subnet=4))
    msg = str(e.value)
    assert "'num_subnet'" in msg
    for key in ALLOWED_KEYS:
        assert key in msg


@pytest.mark.parametrize(
    "key,value",
    [
        ("keep_ratio", "0.5"),
        ("num_subnets", 2.0),
        ("num_subnets", True),
        ("coverage", "yes"),
        ("whole_layers", "0,-1"),
        ("whole_layers", [0.5]),
        ("split", 3),
        ("balance_shards", -1),
        ("seed", None),
        ("lr_scale", [2]),
    ],
)
def test_wrong_type_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f'"{key}"'):
        twist_config_from_ds(ds(**{key: value}))


def test_section_that_is_not_an_object_refused():
    with pytest.raises(ConfigError, match='"twist" in the DeepSpeed config must be a JSON object'):
        twist_section({"twist": [0.5, 4]})


def test_missing_file_refused(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        twist_section(missing)
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        twist_config_from_ds(str(missing))


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"twist": {"keep_ratio": 0.5', "not valid JSON"),
        ('// comment\n{"twist": {}}', "not valid JSON.*no comments"),
        ('{"twist": {"keep_ratio": 0.5,}}', "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"twist": {}, "twist": {"seed": 1}}', "duplicate key 'twist'"),
    ],
)
def test_invalid_json_refused_naming_the_file(tmp_path, text, match):
    path = write(tmp_path, text, name="broken.json")
    with pytest.raises(ConfigError, match=match) as e:
        twist_config_from_ds(path)
    assert "broken.json" in str(e.value)


def test_strip_twist_section_is_a_copy():
    config = ds(**FULL_SECTION)
    stripped = strip_twist_section(config)
    assert "twist" not in stripped and "twist" in config
    assert stripped == {k: v for k, v in config.items() if k != "twist"}


# --------------------------------------------------------------------------- flags against the section


@pytest.mark.parametrize(
    "argv,key,value,flag_text",
    [
        (["--keep-ratio", "0.25"], "keep_ratio", 0.5, "--keep-ratio 0.25"),
        (["--num-subnets", "8"], "num_subnets", 4, "--num-subnets 8"),
        (["--local-steps", "3"], "local_steps", 15, "--local-steps 3"),
        (["--twist-seed", "5"], "seed", 1234, "--twist-seed 5"),
        (["--twist-split", "heads"], "split", "both", "--twist-split heads"),
        (["--whole-layers", "0,-1"], "whole_layers", [1], "--whole-layers 0,-1"),
        (["--no-coverage"], "coverage", True, "--no-coverage"),
        (["--activation-correction", "rescale"], "activation_correction", "none", "--activation-correction rescale"),
        (["--optimizer-state", "reset"], "optimizer_state", "aggregate", "--optimizer-state reset"),
        (["--twist-balance-shards", "4"], "balance_shards", 2, "--twist-balance-shards 4"),
    ],
)
def test_explicit_flag_conflicting_with_section_refused(tmp_path, argv, key, value, flag_text):
    args, explicit = parse(*argv)
    path = write(tmp_path, ds(**{key: value}))
    with pytest.raises(ConfigError) as e:
        twist_config_from_ds(path, args, explicit)
    msg = str(e.value)
    assert flag_text in msg and f'"twist": {{"{key}": {json.dumps(value)}}}' in msg
    assert "ds_config.json" in msg and "set it in one place" in msg


def test_conflict_message_matches_the_documented_form(tmp_path, monkeypatch):
    write(tmp_path, ds(keep_ratio=0.5, num_subnets=4))
    monkeypatch.chdir(tmp_path)  # the path as a user would type it
    args, explicit = parse("--keep-ratio", "0.25")
    with pytest.raises(
        ConfigError,
        match=r'^--keep-ratio 0.25 conflicts with "twist": \{"keep_ratio": 0.5\} in '
        r"ds_config.json; set it in one place$",
    ):
        twist_config_from_ds("ds_config.json", args, explicit)


def test_explicit_flag_equal_to_section_accepted():
    args, explicit = parse(
        "--keep-ratio",
        "0.5",
        "--num-subnets",
        "4",
        "--whole-layers",
        "0,-1",
        "--no-coverage",
        "--activation-correction",
        "rescale",
    )
    cfg = twist_config_from_ds(
        ds(keep_ratio=0.5, num_subnets=4, whole_layers=[0, -1], coverage=False, activation_correction="rescale"),
        args,
        explicit,
    )
    assert (cfg.keep_ratio, cfg.num_subnets, cfg.whole_layers, cfg.coverage, cfg.correction) == (
        0.5,
        4,
        (0, -1),
        False,
        "rescale",
    )


def test_flag_left_at_default_is_not_a_conflict():
    args, explicit = parse()  # --num-subnets defaults to 2, --local-steps to 15, coverage on
    cfg = twist_config_from_ds(ds(num_subnets=4, local_steps=3, coverage=False, keep_ratio=0.5), args, explicit)
    assert (cfg.num_subnets, cfg.local_steps, cfg.coverage) == (4, 3, False)


def test_a_typed_flag_is_explicit_whatever_its_value():
    """Typed flags are told from defaults by what the user typed (arguments.explicit_dests), not by
    comparing values: a host parser's other default is no conflict, and typing the usual default
    value is one (set it in one place)."""
    parser = add_twist_args(argparse.ArgumentParser())
    parser.set_defaults(num_subnets=8)
    assert twist_config_from_ds(ds(num_subnets=4), parser.parse_args([]), explicit_dests(parser, [])).num_subnets == 4
    argv = ["--num-subnets", "2"]
    with pytest.raises(ConfigError, match="--num-subnets 2 conflicts"):
        twist_config_from_ds(ds(num_subnets=4), parser.parse_args(argv), explicit_dests(parser, argv))


def test_coverage_impossibility_refused_with_twist_configs_message():
    with pytest.raises(
        ConfigError,
        match=r"coverage needs num_subnets x keep_ratio >= 1.*"
        r"raise --num-subnets to at least 4 or pass --no-coverage",
    ):
        twist_config_from_ds(ds(keep_ratio=0.25, num_subnets=2))
    assert not twist_config_from_ds(ds(keep_ratio=0.25, num_subnets=2, coverage=False)).coverage


def test_out_of_range_value_refused_with_twist_configs_message():
    with pytest.raises(ConfigError, match=r"--keep-ratio must lie in \(0, 1\]"):
        twist_config_from_ds(ds(keep_ratio=1.5))
    with pytest.raises(ConfigError, match="--twist-split must be one of"):
        twist_config_from_ds(ds(split="attention"))


# --------------------------------------------------------------------------- the command line (train, plan)


def command_line(*argv):
    """The DeepSpeed and TwIST flags as `twist train` / `twist plan` declare them."""
    parser = add_training_args(add_twist_args(argparse.ArgumentParser()))
    argv = [str(a) for a in argv]
    return parser.parse_args(argv), explicit_dests(parser, argv)


def test_resolve_without_deepspeed_flags_is_the_megatron_path():
    args, explicit = command_line("--keep-ratio", "0.25", "--num-subnets", "4")
    assert resolve_deepspeed(args, explicit) == (TwistConfig(keep_ratio=0.25, num_subnets=4), None)


def test_resolve_with_both_flags_reads_the_section_and_the_whole_config(tmp_path):
    config = ds(keep_ratio=0.25, num_subnets=4)
    path = write(tmp_path, config)
    args, explicit = command_line("--deepspeed", "--deepspeed_config", path, "--local-steps", "9")
    twist, ds_config = resolve_deepspeed(args, explicit)
    assert (twist.keep_ratio, twist.num_subnets, twist.local_steps) == (0.25, 4, 9)
    assert ds_config == config  # the "twist" section included: strip_twist_section is the caller's


@pytest.mark.parametrize("argv", [["--deepspeed"], ["--deepspeed_config", "ds.json"]])
def test_resolve_refuses_one_deepspeed_flag_without_the_other(argv):
    with pytest.raises(ConfigError, match="^DeepSpeed needs both --deepspeed and --deepspeed_config FILE$"):
        resolve_deepspeed(*command_line(*argv))


def test_resolve_refuses_a_bad_file_or_a_conflicting_flag_naming_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        resolve_deepspeed(*command_line("--deepspeed", "--deepspeed_config", missing))
    path = write(tmp_path, '{"twist": 3}', name="odd.json")
    with pytest.raises(ConfigError, match=r'"twist" in .*odd.json must be a JSON object'):
        resolve_deepspeed(*command_line("--deepspeed", "--deepspeed_config", path))
    path = write(tmp_path, ds(keep_ratio=0.5))
    with pytest.raises(ConfigError, match=r'--keep-ratio 0.25 conflicts with "twist": \{"keep_ratio": 0.5\}'):
        resolve_deepspeed(*command_line("--deepspeed", "--deepspeed_config", path, "--keep-ratio", "0.25"))


# --------------------------------------------------------------------------- batch sizes


class _Mpu:
    """What DeepSpeedConfig asks an mpu: the size of its data-parallel group."""

    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


def deepspeed_config(config: dict, monkeypatch, data_parallel: int = 1):
    """DeepSpeed's own DeepSpeedConfig over a data-parallel world of ``data_parallel`` ranks, no process group."""
    import deepspeed.runtime.config as dsc

    if data_parallel == 1:
        return dsc.DeepSpeedConfig(strip_twist_section(config))
    if not dsc.dist.is_initialized():  # DeepSpeed asks the rank first, then the mpu for the world
        monkeypatch.setattr(dsc.dist, "get_rank", lambda group=None: 0)
    out = dsc.DeepSpeedConfig(strip_twist_section(config), mpu=_Mpu(data_parallel))
    assert out.world_size == data_parallel
    return out


@pytest.mark.parametrize(
    "world,tp,pp,subnets,dp", [(8, 1, 1, 4, 2), (16, 2, 1, 4, 2), (4, 1, 1, 4, 1), (2, 1, 1, 4, 1), (32, 2, 2, 2, 4)]
)
def test_batch_consistency_subnet_group_is_deepspeeds_data_parallel(monkeypatch, world, tp, pp, subnets, dp):
    twist = TwistConfig(keep_ratio=0.5, num_subnets=subnets)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "twist": {}}
    got = check_batch_consistency(config, 4, world, twist, tensor_parallel=tp, pipeline_parallel=pp)
    assert got == {
        "train_batch_size": 4 * 2 * dp,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "data_parallel_size": dp,
    }
    # with the derived train_batch_size written in, DeepSpeed's own check agrees
    config["train_batch_size"] = got["train_batch_size"]
    assert check_batch_consistency(config, None, world, twist, tensor_parallel=tp, pipeline_parallel=pp) == got
    assert deepspeed_config(config, monkeypatch, dp).train_batch_size == got["train_batch_size"]


def test_batch_consistency_derives_what_deepspeed_derives(monkeypatch):
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2)  # world 8 -> 4 replicas per subnet
    for config in (
        {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4},
        {"train_batch_size": 64, "gradient_accumulation_steps": 4},
        {"train_batch_size": 16},
        {"train_micro_batch_size_per_gpu": 4},
    ):
        got = check_batch_consistency(config, None, 8, twist)
        ours = deepspeed_config(config, monkeypatch, 4)
        assert (got["train_batch_size"], got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"]) == (
            ours.train_batch_size,
            ours.train_micro_batch_size_per_gpu,
            ours.gradient_accumulation_steps,
        )


def test_batch_consistency_refuses_bad_sizes(monkeypatch):
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2)
    # 8 ranks / 2 subnets = 4 replicas: 2 x 1 x 4 = 8, not 12
    bad = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError, match=r"train_batch_size 12 .* = 8; set train_batch_size to 8"):
        check_batch_consistency(bad, None, 8, twist)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):  # DeepSpeed refuses it too
        deepspeed_config(bad, monkeypatch, 4)
    with pytest.raises(ConfigError, match="not a multiple of micro batch 2 .* = 8; use a multiple of 8"):
        check_batch_consistency({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2}, None, 8, twist)
    with pytest.raises(ConfigError, match="--micro-batch-size 4 conflicts with train_micro_batch_size_per_gpu 2"):
        check_batch_consistency({"train_micro_batch_size_per_gpu": 2}, 4, 8, twist)
    with pytest.raises(ConfigError, match="sets neither train_micro_batch_size_per_gpu nor train_batch_size"):
        check_batch_consistency({"gradient_accumulation_steps": 2}, None, 8, twist)
    with pytest.raises(ConfigError, match="must be a positive integer.*'auto'"):
        check_batch_consistency({"train_micro_batch_size_per_gpu": "auto"}, None, 8, twist)
    with pytest.raises(ConfigError, match="6 data-parallel ranks do not divide into 4 subnets"):  # the layout itself
        check_batch_consistency(
            {"train_micro_batch_size_per_gpu": 2}, None, 6, TwistConfig(num_subnets=4, keep_ratio=0.5)
        )


def test_deepspeed_ignores_unknown_top_level_keys_but_not_unknown_zero_keys(monkeypatch):
    """What the module docstring records about DeepSpeed 0.19.8 (fails if a DeepSpeed upgrade changes it)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    kept = DeepSpeedConfig(ds(**FULL_SECTION))  # "twist" left in: read with dict.get, never iterated
    assert kept.zero_optimization_stage == 2 and "twist" in kept._param_dict
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):  # pydantic sub-sections forbid extras
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2, "twist": {}}})


# --------------------------------------------------------------------------- templates


def test_expected_templates_exist():
    found = {p.name for p in DS_CONFIGS.glob("*.json")}
    assert EXPECTED_TEMPLATES <= found, f"missing templates: {sorted(EXPECTED_TEMPLATES - found)}"
    readme = (DS_CONFIGS / "README.md").read_text()
    for name in sorted(found):
        assert f"`{name}`" in readme, f"ds_configs/README.md does not describe {name}"


@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_template_is_valid(path, monkeypatch):
    raw = json.loads(path.read_text())
    assert "twist" in raw, f"{path.name} has no twist section"
    twist = twist_config_from_ds(path)
    cpu = path.name.startswith("cpu_")
    model = ModelConfig(**MODEL_PRESETS["tiny" if cpu else "small"])
    twist.check_against_model(model)

    stripped = strip_twist_section(raw)
    ours = deepspeed_config(raw, monkeypatch)
    assert ours.zero_optimization_stage == int(re.search(r"zero(\d)", path.name).group(1))
    assert ours.train_micro_batch_size_per_gpu == raw["train_micro_batch_size_per_gpu"]
    if cpu:
        assert (twist.keep_ratio, twist.num_subnets, twist.local_steps) == (0.5, 2, 4)
        assert "optimizer" not in stripped  # a client torch optimizer: no FusedAdam build on CPU
        assert not ours.bfloat16_config.enabled and not ours.float16_config.enabled
        assert (ours.train_micro_batch_size_per_gpu, ours.gradient_accumulation_steps) == (2, 1)
        assert ours.gradient_clipping == 1.0
        world = 2  # the CPU tests' 2-rank runs: one rank per subnet
    else:
        assert (twist.keep_ratio, twist.num_subnets, twist.local_steps) == (0.5, 4, 15)
        assert ours.bfloat16_config.enabled
        assert ours.optimizer_name == "adamw"
        assert ours.zero_config.overlap_comm and ours.zero_config.contiguous_gradients
        assert ours.monitor_config.csv_monitor.output_path.startswith("runs/")
        assert ours.monitor_config.tensorboard.output_path.startswith("runs/")
        world = 8  # one node: 4 subnets x 2 replicas
    sizes = check_batch_consistency(raw, None, world, twist)
    assert deepspeed_config(raw, monkeypatch, sizes["data_parallel_size"]).train_batch_size == sizes["train_batch_size"]
