"""A 2-rank torchrun run (one subnet per rank) equals the single-process run bit for bit.

Real processes, real gloo on 127.0.0.1, real Megatron parallel_state: the
only thing that differs between the two runs is where each subnet is trained
and that aggregation goes through an all-reduce.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

ARGS = [
    "train",
    "--model-preset",
    "tiny",
    "--mock-data",
    "--train-iters",
    "12",
    "--local-steps",
    "4",
    "--micro-batch-size",
    "2",
    "--num-subnets",
    "2",
    "--keep-ratio",
    "0.5",
    "--log-interval",
    "4",
]


@pytest.mark.multiprocess
def test_two_ranks_equal_single_process(tmp_path, run_torchrun, run_twist):
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    proc = run_torchrun(
        2,
        ["-m", "megatron_twist", *ARGS, "--save", dist_dir / "ckpt", "--metrics-file", dist_dir / "metrics.json"],
        timeout=300,
    )
    assert "rank 0/2 trains subnets [0]" in proc.stdout
    run_twist([*ARGS, "--save", single_dir / "ckpt", "--metrics-file", single_dir / "metrics.json"])

    dist_metrics = json.loads((dist_dir / "metrics.json").read_text())
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    assert dist_metrics["world_size"] == 2 and single_metrics["world_size"] == 1
    assert dist_metrics["loss_curve"] == single_metrics["loss_curve"]
    for rd, rs in zip(dist_metrics["rounds"], single_metrics["rounds"]):
        assert rd["losses"] == rs["losses"], "every subnet's every step must match"
    # aggregation really went over the wire in the 2-rank run, and not in the single one
    assert all(r["aggregation_bytes"] > 0 for r in dist_metrics["rounds"])
    assert all(r["aggregation_bytes"] == 0 for r in single_metrics["rounds"])

    for stem in ("model", "optimizer"):
        a = load_file(str(dist_dir / "ckpt" / f"{stem}.safetensors"))
        b = load_file(str(single_dir / "ckpt" / f"{stem}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}:{k} differs"
