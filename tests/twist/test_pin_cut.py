"""--twist-pin-cut (issue #15 item 5, the default): subnet 0 holds the cut extraction would take; the
others are dealt around it. Sampler properties, the cut against hand-planted large units, the same cut
from TP x PP shards and from ZeRO partitions (4 real ranks), the switches, and a real 2-rank run;
--twist-cut-from-step, and --twist-cut-share's draws against hand counts and in a real run.
TwIST runs at TP/PP > 1 and on DeepSpeed against their single-process references, which pin too
(tests/distributed/test_parallel_layouts.py, tests/integrations/test_deepspeed_engine.py), check
the whole path in training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from megatron_twist.config import ConfigError, TwistConfig
from megatron_twist.twist.sampler import SubnetSampler, deal_around

from .pin_worker import MODEL  # noqa: E402  (2 layers, 8 heads in 2 KV groups, 32 neurons)


@pytest.mark.parametrize("n, quota, size", [(2, 4, 8), (3, 2, 6), (4, 3, 8), (1, 3, 6)])
def test_deal_around_pins_subnet0_and_covers_the_rest(n, quota, size):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        pinned = np.sort(np.random.default_rng(100 + seed).choice(size, quota, replace=False))
        dealt = deal_around(range(size), pinned, n, quota, rng, coverage=True)
        assert len(dealt) == n and dealt[0].tolist() == pinned.tolist()
        assert all(len(d) == quota and len(set(d.tolist())) == quota for d in dealt)
        assert set(np.concatenate(dealt).tolist()) == set(range(size)) or n * quota < size


def test_deal_around_refuses_a_pinned_set_of_the_wrong_size():
    with pytest.raises(ValueError, match="must hold 2"):
        deal_around(range(4), [0], 2, 2, np.random.default_rng(0), True)


def test_sampler_pins_the_given_plan_in_every_round_and_stays_deterministic():
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, seed=7, pin_cut=True, cut_share=0.0)
    pinned = SubnetSampler(MODEL, TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False, seed=99)).sample(0)[0]
    for r in range(5):
        plans = SubnetSampler(MODEL, twist).sample(r, pinned)
        assert plans == SubnetSampler(MODEL, twist).sample(r, pinned), "another rank draws the same"
        assert plans[0] == pinned
        for layer in range(MODEL.num_layers):
            a, b = plans[0].layers[layer], plans[1].layers[layer]
            # kappa 0.5 with 2 subnets: an exact partition, so subnet 1 is the complement
            assert sorted(a.heads + b.heads) == list(range(8)) and sorted(a.neurons + b.neurons) == list(range(32))
            # GQA validity: 2 heads of each group of 4
            assert np.bincount(np.asarray(b.heads) // 4, minlength=2).tolist() == [2, 2]


def test_pinned_cut_keeps_the_units_planted_with_large_weights(mcore):
    """Make units obviously largest through the raw Megatron-core layout (linear_proj's columns are
    head-major, linear_fc1's rows are [gate; up], linear_fc2's columns one per neuron), not through
    the project's slicing code, and check that subnet 0 holds exactly them."""
    from megatron_twist.model.gpt import build_gpt_model
    from megatron_twist.twist.central import CentralModel
    from megatron_twist.twist.rounds import LocalPlans, ReplicatedRound

    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=1, pin_cut=True, cut_share=0.0)  # subnet 1: the rest
    central = CentralModel(MODEL, build_gpt_model(MODEL))
    d, ffn = MODEL.hidden_size // MODEL.num_attention_heads, MODEL.ffn_hidden_size
    planted = {0: ([1, 2, 4, 7], list(range(0, 32, 2))), 1: ([0, 3, 5, 6], list(range(16, 32)))}
    with torch.no_grad():
        for layer, (heads, neurons) in planted.items():
            pre = f"decoder.layers.{layer}."
            proj = central.params[pre + "self_attention.linear_proj.weight"]
            fc1, fc2 = central.params[pre + "mlp.linear_fc1.weight"], central.params[pre + "mlp.linear_fc2.weight"]
            for h in heads:
                proj[:, h * d : (h + 1) * d] *= 50
            for j in neurons:
                fc1[j] *= 50
                fc1[ffn + j] *= 50
                fc2[:, j] *= 50
    round_ = ReplicatedRound(LocalPlans(MODEL, twist), central, twist, aggregation_group=None)
    plans = round_.open()
    for layer, (heads, neurons) in planted.items():
        assert list(plans[0].layers[layer].heads) == heads
        assert list(plans[0].layers[layer].neurons) == neurons
        assert set(plans[1].layers[layer].heads) == set(range(8)) - set(heads)


