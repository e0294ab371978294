"""`twist plan`: its numbers recomputed here from the model sizes, its parameter counts against real
Megatron models (whole and TP x PP shards), its traffic against a real run (test_slurm_script.py),
and its refusals.

The arithmetic below is written out from the sizes on purpose (no planner function is called to
get an expected value): 70B = Llama 3 70B's shape, whose parameter count is public.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_twist.config import MODEL_PRESETS, ConfigError, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.planning.arithmetic import make_plan
from megatron_twist.planning.sizes import LayerShape, stage_params, subnet_layer_shapes

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
# Llama 3 70B (the sizes); 70,553,706,496 parameters is its published count
L, H_, Q, G, F, V = 80, 8192, 64, 8, 28672, 128256
LLAMA3_70B_PARAMS = 70_553_706_496


def layer_shard(h, heads, groups, ffn, d, tp):
    """One Llama layer on one TP shard: QKV, output projection, SwiGLU (3 matrices), two RMSNorms."""
    return (h * (heads + 2 * groups) * d + heads * d * h + 3 * h * ffn) // tp + 2 * h


def llama_stage(layers, h, heads, groups, ffn, vocab, tp, pp, k, d):
    n = layers // pp * layer_shard(h, heads, groups, ffn, d, tp)
    if k == 0:
        n += vocab * h // tp  # word embeddings (vocab-parallel)
    if k == pp - 1:
        n += h + vocab * h // tp  # final norm + output layer
    return n


def llama_activations(layers, h, heads, groups, ffn, vocab, tp, pp, k, d, seq, mbs, e=4):
    per_layer = (
        seq * mbs * (4 * h + (heads + 2 * groups) * d // tp + heads * d // tp + 3 * ffn // tp)
        + mbs * (heads // tp) * seq * seq
    )
    n = layers // pp * per_layer
    if k == pp - 1:
        n += 2 * seq * mbs * h + 2 * seq * mbs * vocab // tp
    return e * n


def llama_flops(layers, h, heads, groups, ffn, vocab, tp, pp, k, d, seq, mbs):
    matmul = (h * (heads + 2 * groups) * d + heads * d * h + 3 * h * ffn) // tp
    fwd = layers // pp * (2 * seq * mbs * matmul + 4 * mbs * seq * seq * (heads // tp) * d)
    if k == pp - 1:
        fwd += 2 * seq * mbs * h * vocab / tp
    return 3 * fwd


def megatron_peak(tp, pp, kappa=0.5, seq=4096, mbs=1):
    """Bytes on the fullest GPU of the Megatron path for the 70B model (fp32 everything)."""
    d = H_ // Q
    worst = 0
    for k in {0, pp // 2, pp - 1}:
        nc = llama_stage(L, H_, Q, G, F, V, tp, pp, k, d)
        ns = llama_stage(L, H_, int(Q * kappa), G, int(F * kappa), V, tp, pp, k, d)
        act = llama_activations(L, H_, int(Q * kappa), G, int(F * kappa), V, tp, pp, k, d, seq, mbs)
        worst = max(worst, 4 * nc + 8 * nc + 12 * nc + 16 * ns + act)
    return worst


def test_70b_script_plan_matches_independent_arithmetic(script_plan, run_script):
    plan = script_plan("twist_70b.sh")
    m = plan["model"]
    assert (
        m["num_layers"],
        m["hidden_size"],
        m["num_attention_heads"],
        m["num_query_groups"],
        m["ffn_hidden_size"],
        m["vocab_size"],
        m["family"],
    ) == (L, H_, Q, G, F, V, "llama")
    seq, mbs, n, kappa, steps = m["seq_length"], plan["micro_batch_size"], 2, 0.5, plan["local_steps"]
    assert plan["twist"]["num_subnets"] == n and plan["twist"]["keep_ratio"] == kappa
    # the recipe a cluster team would submit (issue #16 item 4): bf16, the central model sharded over
    # data parallel, a global batch of 1,024 sequences per subnet, PP 4
    assert plan["dtype"] == "bf16" and plan["shard_central"] is True
    T, P, W, d = 8, 4, 256, H_ // Q
    D = W // (T * P)
    assert (plan["world_size"], plan["tensor_parallel"], plan["pipeline_parallel"]) == (W, T, P)
    assert (plan["data_parallel"], plan["replicas"], plan["aggregation_group_size"]) == (D, D // n, n)
    micro = 1024 // (mbs * (D // n))  # micro-batches per step: 1,024 sequences over each subnet's 4 replicas
    assert plan["num_microbatches"] == micro == 256
    assert plan["tokens_per_step"] == 1024 * seq * n  # 8,388,608 tokens per global step (both subnets)
    assert plan["pipeline_bubble"] == (P - 1) / (micro + P - 1) <= 0.10

    total = L * layer_shard(H_, Q, G, F, d, 1) + 2 * V * H_ + H_
    assert plan["central_params_total"] == total == LLAMA3_70B_PARAMS
    kq, kf = int(Q * kappa), int(F * kappa)  # 32 query heads (4 of 8 in every KV group), 14336 neurons
    assert plan["subnet_layer"] == {"heads": kq, "groups": G, "ffn": kf}
    assert plan["subnet_params_total"] == L * layer_shard(H_, kq, G, kf, d, 1) + 2 * V * H_ + H_

    assert set(plan["stages"]) == {"first", "middle", "last"}
    for kind, k in (("first", 0), ("middle", 1), ("last", P - 1)):
        st = plan["stages"][kind]
        nc = llama_stage(L, H_, Q, G, F, V, T, P, k, d)
        ns = llama_stage(L, H_, kq, G, kf, V, T, P, k, d)
        assert (st["central_params"], st["subnet_params"]) == (nc, ns)
        in_flight = min(micro, P - k)  # 1F1B: stage k holds up to P - k micro-batches' activations
        act = in_flight * llama_activations(L, H_, kq, G, kf, V, T, P, k, d, seq, mbs, e=2)
        shard = -(-nc // D)
        largest = V // T * H_ if k in (0, P - 1) else 2 * F // T * H_  # vocabulary table, else fused gate/up
        expected = {
            "central weights (1/DP shard)": 4 * shard,
            "central Adam moments (1/DP shard)": 8 * shard,
            "round buffers (largest central tensor, x2)": 2 * 4 * largest,
            "subnet weights": 6 * ns,  # fp32 masters + bf16 twin
            "subnet gradients": 6 * ns,  # bf16 + fp32
            "subnet Adam moments": 8 * ns,
            "activations (estimate)": act,
        }
        expected["total"] = sum(expected.values())
        assert st["memory"] == expected
        assert st["total_memory"] <= 70 * GIB  # the fullest GPU at most 70 of its 80 GiB
        dense_act = in_flight * llama_activations(L, H_, Q, G, F, V, T, P, k, d, seq, mbs, e=2)
        assert st["dense_memory"] == 6 * nc + 12 * nc // D + dense_act  # bf16 + distributed optimizer
        flops = llama_flops(L, H_, kq, G, kf, V, T, P, k, d, seq, mbs)
        assert st["subnet_flops_per_step"] == pytest.approx(micro * flops)
        assert st["dense_flops_per_step"] == pytest.approx(micro * llama_flops(L, H_, Q, G, F, V, T, P, k, d, seq, mbs))
        assert 0.45 < st["subnet_flops_per_step"] / st["dense_flops_per_step"] < 0.6
        # per round: an all-gather at refill and a reduce-scatter at aggregation of weights + 2 moments,
        # each tensor of the stage padded to the 8 data-parallel shards; (D - 1) / D of it on the wire
        assert st["aggregation_bytes_per_round"] == 2 * 3 * 4 * shard * D
        assert st["aggregation_wire_bytes_per_round"] == int(2 * 3 * 4 * shard * D * (D - 1) / D)
        # the subnet's gradients among its 4 replicas every step, against dense DP's (group of 8)
        assert st["replica_grad_bytes_per_round"] == steps * 4 * ns
        assert st["dense_dp_bytes_per_step"] == 4 * nc
        assert st["replica_grad_wire_bytes_per_round"] == steps * 4 * ns * 3 // 2  # 2 x 3/4
        assert st["dense_dp_wire_bytes_per_step"] == 4 * nc * 7 // 4  # 2 x 7/8
    assert plan["peak_stage"] == "first"

    table = run_script("twist_70b.sh", "--plan")
    assert table.returncode == 0, table.stderr
    first = plan["stages"]["first"]
    assert "256 GPUs (32 nodes x 8) = TP 8 x PP 4 x DP 8" in table.stdout
    assert f"{first['total_memory'] / GIB:.2f}" in table.stdout and "pipeline bubble 1.2% (1F1B)" in table.stdout
    assert f"{LLAMA3_70B_PARAMS:,} parameters" in table.stdout


def _cli_plan(*args):
    return subprocess.run(
        [sys.executable, "-m", "megatron_twist", "plan", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _model70(**kw) -> ModelConfig:
    sizes = dict(
        family="llama",
        num_layers=L,
        hidden_size=H_,
        num_attention_heads=Q,
        num_query_groups=G,
        ffn_hidden_size=F,
        vocab_size=V,
        seq_length=4096,
    )
    sizes.update(kw)
    return ModelConfig(**sizes)


def test_refuses_tp_that_does_not_divide_the_heads_kept():
    # multi-head attention, 48 heads, kappa 0.25: a subnet keeps 12 heads, which 8 TP shards cannot share
    model = _model70(hidden_size=6144, num_attention_heads=48, num_query_groups=48, ffn_hidden_size=16384)
    twist = TwistConfig(keep_ratio=0.25, num_subnets=4)
    train = TrainConfig(micro_batch_size=1)
    with pytest.raises(ConfigError) as e:
        make_plan(model, twist, train, world_size=256, tensor_parallel=8, pipeline_parallel=8)
    msg = str(e.value)
    assert "tensor parallel size 8 does not divide the 12 query heads a subnet keeps per layer" in msg
    # the suggested sizes: TP up to a node's 8 GPUs dividing heads, kept heads, FFN, kept FFN and vocab
    good = [
        t
        for t in (1, 2, 4, 8)
        if 48 % t == 0 and 12 % t == 0 and 16384 % t == 0 and 4096 % t == 0 and V % t == 0 and (48 // t) % 4 == 0
    ]
    assert good == [1, 2, 4] and "suggested fix: use --tensor-model-parallel-size in {1, 2, 4}" in msg
    make_plan(model, twist, train, world_size=256, tensor_parallel=4, pipeline_parallel=8, gpu_memory_gib=0)

    # the same through the command line: exit code 2, the reason and the fix on stderr
    proc = _cli_plan(
        "--model-family",
        "llama",
        "--num-layers",
        80,
        "--hidden-size",
        6144,
        "--num-attention-heads",
        48,
        "--num-query-groups",
        48,
        "--ffn-hidden-size",
        16384,
        "--vocab-size",
        V,
        "--seq-length",
        4096,
        "--mock-data",
        "--keep-ratio",
        0.25,
        "--num-subnets",
        4,
        "--micro-batch-size",
        1,
        "--tensor-model-parallel-size",
        8,
        "--pipeline-model-parallel-size",
        8,
        "--nodes",
        32,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("twist plan: error: tensor parallel size 8 does not divide the 12 query heads")
    assert "suggested fix: use --tensor-model-parallel-size in {1, 2, 4}" in proc.stderr


def test_refuses_impossible_70b_layouts_with_a_fix(run_script):
    model, twist, train = _model70(), TwistConfig(keep_ratio=0.5, num_subnets=2), TrainConfig(micro_batch_size=1)

    def refusal(**kw):
        args = dict(world_size=256, tensor_parallel=8, pipeline_parallel=8)
        args.update(kw)
        with pytest.raises(ConfigError) as e:
            make_plan(model, args.pop("twist", twist), train, **args)
        return str(e.value)

    assert "8 key-value heads do not divide over tensor parallel size 16" in refusal(tensor_parallel=16)
    assert "80 layers do not divide over pipeline parallel size 3" in refusal(pipeline_parallel=3)
    msg = refusal(twist=TwistConfig(keep_ratio=0.5, num_subnets=3))
    assert "4 data-parallel ranks do not divide into 3 subnets" in msg and "suggested fix" in msg
    assert "do not divide into TP 8 x PP 8" in refusal(world_size=96)

    # PP 4 does not fit 80 GiB; the fix is the smallest TP x PP that divides and fits, found here independently
    assert megatron_peak(8, 4) > 80 * GIB
    msg = refusal(pipeline_parallel=4)
    assert f"needs {megatron_peak(8, 4) / GIB:.1f} GiB" in msg
    fits = sorted(
        (t * p, p, t)
        for t in (1, 2, 4, 8)
        for p in (1, 2, 4, 5, 8, 10, 16, 20, 40, 80)
        if 256 % (t * p) == 0 and 256 // (t * p) % 2 == 0 and megatron_peak(t, p) <= 80 * GIB
    )
    _, p, t = fits[0]
    assert (t, p) == (8, 8)
    assert f"suggested fix: --tensor-model-parallel-size {t} --pipeline-model-parallel-size {p}" in msg

    # through the script: exit code 2 before anything starts
    proc = run_script("twist_70b.sh", "--plan", TP=16)
    assert proc.returncode == 2
    assert "twist plan: error: 8 key-value heads do not divide over tensor parallel size 16" in proc.stderr


def test_the_planner_needs_no_torch():
    code = (
        "import sys, megatron_twist.planning, megatron_twist.distributed.layout; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


CASES = {
    "tiny": (MODEL_PRESETS["tiny"], dict(keep_ratio=0.5)),
    "small": (MODEL_PRESETS["small"], dict(keep_ratio=0.5)),
    "small-whole-ends": (MODEL_PRESETS["small"], dict(keep_ratio=0.5, whole_layers=(0, -1))),
    "small-mlp-0.75": (MODEL_PRESETS["small"], dict(keep_ratio=0.75, split="mlp")),
}


def test_parameter_counts_equal_built_models(mcore):
    from megatron_twist.model.gpt import build_gpt_model, count_parameters
    from megatron_twist.twist.sampler import SubnetSampler

    cases = dict(
        CASES,
        **{
            "tiny-gpt2": (MODEL_PRESETS["tiny-gpt2"], dict(keep_ratio=0.5)),
            "small-gpt2-heads": (MODEL_PRESETS["small-gpt2"], dict(keep_ratio=0.25, num_subnets=4, split="heads")),
        },
    )
    for name, (sizes, tw) in cases.items():
        model, twist = ModelConfig(**sizes), TwistConfig(**tw)
        layer_sizes = SubnetSampler(model, twist, 1).subnet_layer_sizes()
        shapes = subnet_layer_shapes(model, twist, 1)
        assert [(s.num_attention_heads, s.num_query_groups, s.ffn_hidden_size) for s in layer_sizes] == [
            (s.heads, s.groups, s.ffn) for s in shapes
        ], name
        full = [LayerShape(model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)] * model.num_layers
        assert stage_params(model, full, 1, 1, 0) == count_parameters(build_gpt_model(model)), name
        assert stage_params(model, shapes, 1, 1, 0) == count_parameters(build_gpt_model(model, layer_sizes)), name


@pytest.mark.multiprocess
def test_shard_counts_equal_megatron_shards(tmp_path, run_torchrun):
    """TP 2 x PP 2 on 4 ranks: every rank's central and subnet shard, first and last stage."""

    run_torchrun(4, [REPO / "tests" / "scale" / "shard_count_worker.py", 2, 2, tmp_path], timeout=300)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        for name, (sizes, tw) in CASES.items():
            model, twist = ModelConfig(**sizes), TwistConfig(**tw)
            full = [
                LayerShape(model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)
            ] * model.num_layers
            sub = subnet_layer_shapes(model, twist, 2)
            assert r["cases"][name]["central"] == stage_params(model, full, 2, 2, r["pp_rank"]), (name, r)
            assert r["cases"][name]["subnet"] == stage_params(model, sub, 2, 2, r["pp_rank"]), (name, r)


