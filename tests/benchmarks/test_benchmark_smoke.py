"""Seconds-long versions of every benchmark (`--smoke`), so they cannot rot.

The full runs and their measured output are in docs/RESULTS.md; here the scripts run end to end on a
tiny model and what they report must be self-consistent.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(launch, script, out, timeout=300, extra=()):
    proc = launch([sys.executable, REPO / "benchmarks" / script, "--smoke", "--out", out, *extra], timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.multiprocess
def test_quality_benchmark_smoke_on_a_users_text_with_seeds(tmp_path, launch):
    # issue #15 items 2, 6, 8: a user's text file instead of the built-in corpora, two seeds; and the
    # table's own checks (the built-in corpora's loaders are the scratch and continued smokes')
    import argparse
    import typing

    text = tmp_path / "mytext.txt"
    text.write_text(Path(argparse.__file__).read_text() + "\n\n" + Path(typing.__file__).read_text())
    out = tmp_path / "out"
    proc = _run(launch, "quality.py", out, extra=("--corpora", "--corpus", text, "--seeds", "1", "2"))
    data = json.loads((out / "quality.json").read_text())
    result = data["results"][0]
    assert [r["corpus"] for r in data["results"]] == ["mytext"] and data["seeds"] == [1, 2]
    for entry in (result["e_dense_full"], result["a_twist_cut"]["0.5"], result["d_small_from_scratch"]["0.5"]):
        assert len(entry["perplexity_seeds"]) == 2 and entry["perplexity_spread"]["n"] == 2
        assert entry["perplexity"] == pytest.approx(sum(entry["perplexity_seeds"]) / 2)
    assert (out / "mytext" / "seed-1" / "twist").is_dir() and (out / "mytext" / "seed-2" / "twist").is_dir()
    regime = result["regime"]
    assert isinstance(regime["size_matters"], bool) and data["size_matters"] == regime["size_matters"]
    assert ("regime where size matters: " + ("yes" if regime["size_matters"] else "no")) in proc.stdout
    # the table's arms (one run serves both smoke checks: suite time)
    cut, small = result["a_twist_cut"]["0.5"], result["d_small_from_scratch"]["0.5"]
    # same sizes compared: the cut model and the small dense model have the same parameter count
    assert cut["parameters"] == small["parameters"] == result["b_dense_magnitude"]["0.5"]["parameters"]
    assert cut["parameters"] < result["e_dense_full"]["parameters"]
    assert all(
        math.isfinite(v["perplexity"])
        for k in ("a_twist_cut", "b_dense_magnitude", "c_dense_activation", "d_small_from_scratch")
        for v in result[k].values()
    )
    assert len(result["golden_ticket"]["twist"]) == 2 * 2  # two per seed
    assert (out / "quality.png").is_file() and "(a) TwIST cut" in proc.stdout


@pytest.mark.multiprocess
def test_continued_benchmark_smoke(tmp_path, launch):
    # phase 2 on the standard-library files phase 1 did not use: runs without ../shared/data
    proc = _run(
        launch,
        "continued.py",
        tmp_path,
        extra=("--phase2", "stdlib", "--variant", "nopin=--no-twist-pin-cut", "--distill", "--magnitude-retrain"),
    )
    res = json.loads((tmp_path / "continued.json").read_text())
    arms = ("a_twist_cut", "b_dense_magnitude", "b_dense_activation", "c_prune_retrain", "d_small_from_scratch")
    arms += ("a_twist_nopin_cut",)  # the --variant arm, trained with its flag
    arms += ("c_kd", "c_kd_eqflops")  # --distill: arm (c) distilled from the fine-tuned dense model
    arms += ("c_magnitude_retrain",)  # --magnitude-retrain: arm (c) from the magnitude cut
    for score, name in (("activation", "pruned-0.5-cut"), ("magnitude", "pruned-magnitude-0.5-cut")):
        assert json.loads((tmp_path / name / "meta.json").read_text())["method"] == score
    kd = json.loads((tmp_path / "prune-retrain-kd-0.5" / "meta.json").read_text())["train"]
    assert kd["distill_teacher"] == str(tmp_path / "dense") and kd["distill_weight"] == 0.5
    assert res["distill_steps"]["0.5"] == round(4 * 1 / (1 + res["distill_teacher_forward_share"]["0.5"]))
    assert json.loads((tmp_path / "twist-nopin" / "meta.json").read_text())["twist"]["pin_cut"] is False
    assert json.loads((tmp_path / "twist" / "meta.json").read_text())["twist"]["pin_cut"] is True  # the default
    assert res["kappas"] == [0.5] and res["phase2_tokens"] > 0
    for arm in arms:
        assert set(res[arm]) == {"0.5"} and math.isfinite(res[arm]["0.5"]["perplexity"])
    # every arm at one kappa has the same size, below the full model's
    sizes = {res[arm]["0.5"]["parameters"] for arm in arms}
    assert len(sizes) == 1 and sizes.pop() < res["e_dense_full"]["parameters"]
    for key in ("e_dense_full", "e_twist_central", "phase1_only", "e_twist_nopin_central"):
        assert math.isfinite(res[key]["perplexity"])
    assert res["size_matters"] == res["regime"]["size_matters"] in (True, False)
    assert (tmp_path / "phase1-imported" / "meta.json").is_file() and (tmp_path / "phase1-imported-hf").is_dir()
    assert (tmp_path / "continued.png").is_file() and "regime where size matters: " in proc.stdout


def test_flops_per_token_against_hand_arithmetic():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from scratch import MODELS, flops_per_token

    MODEL = MODELS["base"]

    # hidden 192, 8 heads of 24 in 2 KV groups, FFN 512, 4 layers, sequence 128, vocabulary 2048:
    # per layer qkv 192*(8+4)*24 = 55,296, proj 8*24*192 = 36,864, gated MLP 3*192*512 = 294,912,
    # scores 2*128*8*24 = 49,152: forward 2*(387,072) + 2*49,152 = 872,448 per layer; x4 layers plus
    # the output layer 2*192*2048 = 786,432 = 4,276,224; x3 for training.
    assert flops_per_token(MODEL, 2048) == 3 * 4_276_224
    # kappa 0.5: qkv 192*(4+4)*24 = 36,864, proj 18,432, MLP 147,456, scores 24,576 -> 454,656 per layer
    assert flops_per_token(MODEL, 2048, 0.5) == 3 * (4 * 454_656 + 786_432)
    # quality_set.sh's quick model, hidden 96, 8 heads of 12, FFN 256: qkv 96*12*12 = 13,824, proj 9,216,
    # MLP 73,728, scores 2*128*8*12 = 24,576: forward 2*96,768 + 2*24,576 = 242,688 per layer; x4 plus
    # the output layer 2*96*2048 = 393,216 = 1,363,968; x3 for training (a third of the base model's).
    assert flops_per_token(MODELS["quick"], 2048) == 3 * 1_363_968


@pytest.mark.multiprocess
def test_scratch_benchmark_smoke(tmp_path, launch):
    extra = ("--variant", "half=--num-subnets 1 --keep-ratio 1.0", "--variant-budget", "both")
    proc = _run(launch, "scratch.py", tmp_path, extra=extra)
    data = json.loads((tmp_path / "scratch.json").read_text())
    (res,) = data["results"]
    assert res["steps"]["equal_tokens"] == 4 and res["steps"]["equal_flops"] == round(4 * data["flops_ratio"]) > 4
    p = {k: v["perplexity"] for k, v in res.items() if isinstance(v, dict) and "perplexity" in v}
    assert all(math.isfinite(v) for v in p.values()) and "twist_half_cut" in p
    best = min(p["prune_magnitude"], p["prune_activation"])
    assert res["gaps"]["cut_vs_best_pruning"] == pytest.approx(p["twist_cut"] / best - 1)
    assert res["gaps"]["cut_vs_small_equal_flops"] == pytest.approx(p["twist_flops_cut"] / p["small_flops"] - 1)
    assert res["size_matters"] == (p["dense"] < p["small"])
    # the variant's flags override the arm's: trained dense with the dense arm's seed and data, so its zero-cost
    # cut (the trainer's extraction) is the dense arm's magnitude pruning (benchmarks/pruning.py)
    meta = json.loads((tmp_path / "L4" / "seed-1" / "twist-half" / "meta.json").read_text())
    assert meta["twist"]["num_subnets"] == 1
    assert p["twist_half_central"] == pytest.approx(p["dense"], rel=1e-6)
    assert p["twist_half_cut"] == pytest.approx(p["prune_magnitude"], rel=1e-6)
    # --variant-budget both: the variant also trained for the equal-FLOPs steps, with its own gaps
    meta = json.loads((tmp_path / "L4" / "seed-1" / "twist-half-flops" / "meta.json").read_text())
    assert meta["train"]["train_iters"] == res["steps"]["equal_flops"] and "twist_half_flops_cut" in p
    assert res["variant_gaps"]["half"]["cut_vs_small_equal_flops"] == pytest.approx(
        p["twist_half_flops_cut"] / p["small_flops"] - 1
    )
    assert res["variant_gaps"]["half"]["central_vs_dense_equal_tokens"] == pytest.approx(0, abs=1e-6)
    assert (tmp_path / "scratch.png").is_file() and "regime where size matters" in proc.stdout


@pytest.mark.multiprocess
def test_speed_benchmark_smoke_counts_traffic_at_the_collectives(tmp_path, launch):
    _run(launch, "speed.py", tmp_path, timeout=400)
    summary = json.loads((tmp_path / "speed.json").read_text())
    assert summary["tokens_per_s"]["dense"] > 0 and summary["tokens_per_s"]["twist"] > 0
    # counted bytes agree with the theory: weights + 2 Adam moments once per round (local_steps=2)
    # against the gradient once per step; small extras (loss reductions) keep it from being exact
    assert summary["traffic_ratio"]["twist"] == pytest.approx(3 / summary["local_steps"], rel=0.05)
    assert summary["speedup_ideal_flops"] > 1
    assert (tmp_path / "speed.png").is_file()


def test_deployment_benchmark_smoke(tmp_path, launch):
    _run(launch, "deployment.py", tmp_path)
    rows = json.loads((tmp_path / "deployment.json").read_text())
    assert rows["parameters"]["cut"] < rows["parameters"]["dense"]
    for key in ("latency_ms_batch1", "latency_ms_batch8", "peak_mib_batch1", "peak_mib_batch8"):
        assert rows[key]["dense"] > 0 and rows[key]["cut"] > 0
    assert (tmp_path / "deployment.png").is_file()


@pytest.mark.multiprocess
def test_deepspeed_memory_benchmark_smoke(tmp_path, launch):
    _run(launch, "deepspeed_memory.py", tmp_path)
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["ranks"], r["stage"]) for r in rows] == [(2, 2)]
    row = rows[0]
    # every rank of both jobs reported a peak above its own baseline; the table's ratio is theirs
    for kind in ("dense", "twist"):
        peaks = [json.loads((tmp_path / f"{kind}-zero2-n2-rank{r}.json").read_text())["peak_mib"] for r in range(2)]
        assert all(p > 0 for p in peaks) and row[kind] == max(peaks)
    assert row["ratio"] == pytest.approx(row["twist"] / row["dense"])
    assert (tmp_path / "memory.png").is_file()


@pytest.mark.multiprocess
def test_megatron_memory_benchmark_smoke(tmp_path, launch):
    _run(launch, "megatron_memory.py", tmp_path)
    result = json.loads((tmp_path / "memory.json").read_text())
    for kind in ("dense", "twist", "twist-sharded"):
        peaks = [json.loads((tmp_path / f"{kind}-rank{r}.json").read_text())["peak_mib"] for r in range(2)]
        assert all(p > 0 for p in peaks) and result[kind]["peak_mib"] == max(peaks)
    # per round of 2 steps: replicated, one all-reduce of weights + 2 moments (3 N fp32) against dense
    # data parallel's gradient all-reduce (N) at each of the 2 steps: 3/2; sharded, an all-gather and
    # a reduce-scatter of each of the 3 fields (tensors padded to a multiple of 2 ranks): about 6/2
    assert result["twist"]["traffic_ratio"] == 1.5
    assert result["twist-sharded"]["traffic_ratio"] == pytest.approx(3.0, rel=1e-3)
    assert (tmp_path / "memory.png").is_file()