@pytest.mark.multiprocess
def test_pinned_plan_where_no_rank_holds_the_whole_model(run_torchrun, tmp_path):
    """TP=2 x PP=2 shards (scores summed over the model-parallel group) and 4 ZeRO-style flat partitions
    (squared norms summed over the shards) choose the whole model's cut: the planted units, and on
    random weights extraction's own plan from the full weights."""
    from megatron_twist.twist.extraction import select_plan

    from . import pin_worker

    run_torchrun(4, [pin_worker.__file__, tmp_path], timeout=240)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    planted = [[heads, neurons] for heads, neurons in (pin_worker.PLANTED[i] for i in range(2))]
    full = select_plan(pin_worker.MODEL, pin_worker.TWIST, pin_worker.full_weights(False), 0.5)
    whole = [[list(lu.heads), list(lu.neurons)] for lu in full.layers]
    # rows/columns of arange(35).view(7, 5), by hand
    rows = [sum((5 * i + j) ** 2 for j in range(5)) for i in range(7)]
    columns = [sum((5 * i + j) ** 2 for i in range(7)) for j in range(5)]
    for r, got in enumerate(results):
        assert got["tp_pp_planted"] == planted and got["zero_planted"] == planted, r
        assert got["tp_pp_random"] == whole and got["zero_random"] == whole, r
        assert got["norm_error_planted"] < 1e-6 and got["norm_error_random"] < 1e-6, r
        assert got["odd_rows"] == rows and got["odd_columns"] == columns, r


def test_pin_cut_from_the_deepspeed_config_section_and_flag_agree():
    from megatron_twist.arguments import add_twist_args
    from megatron_twist.integrations.ds_config import twist_config_from_ds

    parser = add_twist_args(__import__("argparse").ArgumentParser())
    assert parser.parse_args([]).twist_pin_cut and parser.parse_args(["--twist-pin-cut"]).twist_pin_cut
    assert TwistConfig().pin_cut, "on by default: the data chose it (docs/RESULTS.md, issue #15)"
    assert not twist_config_from_ds({"twist": {"pin_cut": False}}, parser.parse_args([])).pin_cut
    with pytest.raises(ConfigError, match="--no-twist-pin-cut"):
        args = parser.parse_args(["--no-twist-pin-cut"])
        twist_config_from_ds({"twist": {"pin_cut": True}}, args, explicit={"twist_pin_cut"})


def test_a_checkpoint_from_before_pin_cut_resumes_without_it():
    assert not TwistConfig.from_dict({"keep_ratio": 0.5}).pin_cut
    assert TwistConfig.from_dict({"keep_ratio": 0.5, "pin_cut": True}).pin_cut


def test_two_rank_training_with_pin_cut_records_it_and_trains(run_torchrun, prepared_small, tmp_path):
    data, _ = prepared_small
    save = tmp_path / "pinned"
    proc = run_torchrun(
        2,
        [
            *("-m", "megatron_twist", "train", "--data-path", data, "--model-preset", "tiny"),
            *("--train-iters", "6", "--local-steps", "2", "--micro-batch-size", "2", "--log-interval", "2"),
            *("--num-subnets", "2", "--keep-ratio", "0.5", "--twist-pin-cut", "--save", save),
        ],
    )
    assert "round 3/3" in proc.stdout + proc.stderr
    meta = json.loads((save / "meta.json").read_text())
    assert meta["twist"]["pin_cut"] is True


