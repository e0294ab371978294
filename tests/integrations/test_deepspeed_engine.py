"""TwIST riding on DeepSpeed engines, ZeRO stages 0-3, against the same run without DeepSpeed.

Real `deepspeed.initialize` engines with TwIST's mpu (data-parallel group = the subnet group),
2 ranks, one subnet each, fp32 on CPU. Tolerance: losses 1e-5, weights 1e-4 (the engine reduces
and clips gradients with its own kernels: same maths, different summation order).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

HERE = __import__("pathlib").Path(__file__).resolve().parent


def _assert_engine_run_matches(ref_dir, run_dir, ranks, subnet_of, loss_tol, weight_tol):
    """Losses of ``ranks`` (rank r trains subnet ``subnet_of(r)``) and the central model of ``run_dir``
    against the non-DeepSpeed reference run in ``ref_dir``."""
    ref = json.loads((ref_dir / "ref.json").read_text())
    for rank in ranks:
        got = json.loads((run_dir / f"losses-{rank}.json").read_text())
        expected = [x for r in ref["rounds"] for x in r["losses"][subnet_of(rank)]]
        assert len(got) == len(expected) == 10
        assert max(abs(a - b) for a, b in zip(got, expected)) <= loss_tol, (run_dir.name, rank, got, expected)
    want = load_file(str(ref_dir / "ref" / "model.safetensors"))
    central = load_file(str(run_dir / "central.safetensors"))
    for k in want:
        torch.testing.assert_close(central[k], want[k], atol=weight_tol, rtol=0, msg=f"{run_dir.name}: {k}")


@pytest.mark.multiprocess
def test_zero_stages_match_twist_without_deepspeed(tmp_path, run_torchrun):
    run_torchrun(
        2,
        [
            "-m",
            "megatron_twist",
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "10",
            "--local-steps",
            "4",
            "--micro-batch-size",
            "2",
            "--num-subnets",
            "2",
            "--keep-ratio",
            "0.5",
            "--save",
            tmp_path / "ref",
            "--metrics-file",
            tmp_path / "ref.json",
        ],
        timeout=240,
    )
    run_torchrun(2, [HERE / "ds_worker.py", tmp_path, "0", "1", "2", "3", "2bf16"], timeout=600)
    for stage in range(4):
        _assert_engine_run_matches(tmp_path, tmp_path / f"zero{stage}", (0, 1), lambda r: r, 1e-5, 1e-4)
    # bf16 (ZeRO-2): bf16 forward/backward with fp32 master weights; bf16 keeps ~3 significant digits,
    # so it follows the fp32 run loosely
    _assert_engine_run_matches(tmp_path, tmp_path / "zero2bf16", (0, 1), lambda r: r, 2e-2, 2e-2)


@pytest.mark.multiprocess
def test_cli_deepspeed_run_and_conflicting_flag(tmp_path, run_torchrun, run_twist):
    """`twist train --deepspeed --deepspeed_config ds_configs/cpu_zero2.json` under torchrun, and a
    flag that contradicts the ds_config's "twist" section refused with both names."""
    config = json.loads((HERE.parents[1] / "ds_configs" / "cpu_zero2.json").read_text())
    config["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "twist"}
    (tmp_path / "zero2.json").write_text(json.dumps(config))
    config = tmp_path / "zero2.json"
    proc = run_torchrun(
        2,
        [
            "-m",
            "megatron_twist",
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "8",
            "--micro-batch-size",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            config,
            "--metrics-file",
            tmp_path / "m.json",
        ],
        timeout=300,
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["zero_stage"] == 2 and metrics["twist"]["local_steps"] == 4  # from the ds_config
    assert all(len(r) == 8 and r[-1] < r[0] for r in metrics["losses_per_rank"])
    assert "[twist-ds] round" in proc.stdout
    # TwIST's metrics went through DeepSpeed's csv_monitor: one row per round (steps 4 and 8)
    logs = {p.name: p.read_text() for p in (tmp_path / "monitor").rglob("*.csv")}
    rounds = [line.split(",") for line in logs["Twist_round.csv"].strip().splitlines()[1:]]
    assert [(int(s), float(v)) for s, v in rounds] == [(4, 1.0), (8, 2.0)]
    assert "Twist_subnet_0_loss.csv" in logs and "Twist_subnet_1_loss.csv" in logs
    assert all(
        float(v) > 0 for _, v in (row.split(",") for row in logs["Twist_aggregation_bytes.csv"].splitlines()[1:])
    )
    bad = run_twist(
        [
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--deepspeed",
            "--deepspeed_config",
            config,
            "--keep-ratio",
            "0.25",
            "--num-subnets",
            "4",
        ],
        check=False,
    )
    assert bad.returncode == 2
    assert "--keep-ratio 0.25 conflicts with" in bad.stderr and "keep_ratio" in bad.stderr


@pytest.mark.multiprocess
def test_deepspeed_checkpoint_resume_is_exact(tmp_path, run_torchrun, run_twist):
    """engine.save_checkpoint + the sharded central model at a round boundary; resuming equals the
    straight run, bit for bit. The sharded central checkpoint is also read by single-process tools
    (consolidated), reshards to another shard count, and a corrupt shard is refused."""
    job = [
        "-m",
        "megatron_twist",
        "train",
        "--model-preset",
        "tiny",
        "--mock-data",
        "--train-iters",
        "12",
        "--micro-batch-size",
        "2",
        "--deepspeed",
        "--deepspeed_config",
        HERE.parents[1] / "ds_configs" / "cpu_zero2.json",
    ]
    run_torchrun(2, [*job, "--save", tmp_path / "straight", "--metrics-file", tmp_path / "straight.json"])
    run_torchrun(2, [*job, "--exit-interval", "8", "--save", tmp_path / "half"])
    assert (tmp_path / "half" / "engine" / "latest").read_text().strip() == "global_step8"
    run_torchrun(
        2,
        [
            *job,
            "--load",
            tmp_path / "half",
            "--save",
            tmp_path / "resumed",
            "--metrics-file",
            tmp_path / "resumed.json",
        ],
    )
    straight = json.loads((tmp_path / "straight.json").read_text())["losses_per_rank"]
    resumed = json.loads((tmp_path / "resumed.json").read_text())["losses_per_rank"]
    assert [r[8:] for r in straight] == resumed
    from megatron_twist.checkpoint.models import read_central

    _, a, a_moments = read_central(str(tmp_path / "straight" / "central"))  # sharded: consolidated on read
    _, b, b_moments = read_central(str(tmp_path / "resumed" / "central"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a_moments["exp_avg_sq"][k], b_moments["exp_avg_sq"][k]), k
    # One shard file per rank, nothing else holding tensors.
    assert sorted(p.name for p in (tmp_path / "straight" / "central").iterdir()) == [
        "meta.json",
        "shard-00000-of-00002.safetensors",
        "shard-00001-of-00002.safetensors",
    ]
    # Reshard 2 -> 1 (a single process, no group): equals the consolidated checkpoint.
    from megatron_twist.checkpoint.files import load_checkpoint, model_config_of
    from megatron_twist.checkpoint.sharded import load_sharded
    from megatron_twist.distributed.sharded_central import ShardedCentral

    meta = load_checkpoint(str(tmp_path / "straight" / "central"), tensors=False)[0]
    one = ShardedCentral(model_config_of(meta, "x"), {k: v.shape for k, v in a.items()}, None, device="cpu")
    load_sharded(one, str(tmp_path / "straight" / "central"))
    assert one.step == 12 and one.round == 3
    for k in a:
        assert torch.equal(one.gather(k), a[k]) and torch.equal(one.gather(k, "exp_avg_sq"), a_moments["exp_avg_sq"][k])
    # `twist extract` reads the sharded central directly.
    run_twist(
        ["extract", "--load", tmp_path / "straight" / "central", "--keep-ratio", "0.5", "--save", tmp_path / "cut"]
    )
    assert (tmp_path / "cut" / "meta.json").is_file()
    # A truncated shard is refused, naming the file.
    shard = tmp_path / "straight" / "central" / "shard-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    from megatron_twist.checkpoint.files import CheckpointError

    with pytest.raises(CheckpointError, match="shard-00001-of-00002.safetensors does not match its checksum"):
        load_sharded(one, str(tmp_path / "straight" / "central"))


@pytest.mark.multiprocess
def test_zero_partitions_subnet_over_its_replicas(tmp_path, run_torchrun):
    """4 ranks = 2 subnets x 2 replicas: ZeRO 2 and 3 partition each subnet over its 2 replicas
    (DeepSpeed's data-parallel group is the subnet group) and still match TwIST without DeepSpeed."""
    run_torchrun(
        4,
        [
            "-m",
            "megatron_twist",
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "10",
            "--local-steps",
            "4",
            "--micro-batch-size",
            "2",
            "--num-subnets",
            "2",
            "--keep-ratio",
            "0.5",
            "--save",
            tmp_path / "ref",
            "--metrics-file",
            tmp_path / "ref.json",
        ],
        timeout=300,
    )
    run_torchrun(4, [HERE / "ds_worker.py", tmp_path, "2", "3"], timeout=600)
    for stage in (2, 3):
        # ranks 0,1 train subnet 0 (replicas 0,1), ranks 2,3 subnet 1; the reference's loss table is
        # replica 0's (rank 0 reports its aggregation group), so compare ranks 0 and 2
        _assert_engine_run_matches(tmp_path, tmp_path / f"zero{stage}", (0, 2), lambda r: r // 2, 1e-5, 1e-4)