def test_deepspeed_path_arithmetic(tmp_path):
    """8B recipe's DeepSpeed variant: ZeRO-3 bf16 over 8 replicas per subnet, central sharded 16 ways."""
    L8, h, q, g, f = 32, 4096, 32, 8, 14336
    model = ModelConfig(
        family="llama",
        num_layers=L8,
        hidden_size=h,
        num_attention_heads=q,
        num_query_groups=g,
        ffn_hidden_size=f,
        vocab_size=V,
        seq_length=4096,
    )
    twist, train = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=20), TrainConfig(micro_batch_size=1)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
    }
    plan = make_plan(model, twist, train, world_size=16, path="deepspeed", ds_config=ds, gpus_per_node=8)
    d, W, R = h // q, 16, 8
    assert plan.central_params_total == 8_030_261_248  # Llama 3 8B's published count
    tensors = [h * (q + 2 * g) * d, q * d * h, 2 * h * f, f * h, h, h] * L8 + [V * h, h, V * h]
    padded = sum(-(-n // W) * W for n in tensors)
    ns = L8 * layer_shard(h, 16, g, 7168, d, 1) + 2 * V * h + h
    st = plan.stages[0]
    assert st.subnet_params == ns
    assert st.memory["central shard (weights + 2 moments)"] == 3 * 4 * padded // W
    assert st.memory["round transient (2 tensors)"] == 2 * 4 * V * h  # the embedding is the largest tensor
    assert st.memory["subnet weights"] == 2 * ns // R and st.memory["subnet gradients"] == 2 * ns // R
    assert st.memory["subnet optimizer (master + Adam)"] == 12 * ns // R
    assert st.memory["activations (estimate)"] == llama_activations(L8, h, 16, g, 7168, V, 1, 1, 0, d, 4096, 1, e=2)
    assert st.memory["start-up peak: full central weights, fp32"] == 4 * plan.central_params_total
    steady = sum(v for k, v in st.memory.items() if k not in ("total", "start-up peak: full central weights, fp32"))
    assert st.total_memory == max(steady, 4 * plan.central_params_total)
    assert st.aggregation_bytes_per_round == 2 * 3 * 4 * padded  # all-gather at refill + reduce-scatter
    # TP 2 (DeepSpeed with Megatron-core's TP layers): every TP position shards its own TP shard of the
    # central model over its W = 8 data-parallel ranks; the subnet is a TP shard over R = 4 replicas.
    plan = make_plan(model, twist, train, world_size=16, tensor_parallel=2, path="deepspeed", ds_config=ds)
    W2, R2 = 8, 4
    shard_tensors = [h * (q + 2 * g) * d // 2, q * d * h // 2, 2 * h * f // 2, f * h // 2, h, h] * L8
    shard_tensors += [V * h // 2, h, V * h // 2]  # vocab-parallel embedding, final norm, output layer
    assert sum(shard_tensors) == llama_stage(L8, h, q, g, f, V, 2, 1, 0, d)
    padded = sum(-(-n // W2) * W2 for n in shard_tensors)
    st = plan.stages[0]
    assert st.subnet_params == llama_stage(L8, h, 16, g, 7168, V, 2, 1, 0, d)
    assert st.memory["central shard (weights + 2 moments)"] == 3 * 4 * padded // W2
    assert st.memory["round transient (2 tensors)"] == 2 * 4 * V * h // 2
    assert st.memory["subnet weights"] == 2 * st.subnet_params // R2
    assert st.aggregation_bytes_per_round == 2 * 3 * 4 * padded
    with pytest.raises(ConfigError, match="pipeline parallelism is not supported with --deepspeed"):
        make_plan(model, twist, train, world_size=16, pipeline_parallel=2, path="deepspeed", ds_config=ds)
    with pytest.raises(ConfigError, match="conflicts with train_micro_batch_size_per_gpu"):
        make_plan(model, twist, TrainConfig(micro_batch_size=2), world_size=16, path="deepspeed", ds_config=ds)


def test_micro_batches_scale_tokens_flops_and_in_flight_activations_and_set_the_bubble():
    """--global-batch-size in the planner, against hand arithmetic: N micro-batches per step multiply the
    tokens and FLOPs of a step; under 1F1B stage r holds min(N, PP - r) micro-batches' activations; the
    bubble is (PP - 1) / (N + PP - 1)."""
    model, twist = _model70(), TwistConfig(keep_ratio=0.5, num_subnets=2)
    kw = dict(world_size=256, tensor_parallel=8, pipeline_parallel=4, gpu_memory_gib=0)
    one = make_plan(model, twist, TrainConfig(micro_batch_size=1), **kw)
    # DP = 256 / 32 = 8 = 2 subnets x 4 replicas: 1 x 4 replicas x 64 micro-batches = 256 per subnet
    many = make_plan(model, twist, TrainConfig(micro_batch_size=1, global_batch_size=256), **kw)
    assert one.num_microbatches == 1 and many.num_microbatches == 64
    assert many.tokens_per_step == 64 * one.tokens_per_step == 2 * 256 * 4096
    assert one.pipeline_bubble == 3 / 4 and many.pipeline_bubble == 3 / 67
    for a, b in zip(one.stages, many.stages):
        assert b.subnet_flops_per_step == 64 * a.subnet_flops_per_step
        act = "activations (estimate)"
        assert b.memory[act] == (4 - a.pp_rank) * a.memory[act]  # min(64, 4 - r) micro-batches in flight
    assert any("3/67 = 4.5% of a step" in n for n in many.notes)
    with pytest.raises(ConfigError, match="--global-batch-size 254 is not a multiple of --micro-batch-size 1 x 4"):
        make_plan(model, twist, TrainConfig(micro_batch_size=1, global_batch_size=254), **kw)


def test_bf16_adds_the_twin_and_its_gradients_and_halves_activations():
    """--bf16 on the Megatron path, against hand arithmetic: the subnet keeps fp32 masters (4 N_s) and a
    bf16 twin (2 N_s), bf16 gradients (2 N_s) handed to fp32 ones (4 N_s); activations take 2 bytes
    per element instead of 4; the central model is unchanged (fp32)."""
    model, twist = _model70(), TwistConfig(keep_ratio=0.5, num_subnets=2)
    kw = dict(world_size=256, tensor_parallel=8, pipeline_parallel=8, gpu_memory_gib=0)
    fp32 = make_plan(model, twist, TrainConfig(micro_batch_size=1), **kw)
    bf16 = make_plan(model, twist, TrainConfig(micro_batch_size=1, bf16=True), **kw)
    assert bf16.dtype == "bf16" and fp32.dtype == "fp32"
    for a, b in zip(fp32.stages, bf16.stages):
        ns = a.subnet_params
        assert b.memory["subnet weights"] == 6 * ns and b.memory["subnet gradients"] == 6 * ns
        assert b.memory["central weights"] == a.memory["central weights"] == 4 * a.central_params
        assert b.memory["activations (estimate)"] * 2 == a.memory["activations (estimate)"]
        # dense bf16 with Megatron's distributed optimizer: 2 + 4 bytes, and 12 / DP (DP = 4)
        nc = a.central_params
        assert b.dense_memory == 6 * nc + 12 * nc // 4 + (a.dense_memory - 16 * nc) // 2  # bf16 activations


def test_sharded_central_model_costs_one_dp_th_and_two_largest_tensors():
    """--twist-shard-central in the planner, against hand arithmetic (70B, TP 8 x PP 8 x DP 4): the
    central weights and moments are 12 bytes x ceil(N_c / DP), the round needs two buffers of the
    stage's largest tensor (the vocabulary table on the first and last stages: 128256 / 8 x 8192; the
    fused gate/up weight elsewhere: 2 x 28672 / 8 x 8192), fp32; no central-sized buffer."""
    model, twist = _model70(), TwistConfig(keep_ratio=0.5, num_subnets=2)
    kw = dict(world_size=256, tensor_parallel=8, pipeline_parallel=8, gpu_memory_gib=0)
    rep = make_plan(model, twist, TrainConfig(micro_batch_size=1), **kw)
    sh = make_plan(model, twist, TrainConfig(micro_batch_size=1), shard_central=True, **kw)
    assert sh.shard_central and not rep.shard_central
    for a, b in zip(rep.stages, sh.stages):
        nc, dp = a.central_params, 4
        assert b.memory["central weights (1/DP shard)"] == 4 * -(-nc // dp)
        assert b.memory["central Adam moments (1/DP shard)"] == 8 * -(-nc // dp)
        largest = 128256 // 8 * 8192 if a.kind in ("first", "last") else 2 * 28672 // 8 * 8192
        assert b.memory["round buffers (largest central tensor, x2)"] == 2 * 4 * largest
        assert "aggregation buffer" not in b.memory
        assert a.total_memory - b.total_memory > 20 * 2**30  # 24 N_c bytes become 12 N_c / 4 + buffers
        # per round, one subnet per rank: all-gather + reduce-scatter of weights and 2 moments
        assert b.aggregation_bytes_per_round == 2 * 3 * 4 * -(-nc // dp) * dp


def test_a_layout_that_cannot_hold_the_sharded_recipe_is_refused_with_the_fix():
    """The 70B recipe (bf16, sharded central model, 1,024 sequences per subnet) at PP 2 needs more than
    80 GiB on its first stage (2 micro-batches of 40 layers in flight); the planner, which the
    Slurm script runs before anything starts, refuses it and names the smallest layout that fits."""
    model, twist = _model70(), TwistConfig(keep_ratio=0.5, num_subnets=2)
    train = TrainConfig(micro_batch_size=1, global_batch_size=1024, bf16=True)
    with pytest.raises(ConfigError) as e:
        make_plan(model, twist, train, world_size=256, tensor_parallel=8, pipeline_parallel=2, shard_central=True)
    assert "more than the 80 GiB of a GPU" in str(e.value)
    assert "suggested fix: --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4" in str(e.value)
    fits = make_plan(model, twist, train, world_size=256, tensor_parallel=8, pipeline_parallel=4, shard_central=True)
    assert fits.peak_stage.total_memory <= 70 * GIB
