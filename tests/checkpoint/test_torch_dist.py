"""Megatron dist_checkpointing of the central model: save at one TP size, load at another.

Three real launches (each phase is one process group; see torch_dist_worker.py):

1. torchrun, 2 ranks, TP=2: save llama and gpt2 central models (random moments,
   step/round, extra), replacing an older checkpoint; a save that crashes before
   the rename and one that fails on one rank while writing.
2. one process, TP=1: load both; weights and moments equal the TP=1 model built
   with the same seed (Megatron's CPU init is TP-invariant: checked on both
   sides), logits equal the TP=2 logits; configs/step/round round-trip; a
   different model config, a missing directory, a plain directory, a
   safetensors checkpoint, a foreign Megatron checkpoint are refused; the crash
   left the previous checkpoint loadable. Saves a TP=1 checkpoint.
3. torchrun, 2 ranks, TP=2: load the TP=1 checkpoint; each rank's shards equal
   the slices of the full tensors; logits equal the TP=1 logits. Then TwIST's own
   layout (TP=1, 2 data-parallel replicas): load it whole on both ranks, save
   from both replicas and load that back. Then TP=1 x PP=2: each stage loads
   its layers, saves; that checkpoint loads at TP=2.

Each launch pays ~8 s of imports, so the checks are grouped per launch and
reported as named results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().with_name("torch_dist_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _failures(results: dict) -> dict:
    return {k: v for k, v in results.items() if v is not True}


def _run_single_process(args, timeout: float = 240) -> None:
    """One process without torchrun: init_distributed's in-memory 1-rank group (no port)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.multiprocess
def test_dist_checkpoint_reshards_between_tp_sizes(tmp_path, run_torchrun):
    run_torchrun(2, [WORKER, "save_tp2", tmp_path], timeout=240)
    saved = json.loads((tmp_path / "save_tp2.json").read_text())
    assert not _failures(saved), _failures(saved)
    expected_save = {
        "crash_raised_on_every_rank",
        "temp_dir_left_by_crash",
        "one_rank_write_failure_raised_on_every_rank",
        "non_json_extra_refused",
        "nothing_written_for_refused_save",
    }
    assert expected_save <= saved.keys()

    _run_single_process([WORKER, "load_tp1", tmp_path])
    loaded1 = json.loads((tmp_path / "load_tp1.json").read_text())
    assert not _failures(loaded1), _failures(loaded1)
    for tag in ("llama", "gpt2"):  # (a) TP=2 -> TP=1 for both families, (c) round trip
        for check in (
            "weights_and_moments_equal_tp1_build",
            "logits_equal_tp2_logits",
            "fresh_tp1_build_logits_equal_tp2_logits",
            "central_step_round",
            "configs_returned",
            "common/step_round",
            "common/model_config",
            "common/twist_config",
            "common/train_config",
            "common/saved_layout",
            "common/extra",
        ):
            assert f"{tag}/{check}" in loaded1, f"{tag}/{check} was not run"
    for check in (
        "refuse_hidden_size",
        "refuse_ffn_and_vocab",
        "refuse_layers_heads_groups",  # (d)
        "refuse_other_family",
        "refuse_missing_dir",
        "refuse_plain_dir",
        "refuse_safetensors_checkpoint",
        "refuse_foreign_dist_checkpoint",
        "missing_dir_names_previous_checkpoint",
        "after_crash_previous_checkpoint_kept",
        "resave_clears_temp_dir",  # (e)
        "resave_leaves_no_old_dir",
        "resave_replaced",
    ):
        assert check in loaded1, f"{check} was not run"

    run_torchrun(2, [WORKER, "load_tp2", tmp_path], timeout=240)
    loaded2 = json.loads((tmp_path / "load_tp2.json").read_text())
    assert not _failures(loaded2), _failures(loaded2)
    for check in (
        "fresh_tp2_build_is_slice_of_tp1_build",
        "local_shards_equal_slices",  # (b)
        "logits_equal_tp1_logits",
        "central_step_round",
        "common/step_round",
        "common/saved_layout",
        "common/extra",
        "common/train_config",
        "refused_on_every_rank",
        "dp2/load_tp1_checkpoint",
        "dp2/save_load_round_trip",
        "dp2/common",
        "pp2/load_tp1_checkpoint",
        "pp2/stage_holds_only_its_layers",
        "pp2_to_tp2/local_shards_equal_slices",
        "pp2_to_tp2/common",
    ):
        assert check in loaded2, f"{check} was not run"
