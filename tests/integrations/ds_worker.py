"""TwIST on DeepSpeed engines against TwIST without DeepSpeed, in one launch of one or more phases:

    torchrun --nproc_per_node N ds_worker.py OUT_DIR PHASE [PHASE ...]
    PHASE = TP:STAGE[,STAGE...][,resume]        e.g. 1:0,1,2,3,2bf16   2:1,2,3,resume

Each phase runs at tensor parallel size TP (Megatron's parallel state is rebuilt between phases, so
one launch pays its start-up once) and writes OUT_DIR/tpTP/. First the reference: the Megatron path
(training/twist_trainer.py ``TwistTrainer``, no DeepSpeed code) at the same layout (2 subnets of the
tiny model, the replicas N / (TP x 2) give), 12 steps. Then, for each ZeRO stage ("2" =
ds_configs/cpu_zero2.json; "2bf16" = the same with bf16 enabled), the same run through DeepSpeed
engines (training/deepspeed_trainer.py). Every rank compares its own subnet's losses and its own
shard of the central model (weights, both Adam moments) with the reference's and writes the largest
differences to result-RANK.json; the test asserts them.

``resume`` (with stage 2): the ZeRO-2 run saves a DeepSpeed checkpoint at its end (zero2-ckpt, what
`twist extract` reads); a second run stops at step 8 and saves (half); a third resumes from it to
step 12, and must equal the straight ZeRO-2 run bit for bit (losses, weights, moments). Rank 0 also
writes the reference's whole central model (ref.safetensors), gathered over TP.

Checked on the real engine as it runs: units outside this rank's subnet are not in its model or
optimizer (they cannot move during its local steps), every parameter's Adam state is linked, the
central model is sharded 1/DP per rank, and ZeRO 1/2 partition a subnet over its own replicas.
"""

import dataclasses
import json
import sys
import warnings

warnings.filterwarnings("ignore")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megatron_twist.checkpoint.deepspeed import DeepSpeedCheckpointer  # noqa: E402
from megatron_twist.config import MODEL_PRESETS, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from megatron_twist.data.batches import SyntheticBatches  # noqa: E402
from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, shutdown  # noqa: E402
from megatron_twist.integrations.ds_config import twist_config_from_ds  # noqa: E402
from megatron_twist.model.gpt import count_parameters  # noqa: E402
from megatron_twist.training.deepspeed_trainer import DeepSpeedTrainer  # noqa: E402
from megatron_twist.training.twist_trainer import TwistTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
root = Path(sys.argv[1])
model = ModelConfig(**MODEL_PRESETS["tiny"])
train = TrainConfig(train_iters=12, micro_batch_size=2, log_interval=100)


def ds_config(stage: str) -> dict:
    cfg = json.loads((REPO / "ds_configs" / f"cpu_zero{stage[0]}.json").read_text())
    if stage.endswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    return cfg


def batches():
    return SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=train.seed)


def quiet(_msg):
    pass


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run_ds(twist, groups, stage: str, save=None, load=None, exit_interval=None):
    cfg = ds_config(stage)
    run_train = dataclasses.replace(train, exit_interval=exit_interval)
    checkpointer = None
    if save is not None:
        checkpointer = DeepSpeedCheckpointer(
            RunConfig(tensor_parallel_size=groups.tp_size, save=str(save)), twist, run_train, groups, None, quiet
        )
    trainer = DeepSpeedTrainer(
        model, twist, run_train, groups, batches(), cfg, load=load, checkpointer=checkpointer, log=quiet
    )
    result = trainer.run()
    return result.central, result.losses, trainer.engine


