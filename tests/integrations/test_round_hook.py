"""TwIST as a hook on a host loop reproduces `twist train` bit for bit (2 real ranks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

HERE = __import__("pathlib").Path(__file__).resolve().parent


@pytest.mark.multiprocess
def test_host_loop_with_round_hook_equals_twist_train(tmp_path, run_torchrun, run_twist):
    run_torchrun(2, [HERE / "host_loop_worker.py", tmp_path], timeout=240)
    run_torchrun(
        2,
        [
            "-m",
            "megatron_twist",
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "10",
            "--local-steps",
            "4",
            "--micro-batch-size",
            "2",
            "--num-subnets",
            "2",
            "--keep-ratio",
            "0.5",
            "--save",
            tmp_path / "ref",
            "--metrics-file",
            tmp_path / "ref.json",
        ],
        timeout=240,
    )
    ref = json.loads((tmp_path / "ref.json").read_text())
    for rank in (0, 1):  # rank r trains subnet r
        host = json.loads((tmp_path / f"losses-{rank}.json").read_text())
        expected = [x for r in ref["rounds"] for x in r["losses"][rank]]
        assert host == expected
    got, want = load_file(str(tmp_path / "central.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
