"""The Slurm recipes under a simulated Slurm: stand-in srun / scontrol / sinfo on PATH start local
processes (tests/scale/fake_slurm.py), SLURM_* variables describe a 2-node allocation whose hosts
are 127.0.0.1 and localhost, and `slurm/twist_tiny_cpu.sh` (the tiny sizes + twist_70b.sh's logic)
trains the tiny model with 2 CPU ranks end to end: once through srun + torchrun (static
rendezvous, node rank = SLURM_NODEID), once through the DeepSpeed variant (hostfile written from
`scontrol show hostnames`, `deepspeed --launcher slurm`, which calls srun itself).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["127.0.0.1", "localhost"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_slurm_bin(directory: Path, log: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("srun", "scontrol", "sinfo"):
        path = directory / tool
        path.write_text(
            "#!/bin/sh\n"
            f'echo "{tool} $*" >> {shlex.quote(str(log))}\n'
            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests/scale/fake_slurm.py'))} "
            f'{tool} "$@"\n'
        )
        path.chmod(0o755)
    return directory


def simulated_job(tmp: Path, script_env, job_id: int, **overrides) -> dict:
    log = tmp / "slurm-calls.log"
    bin_dir = _fake_slurm_bin(tmp / "bin", log)
    env = script_env(RUN_DIR=tmp / "run", MASTER_PORT=_free_port(), **overrides)
    env.pop("MASTER_ADDR", None)  # the script must take it from scontrol
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST=",".join(HOSTS),
        SLURM_JOB_NUM_NODES="2",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    return env


def run_job(run_script, tmp: Path, env: dict, timeout: float = 240):
    proc = run_script("twist_tiny_cpu.sh", env=env, timeout=timeout)
    log = tmp / "slurm-calls.log"
    text = log.read_text() if log.exists() else ""
    calls = [c.strip() for c in re.split(r"\n(?=(?:srun|scontrol|sinfo) )", text) if c.strip()]
    return proc, calls


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory, run_script, script_env, script_plan):
    tmp = tmp_path_factory.mktemp("slurm-torchrun")
    env = simulated_job(tmp, script_env, 4242)
    proc, calls = run_job(run_script, tmp, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    plan = script_plan("twist_tiny_cpu.sh")
    return tmp, proc, calls, plan


@pytest.mark.multiprocess
def test_tiny_recipe_trains_under_simulated_slurm(torchrun_job):
    tmp, proc, calls, plan = torchrun_job
    out = proc.stdout
    port = None
    m = re.search(r"2 nodes x 1 = 2 ranks, rendezvous (\S+):(\d+), launcher torchrun", out)
    assert m and m.group(1) == HOSTS[0], out[-3000:]  # first host of `scontrol show hostnames`
    port = m.group(2)
    assert "ok  DP 2 over 2 subnets" in out  # the planner ran as the preflight, with the job's world size
    # srun started ONE torchrun per node, static rendezvous at the first host
    sruns = [c for c in calls if c.startswith("srun ")]
    assert len(sruns) == 1 and "--nodes=2" in sruns[0] and "--ntasks-per-node=1" in sruns[0]
    assert "torch.distributed.run" in sruns[0] and f" 2 1 {HOSTS[0]} {port} -m megatron_twist train" in sruns[0]
    assert "scontrol show hostnames 127.0.0.1,localhost" in calls

    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    curve = metrics["loss_curve"]
    assert len(curve) == 8 and all(math.isfinite(x) for x in curve) and curve[-1] < curve[0]
    assert [r["steps"] for r in metrics["rounds"]] == [4, 4]
    # both subnets trained (one per rank) and their losses differ: different units, different data
    assert all(len(r["losses"]) == 2 and r["losses"][0] != r["losses"][1] for r in metrics["rounds"])
    assert (tmp / "run" / "central" / "meta.json").is_file()

    # the planner's traffic is what the trainer measured at the collective
    stage = plan["stages"]["only"]
    for r in metrics["rounds"]:
        assert r["aggregation_bytes"] == stage["aggregation_bytes_per_round"]
        assert r["dense_dp_bytes"] == stage["dense_dp_bytes_per_step"] * r["steps"]
    # and independently: weights + 2 Adam moments of the whole tiny model, fp32
    n = metrics["model"]
    h, H, G, F, V, L = (
        n["hidden_size"],
        n["num_attention_heads"],
        n["num_query_groups"],
        n["ffn_hidden_size"],
        n["vocab_size"],
        n["num_layers"],
    )
    d = h // H
    params = L * (h * (H + 2 * G) * d + H * d * h + 3 * h * F + 2 * h) + 2 * V * h + h
    assert metrics["rounds"][0]["aggregation_bytes"] == 3 * 4 * params


@pytest.mark.multiprocess
def test_deepspeed_variant_writes_a_hostfile_and_trains(tmp_path, run_script, script_env, torchrun_job):
    env = simulated_job(tmp_path, script_env, 4243, LAUNCHER="deepspeed")
    proc, calls = run_job(run_script, tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = tmp_path / "run"
    assert (run / "hostfile").read_text() == "".join(f"{h} slots=1\n" for h in HOSTS)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["twist"] == {"keep_ratio": 0.5, "num_subnets": 2, "local_steps": 4, "seed": 1234}
    assert ds["zero_optimization"] == {"stage": 1} and ds["bf16"] == {"enabled": False}
    # deepspeed's slurm launcher called srun for 2 tasks; each task found its rank through SLURM_PROCID
    sruns = [c for c in calls if c.startswith("srun ")]
    assert len(sruns) == 1 and sruns[0].startswith("srun -n 2 --ntasks-per-node=1 ") and " train " in sruns[0]
    per_rank = json.loads((run / "metrics.json").read_text())["losses_per_rank"]
    reference = json.loads((torchrun_job[0] / "run" / "metrics.json").read_text())
    assert len(per_rank) == 2
    for rank, losses in enumerate(per_rank):  # the same training as the torchrun variant
        expected = [x for r in reference["rounds"] for x in r["losses"][rank]]
        assert len(losses) == len(expected) and max(abs(a - b) for a, b in zip(losses, expected)) <= 1e-5


def test_run_mode_needs_an_allocation_and_refuses_bad_layouts_before_launch(tmp_path, run_script, script_env):
    outside = run_script("twist_tiny_cpu.sh")  # no SLURM_JOB_NODELIST: not inside a job
    assert outside.returncode != 0 and "submit with sbatch" in outside.stderr
    env = simulated_job(tmp_path, script_env, 4244, TP=4)  # 2 KV heads cannot split over TP 4
    proc, calls = run_job(run_script, tmp_path, env)
    assert proc.returncode == 2
    assert "2 key-value heads do not divide over tensor parallel size 4" in proc.stderr
    assert "suggested fix" in proc.stderr
    assert not [c for c in calls if c.startswith("srun ")]  # no rank was started


def test_recipes_hold_no_machine_specific_paths():
    for script in (REPO / "slurm").glob("*.sh"):
        text = script.read_text()
        assert not re.search(r"(/work/|/home/|/scratch/|/users?/)", text), script.name
        assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
