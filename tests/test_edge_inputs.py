"""Inputs at the edges (issue #8, item 6): each is a clear error naming the fix (exit code 2,
before any process group or file is created), or a documented behaviour.

Documented behaviours tested elsewhere: more subnets than data-parallel ranks is SUPPORTED (each
rank trains its subnets in turn; a single process trains them all: tests/reliability/conftest.py
checks "trains subnets [0, 1]", tests/distributed/test_layout.py the 2-rank x 4-subnet layout and
the refusal of subnets that do not divide over the ranks); --local-steps 0 and other bad TwIST
values are also refused in-process (tests/test_config.py).
"""

from __future__ import annotations

import time

import pytest

TRAIN = ["train", "--model-preset", "tiny", "--train-iters", "2", "--local-steps", "1", "--micro-batch-size", "1"]


def _refused(run_twist, args, *messages):
    t0 = time.perf_counter()
    proc = run_twist([str(a) for a in args], check=False, timeout=180)
    assert proc.returncode == 2, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for m in messages:
        assert m in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[twist] round" not in proc.stdout
    assert time.perf_counter() - t0 < 120
    return proc


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("just one line of text\n", "need at least 2 documents to make a train/validation split, the input has 1"),
    ],
    ids=["empty-corpus", "one-line-corpus"],
)
def test_corpus_too_small_for_prepare_data(tmp_path, run_twist, text, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = tmp_path / "out"
    _refused(run_twist, ["prepare-data", "--input", corpus, "--output", out, "--vocab-size", "300"], message)
    assert not out.exists(), "nothing is written"


def test_sequence_longer_than_the_data(tmp_path, run_twist, prepared_small):
    path, manifest = prepared_small
    tokens = manifest.splits["train"].tokens
    _refused(
        run_twist,
        [*TRAIN, "--data-path", path, "--seq-length", tokens + 10, "--save", tmp_path / "ckpt"],
        f"has {tokens} tokens, fewer than seq_length + 1 = {tokens + 11}",
        "use a shorter --seq-length",
    )
    assert not (tmp_path / "ckpt").exists()


def test_vocabulary_flag_contradicting_the_data(run_twist, prepared_small):
    path, _ = prepared_small
    _refused(
        run_twist,
        [*TRAIN, "--data-path", path, "--vocab-size", "1000"],
        "--vocab-size 1000 contradicts the data",
        "400-token vocabulary",
    )


def test_zero_local_steps(run_twist):
    _refused(run_twist, [*TRAIN[:-4], "--mock-data", "--local-steps", "0"], "--local-steps must be at least 1")


def test_keep_ratio_below_one_head_per_tensor_parallel_shard(run_twist):
    # tiny-gpt2: 4 heads (multi-head attention); TP 4 leaves 1 head per shard, kappa 0.25 keeps 0.25 of it.
    _refused(
        run_twist,
        [
            "train",
            "--model-preset",
            "tiny-gpt2",
            "--mock-data",
            "--tensor-model-parallel-size",
            "4",
            "--keep-ratio",
            "0.25",
            "--num-subnets",
            "4",
        ],
        "keep_ratio 0.25 x 1 heads per tensor-parallel shard = 0.25 is not a whole, positive number of heads",
    )
