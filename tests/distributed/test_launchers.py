"""The launchers users have: torchrun, the `deepspeed` launcher, `mpirun` (mpich), and srun's environment.

Real launchers with 2 ranks on 127.0.0.1. mpirun ranks are discovered through mpi4py; the same
job under mpirun and torchrun computes the same thing bit for bit; the deepspeed launcher runs
the DeepSpeed engine path and matches TwIST without DeepSpeed to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from megatron_twist.config import ConfigError
from megatron_twist.distributed.runtime import discover_launcher

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
JOB = [
    "-m",
    "megatron_twist",
    "train",
    "--model-preset",
    "tiny",
    "--mock-data",
    "--train-iters",
    "8",
    "--local-steps",
    "4",
    "--micro-batch-size",
    "2",
    "--num-subnets",
    "2",
    "--keep-ratio",
    "0.5",
]


def _venv_tool(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    assert path, f"{name} is not installed (it comes with the pinned dependencies: scripts/setup_env.sh)"
    return path


@pytest.mark.multiprocess
def test_mpirun_and_deepspeed_launchers(tmp_path, run_torchrun, launch):
    run_torchrun(2, [*JOB, "--metrics-file", tmp_path / "torchrun.json"])
    mpi = launch(
        [
            _venv_tool("mpirun"),
            "-n",
            "2",
            "-genv",
            "MASTER_ADDR",
            "127.0.0.1",
            sys.executable,
            *JOB,
            "--metrics-file",
            tmp_path / "mpirun.json",
        ],
        timeout=240,
    )
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    ref = json.loads((tmp_path / "torchrun.json").read_text())
    got = json.loads((tmp_path / "mpirun.json").read_text())
    assert got["world_size"] == 2 and got["loss_curve"] == ref["loss_curve"]

    # the deepspeed launcher, with --num_gpus and with a hostfile (`localhost slots=2`, no ssh)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    for name, placement in (
        ("num_gpus", ["--num_gpus", "2"]),
        ("hostfile", ["--hostfile", str(hostfile), "--no_ssh_check"]),
    ):
        ds = launch(
            [
                _venv_tool("deepspeed"),
                *placement,
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(launch.free_port()),
                "--no_local_rank",
                "--module",
                *JOB[1:],
                "--deepspeed",
                "--deepspeed_config",
                REPO / "ds_configs" / "cpu_zero1.json",
                "--metrics-file",
                tmp_path / f"deepspeed-{name}.json",
            ],
            timeout=300,
        )
        assert ds.returncode == 0, ds.stderr[-3000:]
        per_rank = json.loads((tmp_path / f"deepspeed-{name}.json").read_text())["losses_per_rank"]
        assert len(per_rank) == 2
        for rank, losses in enumerate(per_rank):
            expected = [x for r in ref["rounds"] for x in r["losses"][rank]]
            assert max(abs(a - b) for a, b in zip(losses, expected)) <= 1e-5, name


def test_srun_environment_is_discovered(monkeypatch):
    # discover_launcher writes RANK/WORLD_SIZE/... into os.environ: give it a private copy so
    # nothing leaks into later tests of this process
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        discover_launcher()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert discover_launcher() == "srun"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")
    assert os.environ["MASTER_PORT"] == "29500"
