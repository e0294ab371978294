"""No command deletes or replaces a directory that is not its own output (issue #13, item 1).

A precious file is put inside, or next to, every --save / --output / --out / --metrics-file target
of every subcommand and writer, for every format (safetensors, sharded, torch_dist, HF export,
prepared data, save directories, DeepSpeed save directories, benchmark folders). A foreign target
is refused before any work (exit 2, the message naming the path and the fix); the precious file's
sha256 is unchanged afterwards. Our own outputs are still replaced (atomically, as before), and
``--overwrite`` replaces a foreign one only when asked.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_twist import outputs
from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
from megatron_twist.outputs import OutputError

REPO = Path(__file__).resolve().parents[2]
PRECIOUS = b"the user's own work\n"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign_dir(root: Path, name: str = "target") -> Path:
    """A user's own non-empty folder."""
    d = root / name
    d.mkdir(parents=True)
    (d / "notes.txt").write_bytes(PRECIOUS)
    return d


def precious_next_to(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    f = root / "precious.txt"
    f.write_bytes(PRECIOUS)
    return f


def intact(d: Path) -> bool:
    """The foreign folder holds exactly its precious file, unchanged."""
    return sorted(p.name for p in d.iterdir()) == ["notes.txt"] and (d / "notes.txt").read_bytes() == PRECIOUS


# ------------------------------------------------------------------------ what an output is
def test_output_kinds_and_decisions(tmp_path):
    assert outputs.output_kind(tmp_path / "missing") is None
    user = foreign_dir(tmp_path, "user")
    assert outputs.output_kind(user) is None
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"format": "megatron-twist", "kind": "central"}))
    assert outputs.output_kind(tmp_path / "ckpt") == outputs.CENTRAL
    (tmp_path / "fake").mkdir()  # a meta.json of someone else's
    (tmp_path / "fake" / "meta.json").write_text(json.dumps({"kind": "central"}))
    assert outputs.output_kind(tmp_path / "fake") is None

    outputs.check_output(tmp_path / "missing", (outputs.CENTRAL,), "--save")  # new: fine
    (tmp_path / "empty").mkdir()
    outputs.check_output(tmp_path / "empty", (outputs.CENTRAL,), "--save")  # empty: fine
    outputs.check_output(tmp_path / "ckpt", (outputs.CENTRAL,), "--save")  # ours, same kind: fine
    with pytest.raises(OutputError, match=r"--save .*ckpt is a megatron-twist central output.*--overwrite"):
        outputs.check_output(tmp_path / "ckpt", (outputs.EXTRACTED,), "--save")  # ours, another kind
    with pytest.raises(OutputError, match=r"--save .*user is a non-empty directory megatron-twist did not write"):
        outputs.check_output(user, (outputs.CENTRAL,), "--save")
    outputs.check_output(user, (outputs.CENTRAL,), "--save", overwrite=True)  # asked for
    (tmp_path / "file").write_bytes(PRECIOUS)
    with pytest.raises(OutputError, match="is an existing file"):
        outputs.check_output(tmp_path / "file", (outputs.CENTRAL,), "--save", overwrite=True)
    assert intact(user) and (tmp_path / "file").read_bytes() == PRECIOUS


def test_metrics_file_is_replaced_only_if_ours(tmp_path):
    mine = tmp_path / "metrics.json"
    mine.write_text(json.dumps({"megatron_twist": "metrics", "rounds": []}))
    outputs.check_output_file(mine, "--metrics-file")
    theirs = tmp_path / "results.json"
    theirs.write_bytes(PRECIOUS)
    with pytest.raises(OutputError, match="--metrics-file .*results.json is an existing file"):
        outputs.check_output_file(theirs, "--metrics-file")
    outputs.check_output_file(theirs, "--metrics-file", overwrite=True)
    assert theirs.read_bytes() == PRECIOUS


def test_temporaries_are_removed_only_if_marked(tmp_path):
    tmp = outputs.make_temporary(tmp_path / ".x.tmp-1")
    (tmp / "half-written").write_bytes(b"0")
    outputs.make_temporary(tmp)  # a leftover of ours: cleared
    assert sorted(p.name for p in tmp.iterdir()) == [outputs.TEMPORARY_MARKER]
    user = foreign_dir(tmp_path, ".y.tmp-1")
    with pytest.raises(OutputError, match="megatron-twist did not make it; nothing was deleted"):
        outputs.make_temporary(user)
    assert intact(user)


# ------------------------------------------------------------------------ every writer, as a library
def _central(seed=0):
    from megatron_twist.training.twist_trainer import build_central

    return build_central(ModelConfig(**MODEL_PRESETS["tiny"]), seed)