def test_cut_from_step_trains_the_cut_alone_in_the_final_rounds(mcore):
    """--twist-cut-from-step 4 with 2 local steps: rounds 0 and 1 deal the subnets around the pinned cut,
    from round 2 on every subnet holds the pinned cut, so only the cut's rows and columns of the split
    matrices move (checked against the weights before round 2: a reference outside the sampler)."""
    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig
    from megatron_twist.data.batches import SyntheticBatches
    from megatron_twist.distributed.runtime import build_twist_groups
    from megatron_twist.training.twist_trainer import TwistTrainer, build_central

    with pytest.raises(ConfigError, match="round boundary"):
        TwistConfig(local_steps=2, cut_from_step=3)
    with pytest.raises(ConfigError, match="needs --twist-pin-cut"):
        TwistConfig(local_steps=2, cut_from_step=4, pin_cut=False)
    model = ModelConfig(**MODEL_PRESETS["tiny"])
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=2, cut_from_step=4)
    batches = SyntheticBatches(model.vocab_size, model.seq_length, 2, seed=5)

    def run(steps):
        # a constant lr (the 4-step run is the 8-step run's first half) and no decay (unheld units stay put)
        train = TrainConfig(
            train_iters=steps, micro_batch_size=2, lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, weight_decay=0.0
        )
        central = build_central(model, train.seed)
        trainer = TwistTrainer(
            model, twist, train, build_twist_groups(twist), batches, central=central, log=lambda m: None
        )
        return trainer, trainer.run()

    before, _ = run(4)  # the central model at the start of round 2
    after, _ = run(8)
    w0 = {n: p.detach() for n, p in before.central.params.items()}
    w1 = {n: p.detach() for n, p in after.central.params.items()}
    sampler = SubnetSampler(model, twist)
    from megatron_twist.twist.pin import pinned_plan

    cut = pinned_plan(model, twist, w0)
    assert sampler.sample(2, cut) == [cut, cut] and sampler.sample(1, cut)[1] != cut
    for layer, units in enumerate(cut.layers):
        fc1 = f"decoder.layers.{layer}.mlp.linear_fc2.weight"  # [hidden, ffn]: a column per neuron
        moved = (w1[fc1] - w0[fc1]).abs().sum(0) > 0
        assert sorted(torch.nonzero(moved).flatten().tolist()) == sorted(units.neurons), layer


# --------------------------------------------------------------------------- --twist-cut-share

CUT, REST = {0, 1, 2, 3}, {4, 5, 6, 7}


