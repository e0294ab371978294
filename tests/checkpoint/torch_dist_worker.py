"""Worker for tests/checkpoint/test_torch_dist.py: one phase per launch.

    python -m torch.distributed.run --nproc_per_node=2 ... torch_dist_worker.py save_tp2 OUT
    python -m torch.distributed.run --nproc_per_node=1 ... torch_dist_worker.py load_tp1 OUT
    python -m torch.distributed.run --nproc_per_node=2 ... torch_dist_worker.py load_tp2 OUT

The tensor-parallel size of a phase is the number of processes. Every phase
writes ``OUT/<phase>.json``: named checks (``true`` = passed, otherwise a
string saying what differed) plus a few values; the test asserts on them.

Reference values are defined on the FULL (TP=1) tensors: a model built with a
fixed seed (Megatron's CPU init), plus a seeded perturbation so that biases and
norms are not trivially 0/1, plus seeded random Adam moments. A rank's local
shard of a full tensor is cut with the formula Megatron's CPU init uses
(``_initialize_affine_weight_cpu``: split into chunks of local/stride along the
parameter's ``partition_dim``, take every tp-th chunk from the rank), which for
the SwiGLU fc1 weight gives [gate_r; up_r].
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

SEED = 1234  # the model whose checkpoint travels TP=2 -> TP=1
SEED_B = 4321  # the one that travels TP=1 -> TP=2
OTHER_SEED = 99  # set before every load, so a load that did nothing cannot pass
TOKENS_SEED = 7


def _cfg(preset: str, **changes):
    from megatron_twist.config import MODEL_PRESETS, ModelConfig

    return ModelConfig(**{**MODEL_PRESETS[preset], **changes})


def _twist_train(tag: str):
    from megatron_twist.config import TrainConfig, TwistConfig

    twist = TwistConfig(keep_ratio=0.5, num_subnets=4, local_steps=3, seed=11, whole_layers=(-1,))
    train = TrainConfig(train_iters=40, micro_batch_size=2, lr=1e-3, save=f"/somewhere/{tag}", seed=5)
    return twist, train


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def full_random(name: str, shape, salt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{name}".encode()))
    return torch.randn(tuple(shape), generator=g)


def full_shape(param: torch.Tensor, tp: int):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


def local_slice(param: torch.Tensor, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full.clone()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, param.shape[dim] // stride, dim=dim)
    return torch.cat(pieces[rank::tp], dim=dim).contiguous()


def make_central(preset: str, seed: int, step: int, round_: int):
    """Central model at the current TP size: seeded build, seeded perturbation and moments."""
    from megatron_twist.cpu_shim import seed_everything
    from megatron_twist.model.gpt import build_gpt_model
    from megatron_twist.twist.central import CentralModel

    rank, tp = _tp()
    seed_everything(seed)
    model = _cfg(preset)
    central = CentralModel(model, build_gpt_model(model, tensor_parallel_size=tp))
    with torch.no_grad():
        for name, p in central.params.items():
            shape = full_shape(p, tp)
            p.add_(0.05 * local_slice(p, full_random(name, shape, f"w{seed}"), rank, tp))
            central.moments["exp_avg"][name].copy_(local_slice(p, full_random(name, shape, f"m{seed}"), rank, tp))
            central.moments["exp_avg_sq"][name].copy_(
                local_slice(p, full_random(name, shape, f"v{seed}").abs(), rank, tp)
            )
    central.step, central.round = step, round_
    return central


def logits(central, preset: str) -> torch.Tensor:
    """Full-vocabulary logits [b, s, v] on fixed tokens (gathered over the TP ranks)."""
    from megatron.core import parallel_state

    from megatron_twist.model.gpt import gpt_forward

    model = _cfg(preset)
    g = torch.Generator().manual_seed(TOKENS_SEED)
    tokens = torch.randint(0, model.vocab_size, (2, 16), generator=g)
    central.module.eval()
    with torch.no_grad():
        out = gpt_forward(central.module, tokens)
    _, tp = _tp()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def full_tensors(central) -> dict:
    """Only valid at TP=1: the full weights and moments by name."""
    out = {f"param/{n}": p.detach().clone() for n, p in central.params.items()}
    for m, named in central.moments.items():
        out.update({f"{m}/{n}": t.clone() for n, t in named.items()})
    return out


def global_name(local_name: str, first_layer: int) -> str:
    """A pipeline stage numbers its layers from 0; the full model from ``first_layer``."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", local_name)
    return f"decoder.layers.{int(m.group(1)) + first_layer}.{m.group(2)}" if m else local_name


