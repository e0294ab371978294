"""Megatron-LM's own ``pretrain()`` loop with TwIST, run for real: examples/pretrain_gpt_twist.py
launched with torchrun as a user would, 2 ranks on CPU / gloo, under the run-time CPU shim
(integrations/megatron_lm_cpu.py), against ``twist train`` (which shares no code with
Megatron-LM's loop: its own step, data addressing, optimizer and LR schedule calls).

Why the data is a `twist prepare-data` dataset and not mock data: both runs must see the same
samples in the same order. ``twist train --mock-data`` draws its own synthetic sequences, but
on a prepared dataset both build Megatron's GPTDataset with the same seed, split ("100,0,0"),
sequence length and sample count, and Megatron-LM's sampler gives data-parallel rank r the
micro-batch ``(t * ranks + r) * micro + i`` at iteration t, which is what `twist train` gives
subnet r. Megatron-LM's tokenizer is ``NullTokenizer --vocab-size 399`` (its vocabulary is
size + 1 = 400, the dataset's; padded to a multiple of 8 it stays 400), only used for sizes.

Megatron-LM's extract lives outside the project (MEGATRON_LM_PATH, default
../shared/megatron-lm): without it the test is skipped, naming what to set.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from megatron_twist.errors import ConfigError
from megatron_twist.integrations.megatron_lm_env import ENV_VAR, megatron_lm_path

try:
    megatron_lm_path()
    MISSING = None
except ConfigError as e:
    MISSING = str(e)

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.megatron_lm,
    pytest.mark.skipif(MISSING is not None, reason=f"Megatron-LM not available ({ENV_VAR}): {MISSING}"),
]

ITERS, LOCAL_STEPS, MICRO = 10, 4, 2  # the last round is a partial one (2 steps)
TWIST_FLAGS = ["--keep-ratio", "0.5", "--num-subnets", "2", "--local-steps", LOCAL_STEPS]
# twist train's defaults, spelled in Megatron-LM's flags (Megatron-LM's own defaults differ:
# beta2 0.999, dropout 0.1, linear decay)
OPTIM = ["--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--seed", "1234"]
MEGATRON_OPTIM = OPTIM + ["--lr-decay-style", "cosine", "--weight-decay", "0.01", "--adam-beta2", "0.95"]
MEGATRON_OPTIM += ["--clip-grad", "1.0"]
# the tiny preset (llama: RMSNorm, SwiGLU, RoPE, GQA, no biases) in Megatron-LM's flags
TINY = [
    "--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4, "--group-query-attention",
    "--num-query-groups", 2, "--ffn-hidden-size", 128, "--seq-length", 64, "--max-position-embeddings", 64,
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", 0, "--attention-dropout", 0,
    "--use-cpu-initialization", "--transformer-impl", "local", "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--no-rope-fusion",
    "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion",
]  # fmt: skip


def megatron_lm_args(data_dir, out, *extra, iters=ITERS, replicas=1, evaluate=False):
    """examples/pretrain_gpt_twist.py's arguments: one micro-batch per subnet replica per iteration.
    ``evaluate``: Megatron-LM's evaluation every round on the prepared held-out split (the training
    samples are the same: the whole train split either way)."""
    data = ["--data-path", data_dir / "train", "--split", "100,0,0", "--eval-iters", 0, "--eval-interval", 1000]
    if evaluate:
        data = ["--train-data-path", data_dir / "train", "--valid-data-path", data_dir / "valid"]
        data += ["--eval-iters", 1, "--eval-interval", LOCAL_STEPS]
    return [
        "examples/pretrain_gpt_twist.py",
        *TINY,
        *MEGATRON_OPTIM,
        *TWIST_FLAGS,
        "--micro-batch-size", MICRO, "--global-batch-size", 2 * replicas * MICRO, "--train-iters", iters,
        *data, "--data-cache-path", out / "cache",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", 399, "--make-vocab-size-divisible-by", 8,
        "--distributed-backend", "gloo", "--log-interval", 1,
        *extra,
    ]  # fmt: skip


def twist_train(data_dir, *flags, iters=ITERS):
    """`twist train` at the settings of the runs here (TWIST_FLAGS, OPTIM, MICRO) on the prepared data."""
    return ["train", "--data-path", data_dir, "--model-preset", "tiny", *TWIST_FLAGS, *OPTIM] + [
        "--train-iters", iters, "--micro-batch-size", MICRO, *flags
    ]  # fmt: skip


LAYOUT_ITERS = 8  # test_megatron_lm_layouts.py's runs: two rounds
# Every `twist train` reference of the Megatron-LM tests, name -> (ranks, iterations, flags): this
# file's and test_megatron_lm_layouts.py's (its module docstring says why each layout's reference is
# the one it is). Those of one rank count run together, in one launch (the twist_references fixture).
REFERENCES = {
    "uninterrupted": (1, ITERS, []),
    "tp2": (1, LAYOUT_ITERS, ["--twist-balance-shards", 2]),
    "bf16": (1, LAYOUT_ITERS, ["--bf16"]),
    "pp2": (4, LAYOUT_ITERS, ["--pipeline-model-parallel-size", 2]),
    "replicas": (4, LAYOUT_ITERS, []),
}


def reference_dir(twist_references, data_dir, name):
    """The folder of the REFERENCES run ``name`` (central/, metrics.json), run with the others of its rank count."""
    ranks = REFERENCES[name][0]
    runs = {n: twist_train(data_dir, *flags, iters=iters) for n, (r, iters, flags) in REFERENCES.items() if r == ranks}
    return twist_references(ranks, runs)[name]


@pytest.fixture(scope="module")
def reference(prepared_small, twist_references):
    """`twist train`, one process (equal to its 2-rank run bit for bit, tests/distributed/)."""
    out = reference_dir(twist_references, prepared_small[0], "uninterrupted")
    return json.loads((out / "metrics.json").read_text()), load_file(str(out / "central" / "model.safetensors"))


def subnet_loss_error(got: dict, ref_metrics: dict) -> float:
    """Largest difference of any subnet's loss at any iteration both runs have."""
    worst = 0.0
    for r in ref_metrics["rounds"]:
        for s, want in enumerate(r["losses"]):
            for t, loss in enumerate(want, start=r["first_step"]):
                if t in got["iterations"]:
                    have = got["subnet_losses"][str(s)][got["iterations"].index(t)]
                    worst = max(worst, abs(have - loss))
    return worst


