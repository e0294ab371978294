"""Parameters of each rank's real Megatron shard (central model and subnet), for test_plan.py.

Run under torchrun with TP x PP ranks: builds the central GPTModel and a subnet GPTModel (the
sampler's sizes) for several configs in this rank's TP shard / PP stage and writes the counts to
OUT_DIR/rank-R.json.  python shard_count_worker.py TP PP OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TwistConfig  # noqa: E402
from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown  # noqa: E402
from megatron_twist.model.gpt import build_gpt_model, count_parameters  # noqa: E402
from megatron_twist.twist.sampler import SubnetSampler  # noqa: E402

CASES = {
    "tiny": (MODEL_PRESETS["tiny"], dict(keep_ratio=0.5)),
    "small": (MODEL_PRESETS["small"], dict(keep_ratio=0.5)),
    "small-whole-ends": (MODEL_PRESETS["small"], dict(keep_ratio=0.5, whole_layers=(0, -1))),
    "small-mlp-0.75": (MODEL_PRESETS["small"], dict(keep_ratio=0.75, split="mlp")),
}


def main() -> None:
    tp, pp, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    init_distributed()
    try:
        init_model_parallel(1234, tp, pp)
        out = {
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "cases": {},
        }
        for name, (sizes, twist) in CASES.items():
            model, twist = ModelConfig(**sizes), TwistConfig(**twist)
            layer_sizes = SubnetSampler(model, twist, tp).subnet_layer_sizes()
            central = build_gpt_model(model, tensor_parallel_size=tp, pipeline_parallel_size=pp)
            subnet = build_gpt_model(model, layer_sizes, tensor_parallel_size=tp, pipeline_parallel_size=pp)
            out["cases"][name] = {"central": count_parameters(central), "subnet": count_parameters(subnet)}
        with open(os.path.join(out_dir, f"rank-{os.environ['RANK']}.json"), "w") as f:
            json.dump(out, f)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
