"""`twist plan`'s table: a :class:`~megatron_twist.planning.arithmetic.Plan` as text.

(The JSON form is :meth:`Plan.to_dict`.)
"""

from __future__ import annotations

from typing import Optional, Tuple

from .arithmetic import Plan, StagePlan
from .checks import plural
from .sizes import GIB


def _unit(values, units) -> Tuple[str, float]:
    """The largest unit in which the biggest value is at least 1 (else the smallest)."""
    top = max([abs(v) for v in values] + [0])
    for name, size in units:
        if top >= size:
            return name, size
    return units[-1]


_BYTES = (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10))
_FLOPS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6))


def format_plan(plan: Plan) -> str:
    m, t = plan.model, plan.twist
    kinds = [s.kind for s in plan.stages]
    central = (
        "sharded over data parallel (--twist-shard-central)" if plan.shard_central else "replicated over data parallel"
    )
    path_text = {
        "megatron": f"Megatron-core path (`twist train`): central model {central}, "
        + (
            "subnets in bf16 from fp32 masters, central model and Adam fp32"
            if plan.dtype == "bf16"
            else "fp32 weights, gradients and Adam"
        ),
        "deepspeed": f"DeepSpeed path (`twist train --deepspeed`): ZeRO-{plan.zero_stage}, {plan.dtype}, "
        f"central model sharded over data parallel",
    }[plan.path]
    sl = plan.subnet_layer
    nodes = f"{plan.nodes} nodes x {plan.gpus_per_node}" if plan.nodes else f"{plan.gpus_per_node} per node"
    lines = [
        f"twist plan: {path_text}",
        f"model   {m.family}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} query heads / "
        f"{m.num_query_groups} KV heads (head dim {m.head_dim}), FFN {m.ffn_hidden_size}, vocab {m.vocab_size}, "
        f"seq {m.seq_length}: {plan.central_params_total:,} parameters",
        f"subnet  keep ratio {t.keep_ratio}: {sl.heads} query heads / {sl.groups} KV heads, FFN {sl.ffn} per split "
        f"layer: {plan.subnet_params_total:,} parameters "
        f"({plan.subnet_params_total / plan.central_params_total:.3f} of the central model)",
        f"layout  {plan.world_size} GPUs ({nodes}) = TP {plan.tensor_parallel} x PP {plan.pipeline_parallel} x "
        f"DP {plan.data_parallel}; DP = {plural(t.num_subnets, 'subnet')} x {plural(plan.replicas, 'replica')}; "
        f"aggregation group of {plural(plan.aggregation_group_size, 'rank')}",
        f"batch   micro batch {plan.micro_batch_size} x {plan.num_microbatches} micro-batch(es) per step x seq "
        f"{m.seq_length}; {plan.tokens_per_step:,} tokens per global step (all subnets); {plan.local_steps} local "
        f"steps per round"
        + (f"; pipeline bubble {plan.pipeline_bubble:.1%} (1F1B)" if plan.pipeline_parallel > 1 else ""),
        "checks",
        *[f"  ok  {c}" for c in plan.checks],
        "",
    ]
    w0, w = 46, 14
    head = f"{'per GPU':<{w0}}" + "".join(f"{k + ' stage':>{w}}" for k in kinds)

    def row(label, values, fmt):
        return f"{label:<{w0}}" + "".join(f"{fmt(v):>{w}}" for v in values)

    st = plan.stages
    mem_unit, mem_size = _unit([s.total_memory for s in st], _BYTES)
    lines += [
        head,
        row("  layers", [s.layers for s in st], str),
        row("  central parameters (this shard)", [s.central_params for s in st], lambda v: f"{v:,}"),
        row("  subnet parameters (this shard)", [s.subnet_params for s in st], lambda v: f"{v:,}"),
        f"  memory, {mem_unit}",
    ]
    in_mem = lambda v: f"{v / mem_size:.2f}"  # noqa: E731
    for key in st[0].memory:
        lines.append(row(f"    {key}", [s.memory.get(key, 0) for s in st], in_mem))
    if plan.gpu_memory_bytes:
        lines.append(
            row(
                f"    share of {plan.gpu_memory_bytes / GIB:g} GiB",
                [s.total_memory / plan.gpu_memory_bytes for s in st],
                lambda v: f"{100 * v:.0f}%",
            )
        )
    dense_label = (
        "    (dense bf16 + distributed optimizer: total)"
        if plan.path == "megatron" and plan.dtype == "bf16"
        else "    (dense training, same layout: total)"
    )
    lines.append(row(dense_label, [s.dense_memory for s in st], in_mem))
    fl_unit, fl_size = _unit([s.dense_flops_per_step for s in st], _FLOPS)
    lines += [
        f"  compute per step, {fl_unit}",
        row(
            "    TwIST (subnet forward + backward)",
            [s.subnet_flops_per_step for s in st],
            lambda v: f"{v / fl_size:.2f}",
        ),
        row("    dense (same micro-batch)", [s.dense_flops_per_step for s in st], lambda v: f"{v / fl_size:.2f}"),
        row("    TwIST / dense", [s.subnet_flops_per_step / s.dense_flops_per_step for s in st], lambda v: f"{v:.3f}"),
    ]
    traffic = [
        v
        for s in st
        for v in (
            s.aggregation_bytes_per_round,
            s.replica_grad_bytes_per_round,
            s.dense_dp_bytes_per_step * plan.local_steps,
        )
    ]
    tr_unit, tr_size = _unit(traffic, _BYTES)
    in_tr = lambda v: f"{v / tr_size:.2f}"  # noqa: E731
    lines.append(f"  traffic per round of {plan.local_steps} steps, {tr_unit}")
    agg_label = (
        "    aggregation all-reduce (payload)"
        if plan.path == "megatron" and not plan.shard_central
        else "    aggregation all-gather + reduce-scatter"
    )
    lines.append(row(agg_label, [s.aggregation_bytes_per_round for s in st], in_tr))
    wire = "      ring wire bytes per GPU"
    if plan.path == "megatron":
        lines.append(row(wire, [s.aggregation_wire_bytes_per_round for s in st], in_tr))
    lines.append(row("    subnet replicas' gradients (payload)", [s.replica_grad_bytes_per_round for s in st], in_tr))
    if plan.path == "megatron":
        lines.append(row(wire, [s.replica_grad_wire_bytes_per_round for s in st], in_tr))
    steps = plan.local_steps
    lines += [
        row("    dense data parallel (gradients, payload)", [s.dense_dp_bytes_per_step * steps for s in st], in_tr),
        row(wire, [s.dense_dp_wire_bytes_per_step * steps for s in st], in_tr),
        row(
            "    TwIST / dense (ring wire bytes per GPU)",
            [_ratio(s, steps) for s in st],
            lambda v: "n/a" if v is None else f"{v:.3f}",
        ),
    ]
    if plan.notes:
        lines += ["notes", *[f"  - {n}" for n in plan.notes]]
    return "\n".join(lines)


def _ratio(s: StagePlan, steps: int) -> Optional[float]:
    """TwIST's traffic over dense data parallel's, both in wire bytes per GPU."""
    dense = s.dense_dp_wire_bytes_per_step * steps
    twist = s.aggregation_wire_bytes_per_round + s.replica_grad_wire_bytes_per_round
    return None if dense == 0 else twist / dense