@pytest.mark.parametrize("share, held_of_cut", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_cut_share_takes_round_f_times_quota_of_the_cut(share, held_of_cut):
    """A bucket of 8, the cut (0, 1, 2, 3) pinned, 2 subnets at quota 4: subnet 1 holds round(F x 4) cut units
    (counted by hand in the parametrization) and the rest outside it."""
    for seed in range(10):
        dealt = deal_around(range(8), [0, 1, 2, 3], 2, 4, np.random.default_rng(seed), True, cut_share=share)
        assert dealt[0].tolist() == [0, 1, 2, 3]
        one = set(dealt[1].tolist())
        assert len(dealt[1]) == 4 and len(one & CUT) == held_of_cut and len(one & REST) == 4 - held_of_cut
    assert all(
        deal_around(range(8), [0, 1, 2, 3], 2, 4, np.random.default_rng(s), True, cut_share=1.0)[1].tolist()
        == [0, 1, 2, 3]
        for s in range(5)
    )


def test_cut_share_zero_is_the_draw_from_before_it_existed():
    """The expected lists were printed by deal_around and SubnetSampler.sample BEFORE --twist-cut-share
    was added (the default F = 0 must keep runs, and their seeds, as they were)."""
    cases = [
        ((range(8), [0, 1, 2, 3], 2, 4, True), [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ((range(8), [0, 1, 2, 3], 3, 4, True), [[0, 1, 2, 3], [2, 3, 5, 7], [0, 3, 4, 6]]),
        ((range(6), [1, 4], 4, 2, True), [[1, 4], [2, 5], [0, 3], [2, 3]]),
        ((range(8), [0, 1, 2, 3], 3, 4, False), [[0, 1, 2, 3], [0, 3, 5, 6], [0, 1, 2, 3]]),
        ((range(8), [2, 3, 5, 6, 7, 0], 2, 6, True), [[0, 2, 3, 5, 6, 7], [0, 1, 3, 4, 5, 7]]),
    ]
    for (units, pinned, n, quota, coverage), expected in cases:
        for share in ({}, {"cut_share": 0.0}):  # the default, and F = 0 typed
            got = deal_around(units, pinned, n, quota, np.random.default_rng(11), coverage, **share)
            assert [d.tolist() for d in got] == expected, (n, quota, coverage)
    pinned = SubnetSampler(MODEL, TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False, seed=99)).sample(0)[0]
    plans = SubnetSampler(MODEL, TwistConfig(keep_ratio=0.5, num_subnets=3, seed=7, cut_share=0.0)).sample(2, pinned)
    assert pinned.layers[0].heads == (2, 3, 4, 5)
    assert plans[1].layers[0].heads == (0, 1, 5, 6) and plans[2].layers[0].heads == (0, 1, 6, 7)
    assert plans[1].layers[0].neurons == (0, 1, 2, 4, 5, 7, 12, 15, 18, 19, 23, 25, 26, 28, 30, 31)
    assert plans[2].layers[0].neurons == (2, 4, 9, 10, 11, 12, 13, 15, 18, 22, 23, 24, 25, 26, 27, 28)


def test_cut_share_with_three_subnets_still_covers_the_unpinned_units_when_slots_allow():
    """3 subnets, quota 4 of 8, F 0.5: subnets 1 and 2 hold 2 cut units and 2 others each, and the 2 + 2 slots
    for others hold all 4 units outside the cut."""
    for seed in range(20):
        _, one, two = (
            set(d.tolist()) for d in deal_around(range(8), [0, 1, 2, 3], 3, 4, np.random.default_rng(seed), True, 0.5)
        )
        assert len(one & CUT) == len(two & CUT) == 2 and len(one & REST) == len(two & REST) == 2
        assert (one | two) & REST == REST


def test_cut_share_edge_cases():
    rng = np.random.default_rng
    # kappa 0.75: quota 6 of 8, the cut 6, F 0.5 -> 3 cut units and 3 others, but only 2 lie outside the cut:
    # the third slot takes another cut unit
    for seed in range(10):
        dealt = deal_around(range(8), [0, 2, 3, 5, 6, 7], 2, 6, rng(seed), True, 0.5)
        assert set(dealt[1].tolist()) >= {1, 4} and len(dealt[1]) == len(set(dealt[1].tolist())) == 6
    # 4 subnets at quota 2 of 8 with F 0.5: one cut unit each, and 3 x 1 slots for the 6 units outside the cut:
    # 3 of them sit the round out
    for seed in range(10):
        dealt = deal_around(range(8), [0, 1], 4, 2, rng(seed), True, 0.5)
        held = [set(d.tolist()) for d in dealt[1:]]
        assert all(len(h & {0, 1}) == 1 and len(h) == 2 for h in held)
        assert len(set().union(*held) - {0, 1}) == 3
    # one subnet: only the cut; no coverage: each subnet its own 2 + 2, independently
    assert [d.tolist() for d in deal_around(range(8), [4, 5, 6, 7], 1, 4, rng(0), True, 0.5)] == [[4, 5, 6, 7]]
    for seed in range(10):
        dealt = deal_around(range(8), [0, 1, 2, 3], 3, 4, rng(seed), False, 0.5)
        assert all(len(set(d.tolist()) & CUT) == 2 and len(set(d.tolist()) & REST) == 2 for d in dealt[1:])
    # Python's round, half to even: F 0.5 of a quota of 1 takes no cut unit, of a quota of 3 two
    assert deal_around(range(2), [0], 2, 1, rng(0), True, 0.5)[1].tolist() == [1]
    assert len(set(deal_around(range(6), [0, 1, 2], 2, 3, rng(0), True, 0.5)[1].tolist()) & {0, 1, 2}) == 2


def test_cut_share_keeps_equal_sizes_and_determinism_through_the_sampler():
    pinned = SubnetSampler(MODEL, TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False, seed=99)).sample(0)[0]
    twist = TwistConfig(keep_ratio=0.5, num_subnets=3, seed=7, cut_share=0.5)
    for r in range(4):
        plans = SubnetSampler(MODEL, twist).sample(r, pinned)
        assert plans == SubnetSampler(MODEL, twist).sample(r, pinned), "another rank draws the same"
        assert plans[0] == pinned
        for layer in range(MODEL.num_layers):
            cut = set(pinned.layers[layer].neurons)
            for p in plans[1:]:
                lu = p.layers[layer]
                assert len(lu.heads) == 4 and len(set(lu.heads)) == 4
                # 2 GQA groups of 4 heads: 2 heads of each (quota 2, round(0.5 x 2) = 1 of them from the cut)
                assert np.bincount(np.asarray(lu.heads) // 4, minlength=2).tolist() == [2, 2]
                assert len(set(lu.heads) & set(pinned.layers[layer].heads)) == 2
                # 32 neurons in one bucket, quota 16: 8 from the cut, 8 from outside it
                assert len(lu.neurons) == len(set(lu.neurons)) == 16 and len(set(lu.neurons) & cut) == 8
    everything = SubnetSampler(MODEL, dataclasses.replace(twist, cut_share=1.0)).sample(1, pinned)
    assert everything == [pinned] * 3


def test_cut_share_is_validated_and_old_checkpoints_load_without_it():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="--twist-cut-share must lie in"):
            TwistConfig(cut_share=bad)
    with pytest.raises(ConfigError, match="--twist-cut-share .* needs --twist-pin-cut"):
        TwistConfig(cut_share=0.5, pin_cut=False)
    assert TwistConfig(cut_share=0.0, pin_cut=False).cut_share == 0.0, "the default needs nothing"
    # The default: 0.75 with cut-aware sampling (the measured choice, docs/RESULTS.md), none without it, so
    # --no-twist-pin-cut alone stays valid; every way in (dataclass, flags, ds_config section) agrees.
    from megatron_twist.arguments import add_twist_args, validate_twist_args
    from megatron_twist.integrations.ds_config import twist_config_from_ds

    assert TwistConfig().cut_share == 0.75 and TwistConfig(pin_cut=False).cut_share == 0.0
    parser = add_twist_args(__import__("argparse").ArgumentParser())
    assert validate_twist_args(parser.parse_args([])).cut_share == 0.75
    assert validate_twist_args(parser.parse_args(["--no-twist-pin-cut"])).cut_share == 0.0
    assert validate_twist_args(parser.parse_args(["--twist-cut-share", "0"])).cut_share == 0.0
    assert twist_config_from_ds({"twist": {"keep_ratio": 0.5}}, parser.parse_args([])).cut_share == 0.75
    assert twist_config_from_ds({"twist": {"pin_cut": False}}, parser.parse_args([])).cut_share == 0.0
    assert TwistConfig.from_dict({"keep_ratio": 0.5, "pin_cut": True}).cut_share == 0.0
    assert TwistConfig.from_dict(TwistConfig(cut_share=0.5).to_dict()).cut_share == 0.5


@pytest.mark.multiprocess
def test_a_run_with_cut_share_trains_records_it_and_a_resume_keeps_it(run_twist_many, refused_before_work, tmp_path):
    """`twist train --twist-cut-share 0.5` (3 subnets, one process): finite losses, cut_share in the checkpoint;
    resuming with another value is refused like any TwIST flag (nothing written), without the flag it keeps 0.5."""
    save, metrics = tmp_path / "shared", tmp_path / "metrics.json"
    args = [*("train", "--model-preset", "tiny", "--mock-data", "--local-steps", "2", "--micro-batch-size", "2")]
    args += [*("--num-subnets", "3", "--keep-ratio", "0.5", "--log-interval", "2", "--save", save)]
    # The run and the resume without the flag in one process (start-up paid once); the refusal in-process.
    first = [*args, "--train-iters", "4", "--twist-cut-share", "0.5", "--metrics-file", metrics]
    _, resumed = run_twist_many(1, [first, [*args, "--train-iters", "6", "--load", save]])
    losses = json.loads(metrics.read_text())["loss_curve"]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    assert "round 3/3" in resumed, resumed[-2000:]
    assert json.loads((save / "meta.json").read_text())["twist"]["cut_share"] == 0.5
    err = refused_before_work([*args, "--train-iters", "8", "--load", save, "--twist-cut-share", "0.25"])
    assert "--twist-cut-share 0.25 (the checkpoint was trained with cut_share=0.5)" in err, err