def compare_to_full(central, full: dict, exact: bool = True, first_layer: int = 0):
    """Every local parameter and moment shard against the slice of the full reference."""
    rank, tp = _tp()
    bad = []
    for name, p in central.params.items():
        pairs = [("param", p.detach())] + [(m, central.moments[m][name]) for m in central.moments]
        for kind, local in pairs:
            want = local_slice(p, full[f"{kind}/{global_name(name, first_layer)}"], rank, tp)
            ok = torch.equal(local, want) if exact else torch.allclose(local, want, atol=1e-6, rtol=0)
            if not ok:
                bad.append(f"{kind}/{name}")
    return True if not bad else f"differs: {bad}"


def expect_error(fn, *needles):
    from megatron_twist.checkpoint.files import CheckpointError

    try:
        fn()
    except CheckpointError as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        return True if not missing else f"message lacks {missing}: {msg}"
    except Exception as e:  # noqa: BLE001
        return f"raised {type(e).__name__} instead of CheckpointError: {e}"
    return "no error raised"


def common_checks(common: dict, preset: str, tag: str, step: int, round_: int, saved_tp: int, extra: dict):
    twist, train = _twist_train(tag)
    return {
        "step_round": (common["step"], common["round"]) == (step, round_) or f"{common['step']}, {common['round']}",
        "model_config": common["model"] == _cfg(preset).to_dict() or str(common["model"]),
        "twist_config": common["twist"] == twist.to_dict() or str(common["twist"]),
        "train_config": common["train"] == train.to_dict() or str(common["train"]),
        "saved_layout": (common["tensor_parallel_size"], common["pipeline_parallel_size"]) == (saved_tp, 1)
        or f"{common['tensor_parallel_size']}, {common['pipeline_parallel_size']}",
        "extra": common["extra"] == extra or str(common["extra"]),
    }


def phase_save_tp2(out: Path) -> dict:
    """TP=2: save llama and gpt2 central models (replacing an older one), then a save that crashes."""
    from megatron_twist.checkpoint import torch_dist as dc

    res = {}
    twist, train = _twist_train("llama")
    old = make_central("tiny", SEED, step=3, round_=1)
    dc.save_central_dist(out / "llama", old, twist, train, extra={"version": "old"})
    central = make_central("tiny", SEED, step=17, round_=5)
    dc.save_central_dist(out / "llama", central, twist, train, extra={"note": "tp2", "list": [1, 2]})
    lg = logits(central, "tiny")
    if dist.get_rank() == 0:
        torch.save(lg, out / "llama_logits.pt")

    twist_g, train_g = _twist_train("gpt2")
    central_g = make_central("tiny-gpt2", SEED, step=8, round_=4)
    dc.save_central_dist(out / "gpt2", central_g, twist_g, train_g, extra={"note": "gpt2"})
    lg = logits(central_g, "tiny-gpt2")
    if dist.get_rank() == 0:
        torch.save(lg, out / "gpt2_logits.pt")

    # (e) a crash after every rank wrote its shards but before rank 0's rename
    def crash(tmp, final, *rest):
        raise OSError("simulated crash before the rename")

    real = dc.publish_checkpoint
    dc.publish_checkpoint = crash
    try:
        newer = make_central("tiny", SEED + 1, step=999, round_=99)
        res["crash_raised_on_every_rank"] = expect_error(
            lambda: dc.save_central_dist(out / "llama", newer, twist, train), "simulated crash"
        )
    finally:
        dc.publish_checkpoint = real
    res["temp_dir_left_by_crash"] = dc.temporary_path((out / "llama").resolve()).is_dir()

    # a write failure on ONE rank (its writer process cannot write its file): Megatron broadcasts the
    # failure, so every rank raises (none hangs) and nothing is published
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real_write_item = filesystem_async._write_item

    def failing_write_item(*args, **kwargs):
        raise OSError("disk full on rank 1")

    if dist.get_rank() == 1:
        filesystem_async._write_item = failing_write_item
    try:
        res["one_rank_write_failure_raised_on_every_rank"] = expect_error(
            lambda: dc.save_central_dist(out / "llama", newer, twist, train), "writing the distributed checkpoint"
        )
    finally:
        filesystem_async._write_item = real_write_item
    # extra state must be JSON-able, refused before anything is written
    res["non_json_extra_refused"] = expect_error(
        lambda: dc.save_central_dist(out / "bad", central, twist, train, extra={"t": torch.zeros(1)}), "JSON"
    )
    res["nothing_written_for_refused_save"] = not (out / "bad").exists()
    return res


