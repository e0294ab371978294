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
def test_quality_benchmark_smoke(tmp_path, launch):
    proc = _run(launch, "quality.py", tmp_path)
    result = json.loads((tmp_path / "quality.json").read_text())["results"][0]
    cut, small = result["a_twist_cut"]["0.5"], result["d_small_from_scratch"]["0.5"]
    # same sizes compared: the cut model and the small dense model have the same parameter count
    assert cut["parameters"] == small["parameters"] == result["b_dense_magnitude"]["0.5"]["parameters"]
    assert cut["parameters"] < result["e_dense_full"]["parameters"]
    assert all(
        math.isfinite(v["perplexity"])
        for k in ("a_twist_cut", "b_dense_magnitude", "c_dense_activation", "d_small_from_scratch")
        for v in result[k].values()
    )
    assert len(result["golden_ticket"]["twist"]) == 2
    assert (tmp_path / "quality.png").is_file() and "(a) TwIST cut" in proc.stdout


@pytest.mark.multiprocess
def test_quality_benchmark_smoke_on_a_users_text_with_seeds(tmp_path, launch):
    # issue #15 items 2, 6, 8: a user's text file instead of the built-in corpora, two seeds
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


@pytest.mark.multiprocess
def test_continued_benchmark_smoke(tmp_path, launch):
    # phase 2 on the standard-library files phase 1 did not use: runs without ../shared/data
    proc = _run(launch, "continued.py", tmp_path, extra=("--phase2", "stdlib"))
    res = json.loads((tmp_path / "continued.json").read_text())
    arms = ("a_twist_cut", "b_dense_magnitude", "b_dense_activation", "c_prune_retrain", "d_small_from_scratch")
    assert res["kappas"] == [0.5] and res["phase2_tokens"] > 0
    for arm in arms:
        assert set(res[arm]) == {"0.5"} and math.isfinite(res[arm]["0.5"]["perplexity"])
    # every arm at one kappa has the same size, below the full model's
    sizes = {res[arm]["0.5"]["parameters"] for arm in arms}
    assert len(sizes) == 1 and sizes.pop() < res["e_dense_full"]["parameters"]
    for key in ("e_dense_full", "e_twist_central", "phase1_only"):
        assert math.isfinite(res[key]["perplexity"])
    assert res["size_matters"] == res["regime"]["size_matters"] in (True, False)
    assert (tmp_path / "phase1-imported" / "meta.json").is_file() and (tmp_path / "phase1-imported-hf").is_dir()
    assert (tmp_path / "continued.png").is_file() and "regime where size matters: " in proc.stdout


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
