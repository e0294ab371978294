"""The reliability guarantees on the DeepSpeed path (issue #8, items 1 and 5).

* A rank of a `twist train --deepspeed --save-interval` job killed with SIGKILL mid-round: the
  survivor stops within the timeout, naming the lost rank, with the rank-failure exit code (the
  same watchdog as the Megatron path, distributed/watchdog.py, told the step by the DeepSpeed
  loop); the latest pointer names the last complete checkpoint, and the same command rerun ends
  bit for bit where the uninterrupted run ends (issue #13).
* DeepSpeed reads its engine checkpoint with ``torch.load(weights_only=False)``: the files are
  vetted first (checkpoint/vetting.py). A real engine checkpoint passes; one whose
  optimizer file would run code when unpickled is refused by name, the code never runs, and
  nothing in the checkpoint changes. A file swapped for a hostile one AFTER vetting never runs
  either: DeepSpeed's own reads are restricted (issue #13).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_twist.checkpoint.files import CheckpointError
from megatron_twist.checkpoint.vetting import vet_deepspeed_checkpoint
from megatron_twist.distributed.watchdog import EXIT_RANK_FAILURE

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MIN = 0.25
POINTER = "latest_checkpointed_iteration.txt"


class _Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ds_config(tmp_path: Path, subnets: int) -> Path:
    config = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    config["twist"].update(num_subnets=subnets, coverage=subnets > 1)
    path = tmp_path / f"zero2_{subnets}.json"
    path.write_text(json.dumps(config))
    return path


def _listing(directory: Path) -> list:
    """What a directory holds, less the marker that says megatron-twist made it (outputs.py)."""
    from megatron_twist.outputs import MARKER

    return sorted(p.name for p in directory.iterdir() if p.name != MARKER)


@pytest.mark.multiprocess
def test_killed_rank_stops_a_deepspeed_job_and_restart_is_bitwise(tmp_path, launch, monkeypatch):
    """`--save DIR --load DIR --save-interval 4 --keep-checkpoints 2` on the DeepSpeed path (ZeRO-2,
    2 ranks): rank 1 SIGKILLed before step 6 (mid-round); the survivor stops naming it (exit 75);
    the pointer names iter_0000004; the same command rerun finishes with the central model (weights
    and both Adam moments, consolidated) bit for bit equal to the uninterrupted run's, and retention
    keeps the newest 2."""
    from megatron_twist.checkpoint.models import read_central

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=0",
        "--master_addr=127.0.0.1",
    ]
    job = [
        "-m",
        "megatron_twist",
        "train",
        "--model-preset",
        "tiny",
        "--mock-data",
        "--train-iters",
        "12",
        "--micro-batch-size",
        "2",
        "--deepspeed",
        "--deepspeed_config",
        _ds_config(tmp_path, 2),
        "--distributed-timeout-minutes",
        TIMEOUT_MIN,
        "--save-interval",
        "4",
        "--keep-checkpoints",
        "2",
    ]
    reference, save = tmp_path / "reference", tmp_path / "save"
    proc = launch([*torchrun, f"--master_port={launch.free_port()}", *job, "--save", reference], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _listing(reference) == ["iter_0000008", "iter_0000012", POINTER]

    monkeypatch.setenv("TWIST_FAULT_KILL_RANK", "1")  # launch() hands os.environ to the job
    monkeypatch.setenv("TWIST_FAULT_KILL_AT_STEP", "6")  # round 2 of 4-step rounds: mid-round
    resumable = [*job, "--save", save, "--load", save]
    proc = launch([*torchrun, f"--master_port={launch.free_port()}", *resumable], timeout=300)
    end = time.time()
    monkeypatch.delenv("TWIST_FAULT_KILL_RANK")
    out = proc.stdout + proc.stderr
    m = re.search(r"\[fault\] rank 1 before step 6: SIGKILL to pid \d+ at ([0-9.]+)", out)
    assert m, f"the fault was not injected:\n{out[-3000:]}"
    assert "holds no complete checkpoint yet" in out, "the first run starts at step 0"
    assert proc.returncode != 0
    assert "[twist] rank 0/2: rank(s) [1] lost" in out, out[-4000:]
    assert f"exitcode  : {EXIT_RANK_FAILURE}" in out, "the survivor exits with the rank-failure code"
    assert end - float(m.group(1)) < TIMEOUT_MIN * 60 + 60
    # The pointer names the last complete checkpoint; nothing of the interrupted round is published.
    assert (save / POINTER).read_text().strip() == "4"
    assert _listing(save) == ["iter_0000004", POINTER]
    assert _listing(save / "iter_0000004") == ["central", "engine"]

    proc = launch([*torchrun, f"--master_port={launch.free_port()}", *resumable], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "the latest complete checkpoint is iter_0000004" in proc.stdout
    assert (save / POINTER).read_text().strip() == "12"
    assert _listing(save) == ["iter_0000008", "iter_0000012", POINTER]
    for it in ("iter_0000008", "iter_0000012"):
        meta, weights, moments = read_central(str(save / it / "central"))
        _, want, want_moments = read_central(str(reference / it / "central"))
        assert meta["step"] == int(it[5:])
        for k in want:
            assert torch.equal(weights[k], want[k]), (it, k)
            for field in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(moments[field][k], want_moments[field][k]), (it, field, k)


@pytest.fixture(scope="module")
def engine_checkpoint(tmp_path_factory, run_twist):
    """A real DeepSpeed ZeRO-2 checkpoint (one process, one subnet, 4 steps)."""
    tmp = tmp_path_factory.mktemp("ds_ckpt")
    run_twist(
        [
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "4",
            "--micro-batch-size",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            _ds_config(tmp, 1),
            "--save",
            tmp / "save",
        ],
        timeout=300,
    )
    return tmp / "save", _ds_config(tmp, 1)


def test_real_engine_checkpoint_passes_vetting(engine_checkpoint):
    save, _ = engine_checkpoint
    names = sorted(p.name for p in vet_deepspeed_checkpoint(save / "engine"))
    assert names == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_hostile_engine_checkpoint_is_refused_and_never_executed(engine_checkpoint, tmp_path, run_twist):
    save, config = engine_checkpoint
    hostile = tmp_path / "hostile"
    shutil.copytree(save, hostile)
    marker = tmp_path / "code-ran"
    optim = hostile / "engine" / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload(marker)}, optim)
    before = {p: p.read_bytes() for p in hostile.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt is not plain checkpoint"):
        vet_deepspeed_checkpoint(hostile / "engine")
    assert not marker.exists()
    proc = run_twist(
        [
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "8",
            "--micro-batch-size",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            config,
            "--load",
            hostile,
            "--save",
            hostile,
        ],
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not plain checkpoint data" in proc.stderr and "optim_states.pt" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the hostile pickle ran"
    assert {p: p.read_bytes() for p in hostile.rglob("*") if p.is_file()} == before, "a refused --load wrote"
    # And the payload is live: unrestricted unpickling (what DeepSpeed would do) runs it.
    torch.load(optim, weights_only=False)
    assert marker.exists()


def test_file_swapped_after_vetting_is_never_executed(engine_checkpoint, tmp_path, run_twist, monkeypatch):
    """Vetting and loading are two reads: a vetted file replaced by a hostile pickle between them
    (TWIST_FAULT_SWAP_AFTER_VET) must not run. DeepSpeed's own read is restricted too
    (vetting.load_vetted): the load is refused, the marker never appears."""
    save, config = engine_checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(save, ckpt)
    marker = tmp_path / "code-ran"
    swap = tmp_path / "swap" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    swap.parent.mkdir()
    torch.save({"optimizer_state_dict": _Payload(marker)}, swap)
    monkeypatch.setenv("TWIST_FAULT_SWAP_AFTER_VET", str(swap))  # run_twist hands os.environ on
    proc = run_twist(
        [
            "train",
            "--model-preset",
            "tiny",
            "--mock-data",
            "--train-iters",
            "8",
            "--micro-batch-size",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            config,
            "--load",
            ckpt,
            "--save",
            tmp_path / "out",
        ],
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "[fault] swapped" in out, out[-3000:]
    assert not marker.exists(), "a file swapped after vetting was unpickled with code execution"
    assert proc.returncode == 2, out[-3000:]
    assert "optim_states.pt" in proc.stderr and "not plain checkpoint data" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_missing_latest_and_empty_tag_are_refused(tmp_path):
    (tmp_path / "engine").mkdir()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        vet_deepspeed_checkpoint(tmp_path / "engine")
    (tmp_path / "engine" / "latest").write_text("global_step4")
    with pytest.raises(CheckpointError, match=r"holds no DeepSpeed checkpoint files"):
        vet_deepspeed_checkpoint(tmp_path / "engine")
