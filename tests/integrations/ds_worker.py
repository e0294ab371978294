"""TwIST on DeepSpeed engines: torchrun --nproc_per_node 2 ds_worker.py OUT_DIR STAGE [STAGE ...]

For each ZeRO stage: 2 subnets (one per rank) of the tiny model, trained with the ds_configs/cpu_zeroN.json
engine; writes OUT_DIR/zeroN/central.safetensors (rank 0) and OUT_DIR/zeroN/losses-RANK.json.
Also checks, on the real engine, that the units outside this rank's subnet cannot move during its
local steps (they are not in its model or optimizer), and that every parameter's Adam state is linked.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig  # noqa: E402
from megatron_twist.data.batches import SyntheticBatches  # noqa: E402
from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, shutdown  # noqa: E402
from megatron_twist.integrations.ds_config import twist_config_from_ds  # noqa: E402
from megatron_twist.training.deepspeed_trainer import train_with_deepspeed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
out = Path(sys.argv[1])
model = ModelConfig(**MODEL_PRESETS["tiny"])
train = TrainConfig(train_iters=10, micro_batch_size=2, log_interval=100)
init_distributed()
groups = None
for stage in sys.argv[2:]:  # "2" = ds_configs/cpu_zero2.json; "2bf16" = the same with bf16 enabled
    cfg = json.loads((REPO / "ds_configs" / f"cpu_zero{stage[0]}.json").read_text())
    if stage.endswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    twist = twist_config_from_ds(cfg)
    groups = groups or build_twist_groups(twist)
    batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=train.seed)
    central, losses, engine = train_with_deepspeed(model, twist, train, groups, batches, cfg)
    expected_dtype = torch.bfloat16 if stage.endswith("bf16") else torch.float32
    assert next(engine.module.parameters()).dtype == expected_dtype  # the engine computes in bf16
    for name, p in engine.module.named_parameters():  # every parameter's Adam state reachable
        if engine.zero_optimization_stage() > 0:
            from deepspeed.utils import safe_get_full_optimizer_state

            assert safe_get_full_optimizer_state(p, "exp_avg") is not None, name
    # The engine's optimizer holds exactly this subnet's units: units outside it have no optimizer
    # state on this rank, so they cannot move during its local steps (no frozen-parameter drift).
    from megatron_twist.model.gpt import count_parameters

    subnet_params = count_parameters(engine.module)
    assert subnet_params < central.num_parameters()
    # The central model is sharded over the ranks: this rank keeps ~1/W of every tensor, nothing more.
    world = torch.distributed.get_world_size()
    held = sum(t.numel() for t in central.shards["param"].values())
    assert held == sum(-(-s.numel() // world) for s in central.shapes.values()), held
    if engine.zero_optimization_stage() in (1, 2):
        held = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
        reps = groups.layout.replicas
        if reps == 1:
            assert held == subnet_params, (held, subnet_params)  # one rank per subnet: the whole subnet
        else:  # ZeRO partitions the subnet over its replicas: this rank holds ~1/replicas of it
            assert held < subnet_params <= held * reps, (held, subnet_params, reps)
    d = out / f"zero{stage}"
    d.mkdir(parents=True, exist_ok=True)
    weights, _ = central.full_state()  # collective: consolidated for the comparison
    if groups.rank == 0:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(d / "central.safetensors"))
    (d / f"losses-{groups.rank}.json").write_text(json.dumps(losses))
    torch.distributed.barrier()
shutdown()
