"""--twist-pin-cut's plan where no rank holds the whole model: 4 gloo ranks (torchrun).

Every rank builds the same full weights for a 2-layer model, with planted units (scaled x50 through
the raw Megatron-core layout) in one copy. It then:
* as TP rank (r % 2) of stage (r // 2) of a TP=2 x PP=2 model, keeps ITS shard, cut by hand from the
  Megatron-core layout ([q heads | k | v] blocks per KV group in linear_qkv, head-major linear_proj
  columns, [gate; up] rows of linear_fc1, one linear_fc2 column per neuron; stage s holds layer s
  named layer 0), and calls twist/pin.py's ``pinned_plan`` with the world as model-parallel group;
* as one of 4 ZeRO-style partitions (distributed/sharded_central.py, flat, padded), sums squared
  row/column norms with ``ShardedCentral.squared_norms`` and calls ``pin.pinned_plan_from_norms`` (what
  the ZeRO round hook and ``--twist-shard-central`` do, here at TP = PP = 1).

    torchrun --nproc_per_node 4 pin_worker.py OUT_DIR      -> OUT_DIR/rank-R.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_twist.config import ModelConfig, TwistConfig
from megatron_twist.distributed.sharded_central import ShardedCentral
from megatron_twist.twist.pin import pinned_plan, pinned_plan_from_norms

MODEL = ModelConfig(
    family="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=32,
    vocab_size=64,
    seq_length=8,
)
# The pinned plan is drawn with the run's TP balance blocks (2 neuron blocks of 16; heads per KV group).
TWIST = TwistConfig(keep_ratio=0.5, num_subnets=2, balance_shards=2)
D, F = 8, 32  # head dim, neurons
PLANTED = {0: ([1, 2, 4, 7], [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31])}
PLANTED[1] = ([0, 3, 5, 6], list(range(4, 12)) + list(range(24, 32)))


def full_weights(planted: bool):
    g = torch.Generator().manual_seed(7)
    out = {}
    for layer in range(MODEL.num_layers):
        pre = f"decoder.layers.{layer}."
        out[pre + "self_attention.linear_qkv.weight"] = torch.randn(96, 64, generator=g)  # 2 x (4 q + k + v) x 8
        out[pre + "self_attention.linear_proj.weight"] = torch.randn(64, 64, generator=g)
        out[pre + "mlp.linear_fc1.weight"] = torch.randn(2 * F, 64, generator=g)  # [gate; up]
        out[pre + "mlp.linear_fc2.weight"] = torch.randn(64, F, generator=g)
        if planted:
            heads, neurons = PLANTED[layer]
            for h in heads:
                out[pre + "self_attention.linear_proj.weight"][:, h * D : (h + 1) * D] *= 50
            for j in neurons:
                out[pre + "mlp.linear_fc1.weight"][[j, F + j]] *= 50
                out[pre + "mlp.linear_fc2.weight"][:, j] *= 50
    return out


def tp_pp_shard(full, tp_rank: int, stage: int):
    """This rank's TP shard of layer ``stage``, named as Megatron names it on that stage (layer 0)."""
    src, dst = f"decoder.layers.{stage}.", "decoder.layers.0."
    qkv = full[src + "self_attention.linear_qkv.weight"]
    half = F // 2
    return {  # one KV group per shard: 4 q heads + k + v, 8 rows each
        dst + "self_attention.linear_qkv.weight": qkv[48 * tp_rank : 48 * (tp_rank + 1)],
        dst + "self_attention.linear_proj.weight": full[src + "self_attention.linear_proj.weight"][
            :, 32 * tp_rank : 32 * (tp_rank + 1)
        ],
        dst + "mlp.linear_fc1.weight": torch.cat(
            [
                full[src + "mlp.linear_fc1.weight"][half * tp_rank : half * (tp_rank + 1)],
                full[src + "mlp.linear_fc1.weight"][F + half * tp_rank : F + half * (tp_rank + 1)],
            ]
        ),
        dst + "mlp.linear_fc2.weight": full[src + "mlp.linear_fc2.weight"][:, half * tp_rank : half * (tp_rank + 1)],
    }


def plan_json(plan):
    return [[list(lu.heads), list(lu.neurons)] for lu in plan.layers]


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 4
    result = {}
    for kind in ("planted", "random"):
        full = full_weights(kind == "planted")
        shard = tp_pp_shard(full, rank % 2, rank // 2)
        plan = pinned_plan(
            MODEL,
            TWIST,
            shard,
            tp_rank=rank % 2,
            tp_size=2,
            first_layer=rank // 2,
            num_layers=1,
            model_parallel_group=dist.group.WORLD,
            agreement_group=dist.group.WORLD,
        )
        result[f"tp_pp_{kind}"] = plan_json(plan)
        sharded = ShardedCentral.from_full(MODEL, full, dist.group.WORLD, device="cpu")
        which = {n: "rows" if "qkv" in n or "fc1" in n else "columns" for n in full}
        norms = sharded.squared_norms(which)
        errors = []  # relative to the largest norm: partial sums are added in another order
        for n, w in which.items():
            want = full[n].pow(2).sum(dim=1 if w == "rows" else 0)
            errors.append(float((norms[n] - want).abs().max() / want.abs().max()))
        result[f"norm_error_{kind}"] = max(errors)
        per_layer = [
            {n.split(".", 3)[3]: norms[n] for n in which if n.startswith(f"decoder.layers.{i}.")}
            for i in range(MODEL.num_layers)
        ]
        plan = pinned_plan_from_norms(
            MODEL,
            TWIST,
            per_layer.__getitem__,
            tp_rank=0,
            tp_size=1,
            first_layer=0,
            num_layers=None,
            device=torch.device("cpu"),
        )
        result[f"zero_{kind}"] = plan_json(plan)
    # an odd-sized tensor: 4 shards of 9, the last with 1 padding element, rows and columns split mid-way
    odd = torch.arange(35, dtype=torch.float32).view(7, 5)
    sharded = ShardedCentral.from_full(MODEL, {"odd": odd}, dist.group.WORLD, device="cpu")
    result["odd_rows"] = sharded.squared_norms({"odd": "rows"})["odd"].tolist()
    result["odd_columns"] = sharded.squared_norms({"odd": "columns"})["odd"].tolist()
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