def phase_load_tp1(out: Path) -> dict:
    """TP=1, one process: load the TP=2 checkpoints and compare; refusals; save the TP=1 one."""
    from megatron_twist.checkpoint import torch_dist as dc
    from megatron_twist.checkpoint.torch_dist_state import in_process_write_results_queue
    from megatron_twist.cpu_shim import seed_everything

    res = {}
    for preset, tag, step, round_, extra in (
        ("tiny", "llama", 17, 5, {"note": "tp2", "list": [1, 2]}),
        ("tiny-gpt2", "gpt2", 8, 4, {"note": "gpt2"}),
    ):
        ref = make_central(preset, SEED, step=step, round_=round_)  # TP=1, same seed
        ref_logits = logits(ref, preset)
        seed_everything(OTHER_SEED)
        central, twist, train, common = dc.load_central_dist(out / tag, _cfg(preset), 1)
        res[f"{tag}/weights_and_moments_equal_tp1_build"] = compare_to_full(central, full_tensors(ref))
        saved_logits = torch.load(out / f"{tag}_logits.pt")
        got = logits(central, preset)
        res[f"{tag}/logits_equal_tp2_logits"] = (
            torch.allclose(got, saved_logits, atol=1e-5, rtol=0)
            or f"max diff {(got - saved_logits).abs().max().item()}"
        )
        # Megatron's CPU init is TP-invariant: the fresh TP=1 build computes the TP=2 model's function.
        res[f"{tag}/fresh_tp1_build_logits_equal_tp2_logits"] = (
            torch.allclose(ref_logits, saved_logits, atol=1e-5, rtol=0)
            or f"max diff {(ref_logits - saved_logits).abs().max().item()}"
        )
        res[f"{tag}/central_step_round"] = (central.step, central.round) == (step, round_)
        exp_twist, exp_train = _twist_train(tag)
        res[f"{tag}/configs_returned"] = (twist, train) == (exp_twist, exp_train) or f"{twist}, {train}"
        res.update(
            {f"{tag}/common/{k}": v for k, v in common_checks(common, preset, tag, step, round_, 2, extra).items()}
        )

    # (d) refusals
    res["refuse_hidden_size"] = expect_error(
        lambda: dc.load_central_dist(out / "llama", _cfg("tiny", hidden_size=128), 1), "hidden_size", "saved 64"
    )
    res["refuse_ffn_and_vocab"] = expect_error(
        lambda: dc.load_central_dist(out / "llama", _cfg("tiny", ffn_hidden_size=256, vocab_size=1024), 1),
        "ffn_hidden_size",
        "vocab_size",
    )
    res["refuse_layers_heads_groups"] = expect_error(
        lambda: dc.load_central_dist(
            out / "llama", _cfg("tiny", num_layers=3, num_attention_heads=8, num_query_groups=4), 1
        ),
        "num_layers",
        "num_attention_heads",
        "num_query_groups",
    )
    res["refuse_other_family"] = expect_error(lambda: dc.load_central_dist(out / "gpt2", _cfg("tiny"), 1), "family")
    res["refuse_missing_dir"] = expect_error(
        lambda: dc.load_central_dist(out / "nope", _cfg("tiny"), 1), "does not exist"
    )
    res["refuse_plain_dir"] = expect_error(
        lambda: dc.load_central_dist(out, _cfg("tiny"), 1), "not a Megatron distributed checkpoint"
    )
    from megatron.core import dist_checkpointing

    from megatron_twist.checkpoint.models import save_central

    ref = make_central("tiny", SEED, step=1, round_=1)
    twist, train = _twist_train("llama")
    save_central(str(out / "safetensors_ckpt"), ref, twist, train)
    res["refuse_safetensors_checkpoint"] = expect_error(
        lambda: dc.load_central_dist(out / "safetensors_ckpt", _cfg("tiny"), 1),
        "not a Megatron distributed checkpoint",
        "load_central",
    )
    (out / "foreign").mkdir()
    with in_process_write_results_queue():
        dist_checkpointing.save(ref.module.sharded_state_dict(), str(out / "foreign"))
    res["refuse_foreign_dist_checkpoint"] = expect_error(
        lambda: dc.load_central_dist(out / "foreign", _cfg("tiny"), 1), "not a megatron-twist central checkpoint"
    )
    # interrupted between "move the old one aside" and "move the new one in": the error names the old one
    (out / "gpt2").rename(dc.old_path((out / "gpt2").resolve()))
    res["missing_dir_names_previous_checkpoint"] = expect_error(
        lambda: dc.load_central_dist(out / "gpt2", _cfg("tiny-gpt2"), 1), "does not exist", ".gpt2.dist-old"
    )

    # (e) the crashed save left the previous checkpoint in place; the next save clears the temp dir
    common = dc.read_common(out / "llama")
    res["after_crash_previous_checkpoint_kept"] = (common["step"], common["round"]) == (17, 5) or str(common)
    twist, train = _twist_train("llama")
    again = make_central("tiny", SEED + 2, step=21, round_=7)
    dc.save_central_dist(out / "llama", again, twist, train)
    res["resave_clears_temp_dir"] = not dc.temporary_path((out / "llama").resolve()).exists()
    res["resave_leaves_no_old_dir"] = not dc.old_path((out / "llama").resolve()).exists()
    res["resave_replaced"] = dc.read_common(out / "llama")["step"] == 21

    # source of the TP=1 -> TP=2 direction
    twist_b, train_b = _twist_train("llama_tp1")
    central_b = make_central("tiny", SEED_B, step=30, round_=10)
    dc.save_central_dist(out / "llama_tp1", central_b, twist_b, train_b, extra={"from": "tp1"})
    torch.save(full_tensors(central_b), out / "llama_tp1_full.pt")
    torch.save(logits(central_b, "tiny"), out / "llama_tp1_logits.pt")
    return res