def test_safetensors_writers(mcore, tmp_path):
    from megatron_twist.checkpoint.models import read_central, save_central

    sibling = precious_next_to(tmp_path)
    central = _central()
    save_central(str(tmp_path / "central"), central, TwistConfig(), TrainConfig())
    central.step = 5
    save_central(str(tmp_path / "central"), central, TwistConfig(), TrainConfig())  # ours: replaced
    assert read_central(str(tmp_path / "central"))[0]["step"] == 5
    user = foreign_dir(tmp_path)
    with pytest.raises(OutputError, match="did not write"):
        save_central(str(user), central, TwistConfig(), TrainConfig())
    assert intact(user) and sha(sibling) == sha(tmp_path / "precious.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["central", "precious.txt", "target"], "no temporaries"
    save_central(str(user), central, TwistConfig(), TrainConfig(), overwrite=True)  # asked for
    assert read_central(str(user))[0]["step"] == 5 and not (user / "notes.txt").exists()


def test_sharded_writer(mcore, tmp_path):
    from megatron_twist.checkpoint.models import read_central
    from megatron_twist.checkpoint.sharded import save_sharded
    from megatron_twist.distributed.sharded_central import ShardedCentral

    sibling = precious_next_to(tmp_path)
    central = _central()
    sharded = ShardedCentral.from_full(central.config, dict(central.params), None, device="cpu")
    save_sharded(sharded, str(tmp_path / "central"), TwistConfig(), TrainConfig())
    save_sharded(sharded, str(tmp_path / "central"), TwistConfig(), TrainConfig())  # ours: replaced
    assert read_central(str(tmp_path / "central"))[0]["sharded"]["shard_count"] == 1
    user = foreign_dir(tmp_path)
    with pytest.raises(OutputError, match="did not write"):
        save_sharded(sharded, str(user), TwistConfig(), TrainConfig())
    blocker = foreign_dir(tmp_path, ".central.tmp-sharded")  # a user's folder at the temporary's name
    with pytest.raises(OutputError, match="did not make it; nothing was deleted"):
        save_sharded(sharded, str(tmp_path / "central"), TwistConfig(), TrainConfig())
    assert intact(user) and intact(blocker) and sibling.read_bytes() == PRECIOUS


def test_torch_dist_writer(mcore, tmp_path):
    from megatron_twist.checkpoint.torch_dist import read_common, save_central_dist

    sibling = precious_next_to(tmp_path)
    central = _central()
    save_central_dist(tmp_path / "central", central, TwistConfig(), TrainConfig())
    central.step = 7
    save_central_dist(tmp_path / "central", central, TwistConfig(), TrainConfig())  # ours: replaced
    assert read_common(tmp_path / "central")["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["central", "precious.txt"], "no temporaries left"
    user = foreign_dir(tmp_path)
    with pytest.raises(Exception, match="did not write"):
        save_central_dist(user, central, TwistConfig(), TrainConfig())
    blocker = foreign_dir(tmp_path, ".central.dist-tmp")
    with pytest.raises(Exception, match="did not make it; nothing was deleted"):
        save_central_dist(tmp_path / "central", central, TwistConfig(), TrainConfig())
    assert intact(user) and intact(blocker) and sibling.read_bytes() == PRECIOUS


def test_checkpoint_series_removes_only_its_own(tmp_path):
    from megatron_twist.checkpoint import series as series

    save = tmp_path / "save"
    series.prepare(save)
    user_iter = foreign_dir(save, "iter_0000001")  # a user's folder with an iter_ name
    user_tmp = foreign_dir(save, ".iter_0000002.tmp-99")  # and one with a temporary's name
    marked = outputs.make_temporary(save / ".iter_0000003.tmp-98")
    assert series.remove_stale_temporaries(save) == [marked.name]
    for i in (2, 3):
        (save / f"iter_000000{i}").mkdir()
        (save / f"iter_000000{i}" / "meta.json").write_text(json.dumps({"format": "megatron-twist", "kind": "central"}))
    series.publish(save, 3, keep=1)
    assert not (save / "iter_0000002").exists() and (save / "iter_0000003").is_dir()
    assert intact(user_iter) and intact(user_tmp)
    assert outputs.output_kind(save) == outputs.SAVE_DIR


def test_prepare_data(tmp_path):
    from megatron_twist.data import prepare_data
    from megatron_twist.data.corpus import Document

    docs = [Document(f"doc{i}", ("def f(x):\n    return x + %d\n" % i) * 40) for i in range(12)]
    sibling = precious_next_to(tmp_path)
    out = tmp_path / "data"
    prepare_data(str(out), docs[:10], docs[10:], vocab_size=300, progress=False)
    prepare_data(str(out), docs[:10], docs[10:], vocab_size=300, progress=False)  # ours: rewritten
    (out / "manifest.json").unlink()  # as an interrupted run leaves it: still ours (the claim marker)
    prepare_data(str(out), docs[:10], docs[10:], vocab_size=300, progress=False)
    user = foreign_dir(tmp_path)
    with pytest.raises(OutputError, match="--output .*did not write"):
        prepare_data(str(user), docs[:10], docs[10:], vocab_size=300, progress=False)
    assert intact(user) and sibling.read_bytes() == PRECIOUS


# ------------------------------------------------------------------------ every subcommand
DS_CONFIG = str(REPO / "ds_configs" / "cpu_zero2.json")
TRAIN = ["train", "--model-preset", "tiny", "--mock-data", "--train-iters", "2", "--local-steps", "1"]


@pytest.mark.parametrize(
    "case",
    [
        "train",
        "train-torch_dist",
        "train-series",
        "train-deepspeed",
        "metrics-file",
        "extract",
        "import-hf",
        "export-hf",
        "prepare-data",
    ],
)
def test_every_subcommand_refuses_a_foreign_target_before_any_work(in_process_cli, tmp_path, case):
    """In-process: a command that got as far as creating a process group fails the test."""
    user = foreign_dir(tmp_path)
    sibling = precious_next_to(tmp_path)
    flag = "--save"
    args = {
        "train": [*TRAIN, "--save", user],
        "train-torch_dist": [*TRAIN, "--ckpt-format", "torch_dist", "--save", user],
        "train-series": [*TRAIN, "--save", user, "--save-interval", "1"],
        "train-deepspeed": [*TRAIN[:-2], "--deepspeed", "--deepspeed_config", DS_CONFIG, "--save", user],
        "metrics-file": [*TRAIN, "--metrics-file", user / "notes.txt"],
        "extract": ["extract", "--load", tmp_path / "nothing", "--save", user],
        "import-hf": ["import-hf", tmp_path / "nothing", "--save", user],
        "export-hf": ["export-hf", "--load", tmp_path / "nothing", "--save", user],
        "prepare-data": ["prepare-data", "--input", sibling, "--output", user],
    }[case]
    if case == "metrics-file":
        flag = "--metrics-file"
    if case == "prepare-data":
        flag = "--output"
    rc, out, err = in_process_cli(args)
    assert rc == 2, (out, err)
    assert f"error: {flag} {user}" in err and "nothing was written" in err and "--overwrite" in err, err
    assert intact(user) and sibling.read_bytes() == PRECIOUS


def test_extract_end_to_end_next_to_precious_files_and_overwrite(tmp_path, run_twist, run_twist_many):
    """Real processes: our own outputs are replaced, a foreign one only with --overwrite; files next to
    the targets are never touched."""
    sibling = precious_next_to(tmp_path)
    central, cut, metrics = tmp_path / "central", tmp_path / "cut", tmp_path / "metrics.json"
    run_twist([*TRAIN, "--save", central, "--metrics-file", metrics])
    assert json.loads(metrics.read_text())["megatron_twist"] == "metrics"
    # a rerun replaces its own outputs; two extracts, the second replacing the first's: one process
    run_twist_many(
        1,
        [
            [*TRAIN, "--save", central, "--metrics-file", metrics],
            ["extract", "--load", central, "--save", cut],
            ["extract", "--load", central, "--save", cut, "--method", "random:3"],
        ],
    )
    assert json.loads((cut / "meta.json").read_text())["method"] == "random:3"
    user = foreign_dir(tmp_path)
    refused = run_twist(["extract", "--load", central, "--save", user], check=False)
    assert refused.returncode == 2 and intact(user)
    run_twist(["extract", "--load", central, "--save", user, "--overwrite"])
    assert json.loads((user / "meta.json").read_text())["kind"] == "extracted" and not (user / "notes.txt").exists()
    assert sibling.read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["central", "cut", "metrics.json", "precious.txt", "target"], (
        "no temporaries left behind"
    )


@pytest.mark.parametrize(
    "script",
    [
        *("quality.py", "speed.py", "deployment.py", "deepspeed_memory.py"),
        *("megatron_memory.py", "continued.py", "scratch.py"),
    ],
)
def test_benchmarks_refuse_a_foreign_out_folder(tmp_path, script):
    user = foreign_dir(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(user)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode != 0 and f"--out {user}" in proc.stderr and "did not write" in proc.stderr, proc.stderr
    assert intact(user)


@pytest.mark.parametrize("script", ["run_all.sh", "quality_set.sh"])
def test_benchmark_sets_refuse_a_foreign_out_folder(tmp_path, script):
    user = foreign_dir(tmp_path)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / script), str(user)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2 and f"was not made by benchmarks/{script}" in proc.stderr, proc.stderr
    assert intact(user)


def test_no_writer_deletes_without_the_guard():
    """Source scan: every shutil.rmtree in the package is one this issue reviewed (a marked
    temporary, a set-aside copy of our own output, a pruned checkpoint of our own, a sub-directory of
    a prepared directory it checked)."""
    # prepare.py: the hf_tokenizer/ sub-directory of a prepared directory it claimed (check_output first)
    reviewed = {"outputs.py": 1, "series.py": 1, "prepare.py": 1}
    found = {}
    for path in (REPO / "megatron_twist").rglob("*.py"):
        n = path.read_text().count("shutil.rmtree(")
        if n:
            found[path.name] = n
    assert found == reviewed, found