def check_engine(engine, central, groups) -> None:
    """What the engine holds (see the module docstring)."""
    for name, p in engine.module.named_parameters():  # every parameter's Adam state reachable
        if engine.zero_optimization_stage() > 0:
            from deepspeed.utils import safe_get_full_optimizer_state

            assert safe_get_full_optimizer_state(p, "exp_avg") is not None, name
    # The engine's optimizer holds exactly this subnet's units: units outside it have no optimizer
    # state on this rank, so they cannot move during its local steps (no frozen-parameter drift).
    subnet_params = count_parameters(engine.module)
    assert subnet_params < central.num_parameters()
    # The central model (this TP shard's) is sharded over the data-parallel ranks: ~1/DP of every tensor.
    dp = groups.dp_size
    held = sum(t.numel() for t in central.shards["param"].values())
    assert held == sum(-(-s.numel() // dp) for s in central.shapes.values()), held
    if engine.zero_optimization_stage() in (1, 2):
        held = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
        reps = groups.layout.replicas
        if reps == 1:
            assert held == subnet_params, (held, subnet_params)  # one rank per subnet: the whole subnet
        else:  # ZeRO partitions the subnet over its replicas: this rank holds ~1/replicas of it
            assert held < subnet_params <= held * reps, (held, subnet_params, reps)


def phase(out: Path, tp: int, stages, resume: bool) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():  # another TP size than the last phase's
        parallel_state.destroy_model_parallel()
    twist = twist_config_from_ds(ds_config("2"))
    groups = build_twist_groups(twist, tp)
    subnet = groups.local_subnets(twist.num_subnets)[0]
    out.mkdir(parents=True, exist_ok=True)

    # The reference: the Megatron path at the same layout.
    reference = TwistTrainer(model, twist, train, groups, batches(), log=quiet)
    rounds = reference.run().rounds
    ref_losses = [x for r in rounds for x in r.losses[subnet]]
    ref_weights = {n: p.detach().clone() for n, p in reference.central.params.items()}
    ref_moments = {m: dict(t) for m, t in reference.central.moments.items()}
    whole, _ = reference.full_central_state()  # collective: gathered over TP
    if groups.rank == 0:
        save_file({k: v.detach().contiguous() for k, v in whole.items()}, str(out / "ref.safetensors"))
    del reference, whole

    result = {"rank": groups.rank, "subnet": subnet, "tp_rank": groups.tp_rank, "stages": {}}
    straight = None
    for stage in stages:
        save = out / "zero2-ckpt" if (resume and stage == "2") else None
        central, losses, engine = run_ds(twist, groups, stage, save=save)
        expected_dtype = torch.bfloat16 if stage.endswith("bf16") else torch.float32
        assert next(engine.module.parameters()).dtype == expected_dtype  # the engine computes in bf16
        check_engine(engine, central, groups)
        weights, moments = central.full_state()  # this TP shard, gathered over data parallel
        assert len(losses) == len(ref_losses) == train.train_iters
        result["stages"][stage] = {
            "zero": engine.zero_optimization_stage(),
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "weights": max_diff(weights, ref_weights),
            "moments": max(max_diff(moments[m], ref_moments[m]) for m in ref_moments),
        }
        if save is not None:
            straight = (losses, weights, moments)
        del engine, central
        torch.distributed.barrier()

    if resume:
        assert straight is not None, "resume needs stage 2"
        run_ds(twist, groups, "2", save=out / "half", exit_interval=8)
        central, losses, _ = run_ds(twist, groups, "2", load=str(out / "half"))
        weights, moments = central.full_state()
        s_losses, s_weights, s_moments = straight
        result["resume"] = {
            "losses_equal": losses == s_losses[8:],
            "weights_equal": all(torch.equal(weights[k], s_weights[k]) for k in s_weights),
            "moments_equal": all(torch.equal(moments[m][k], s_moments[m][k]) for m in s_moments for k in s_weights),
            "steps": len(losses),
        }
    (out / f"result-{groups.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


init_distributed()
for spec in sys.argv[2:]:
    tp, _, items = spec.partition(":")
    names = items.split(",")
    phase(root / f"tp{tp}", int(tp), [n for n in names if n != "resume"], "resume" in names)
shutdown()
