"""The 70B recipe's process groups at its real world size, without GPUs (torch's fake backend).

The layout comes from the script itself (`bash slurm/twist_70b.sh --plan --json`: 32 nodes x 8
GPUs, TP 8, PP 4, 2 subnets by default). group_wiring_worker.py runs Megatron's real
initialize_model_parallel as every one of the 256 ranks, and this project's real
build_twist_groups as rank 0, a middle rank and the last rank. The expectations below are computed
here from the launch geometry alone: torchrun's static rendezvous with node rank = SLURM_NODEID
gives global rank = node x GPUs per node + local rank, and Megatron's documented order is
tp-cp-ep-dp-pp (tensor parallel fastest, pipeline slowest).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_twist.distributed.layout import ParallelLayout, groups_of, twist_group_members

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_70b_groups_at_real_world_size(tmp_path, script_plan, script_env):
    plan = script_plan("twist_70b.sh")
    W, T, P, n = plan["world_size"], plan["tensor_parallel"], plan["pipeline_parallel"], plan["twist"]["num_subnets"]
    G = plan["gpus_per_node"]
    D = W // (T * P)
    R = max(1, D // n)
    assert (W, T, P) == (256, 8, 4) and D == plan["data_parallel"] and R == plan["replicas"]
    middle = W // 2 + 3
    sample = [0, middle, W - 1]
    out = tmp_path / "groups.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "scale" / "group_wiring_worker.py"),
            str(W),
            str(T),
            str(P),
            str(n),
            str(plan["twist"]["keep_ratio"]),
            ",".join(map(str, sample)),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=script_env(),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = json.loads(out.read_text())

    # Expected coordinates: rank = tp + T * (dp + D * pp); node = rank // G.
    def coords_of(rank):
        return rank % T, rank // (T * D), (rank // T) % D  # tp, pp, dp

    def rank_of(tp, pp, dp):
        return tp + T * (dp + D * pp)

    coords = [tuple(c) for c in got["coords"]]
    assert coords == [(r, *coords_of(r)) for r in range(W)]
    for r in range(W):
        groups = got["megatron_groups"][str(r)]
        tp, pp, dp = coords_of(r)
        # TP group: the GPUs of r's node, consecutive ranks (tensor parallel never leaves a node)
        assert groups["tp"] == list(range(r - r % T, r - r % T + T))
        assert {m // G for m in groups["tp"]} == {r // G}
        assert groups["pp"] == [rank_of(tp, p, dp) for p in range(P)]  # one rank per stage, same tp/dp
        assert groups["dp"] == [rank_of(tp, pp, d) for d in range(D)]

    # TwIST's groups for every rank, from the same pure function the runtime walks
    layout = ParallelLayout.for_world(W, n, T, P)
    members = twist_group_members(layout, coords)
    subnet_groups = [m for kind, m in members if kind == "subnet"]
    aggregation_groups = [m for kind, m in members if kind == "aggregation"]
    assert len(subnet_groups) == T * P * n and all(len(m) == R for m in subnet_groups)
    assert len(aggregation_groups) == T * P * R and all(len(m) == n for m in aggregation_groups)
    for family in (subnet_groups, aggregation_groups):  # each a partition of the world
        assert sorted(r for m in family for r in m) == list(range(W))
    for r in range(W):
        tp, pp, dp = coords_of(r)
        mine = groups_of(r, members)
        s, q = dp // R, dp % R  # the subnet r trains, its replica index
        assert mine["subnet"] == [rank_of(tp, pp, s * R + i) for i in range(R)]
        assert mine["aggregation"] == [rank_of(tp, pp, k * R + q) for k in range(n)]

    # the real build_twist_groups, as the sampled ranks, created exactly these groups
    for r in sample:
        b = got["built"][str(r)]
        tp, pp, dp = coords_of(r)
        assert b["coords"] == [r, tp, pp, dp]
        assert b["layout"] == [T, P, D, R]
        assert b["local_subnets"] == [dp // R] and b["replica_index"] == dp % R
        assert b["subnet_group"] == [rank_of(tp, pp, (dp // R) * R + i) for i in range(R)]
        assert b["aggregation_group"] == [rank_of(tp, pp, k * R + dp % R) for k in range(n)]
        assert b["data_parallel_group"] == [rank_of(tp, pp, d) for d in range(D)]
