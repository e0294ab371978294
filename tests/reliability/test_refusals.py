"""Checkpoints that cannot be resumed are refused with a clear error, and nothing is overwritten
(issue #8, item 3): a truncated or corrupt file or pointer, flags that contradict the saved TwIST
config or model sizes, a parallel layout the checkpoint cannot be resharded to, data from another
tokenizer. Each case goes through the `twist` command line with --load and --save naming the
same save directory (the restart idiom), and every file in it is compared before and after.
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_twist.arguments import explicit_dests
from megatron_twist.checkpoint.resume import resume_conflicts
from megatron_twist.cli import build_parser


@pytest.fixture
def save_dir(tmp_path, reference):
    """A copy of the reference run's save directory (iter_0000004, iter_0000008, pointer -> 8)."""
    d = tmp_path / "save"
    shutil.copytree(reference, d)
    return d


def _resume(rel, save):
    return [*rel.ARGS, "--load", save, "--save", save, "--save-interval", "4"]


def test_flags_typed_on_the_command_line_are_told_from_defaults():
    train = build_parser().train_parser
    assert explicit_dests(train, ["--mock-data", "--keep-r", "0.25", "--no-coverage"]) == {
        "mock_data",
        "keep_ratio",
        "twist_coverage",
    }
    assert explicit_dests(train, []) == set()
    assert train.get_default("keep_ratio") == 0.5, "the parser's defaults are restored"


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--keep-ratio", "0.25"], "--keep-ratio 0.25 (the checkpoint was trained with keep_ratio=0.5)"),
        (["--num-subnets", "4"], "--num-subnets 4 (the checkpoint was trained with num_subnets=2)"),
        (["--local-steps", "3"], "--local-steps 3 (the checkpoint was trained with local_steps=2)"),
        (["--whole-layers", "0"], "--whole-layers 0 (the checkpoint was trained with whole_layers=[])"),
        (["--no-coverage"], "--no-coverage (the checkpoint was trained with coverage=True)"),
        (["--no-twist-pin-cut"], "--no-twist-pin-cut (the checkpoint was trained with pin_cut=True)"),
        (["--twist-lr-scale", "1"], "--twist-lr-scale 1.0 (the checkpoint was trained with lr_scale=1.414"),
        (["--model-preset", "small"], "--model-preset small (num_layers 4 vs 2"),
        (["--hidden-size", "128"], "--hidden-size 128 (the checkpoint's model has hidden_size=64)"),
        (["--seq-length", "128"], "--seq-length 128 (the checkpoint's model has seq_length=64)"),
    ],
)
def test_conflicting_flags(rel, reference, flags, expected):
    parser = build_parser()
    argv = [*rel.ARGS, *flags]
    args = parser.parse_args(argv)
    saved = rel.meta(reference / "iter_0000008")
    conflicts = resume_conflicts(saved, args, explicit_dests(parser.train_parser, argv[1:]))
    assert len(conflicts) == 1 and conflicts[0].startswith(expected), conflicts
    # The saved values typed explicitly are no conflict ('sqrt' of the checkpoint's 2 subnets is its 1.414...).
    typed = ["--keep-ratio", "0.5", "--model-preset", "tiny", "--twist-lr-scale", "sqrt"]
    same = parser.parse_args([*rel.ARGS, *typed])
    assert resume_conflicts(saved, same, explicit_dests(parser.train_parser, typed)) == []
    # A checkpoint from before the flag trained at scale 1: a different explicit scale is refused.
    older = {**saved, "twist": {k: v for k, v in saved["twist"].items() if k != "lr_scale"}}
    conflicts = resume_conflicts(older, same, explicit_dests(parser.train_parser, typed))
    assert conflicts == ["--twist-lr-scale sqrt (the checkpoint was trained with lr_scale=1.0)"]


