"""A rank killed with SIGKILL in the middle of a round (issue #8, item 1).

Real processes: a 2-rank job on 127.0.0.1 whose rank sends itself SIGKILL before global step 6
(round 3; the last checkpoint is at step 4, `--save-interval 4`). The survivor must stop within
the configured timeout (`--distributed-timeout-minutes 0.25`) with a message naming the lost rank,
the checkpoint must be intact, and restarting the same command from it must reach the weights of
the uninterrupted run bit for bit.

Two ways the survivor learns of the death are exercised: under torchrun the launcher's agent
sends it SIGTERM (torchrun's default when a worker fails, `--max-restarts 0`); without a launcher
(plain processes, as under srun/mpirun) gloo's collective fails on the closed connection, or, when
the dead rank hosted the job's store, the store stops answering.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_twist.checkpoint.files import load_checkpoint
from megatron_twist.distributed.watchdog import EXIT_RANK_FAILURE

TIMEOUT_MIN = 0.25  # --distributed-timeout-minutes of these runs (15 s)
BOUND_S = TIMEOUT_MIN * 60 + 60  # the survivors must be gone this long after the kill


def _kill_time(text: str) -> float:
    m = re.search(r"\[fault\] rank \d+ before step \d+: SIGKILL to pid \d+ at ([0-9.]+)", text)
    assert m, f"the fault was not injected:\n{text[-3000:]}"
    return float(m.group(1))


@pytest.mark.multiprocess
def test_killed_rank_stops_the_job_and_restart_is_bitwise(tmp_path, rel, reference, launch, monkeypatch):
    save = tmp_path / "save"
    job = [
        *rel.ARGS,
        "--save",
        save,
        "--load",
        save,
        "--save-interval",
        "4",
        "--distributed-timeout-minutes",
        TIMEOUT_MIN,
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=0",
        "--master_addr=127.0.0.1",
    ]
    # launch() hands os.environ to the job
    monkeypatch.setenv("TWIST_FAULT_KILL_RANK", "1")
    monkeypatch.setenv("TWIST_FAULT_KILL_AT_STEP", "6")
    proc = launch([*torchrun, f"--master_port={launch.free_port()}", "-m", "megatron_twist", *job], timeout=300)
    end = time.time()
    monkeypatch.delenv("TWIST_FAULT_KILL_RANK")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[twist] rank 0/2: rank(s) [1] lost" in out, out[-4000:]
    assert f"exitcode  : {EXIT_RANK_FAILURE}" in out, "the survivor exits with the rank-failure code"
    assert end - _kill_time(out) < BOUND_S
    # The pointer names the last complete checkpoint, which loads (checksums verified).
    assert (save / rel.POINTER).read_text().strip() == "4"
    assert load_checkpoint(str(save / "iter_0000004"), kind="central")[0]["step"] == 4
    assert not (save / "iter_0000008").exists()

    # Restart the very same command: it resumes from iter_0000004 and ends where the reference ended.
    proc = launch([*torchrun, f"--master_port={launch.free_port()}", "-m", "megatron_twist", *job], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "the latest complete checkpoint is iter_0000004" in proc.stdout
    assert (save / rel.POINTER).read_text().strip() == "8"
    rel.assert_same_tensors(save / "iter_0000008", reference / "iter_0000008")
    assert rel.meta(save / "iter_0000008")["step"] == 8


def _plain_job(rel, launch, **fault_env):
    """The 2-rank job as plain processes (no launcher: no agent tears the job down, each survivor
    must find out by itself), with fault variables set. Returns (processes, outputs, end time)."""
    port = launch.free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME="lo",
            PYTHONUNBUFFERED="1",
            **fault_env,
        )
        cmd = [
            sys.executable,
            "-m",
            "megatron_twist",
            *map(str, rel.ARGS),
            "--distributed-timeout-minutes",
            str(TIMEOUT_MIN),
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return procs, outs, time.time()


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0], ids=["peer", "store-host"])
def test_killed_rank_without_a_launcher(tmp_path, rel, launch, victim):
    """Plain processes (no torchrun agent to tear the job down): the survivor finds out by itself."""
    procs, outs, end = _plain_job(rel, launch, TWIST_FAULT_KILL_RANK=str(victim), TWIST_FAULT_KILL_AT_STEP="6")
    survivor = 1 - victim
    assert procs[victim].returncode == -signal.SIGKILL
    assert procs[survivor].returncode == EXIT_RANK_FAILURE, outs[survivor][-4000:]
    named = "rank(s) [1] lost" if victim == 1 else "rank 0 was lost"  # rank 0 hosts the job's store
    assert f"[twist] rank {survivor}/2: {named}" in outs[survivor], outs[survivor][-4000:]
    assert end - _kill_time(outs[victim]) < BOUND_S


def _watchdog(store, rank, world=2, timeout=0.5):
    """A watchdog whose failure is recorded instead of ending this process."""
    from megatron_twist.distributed.watchdog import Watchdog

    wd = Watchdog(store, rank, world, timeout_s=timeout, interval_s=0.05)
    wd.failures = []

    def record(text):
        wd.failures.append(text)
        wd._stop.set()

    wd._fail = record
    return wd


def _wait(cond, seconds):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not cond():
        time.sleep(0.02)
    return bool(cond())


def test_watchdog_reports_a_silent_rank_after_the_timeout_and_only_then():
    import torch.distributed as dist

    store = dist.HashStore()
    a, b = _watchdog(store, 0), _watchdog(store, 1)
    a.start(), b.start()
    t0 = time.monotonic()
    assert not _wait(lambda: a.failures or b.failures, 1.0), "both alive: nobody is reported"
    b._stop.set()  # rank 1 freezes: its heartbeat stops, it writes no exit marker
    assert _wait(lambda: a.failures, 5.0)
    assert a.failures[0].startswith("rank(s) [1] lost (no heartbeat for ") and "timeout 0.5 s" in a.failures[0]
    assert time.monotonic() - t0 > 1.0 and store.get("twist/watchdog/0/lost").decode() == a.failures[0]


@pytest.mark.parametrize(
    "marker,reported", [("done", False), ("stopped: ConfigError: refused", False), ("error: RuntimeError: boom", True)]
)
def test_watchdog_tells_a_finished_rank_from_a_failed_one(marker, reported):
    import torch.distributed as dist

    store = dist.HashStore()
    a, b = _watchdog(store, 0), _watchdog(store, 1)
    a.start(), b.start()
    b.stop(marker)
    assert _wait(lambda: a.failures, 1.0) == reported  # > 0.5 s timeout: silence alone is no failure
    if reported:
        assert a.failures == [f"rank 1 stopped: {marker}"]
    a.stop()


def test_diagnosis_names_the_silent_rank():
    import torch.distributed as dist

    store = dist.HashStore()
    a, b, c = _watchdog(store, 0, 3, timeout=60), _watchdog(store, 1, 3, timeout=60), _watchdog(store, 2, 3, 60)
    for wd in (a, b, c):
        wd.start()
    time.sleep(0.2)
    c.beat(7)
    time.sleep(0.2)
    c._stop.set()  # rank 2 dies at step 7
    text, lost = a.find_lost()
    assert lost == [(2, 7)] and text.startswith("rank(s) [2] lost") and "rank 2 at step 7" in text
    b.stop(), a.stop()


@pytest.mark.multiprocess
def test_rank_alive_but_stuck_is_named_after_the_collective_timeout(rel, launch):
    """Rank 1 stops making progress before step 6 but stays alive (its heartbeat goes on): only the
    collective timeout reveals it. Rank 0, waiting for it at the end of the round, must name it as
    stuck and exit 75; rank 1 must then stop too (it sees rank 0's exit) instead of hanging."""
    procs, outs, end = _plain_job(rel, launch, TWIST_FAULT_HANG_RANK="1", TWIST_FAULT_HANG_AT_STEP="6")
    m = re.search(r"\[fault\] rank 1 hangs before step 6 at ([0-9.]+)", outs[1])
    assert m, outs[1][-3000:]
    assert procs[0].returncode == EXIT_RANK_FAILURE, outs[0][-4000:]
    assert "[twist] rank 0/2: rank(s) [1] alive but stuck (heartbeat still moving; rank 1 at step 6" in outs[0], outs[
        0
    ][-4000:]
    assert procs[1].returncode == EXIT_RANK_FAILURE, outs[1][-4000:]
    # Rank 1 sees rank 0's exit marker, or (rank 0 hosts the job's store here) the store going away
    # with it, whichever its watchdog thread meets first: either way it stops instead of hanging.
    assert (
        "[twist] rank 1/2: rank 0 stopped: failed after: rank(s) [1] alive but stuck" in outs[1]
        or "[twist] rank 1/2: rank 0 was lost: the job's store it hosts" in outs[1]
    ), outs[1][-4000:]
    # the collective timeout (15 s) plus the diagnosis, with margin
    assert end - float(m.group(1)) < TIMEOUT_MIN * 60 + 60
