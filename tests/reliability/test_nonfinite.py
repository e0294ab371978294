"""A subnet whose loss or gradient turns non-finite is kept out of the central model (issue #8, item 4).

Policy (docs/ARCHITECTURE.md "Reliability"): with `--nonfinite-policy skip` (the default) the
subnet stops for the rest of its round and is left out of that round's aggregation (holder counts
exclude it, on every rank); `stop` stops the run with the central model of the previous round;
a round in which every subnet is non-finite stops under both. The NaN is real: the fault hook
(megatron_twist/faults.py) fills a transformer weight of the subnet with NaN (kind `loss`) or
turns one weight's gradient into NaN while the loss stays finite (kind `grad`).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.data.batches import SyntheticBatches
from megatron_twist.distributed.runtime import build_twist_groups
from megatron_twist.training.twist_trainer import NonFiniteError, TwistTrainer
from megatron_twist.twist.slicing import put_add, slice_for

MODEL = ModelConfig(**MODEL_PRESETS["tiny"])
TWIST = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=2)


def _trainer(iters=4, policy="skip"):
    # The same settings as `twist train` with tests/reliability's ARGS (its defaults, mock data).
    train = TrainConfig(train_iters=iters, micro_batch_size=2, log_interval=100, nonfinite_policy=policy)
    batches = SyntheticBatches(MODEL.vocab_size, MODEL.seq_length, train.micro_batch_size, seed=train.seed)
    return TwistTrainer(MODEL, TWIST, train, build_twist_groups(TWIST), batches, log=lambda m: None)


def _state(central):
    out = {f"param/{n}": p.detach().clone() for n, p in central.params.items()}
    out.update({f"{m}/{n}": t.clone() for m, ts in central.moments.items() for n, t in ts.items()})
    return out


def _poison(monkeypatch, subnets="1", step=2, kind="loss"):
    monkeypatch.setenv("TWIST_FAULT_NAN_SUBNETS", subnets)
    monkeypatch.setenv("TWIST_FAULT_NAN_AT_STEP", str(step))
    monkeypatch.setenv("TWIST_FAULT_NAN_KIND", kind)


def _expected_round_from_subnet_0(clean: TwistTrainer) -> dict:
    """Independently: round 1 with subnet 0 alone. Units subnet 0 held take its values, shared tensors
    too; units only subnet 1 held keep their values from round 0."""
    before = _state(clean.central)
    # subnet 0's plan for round 1: pinned to the magnitude cut of the central model (the default)
    plan = clean.local_plans.sample(1, clean.local_plans.pinned(clean.central, None, None))[0]
    clean.worker.load(clean.central, plan)
    for t in (2, 3):
        clean.worker.step(clean.batches.get(t, 0, 2), t)
    contribution = clean.worker.contribution()
    expected = {}
    for field, tensors in contribution.items():
        for name, value in tensors.items():
            old = before[f"{field}/{name}"]
            spec = slice_for(clean.geometry, name, plan, device=old.device)
            placed, held = torch.zeros_like(old), torch.zeros_like(old)
            put_add(placed, spec, value.detach().float())
            put_add(held, spec, torch.ones_like(value, dtype=torch.float32))
            expected[f"{field}/{name}"] = torch.where(held > 0, placed, old)
    return before, expected


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_subnet_is_left_out_of_the_aggregation(mcore, monkeypatch, kind):
    clean = _trainer()
    clean.run_round()  # round 0, identical in both runs (the fault is in round 1)
    before, expected = _expected_round_from_subnet_0(clean)

    _poison(monkeypatch, kind=kind)
    result = _trainer().run()
    r0, r1 = result.rounds
    assert r0.excluded == [] and r1.excluded == [1]
    if kind == "loss":
        assert math.isnan(r1.losses[1][0])
    else:  # the loss was finite, the gradient was not: detected all the same
        assert math.isfinite(r1.losses[1][0])
    assert math.isnan(r1.losses[1][1]), "the subnet stops for the rest of its round"
    assert all(math.isfinite(x) for x in r1.losses[0]) and math.isfinite(r1.mean_loss())
    after = _state(result.central)
    assert all(torch.isfinite(t).all() for t in after.values()), "no NaN reached the central model"
    for key, want in expected.items():
        assert torch.equal(after[key], want), key
    # Units held only by the poisoned subnet kept their round-0 values; some exist (kappa 0.5, 2 subnets).
    unchanged = sum(int((after[k] == before[k]).sum()) for k in expected if k.startswith("param/decoder"))
    assert unchanged > 0


def test_stop_policy_stops_with_the_previous_central_model(mcore, monkeypatch):
    clean = _trainer()
    clean.run_round()
    before = _state(clean.central)
    _poison(monkeypatch)
    trainer = _trainer(policy="stop")
    with pytest.raises(NonFiniteError, match=r"round 1 \(subnet 1 at step 2\); --nonfinite-policy stop"):
        trainer.run()
    assert trainer.central.step == 2 and trainer.central.round == 1
    after = _state(trainer.central)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_every_subnet_nonfinite_stops_under_skip_too(mcore, monkeypatch):
    _poison(monkeypatch, subnets="all", step=0)
    trainer = _trainer()
    with pytest.raises(NonFiniteError, match="every subnet of the round is non-finite"):
        trainer.run()
    assert trainer.central.step == 0


@pytest.mark.multiprocess
def test_ranks_agree_on_the_excluded_subnet(mcore, tmp_path, rel, run_torchrun, monkeypatch):
    """2 ranks, one subnet each: subnet 1 (rank 1) goes NaN; rank 0 leaves it out too, and the result
    equals the single-process run with the same fault, bit for bit."""
    _poison(monkeypatch)
    proc = run_torchrun(
        2,
        ["-m", "megatron_twist", *rel.ARGS, "--save", tmp_path / "ckpt", "--metrics-file", tmp_path / "metrics.json"],
        timeout=300,
    )
    # rank 0 (the logging rank) trained subnet 0 only, and still knows subnet 1 is out
    assert (
        "[twist] round 1: non-finite loss or gradient (subnet 1 at step 2); left out of the aggregation" in proc.stdout
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["excluded"] for r in metrics["rounds"]] == [[], [1], [], []]

    single = _trainer(iters=8).run()  # the same fault in one process (subnets in turn)
    saved = rel.tensors(tmp_path / "ckpt")
    for name, p in single.central.params.items():
        assert torch.equal(saved["model"][name], p.detach()), name


def test_sharded_central_leaves_a_nonfinite_subnet_out_like_the_replicated_one(mcore, monkeypatch):
    """--twist-shard-central: the non-finite subnet contributes zeros (every rank joins each collective)
    and is dropped from the holder counts; the result equals the replicated central model's."""
    from megatron_twist.distributed.sharded_round import shard_central
    from megatron_twist.training.twist_trainer import build_central

    _poison(monkeypatch)
    replicated = _trainer().run()
    train = TrainConfig(train_iters=4, micro_batch_size=2, log_interval=100)
    batches = SyntheticBatches(MODEL.vocab_size, MODEL.seq_length, train.micro_batch_size, seed=train.seed)
    central = shard_central(build_central(MODEL, train.seed), None)
    trainer = TwistTrainer(MODEL, TWIST, train, build_twist_groups(TWIST), batches, central=central, log=lambda m: None)
    sharded = trainer.run()
    assert [r.excluded for r in sharded.rounds] == [[], [1]]
    weights, moments = sharded.central.full_state()
    for name, p in replicated.central.params.items():
        assert torch.equal(weights[name], p.detach()), name
        assert torch.equal(moments["exp_avg"][name], replicated.central.moments["exp_avg"][name]), name
