"""TwIST riding on DeepSpeed engines, ZeRO stages 0-3, against the same run without DeepSpeed.

Real `deepspeed.initialize` engines with TwIST's mpu (data-parallel group = the subnet group, model
parallel = Megatron's TP group), fp32 on CPU, against the Megatron path (no DeepSpeed code) at the same
layout, run in the same launch (ds_worker.py): 2 ranks with one subnet each, 2 subnets x 2 replicas,
and TP 2 x 2 subnets. Tolerance: losses 1e-5, weights and Adam moments 1e-4 (the engine reduces and
clips gradients with its own kernels: same maths, different summation order).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

HERE = __import__("pathlib").Path(__file__).resolve().parent


def _results(out, ranks):
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(ranks)]


def _assert_matches_reference(results, stages, loss_tol, weight_tol, moment_tol=None):
    """Every rank's largest differences from the Megatron-path reference (ds_worker.py) per stage."""
    for res in results:
        for stage in stages:
            got = res["stages"][stage]
            assert got["loss"] <= loss_tol, (stage, res["rank"], got)
            assert got["weights"] <= weight_tol, (stage, res["rank"], got)
            if moment_tol is not None:
                assert got["moments"] <= moment_tol, (stage, res["rank"], got)


@pytest.mark.multiprocess
def test_zero_stages_match_twist_without_deepspeed(tmp_path, run_torchrun):
    run_torchrun(2, [HERE / "ds_worker.py", tmp_path, "1:0,1,2,3,2bf16"], timeout=600)
    results = _results(tmp_path / "tp1", 2)
    assert [r["subnet"] for r in results] == [0, 1]
    _assert_matches_reference(results, ("0", "1", "2", "3"), 1e-5, 1e-4, 1e-4)
    assert [results[0]["stages"][s]["zero"] for s in ("0", "1", "2", "3", "2bf16")] == [0, 1, 2, 3, 2]
    # bf16 (ZeRO-2): bf16 forward/backward with fp32 master weights; bf16 keeps ~3 significant digits,
    # so it follows the fp32 run loosely
    _assert_matches_reference(results, ("2bf16",), 2e-2, 2e-2)


# One 2-rank ZeRO-2 job, 12 iterations on mock data, serves both CLI tests below. Its half run (stopped
# by --exit-interval 8) is the run test_cli_deepspeed_run_and_conflicting_flag checks (8 iterations,
# DeepSpeed's csv_monitor) and the checkpoint test_deepspeed_checkpoint_resume_is_exact resumes.
ZERO2_JOB = ["-m", "megatron_twist", "train", "--model-preset", "tiny", "--mock-data", "--train-iters", "12"]
ZERO2_JOB += ["--micro-batch-size", "2", "--deepspeed"]


def _zero2_config(root, name):
    """ds_configs/cpu_zero2.json with DeepSpeed's csv_monitor writing to ROOT/monitor-NAME."""
    config = json.loads((HERE.parents[1] / "ds_configs" / "cpu_zero2.json").read_text())
    config["csv_monitor"] = {"enabled": True, "output_path": str(root / f"monitor-{name}"), "job_name": "twist"}
    path = root / f"zero2-{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def zero2_half(tmp_path_factory, run_torchrun):
    """`twist train --deepspeed` under torchrun, stopped at iteration 8 of 12 (--exit-interval 8,
    saving its checkpoint): (the completed process, its folder)."""
    root = tmp_path_factory.mktemp("zero2")
    config = _zero2_config(root, "half")
    proc = run_torchrun(
        2,
        [*ZERO2_JOB, "--deepspeed_config", config, "--exit-interval", "8", "--save", root / "half"]
        + ["--metrics-file", root / "half.json"],
        timeout=300,
    )
    return proc, root