@pytest.mark.multiprocess
def test_contradicting_flags_are_refused_and_nothing_changes(rel, save_dir, run_twist):
    before = rel.file_hashes(save_dir)
    proc = run_twist(
        [*_resume(rel, save_dir), "--keep-ratio", "0.25", "--num-subnets", "4", "--hidden-size", "128"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    for part in (
        "these flags contradict the checkpoint",
        "--keep-ratio 0.25",
        "--num-subnets 4",
        "--hidden-size 128",
        "drop these flags",
    ):
        assert part in proc.stderr
    assert "[twist] round" not in proc.stdout
    assert rel.file_hashes(save_dir) == before


@pytest.mark.multiprocess
def test_truncated_checkpoint_is_refused_and_nothing_changes(rel, save_dir, run_twist):
    f = save_dir / "iter_0000008" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    before = rel.file_hashes(save_dir)
    proc = run_twist(_resume(rel, save_dir), check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.safetensors does not match its checksum in meta.json: the file is corrupt or truncated" in proc.stderr
    assert "[twist] round" not in proc.stdout
    assert rel.file_hashes(save_dir) == before


def test_corrupt_pointer_and_meta_are_refused(rel, save_dir, in_process_cli):
    (save_dir / rel.POINTER).write_text("eight\n")
    before = rel.file_hashes(save_dir)
    rc, _, err = in_process_cli(_resume(rel, save_dir))
    assert rc == 2 and "does not hold an iteration number" in err and "echo 4 >" in err
    assert rel.file_hashes(save_dir) == before

    (save_dir / rel.POINTER).write_text("8\n")
    (save_dir / "iter_0000008" / "meta.json").write_text('{"format": "megatron-twist", "kind": ')
    before = rel.file_hashes(save_dir)
    rc, _, err = in_process_cli(_resume(rel, save_dir))
    assert rc == 2 and "meta.json is corrupt" in err
    assert rel.file_hashes(save_dir) == before


def test_layout_that_cannot_be_resharded_is_refused(rel, save_dir, in_process_cli):
    before = rel.file_hashes(save_dir)
    rc, _, err = in_process_cli([*_resume(rel, save_dir), "--tensor-model-parallel-size", "4"])
    assert rc == 2
    assert "cannot continue at tensor parallel 4 x pipeline parallel 1" in err
    # Trained at TP 1, its subnets were balanced over 1 block: they cannot be redrawn for 4 shards.
    assert "not a multiple of tensor parallel size 4" in err and "balanced over 1 shard(s)" in err
    rc, _, err = in_process_cli([*_resume(rel, save_dir), "--pipeline-model-parallel-size", "4"])
    assert rc == 2 and "2 layers do not divide over pipeline parallel size 4" in err
    assert rel.file_hashes(save_dir) == before


def test_data_from_another_tokenizer_is_refused(rel, save_dir, prepared_small, in_process_cli):
    data, manifest = prepared_small
    ckpt = save_dir / "iter_0000008"
    meta = rel.meta(ckpt)  # meta.json is not checksummed: pretend the run was trained on other data
    meta["data"] = {"path": "/elsewhere/data", "tokenizer_sha256": "f" * 64, "vocab_size": 512}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    args = [a for a in _resume(rel, save_dir) if a != "--mock-data"]
    before = rel.file_hashes(save_dir)
    rc, _, err = in_process_cli([*args, "--data-path", data])
    assert rc == 2
    assert "was tokenized with another tokenizer" in err and "--tokenizer-model" in err
    # The same tokenizer but another vocabulary size than the model's: refused too.
    meta["data"]["tokenizer_sha256"] = manifest.tokenizer_sha256
    (ckpt / "meta.json").write_text(json.dumps(meta))
    before = rel.file_hashes(save_dir)
    rc, _, err = in_process_cli([*args, "--data-path", data])
    assert rc == 2 and "has vocabulary 512, the data 400" in err
    assert rel.file_hashes(save_dir) == before
