"""A host training loop (as Megatron-LM or a user would write it) with TwIST as a hook.

    torchrun --nproc_per_node 2 tests/integrations/host_loop_worker.py OUT_DIR

Same model, data, optimizer and schedule as `twist train --model-preset tiny --mock-data ...` in
test_round_hook.py; writes OUT_DIR/central.safetensors (rank 0) and OUT_DIR/losses.json.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

from safetensors.torch import save_file  # noqa: E402

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig  # noqa: E402
from megatron_twist.data.batches import SyntheticBatches  # noqa: E402
from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, shutdown  # noqa: E402
from megatron_twist.integrations.round_hook import TwistRoundHook  # noqa: E402
from megatron_twist.model.gpt import build_gpt_model  # noqa: E402
from megatron_twist.optim.optimizer import build_optimizer, build_scheduler  # noqa: E402
from megatron_twist.optim.step import train_step  # noqa: E402
from megatron_twist.training.twist_trainer import build_central  # noqa: E402
from megatron_twist.twist.sampler import SubnetSampler  # noqa: E402

out = sys.argv[1]
model = ModelConfig(**MODEL_PRESETS["tiny"])
twist = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=4)
train = TrainConfig(train_iters=10, micro_batch_size=2, log_interval=100)
init_distributed()
groups = build_twist_groups(twist)
central = build_central(model, train.seed)
# the host builds and owns the subnet model, its optimizer and its data
subnet = build_gpt_model(model, SubnetSampler(model, twist).subnet_layer_sizes())
optimizer = build_optimizer(subnet, train)
scheduler = build_scheduler(optimizer, train, twist.lr_scale)
batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=train.seed)
hook = TwistRoundHook(model, twist, groups, central, subnet, optimizer)
losses = []
for iteration in range(train.train_iters):
    hook.on_iteration_start(iteration)
    batch = batches.get(iteration, hook.subnet, twist.num_subnets)
    losses.append(train_step(subnet, optimizer, scheduler, batch, iteration, train.clip_grad))
hook.finish(train.train_iters)
if groups.rank == 0:
    save_file({k: v.detach().contiguous() for k, v in central.params.items()}, f"{out}/central.safetensors")
json.dump(losses, open(f"{out}/losses-{groups.rank}.json", "w"))
assert central.step == 10 and central.round == 3, (central.step, central.round)
shutdown()