def logged_learning_rates(stdout: str) -> list:
    return [float(line.split("learning rate:")[1].split("|")[0]) for line in stdout.splitlines() if "lm loss:" in line]


def subnet_lr_after(iteration: int) -> float:
    """The subnets' lr after ``iteration`` steps, by hand: OPTIM's 3e-3 peak and 3e-4 floor, each times
    --twist-lr-scale's default sqrt(2 subnets); linear warm-up over 2 steps, then cosine to step ITERS."""
    peak, floor = 3e-3 * math.sqrt(2), 3e-4 * math.sqrt(2)
    if iteration <= 2:
        return peak * iteration / 2
    return floor + (peak - floor) * 0.5 * (math.cos(math.pi * (iteration - 2) / (ITERS - 2)) + 1)


def test_megatron_lm_pretrain_equals_twist_train_across_a_resume(prepared_small, reference, tmp_path, run_torchrun):
    """2 ranks, 2 subnets, rounds of 4 iterations and a last one of 2, interrupted: the first job stops at iteration 8
    (--exit-interval, saving Megatron-LM's checkpoint and TwIST's state), the second resumes it
    (--load). Every subnet's loss at every iteration and the final central model equal one
    uninterrupted `twist train`. Fails on a DDP that averages gradients over the whole
    data-parallel group (subnets mixed: measured 0.094 loss, 0.030 weight difference) and on a
    resume without TwIST's state. The first job also runs Megatron-LM's evaluation every round."""
    data_dir, _ = prepared_small
    ref_metrics, ref_central = reference
    save = tmp_path / "save"
    first = run_torchrun(
        2,
        megatron_lm_args(data_dir, tmp_path, "--save", save, "--save-interval", 8, "--exit-interval", 8, evaluate=True)
        + ["--twist-metrics-file", tmp_path / "first.json"],
    )
    got = json.loads((tmp_path / "first.json").read_text())
    assert got["iterations"] == list(range(8)) and (got["central_step"], got["central_round"]) == (8, 2)
    assert subnet_loss_error(got, ref_metrics) <= 1e-5
    # Megatron-LM's own log: the mean over data parallel = the mean over subnets (printed to 7
    # digits). Its line for iteration 2 averages iterations 1 and 2 (the first report does not
    # reset Megatron-LM's running sums), so that line is checked as that average.
    logged = [
        float(line.split("lm loss:")[1].split("|")[0]) for line in first.stdout.splitlines() if "lm loss:" in line
    ]
    want = list(ref_metrics["loss_curve"][:8])
    want[1] = (want[0] + want[1]) / 2
    assert len(logged) == 8 and max(abs(a - b) for a, b in zip(logged, want)) <= 1e-5
    # the subnets' lr is --lr x --twist-lr-scale (set on the optimizer Megatron-LM built), printed to 7 digits
    rates = logged_learning_rates(first.stdout)
    assert rates == pytest.approx([subnet_lr_after(i) for i in range(1, 9)], rel=1e-6)
    # Megatron-LM's evaluation (of the subnets, every round) ran and left training untouched
    assert "validation loss at iteration 4" in first.stdout and "validation loss at iteration 8" in first.stdout
    assert (save / "twist" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"

    second = run_torchrun(
        2,
        megatron_lm_args(data_dir, tmp_path, "--load", save, "--twist-save", tmp_path / "central")
        + ["--twist-metrics-file", tmp_path / "second.json"],
    )
    got = json.loads((tmp_path / "second.json").read_text())
    assert got["iterations"] == list(range(8, ITERS))
    # resumed: the scale is set again on the optimizer Megatron-LM restored, not compounded
    assert logged_learning_rates(second.stdout) == pytest.approx([subnet_lr_after(i) for i in (9, 10)], rel=1e-6)
    assert (got["central_step"], got["central_round"]) == (ITERS, -(-ITERS // LOCAL_STEPS))
    assert subnet_loss_error(got, ref_metrics) <= 1e-5
    central = load_file(str(tmp_path / "central" / "model.safetensors"))
    assert set(central) == set(ref_central)
    for name, want in ref_central.items():
        torch.testing.assert_close(central[name], want, atol=1e-4, rtol=0, msg=name)
