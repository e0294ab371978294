"""Megatron-LM's real ``pretrain()`` loop with TwIST at 4 ranks: TP 2 x 2 subnets and PP 2 x 2
subnets, and at 2 ranks in bf16 (examples/pretrain_gpt_twist.py under torchrun, CPU / gloo), each
against `twist train` at the layout whose weights and subnets it reproduces:

* TP 2: the single-process `twist train --twist-balance-shards 2` (the sampler balances units
  over 2 blocks, so TP 1 draws the TP 2 subnets; CPU initialisation draws whole tensors, so the
  weights are the same at any TP size);
* PP 2: `twist train --pipeline-model-parallel-size 2` on 4 ranks (a pipeline stage initialises
  its layers from its own RNG stream, so PP 2 starts from other weights than PP 1);
* 2 subnets x 2 replicas: `twist train` on 4 ranks (the subnet's gradients averaged over its 2
  replicas every step, in Megatron-LM by its DDP narrowed to the subnet group). Measured: the
  central model equal to 1.5e-8. Losses are not compared there: `twist train` logs replica 0's
  loss, the adapter the subnet's loss over all its replicas' tokens;
* bf16: the single-process `twist train --bf16` (bf16 compute from fp32 masters in both; the two
  round at different places - Megatron-LM's Float16Module casts the logits to fp32, its DDP buffer
  holds bf16 gradients - so the bound is bf16's: measured 2.3e-4 loss and 4.8e-3 weight
  difference after 12 iterations, against 0.094 / 0.030 when subnets' gradients mix).

Same data and flags as test_megatron_lm_pretrain.py (its module docstring says why this data).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_twist.checkpoint.models import read_central

from .test_megatron_lm_pretrain import (
    LAYOUT_ITERS,
    LOCAL_STEPS,
    MICRO,
    megatron_lm_args,
    pytestmark,  # noqa: F401  (multiprocess; skipped without Megatron-LM)
    reference_dir,
    subnet_loss_error,
)

ITERS = LAYOUT_ITERS  # two rounds


# reference_run: the name of the layout's `twist train` run (the module docstring says which) in
# test_megatron_lm_pretrain.REFERENCES, where its flags are: the references of one rank count run
# together in one launch, once per session (the twist_references fixture)
@pytest.mark.parametrize(
    "reference_run, layout, ranks, loss_tol, weight_tol",
    [
        ("tp2", ["--tensor-model-parallel-size", 2], 4, 1e-5, 1e-4),
        ("pp2", ["--pipeline-model-parallel-size", 2], 4, 1e-5, 1e-4),
        ("bf16", ["--bf16"], 2, 2e-3, 2e-2),
        ("replicas", ["replicas"], 4, None, 1e-4),
    ],
    ids=["tp2", "pp2", "bf16", "replicas"],
)
def test_megatron_lm_layout_equals_twist_train(
    prepared_small, tmp_path, run_torchrun, twist_references, reference_run, layout, ranks, loss_tol, weight_tol
):
    data_dir, _ = prepared_small
    ref_dir = reference_dir(twist_references, data_dir, reference_run)
    replicas = 2 if "replicas" in layout else 1
    flags = [f for f in layout if f != "replicas"]
    args = megatron_lm_args(
        data_dir, tmp_path, *flags, "--twist-save", tmp_path / "central", iters=ITERS, replicas=replicas
    )  # noqa: E501
    run_torchrun(ranks, args + ["--twist-metrics-file", tmp_path / "got.json"])

    ref, got = json.loads((ref_dir / "metrics.json").read_text()), json.loads((tmp_path / "got.json").read_text())
    assert got["iterations"] == list(range(ITERS))
    assert (got["central_step"], got["central_round"]) == (ITERS, ITERS // LOCAL_STEPS)
    if loss_tol is not None:
        assert subnet_loss_error(got, ref) <= loss_tol
    # gathered over TP / PP into one checkpoint, the form `twist extract` reads
    meta, weights, _moments = read_central(str(tmp_path / "central"))
    assert meta["step"] == ITERS
    want = load_file(str(ref_dir / "central" / "model.safetensors"))
    assert set(weights) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(weights[name], tensor, atol=weight_tol, rtol=0, msg=name)


def test_megatron_lm_mock_data_with_several_micro_batches(tmp_path, run_torchrun):
    """Megatron-LM's own --mock-data, and a global batch of 2 micro-batches per subnet per iteration
    (Megatron-LM's gradient accumulation inside a TwIST round): the job runs its rounds, every
    subnet learns (its loss falls), and the central model it saves is the one `twist extract` reads.
    Not compared with `twist train`: Megatron-LM's mock samples are its own, and its sampler groups
    several micro-batches differently (README "Inside a Megatron-LM pipeline")."""
    args = megatron_lm_args(tmp_path, tmp_path, "--twist-save", tmp_path / "central", iters=ITERS)
    start = args.index("--data-path")
    data = ["--mock-data", "--eval-iters", 0, "--eval-interval", 1000]
    args[start : args.index("--data-cache-path")] = data
    args[args.index("--global-batch-size") + 1] = 2 * 2 * MICRO  # 2 subnets x 2 micro-batches of MICRO
    args[args.index("--vocab-size") + 1] = 511  # NullTokenizer adds one: 512 embeddings
    run_torchrun(2, args + ["--twist-metrics-file", tmp_path / "got.json"])
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["iterations"] == list(range(ITERS))
    assert (got["central_step"], got["central_round"]) == (ITERS, ITERS // LOCAL_STEPS)
    for losses in got["subnet_losses"].values():
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    meta, weights, _ = read_central(str(tmp_path / "central"))
    assert meta["step"] == ITERS and weights["embedding.word_embeddings.weight"].shape[0] == 512
