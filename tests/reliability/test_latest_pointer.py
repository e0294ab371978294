"""A crash while a checkpoint is written loses nothing (issue #8, item 2).

`--save-interval` writes SAVE_DIR/iter_XXXXXXX through the atomic writer (temporary directory,
renamed when complete) and only then moves SAVE_DIR/latest_checkpointed_iteration.txt. The
crashes are real: the writing process sends itself SIGKILL at a chosen point
(megatron_twist/faults.py), and what it leaves behind is inspected and loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_twist.checkpoint import series as cs
from megatron_twist.checkpoint.files import CheckpointError, load_checkpoint, save_checkpoint
from megatron_twist.checkpoint.models import read_central


@pytest.mark.multiprocess
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, rel, run_twist, monkeypatch):
    """`twist train` killed while writing its second checkpoint (tensor files written, not renamed)."""
    save = tmp_path / "save"
    monkeypatch.setenv("TWIST_FAULT_KILL_IN_SAVE", "files-written:2")
    proc = run_twist([*rel.ARGS, "--save", save, "--save-interval", "2"], timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "checkpoint write at 'files-written' (occurrence 2)" in proc.stderr
    # The pointer still names the first checkpoint, which is complete and loads with its checksums.
    assert (save / rel.POINTER).read_text().strip() == "2"
    assert cs.resolve_load(save) == save / "iter_0000002"
    meta, weights, moments = read_central(str(save / "iter_0000002"))
    assert meta["step"] == 2 and weights and all(torch.isfinite(t).all() for t in weights.values())
    # The interrupted write is a temporary directory that no reader looks at ...
    leftovers = [p.name for p in save.iterdir() if p.name.startswith(".iter_0000004.tmp-")]
    assert len(leftovers) == 1 and not (save / "iter_0000004").exists()
    assert cs.list_iterations(save) == [2]
    # ... and the next save removes it.
    cs.save_iteration(save, 4, lambda p: save_checkpoint(str(p), {"kind": "central"}, {"model": {"a": torch.ones(1)}}))
    assert not (save / leftovers[0]).exists() and (save / rel.POINTER).read_text().strip() == "4"


_WRITER = textwrap.dedent("""
    import sys, torch
    from megatron_twist.checkpoint import series as cs
    from megatron_twist.checkpoint.files import save_checkpoint
    save = sys.argv[1]
    for it in (2, 4):
        cs.save_iteration(save, it, lambda p: save_checkpoint(str(p), {"kind": "central", "step": it},
                                                              {"model": {"w": torch.full((3,), float(it))}}))
""")


def test_pointer_moves_only_after_a_complete_write(tmp_path):
    """Killed after iter_0000004 is complete but before the pointer moved: the pointer still says 2."""
    save = tmp_path / "save"
    env = dict(os.environ, TWIST_FAULT_KILL_IN_SAVE="before-pointer:2")
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(save)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert cs.resolve_load(save) == save / "iter_0000002"
    assert load_checkpoint(str(save / "iter_0000002"))[1]["model"]["w"].tolist() == [2.0] * 3
    # iter_0000004 is complete but not pointed to: it is not used, and saving 4 again replaces it.
    assert load_checkpoint(str(save / "iter_0000004"))[0]["step"] == 4
    cs.save_iteration(
        save, 4, lambda p: save_checkpoint(str(p), {"kind": "central", "step": 44}, {"model": {"w": torch.zeros(3)}})
    )
    assert cs.read_pointer(save) == 4 and load_checkpoint(str(cs.resolve_load(save)))[0]["step"] == 44


def _write(it):
    return lambda p: save_checkpoint(str(p), {"kind": "central", "step": it}, {"model": {"w": torch.full((2,), it)}})


def test_pointer_retention_and_refusals(tmp_path):
    save = tmp_path / "save"
    for it in (2, 4, 6, 8):
        cs.save_iteration(save, it, _write(it), keep=2)
    assert cs.list_iterations(save) == [6, 8] and cs.read_pointer(save) == 8
    assert sorted(p.name for p in save.iterdir()) == [
        ".megatron-twist-output",
        "iter_0000006",
        "iter_0000008",
        cs.POINTER,
    ]
    cs.save_iteration(save, 10, _write(10))  # keep=0: keep all
    assert cs.list_iterations(save) == [6, 8, 10]
    # A plain checkpoint directory is loaded as itself.
    assert cs.resolve_load(save / "iter_0000006") == save / "iter_0000006"
    # A corrupt pointer, or one naming a missing directory, is refused with the way out.
    (save / cs.POINTER).write_text("garbage\n")
    with pytest.raises(CheckpointError, match="does not hold an iteration number"):
        cs.resolve_load(save)
    (save / cs.POINTER).write_text("12\n")
    with pytest.raises(CheckpointError, match=r"names iteration 12, but .*iter_0000012 does not exist.*\[6, 8, 10\]"):
        cs.resolve_load(save)


def test_save_interval_flags_are_checked(tmp_path, rel, reference, in_process_cli):
    rc, _, err = in_process_cli([*rel.ARGS, "--save", tmp_path / "s", "--save-interval", "3"])
    assert rc == 2 and "--save-interval 3 must be a positive multiple of --local-steps 2" in err
    rc, _, err = in_process_cli([*rel.ARGS, "--save-interval", "4"])
    assert rc == 2 and "--save-interval needs --save DIR" in err
    rc, _, err = in_process_cli([*rel.ARGS, "--save", reference / "iter_0000004", "--save-interval", "4"])
    assert rc == 2 and "is a checkpoint, not a save directory" in err
    assert not (tmp_path / "s").exists()


def test_torch_dist_checkpoints_follow_the_same_protocol(mcore, tmp_path):
    """`--ckpt-format torch_dist` in a save directory: collective write, then rank 0 moves the pointer."""
    from megatron_twist.checkpoint.manager import CentralCheckpointer
    from megatron_twist.checkpoint.torch_dist import read_common
    from megatron_twist.config import MODEL_PRESETS, ModelConfig, RunConfig, TrainConfig, TwistConfig
    from megatron_twist.data.batches import SyntheticBatches
    from megatron_twist.distributed.runtime import build_twist_groups
    from megatron_twist.training.twist_trainer import TwistTrainer

    model, twist = ModelConfig(**MODEL_PRESETS["tiny"]), TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=2)
    train = TrainConfig(train_iters=4, micro_batch_size=2, log_interval=100)
    trainer = TwistTrainer(
        model,
        twist,
        train,
        build_twist_groups(twist),
        SyntheticBatches(model.vocab_size, model.seq_length, 2),
        log=lambda m: None,
    )
    run = RunConfig(save=str(tmp_path / "save"), series=True, ckpt_format="torch_dist", keep_checkpoints=1)
    checkpointer = CentralCheckpointer(run, twist, train, {"mock": True}, trainer.groups.is_logging_rank)
    for _ in range(2):
        trainer.run_round()
        checkpointer.save(trainer.central, trainer.full_central_state)
    save = tmp_path / "save"
    assert cs.read_pointer(save) == 4 and cs.list_iterations(save) == [4]  # keep 1
    assert read_common(cs.resolve_load(save))["step"] == 4
