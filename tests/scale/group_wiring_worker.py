"""Process-group wiring of a large layout at its real world size, in ONE process, without GPUs.

torch's "fake" backend (torch.testing._internal.distributed.fake_pg) lets one process be rank r of
a world of W: group creation works, collectives return without communicating. For EVERY rank r
this script creates the default group as rank r of W, runs Megatron's real
``initialize_model_parallel(TP, PP)`` and records r's (tp, pp, dp) coordinates and its TP / PP / DP
group members. For the sampled ranks it then runs this project's real ``build_twist_groups``: on the
fake backend ``all_gather_object`` hands back this rank's own object W times, so the one all-gather
it does is answered with the coordinate table collected above (what the real gather returns), and
the members of the subnet and aggregation groups it creates are read back with
``dist.get_process_group_ranks``. Megatron's gloo side groups are not created
(``create_gloo_process_groups=False``): the fake backend cannot make gloo groups, and TwIST does not
use them.

    python group_wiring_worker.py WORLD TP PP NUM_SUBNETS KEEP_RATIO SAMPLE_RANKS(comma) OUT.json
"""

from __future__ import annotations

import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from megatron_twist.config import TwistConfig  # noqa: E402
from megatron_twist.distributed import runtime  # noqa: E402


def init(rank: int, world: int, tp: int, pp: int) -> None:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    ps.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)


def teardown() -> None:
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    world, tp, pp, subnets = (int(x) for x in sys.argv[1:5])
    keep_ratio = float(sys.argv[5])
    sample = [int(x) for x in sys.argv[6].split(",")]
    out_path = sys.argv[7]
    t0 = time.perf_counter()
    coords, megatron_groups = [], {}
    for r in range(world):
        init(r, world, tp, pp)
        coords.append(
            (r, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
        )
        megatron_groups[r] = {
            "tp": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
            "pp": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
            "dp": dist.get_process_group_ranks(ps.get_data_parallel_group()),
        }
        teardown()
    twist = TwistConfig(keep_ratio=keep_ratio, num_subnets=subnets)
    built = {}
    for r in sample:
        init(r, world, tp, pp)
        runtime.all_gather_objects = lambda obj, group=None: list(coords)  # what the real all-gather returns
        groups = runtime.build_twist_groups(twist, tp, pp)
        built[r] = {
            "coords": [groups.rank, groups.tp_rank, groups.pp_rank, groups.dp_rank],
            "subnet_group": (
                dist.get_process_group_ranks(groups.subnet_group) if groups.subnet_group is not None else None
            ),
            "aggregation_group": dist.get_process_group_ranks(groups.aggregation_group),
            "data_parallel_group": dist.get_process_group_ranks(groups.data_parallel_group),
            "local_subnets": list(groups.local_subnets(subnets)),
            "replica_index": groups.replica_index,
            "layout": [
                groups.layout.tensor_parallel,
                groups.layout.pipeline_parallel,
                groups.layout.data_parallel,
                groups.layout.replicas,
            ],
        }
        teardown()
    with open(out_path, "w") as f:
        json.dump(
            {"coords": coords, "megatron_groups": megatron_groups, "built": built, "seconds": time.perf_counter() - t0},
            f,
        )


if __name__ == "__main__":
    main()
