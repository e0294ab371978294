"""--twist-shard-central (issue #16 item 3): the central model sharded over data parallel, against
today's replicated central model, in real 4-rank runs (gloo, Megatron-core).

Here: DP 4 (2 subnets x 2 replicas). The sharded run stops after its first round and resumes from
its checkpoint, so the comparison also covers saving a sharded central model and loading it back
into shards; the losses, the saved central weights and both Adam moments must equal the replicated
run's to 1e-6 (measured: bit-identical; the same sums, added in another reduction order). TP 2 x DP 2
and PP 2 x DP 2 are in tests/distributed/test_parallel_layouts.py, against both the single-process
reference and the replicated run of their layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_twist.checkpoint.models import read_central

BASE = ["--model-preset", "tiny", "--mock-data", "--train-iters", "8", "--local-steps", "4", "--log-interval", "4"]
BASE += ["--num-subnets", "2", "--keep-ratio", "0.5", "--micro-batch-size", "2"]


def _padded_numel(shape, ranks: int) -> int:
    n = 1
    for d in shape:
        n *= d
    return -(-n // ranks) * ranks


def _train(root, name, extra=()):
    return ["train", *BASE, *extra, "--save", root / name, "--metrics-file", root / f"{name}.json"]


@pytest.mark.multiprocess
def test_sharded_central_with_replicas_equals_the_replicated_one_across_a_resume(
    tmp_path, run_torchrun, run_twist_many
):
    # the replicated run and the sharded one that stops after a round, in one launch (start-up paid once)
    replicated = _train(tmp_path, "replicated")
    sharded = _train(tmp_path, "sharded", ["--twist-shard-central", "--exit-interval", "4"])
    run_twist_many(4, [replicated, sharded])
    # the resume: a launch of its own (fresh processes read the sharded checkpoint)
    resumed = _train(tmp_path, "resumed", ["--twist-shard-central", "--load", tmp_path / "sharded"])
    proc = run_torchrun(4, ["-m", "megatron_twist", *resumed], timeout=300)
    assert "central model sharded over 4 data-parallel ranks" in proc.stdout
    ref = json.loads((tmp_path / "replicated.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert len(got["loss_curve"]) == 4
    assert max(abs(a - b) for a, b in zip(ref["loss_curve"][4:], got["loss_curve"])) <= 1e-6
    # the sharded runs wrote one file per rank (the DeepSpeed path's format); the resume read its own
    meta = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert meta["sharded"]["shard_count"] == 4 and len(meta["files"]) == 4
    _, weights, moments = read_central(str(tmp_path / "resumed"))
    have = {"model": weights, "optimizer": {f"{m}/{n}": t for m, ts in moments.items() for n, t in ts.items()}}
    for stem in ("model", "optimizer"):
        want = load_file(str(tmp_path / "replicated" / f"{stem}.safetensors"))
        assert want.keys() == have[stem].keys()
        for k in want:
            torch.testing.assert_close(have[stem][k], want[k], atol=1e-6, rtol=0, msg=f"{stem} {k}")
    # per round: the refill all-gathers and the aggregation reduce-scatters every central tensor,
    # weights and 2 moments, each padded to a multiple of the 4 shards (fp32)
    shapes = [t.shape for t in load_file(str(tmp_path / "replicated" / "model.safetensors")).values()]
    per_field = 4 * sum(_padded_numel(s, 4) for s in shapes)
    assert got["rounds"][0]["aggregation_bytes"] == 2 * 3 * per_field


@pytest.mark.parametrize(
    "extra, fix",
    [
        (["--deepspeed", "--deepspeed_config", "DS"], "always sharded over data parallel"),
        (["--ckpt-format", "torch_dist", "--save", "OUT"], "use --ckpt-format safetensors"),
    ],
)
def test_shard_central_refusals_before_any_work(refused_before_work, extra, fix):
    assert fix in refused_before_work(["train", *BASE, "--twist-shard-central", *extra])
