"""Fixtures shared by the whole suite.

* ``mcore``: an in-process, single-rank gloo group with Megatron's parallel_state
  initialised (an in-memory store: nothing listens on a port). Session-wide,
  because parallel_state is process-global.
* ``run_torchrun``: launches a real multi-process job with torchrun on 127.0.0.1
  and a free port, with a timeout, and returns the completed process.
* ``run_twist_many``: several `twist` command lines in one launch (tests/twist_many.py), for runs
  whose start-up (imports of torch and Megatron-core) would cost more than their work.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mcore():
    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown

    init_distributed()
    init_model_parallel(seed=1234)
    yield
    shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_ports(n: int) -> list:
    """``n`` distinct free ports below Linux's ephemeral range (32768-60999 by default), each to be bound
    later by a run's rendezvous store: sockets that earlier runs open meanwhile (gloo binds ephemeral
    ports) cannot take them first."""
    import random

    ports: list = []
    while len(ports) < n:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
    )
    # DeepSpeed JIT-compiles a shared-memory comm op once; keep it in a stable place (the venv).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for leaked in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # set by in-process runs: not for children
        env.pop(leaked, None)
    return env


def run_process_group(cmd, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the WHOLE group (torchrun's workers too)."""
    with subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=cwd or REPO,
        start_new_session=True,
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"timed out after {timeout}s: {cmd}\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun(nproc: int, args, timeout: float = 240, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *map(str, args),
    ]
    proc = run_process_group(cmd, timeout, cwd)
    if check:
        assert proc.returncode == 0, (
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def run_torchrun():
    return torchrun


@pytest.fixture(scope="session")
def run_torchrun_raw():
    """torchrun without the success assertion, for runs that must fail."""
    return lambda nproc, args, timeout=240: torchrun(nproc, args, timeout, check=False)


@pytest.fixture(scope="session")
def run_twist():
    """The `twist` command in a fresh process (so each run owns its process group)."""

    def run(args, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
        proc = run_process_group([sys.executable, "-m", "megatron_twist", *args], timeout)
        if check:
            assert proc.returncode == 0, f"twist {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    return run


@pytest.fixture(scope="session")
def run_twist_many(tmp_path_factory):
    """``run_twist_many(nproc, argvs, timeout=600)`` -> [stdout of each run]: several `twist` command
    lines (each the arguments of `python -m megatron_twist`) one after the other in ONE launch of
    ``nproc`` ranks (tests/twist_many.py, under torchrun if nproc > 1): the start-up, seconds of
    imports per process, paid once. Fails, naming the output, unless every run succeeds."""

    def run(nproc: int, argvs, timeout: float = 600) -> list:
        import json

        spec = tmp_path_factory.mktemp("twist_many") / "runs.json"
        argvs = [[str(a) for a in argv] for argv in argvs]
        spec.write_text(json.dumps({"runs": argvs, "ports": store_ports(len(argvs))}))
        script = REPO / "tests" / "twist_many.py"
        if nproc == 1:
            proc = run_process_group([sys.executable, script, spec], timeout)
            assert proc.returncode == 0, f"runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        else:
            proc = torchrun(nproc, [script, spec], timeout)
        marker = "[twist_many] run "
        outputs = proc.stdout.split(marker)[1:]
        assert [o.split("\n", 1)[0] for o in outputs] == [str(i) for i in range(len(argvs))], proc.stdout[-3000:]
        return [o.split("\n", 1)[1] if "\n" in o else "" for o in outputs]

    return run


@pytest.fixture(scope="session")
def launch():
    """Run any launcher command in its own process group with a timeout; `launch.free_port()` for rendezvous."""
    run_process_group.free_port = free_port
    return run_process_group


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory):
    """A small real dataset (own sentencepiece tokenizer, vocabulary 400), prepared in-process once
    per session: (its directory, its manifest)."""
    from megatron_twist.data import prepare_data, stdlib_documents

    out = tmp_path_factory.mktemp("prepared_small")
    manifest = prepare_data(
        str(out),
        stdlib_documents("train", max_bytes=40_000),
        stdlib_documents("valid", max_bytes=150_000),
        vocab_size=400,
        progress=False,
        source="tests",
    )
    return out, manifest


@pytest.fixture
def refused_before_work(tmp_path, monkeypatch, capsys):
    """``refused_before_work(["train", ...])`` runs the CLI in-process and returns its stderr, failing
    unless it exits 2 without starting distributed work. "DS" in argv stands for a small ds_config
    file (ZeRO-1, micro batch 2) written here; "OUT" for a fresh path under tmp_path."""
    import json

    from megatron_twist import cli
    from megatron_twist.distributed import runtime

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}))

    def no_start(*a, **k):
        raise AssertionError("started distributed work before refusing")

    monkeypatch.setattr(runtime, "init_distributed", no_start)

    def run(argv) -> str:
        subs = {"DS": str(ds), "OUT": str(tmp_path / "out")}
        assert cli.main([subs.get(str(a), str(a)) for a in argv]) == 2
        return capsys.readouterr().err

    return run
