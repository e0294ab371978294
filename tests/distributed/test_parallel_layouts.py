"""TwIST inside Megatron parallelism: TP=2, PP=2, TP=2 x 2 subnets, PP=2 x 2 subnets, and the last two
with the central model sharded over data parallel (--twist-shard-central).

Every layout continues the same central checkpoint for 8 more steps and must
match the single-process, TP=1/PP=1 reference: losses, final weights, Adam
moments, and the model cut out of the result. Real torchrun processes, gloo
on 127.0.0.1, Megatron's parallel_state, tensor-parallel layers and 1F1B
pipeline schedule.

Tolerances: losses 1e-5 absolute, weights and moments 1e-4 absolute. The
layouts compute the same maths in a different order (TP splits matrix
products and sums partial results; the gradient norm is summed over shards),
so they agree to float32 rounding: measured differences are <= 5e-7 on losses
and <= 1e-5 on weights after 8 steps. Adam divides by sqrt(second moment), which
can turn a rounding-level gradient difference on a parameter with a tiny
gradient into a larger weight difference, hence 1e-4 rather than 1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_twist.config import ModelConfig, TwistConfig
from megatron_twist.twist.extraction import cut_state, select_plan

BASE = [
    "--mock-data",
    "--micro-batch-size",
    "2",
    "--local-steps",
    "4",
    "--num-subnets",
    "2",
    "--keep-ratio",
    "0.5",
    "--log-interval",
    "4",
]
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2x2subnets": (4, ["--tensor-model-parallel-size", "2"]),
    "pp2x2subnets": (4, ["--pipeline-model-parallel-size", "2"]),
    # the central model sharded over the 2 data-parallel ranks: also equal (1e-6; measured bit-identical)
    # to the replicated run of the same layout
    "tp2x2subnets-sharded": (4, ["--tensor-model-parallel-size", "2", "--twist-shard-central"]),
}
# PP 2 x DP 2 with the sharded central model: test_sharded_checkpoint_resumes_at_its_own_layout


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_twist, run_twist_many):
    """A 16-step run stopped at step 8 (balance shards 2), and its single-process continuation to 16.
    The uninterrupted 16-step run of test_resume_is_bitwise_identical_to_uninterrupted_run (``straight``)
    runs in the same process as the stopped one (start-up paid once); the continuation in its own."""
    root = tmp_path_factory.mktemp("layouts")
    run = ["train", "--model-preset", "tiny", *BASE, "--train-iters", "16", "--twist-balance-shards", "2"]
    run_twist_many(
        1,
        [
            [*run, "--exit-interval", "8", "--save", root / "init"],
            [*run, "--save", root / "straight", "--metrics-file", root / "straight.json"],
        ],
    )
    run_twist(
        [
            "train",
            "--model-preset",
            "tiny",
            *BASE,
            "--train-iters",
            "16",
            "--load",
            root / "init",
            "--save",
            root / "ref",
            "--metrics-file",
            root / "ref.json",
        ]
    )
    return root


def _saved(path) -> dict:
    """{"model": weights, "optimizer": {"exp_avg/NAME": ...}} of a saved central model, single-file or
    sharded (--twist-shard-central writes one file per rank; read_central consolidates them)."""
    from megatron_twist.checkpoint.models import read_central

    _, weights, moments = read_central(str(path))
    return {"model": weights, "optimizer": {f"{m}/{n}": t for m, ts in moments.items() for n, t in ts.items()}}


def _compare_to_reference(root, name):
    ref = json.loads((root / "ref.json").read_text())
    got = json.loads((root / f"{name}.json").read_text())
    assert len(got["loss_curve"]) == len(ref["loss_curve"]) == 8
    for a, b in zip(got["loss_curve"], ref["loss_curve"]):
        assert abs(a - b) <= 1e-5, (name, got["loss_curve"], ref["loss_curve"])
    for stem in ("model", "optimizer"):
        a = _saved(root / name)[stem]
        b = load_file(str(root / "ref" / f"{stem}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=f"{name} {stem} {k}")
    # the model cut out of the result is the reference's cut (same units, same weights)
    meta = json.loads((root / "ref" / "meta.json").read_text())
    model, twist = ModelConfig.from_dict(meta["model"]), TwistConfig.from_dict(meta["twist"])
    params_got = _saved(root / name)["model"]
    params_ref = load_file(str(root / "ref" / "model.safetensors"))
    plan_got, plan_ref = (select_plan(model, twist, p, 0.5) for p in (params_got, params_ref))
    assert plan_got == plan_ref
    cut_got, cut_ref = cut_state(model, twist, params_got, plan_got), cut_state(model, twist, params_ref, plan_ref)
    for k in cut_ref:
        torch.testing.assert_close(cut_got[k], cut_ref[k], atol=1e-4, rtol=0)
    return got


def _compare_runs(root, name, other):
    """Two runs of one layout: losses, weights and moments to 1e-6."""
    a = json.loads((root / f"{name}.json").read_text())["loss_curve"]
    b = json.loads((root / f"{other}.json").read_text())["loss_curve"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    for stem in ("model", "optimizer"):
        x, y = (_saved(root / r)[stem] for r in (name, other))
        for k in y:
            torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=0, msg=f"{name} {stem} {k}")


@pytest.fixture(scope="module")
def layout_runs(reference, run_twist_many):
    """``layout_runs(name)`` -> the output of LAYOUTS[name]'s run, which continues the reference's init
    for 8 steps and writes ``reference/NAME`` and ``reference/NAME.json``. The layouts of one rank
    count run one after the other in one launch (run_twist_many: the start-up paid once), the first
    time one of them is asked for."""
    outputs = {}

    def get(name):
        if name not in outputs:
            nproc = LAYOUTS[name][0]
            names = [n for n, (ranks, _) in LAYOUTS.items() if ranks == nproc]
            argvs = [
                ["train", "--model-preset", "tiny", *BASE, *LAYOUTS[n][1], "--train-iters", "16"]
                + ["--load", reference / "init", "--save", reference / n, "--metrics-file", reference / f"{n}.json"]
                for n in names
            ]
            outputs.update(zip(names, run_twist_many(nproc, argvs)))
        return outputs[name]

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_reference(reference, layout_runs, name):
    nproc, _ = LAYOUTS[name]
    stdout = layout_runs(name)
    got = _compare_to_reference(reference, name)
    assert got["world_size"] == nproc
    rounds = got["rounds"]
    assert len(rounds) == 2, "two rounds: aggregated and resampled twice"
    if name.endswith("-sharded"):
        replicated = name.removesuffix("-sharded")
        layout_runs(replicated)  # run in the same launch
        assert "central model sharded over 2 data-parallel ranks" in stdout
        # written by every rank, one file per (TP shard, stage, data-parallel shard): 2 x 1 x 2 or 1 x 2 x 2
        meta = json.loads((reference / name / "meta.json").read_text())
        assert len(meta["files"]) == 4 and len(meta["sharded"]["positions"]) == 2
        _compare_runs(reference, name, replicated)
    elif nproc == 4:  # two subnet slots over data parallel: aggregation goes over the wire
        assert all(r["aggregation_bytes"] > 0 for r in rounds)
        # counted at the collective: weights + 2 Adam moments of this rank's shard, once per round,
        # against dense data parallel's gradient all-reduce at every one of the round's 4 steps
        for r in rounds:
            assert r["aggregation_bytes"] * 4 == r["dense_dp_bytes"] * 3
        assert "dense DP" in stdout


@pytest.mark.multiprocess
def test_sharded_checkpoint_resumes_at_its_own_layout(reference, layout_runs, run_torchrun):
    """PP 2 x DP 2 with the central model sharded: stop after one round (each of the 4 ranks writes its
    file), resume (each reads only its own: checkpoint/sharded.open_own_shard), and end where the
    replicated run of the layout ends (1e-6)."""
    nproc, flags = LAYOUTS["pp2x2subnets"][0], [*LAYOUTS["pp2x2subnets"][1], "--twist-shard-central"]
    layout_runs("pp2x2subnets")  # the replicated run of the layout
    common = ["-m", "megatron_twist", "train", "--model-preset", "tiny", *BASE, *flags, "--train-iters", "16"]
    half = reference / "pp2-sharded-half"
    run_torchrun(nproc, [*common, "--load", reference / "init", "--exit-interval", "12", "--save", half])
    meta = json.loads((half / "meta.json").read_text())
    assert meta["step"] == 12 and sorted(meta["sharded"]["positions"]) == ["tp000-pp000", "tp000-pp001"]
    proc = run_torchrun(
        nproc,
        [*common, "--load", half, "--save", reference / "pp2-sharded-resumed"]
        + ["--metrics-file", reference / "pp2-sharded-resumed.json"],
    )
    assert "every rank read only its own shard" in proc.stdout
    got = json.loads((reference / "pp2-sharded-resumed.json").read_text())["loss_curve"]
    want = json.loads((reference / "pp2x2subnets.json").read_text())["loss_curve"][4:]
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, want)) <= 1e-6
    for stem in ("model", "optimizer"):
        x, y = _saved(reference / "pp2-sharded-resumed")[stem], _saved(reference / "pp2x2subnets")[stem]
        for k in y:
            torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=0, msg=f"{stem} {k}")


@pytest.mark.multiprocess
def test_resume_is_bitwise_identical_to_uninterrupted_run(reference):
    """init (8 steps) + resume (8 steps) == one uninterrupted 16-step run (the reference fixture's
    ``straight``), bit for bit."""
    straight = json.loads((reference / "straight.json").read_text())["loss_curve"]
    resumed = json.loads((reference / "ref.json").read_text())["loss_curve"]
    assert straight[8:] == resumed
    for stem in ("model", "optimizer"):
        a = load_file(str(reference / "straight" / f"{stem}.safetensors"))
        b = load_file(str(reference / "ref" / f"{stem}.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.multiprocess
def test_tp2_checkpoint_resumes_at_tp1_in_both_formats(reference, layout_runs, run_twist, run_torchrun):
    """A TP=2 run saved as Megatron dist_checkpointing (resharded on load) and as the gathered
    safetensors checkpoint both resume at TP=1, and continue identically."""
    run_torchrun(
        2,
        [
            "-m",
            "megatron_twist",
            "train",
            "--model-preset",
            "tiny",
            *BASE,
            "--train-iters",
            "16",
            "--tensor-model-parallel-size",
            "2",
            "--load",
            reference / "init",
            "--ckpt-format",
            "torch_dist",
            "--save",
            reference / "tp2-dist",
        ],
        timeout=300,
    )
    assert (reference / "tp2-dist" / "metadata.json").is_file()
    layout_runs("tp2")  # the TP=2 run in the safetensors format
    for source in ("tp2", "tp2-dist"):
        run_twist(
            [
                "train",
                "--model-preset",
                "tiny",
                *BASE,
                "--train-iters",
                "20",
                "--load",
                reference / source,
                "--save",
                reference / f"{source}-then-tp1",
                "--metrics-file",
                reference / f"{source}-then-tp1.json",
            ]
        )
    a = json.loads((reference / "tp2-then-tp1.json").read_text())["loss_curve"]
    b = json.loads((reference / "tp2-dist-then-tp1.json").read_text())["loss_curve"]
    assert len(a) == 4 and a == b
    wa = load_file(str(reference / "tp2-then-tp1" / "model.safetensors"))
    wb = load_file(str(reference / "tp2-dist-then-tp1" / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.multiprocess
def test_bad_layout_refused_under_torchrun(run_torchrun_raw):
    """2 data-parallel ranks cannot share 3 subnets: both ranks refuse before creating any group."""
    proc = run_torchrun_raw(
        2,
        [
            "-m",
            "megatron_twist",
            "train",
            "--model-preset",
            "tiny",
            *BASE,
            "--train-iters",
            "4",
            "--num-subnets",
            "3",
            "--keep-ratio",
            "0.5",
        ],
    )
    assert proc.returncode != 0
    # Each rank refuses on its own; once the first exits, torchrun stops the other, which on a loaded
    # machine may not have printed yet (seen in CI: 1 of 2). Neither got as far as a round.
    assert proc.stderr.count("--num-subnets 3 does not divide over 2 data-parallel ranks") >= 1
    assert "[twist] round" not in proc.stdout
