"""Stand-ins for Slurm's `srun`, `scontrol` and `sinfo` on one machine (tests only).

    fake_slurm.py scontrol show hostnames LIST   one host per line; LIST is comma-separated
                                                 (real scontrol also expands ranges like node[01-04])
    fake_slurm.py srun [OPTIONS] CMD ARGS...     CMD once per task, all at once, locally, with the
                                                 variables real srun gives a task: SLURM_PROCID,
                                                 SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS,
                                                 SLURM_NNODES, SLURM_STEP_NUM_TASKS; tasks are spread
                                                 block-wise over the allocation's nodes
                                                 (SLURM_JOB_NUM_NODES); exit status: the worst task's
    fake_slurm.py sinfo                          prints a partition line (DeepSpeed only checks it exists)

The test puts tiny shell wrappers named srun / scontrol / sinfo on PATH that exec this file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_VALUED = {
    "-n",
    "--ntasks",
    "-N",
    "--nodes",
    "--ntasks-per-node",
    "--export",
    "--nodelist",
    "-w",
    "--gpus-per-node",
    "--comment",
    "--kill-on-bad-exit",
    "-K",
    "--cpus-per-task",
    "-c",
}


def _parse_srun(argv):
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if "=" in a:
            k, v = a.split("=", 1)
            opts[k] = v
            i += 1
        elif a in _VALUED and a not in ("--kill-on-bad-exit", "-K"):
            opts[a] = argv[i + 1]
            i += 2
        else:  # a switch
            opts[a] = "1"
            i += 1
    return opts, argv[i:]


def srun(argv) -> int:
    opts, cmd = _parse_srun(argv)
    if not cmd:
        print("fake srun: no command", file=sys.stderr)
        return 2
    nodes = int(opts.get("--nodes", opts.get("-N", os.environ.get("SLURM_JOB_NUM_NODES", "1"))))
    if "--ntasks" in opts or "-n" in opts:
        ntasks = int(opts.get("--ntasks", opts.get("-n")))
    else:
        ntasks = nodes * int(opts.get("--ntasks-per-node", "1"))
    per_node = -(-ntasks // nodes)
    procs = []
    for task in range(ntasks):
        env = dict(os.environ)
        env.update(
            SLURM_PROCID=str(task),
            SLURM_LOCALID=str(task % per_node),
            SLURM_NODEID=str(task // per_node),
            SLURM_NTASKS=str(ntasks),
            SLURM_NNODES=str(nodes),
            SLURM_STEP_NUM_TASKS=str(ntasks),
            SLURM_STEP_NUM_NODES=str(nodes),
        )
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    kill_on_bad_exit = opts.get("--kill-on-bad-exit", opts.get("-K", "0")) not in ("0", "")
    worst = 0
    pending = list(procs)
    while pending:
        for p in list(pending):
            rc = p.poll()
            if rc is None:
                continue
            pending.remove(p)
            worst = max(worst, abs(rc))
            if rc != 0 and kill_on_bad_exit:
                for q in pending:
                    os.killpg(q.pid, signal.SIGTERM)
        time.sleep(0.05)
    return worst


def scontrol(argv) -> int:
    if argv[:2] != ["show", "hostnames"]:
        print(f"fake scontrol: only `show hostnames` is implemented, got {argv}", file=sys.stderr)
        return 2
    nodelist = argv[2] if len(argv) > 2 else os.environ["SLURM_JOB_NODELIST"]
    for host in nodelist.split(","):
        print(host)
    return 0


def sinfo(argv) -> int:
    print("PARTITION AVAIL TIMELIMIT NODES STATE NODELIST")
    nodes, nodelist = os.environ.get("SLURM_JOB_NUM_NODES", "1"), os.environ.get("SLURM_JOB_NODELIST", "")
    print(f"local* up infinite {nodes} idle {nodelist}")
    return 0


if __name__ == "__main__":
    tool, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"srun": srun, "scontrol": scontrol, "sinfo": sinfo}[tool](rest))