def phase_load_tp2(out: Path) -> dict:
    """TP=2: load the TP=1 checkpoint; every rank's shards are the slices of the full tensors."""
    from megatron_twist.checkpoint import torch_dist as dc
    from megatron_twist.cpu_shim import seed_everything

    res = {}
    full = torch.load(out / "llama_tp1_full.pt")
    # The assumption the TP=2 -> TP=1 check rests on, checked on the TP=2 side too.
    fresh = make_central("tiny", SEED_B, step=0, round_=0)
    res["fresh_tp2_build_is_slice_of_tp1_build"] = compare_to_full(fresh, full)
    seed_everything(OTHER_SEED)
    central, twist, train, common = dc.load_central_dist(out / "llama_tp1", _cfg("tiny"), 2)
    res["local_shards_equal_slices"] = compare_to_full(central, full)
    saved_logits = torch.load(out / "llama_tp1_logits.pt")
    got = logits(central, "tiny")
    res["logits_equal_tp1_logits"] = (
        torch.allclose(got, saved_logits, atol=1e-5, rtol=0) or f"max diff {(got - saved_logits).abs().max().item()}"
    )
    res["central_step_round"] = (central.step, central.round) == (30, 10)
    res.update(
        {f"common/{k}": v for k, v in common_checks(common, "tiny", "llama_tp1", 30, 10, 1, {"from": "tp1"}).items()}
    )
    res["refused_on_every_rank"] = expect_error(
        lambda: dc.load_central_dist(out / "llama_tp1", _cfg("tiny", hidden_size=128), 2), "hidden_size"
    )

    # TwIST's own layout: TP=1 with 2 data-parallel replicas, every rank holding the whole model
    from megatron.core import parallel_state

    from megatron_twist.distributed.runtime import init_model_parallel

    parallel_state.destroy_model_parallel()
    init_model_parallel(seed=OTHER_SEED, tensor_parallel_size=1)
    whole, twist1, train1, _ = dc.load_central_dist(out / "llama_tp1", _cfg("tiny"), 1)
    res["dp2/load_tp1_checkpoint"] = compare_to_full(whole, full)
    whole.step = 31
    dc.save_central_dist(out / "llama_dp2", whole, twist1, train1)
    seed_everything(OTHER_SEED + 1)
    back, _, _, common2 = dc.load_central_dist(out / "llama_dp2", _cfg("tiny"), 1)
    res["dp2/save_load_round_trip"] = compare_to_full(back, full)
    res["dp2/common"] = (back.step, common2["tensor_parallel_size"], common2["world_size"]) == (31, 1, 2) or str(
        common2
    )

    # pipeline parallelism: TP=1 x PP=2 (each rank one stage), load and save; then that checkpoint at TP=2
    parallel_state.destroy_model_parallel()
    init_model_parallel(seed=OTHER_SEED, tensor_parallel_size=1, pipeline_parallel_size=2)
    staged, twist2, train2, _ = dc.load_central_dist(out / "llama_tp1", _cfg("tiny"), 1, 2)
    layers_per_stage = _cfg("tiny").num_layers // 2
    first = parallel_state.get_pipeline_model_parallel_rank() * layers_per_stage
    res["pp2/load_tp1_checkpoint"] = compare_to_full(staged, full, first_layer=first)
    local_layers = {n.split(".")[2] for n in staged.params if n.startswith("decoder.layers.")}
    res["pp2/stage_holds_only_its_layers"] = len(local_layers) == layers_per_stage or str(sorted(local_layers))
    staged.step = 32
    dc.save_central_dist(out / "llama_pp2", staged, twist2, train2)
    parallel_state.destroy_model_parallel()
    init_model_parallel(seed=OTHER_SEED, tensor_parallel_size=2)
    back, _, _, common3 = dc.load_central_dist(out / "llama_pp2", _cfg("tiny"), 2)
    res["pp2_to_tp2/local_shards_equal_slices"] = compare_to_full(back, full)
    res["pp2_to_tp2/common"] = (back.step, common3["tensor_parallel_size"], common3["pipeline_parallel_size"]) == (
        32,
        1,
        2,
    ) or str(common3)
    return res


PHASES = {"save_tp2": phase_save_tp2, "load_tp1": phase_load_tp1, "load_tp2": phase_load_tp2}


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    from megatron_twist.distributed.runtime import all_gather_objects, init_distributed, init_model_parallel, shutdown

    init_distributed()
    init_model_parallel(seed=SEED, tensor_parallel_size=dist.get_world_size())
    try:
        res = PHASES[phase](out)
        # a check passes only if it passed on every rank; the first failure is kept
        merged = {}
        for rank, rank_res in enumerate(all_gather_objects(res)):
            for k, v in rank_res.items():
                if merged.get(k, True) is True:
                    merged[k] = v if v is True or rank == 0 else f"rank {rank}: {v}"
        if dist.get_rank() == 0:
            (out / f"{phase}.json").write_text(json.dumps(merged, indent=1, sort_keys=True))
    finally:
        shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