@pytest.mark.multiprocess
def test_cli_deepspeed_run_and_conflicting_flag(zero2_half, run_twist):
    """`twist train --deepspeed --deepspeed_config ds_configs/cpu_zero2.json` under torchrun, and a
    flag that contradicts the ds_config's "twist" section refused with both names."""
    proc, root = zero2_half
    config = root / "zero2-half.json"
    metrics = json.loads((root / "half.json").read_text())
    assert metrics["zero_stage"] == 2 and metrics["twist"]["local_steps"] == 4  # from the ds_config
    assert all(len(r) == 8 and r[-1] < r[0] for r in metrics["losses_per_rank"])
    assert "[twist-ds] round" in proc.stdout
    # TwIST's metrics went through DeepSpeed's csv_monitor: one row per round (steps 4 and 8)
    logs = {p.name: p.read_text() for p in (root / "monitor-half").rglob("*.csv")}
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
def test_deepspeed_checkpoint_resume_is_exact(zero2_half, run_torchrun, run_twist):
    """engine.save_checkpoint + the sharded central model at a round boundary; resuming equals the
    straight run, bit for bit. The sharded central checkpoint is also read by single-process tools
    (consolidated), reshards to another shard count, and a corrupt shard is refused. The stopped run
    is the zero2_half fixture's (csv_monitor on: it only writes logs)."""
    _, tmp_path = zero2_half
    job = [*ZERO2_JOB, "--deepspeed_config", _zero2_config(tmp_path, "run")]
    run_torchrun(2, [*job, "--save", tmp_path / "straight", "--metrics-file", tmp_path / "straight.json"])
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
    # the stopped run is the straight run's first 8 iterations, bit for bit
    assert [r[:8] for r in straight] == json.loads((tmp_path / "half.json").read_text())["losses_per_rank"]
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
def test_zero_over_replicas_and_tensor_parallel(tmp_path, run_torchrun, refused_before_work):
    """Two 4-rank layouts in one launch (ds_worker.py phases), each against the Megatron path at the
    same layout (losses 1e-5, weights and Adam moments 1e-4):

    * 2 subnets x 2 replicas: ZeRO 2 and 3 partition each subnet over its 2 replicas (DeepSpeed's
      data-parallel group is the subnet group);
    * TP 2 x 2 subnets: Megatron-core's tensor-parallel layers inside DeepSpeed engines (TwistMpu: model
      parallel = the TP group), ZeRO 1, 2 and 3, each rank aggregating its ZeRO fragment of its TP
      shard; a checkpoint at step 8 resumes bit for bit; the model cut out of the DeepSpeed checkpoint
      (its TP-positioned shards consolidated) equals the reference's cut."""
    run_torchrun(4, [HERE / "ds_worker.py", tmp_path, "1:2,3", "2:1,2,3,resume"], timeout=600)
    results = _results(tmp_path / "tp1", 4)
    assert [r["subnet"] for r in results] == [0, 0, 1, 1]  # ranks 0, 1: subnet 0's replicas
    _assert_matches_reference(results, ("2", "3"), 1e-5, 1e-4, 1e-4)

    tmp_path = tmp_path / "tp2"
    results = _results(tmp_path, 4)
    assert [(r["tp_rank"], r["subnet"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    _assert_matches_reference(results, ("1", "2", "3"), 1e-5, 1e-4, 1e-4)
    for r in results:
        assert r["resume"] == {"losses_equal": True, "weights_equal": True, "moments_equal": True, "steps": 4}
    # The DeepSpeed checkpoint's central model: one file per (TP shard, data-parallel shard).
    ckpt = tmp_path / "zero2-ckpt"
    meta = json.loads((ckpt / "central" / "meta.json").read_text())
    assert meta["sharded"]["tensor_parallel"] == 2 and len(meta["files"]) == 4
    assert sorted(p.name for p in (ckpt / "engine" / "global_step12").glob("mp_rank_*")) == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
    ]
    from megatron_twist.checkpoint.models import read_central
    from megatron_twist.config import ModelConfig, TwistConfig
    from megatron_twist.twist.extraction import cut_state, select_plan

    _, params_got, _ = read_central(str(ckpt / "central"))
    model = ModelConfig.from_dict(meta["model"])
    params_ref = load_file(str(tmp_path / "ref.safetensors"))
    assert params_got.keys() == params_ref.keys()
    for k in params_ref:  # the consolidated whole model (TP shards put back in place)
        torch.testing.assert_close(params_got[k], params_ref[k], atol=1e-4, rtol=0, msg=k)
    twist = TwistConfig.from_dict(meta["twist"])
    plan_got, plan_ref = (select_plan(model, twist, p, 0.5) for p in (params_got, params_ref))
    assert plan_got == plan_ref
    cut_got, cut_ref = cut_state(model, twist, params_got, plan_got), cut_state(model, twist, params_ref, plan_ref)
    for k in cut_ref:
        torch.testing.assert_close(cut_got[k], cut_ref[k], atol=1e-4, rtol=0, msg=k)
    # It resumes only at its own TP size (engine files per TP rank): refused before any work otherwise.
    err = refused_before_work(
        ["train", "--model-preset", "tiny", "--mock-data", "--deepspeed", "--deepspeed_config", "DS", "--load", ckpt]
    )
    assert "saved by a DeepSpeed run at tensor parallel 2" in err and "--tensor-model-parallel-size 2" in err


def test_pipeline_parallel_under_deepspeed_refused_with_the_reason(refused_before_work):
    err = refused_before_work(
        ["train", "--model-preset", "tiny", "--mock-data", "--deepspeed", "--deepspeed_config", "DS"]
        + ["--pipeline-model-parallel-size", "2"]
    )
    assert "not supported with --deepspeed" in err and "runs the whole forward and backward" in err
    assert "Megatron-core's 1F1B path" in err
