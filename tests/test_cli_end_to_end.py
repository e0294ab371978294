"""The user's path on real text: prepare-data -> train -> extract -> eval, through the `twist` command."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.mark.multiprocess
def test_prepare_train_extract_eval_on_real_text(run_dir, run_twist, run_torchrun, run_twist_many):
    data = run_dir / "data"
    # real text: a slice of the Python standard library (what every user's machine has)
    run_twist(["prepare-data", "--output", data, "--vocab-size", "512", "--max-bytes", "300000"])
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["splits"]["train"]["tokens"] > 10_000

    proc = run_torchrun(
        2,
        [
            "-m",
            "megatron_twist",
            "train",
            "--data-path",
            data,
            "--model-preset",
            "tiny",
            "--train-iters",
            "60",
            "--local-steps",
            "5",
            "--micro-batch-size",
            "4",
            "--log-interval",
            "10",
            "--save",
            run_dir / "central",
            "--metrics-file",
            run_dir / "metrics.json",
        ],
        timeout=300,
    )
    assert "tok/s" in proc.stdout and "round 12/12" in proc.stdout, "progress lines are shown"
    curve = json.loads((run_dir / "metrics.json").read_text())["loss_curve"]
    assert len(curve) == 60
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.8, f"loss must fall on real text: {first:.3f} -> {last:.3f}"

    # extract, then eval of both models: three `twist` commands in one process (the start-up paid once)
    evals = [
        ["eval", "--load", run_dir / name, "--data-path", data, "--max-tokens", "8192"] for name in ("central", "cut")
    ]
    out, *eval_outs = run_twist_many(1, [["extract", "--load", run_dir / "central", "--save", run_dir / "cut"], *evals])
    assert "keep ratio 0.5" in out

    results = {}
    for name, stdout in zip(("central", "cut"), eval_outs):
        results[name] = json.loads(stdout.strip().splitlines()[-1])  # the last line is a JSON object
        for key in ("perplexity", "tokens", "parameters"):
            assert key in results[name]
    assert results["cut"]["parameters"] < results["central"]["parameters"]
    assert results["central"]["tokens"] == results["cut"]["tokens"] > 8000
    assert results["central"]["perplexity"] < 512, "better than uniform over the vocabulary"
    assert results["cut"]["perplexity"] < 512


@pytest.mark.multiprocess
def test_eval_refuses_data_from_another_tokenizer(run_dir, run_twist):
    other = run_dir / "other-data"
    run_twist(["prepare-data", "--output", other, "--vocab-size", "400", "--max-bytes", "100000"])
    proc = run_twist(["eval", "--load", run_dir / "cut", "--data-path", other], check=False)
    assert proc.returncode == 2
    assert "different tokenizer" in proc.stderr
