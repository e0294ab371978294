"""Several `twist` command lines, one after the other, in one process (or one torchrun launch): the
start-up (importing torch and Megatron-core, seconds per process) is paid once for all of them.

    python tests/twist_many.py RUNS_JSON
    torchrun --nproc_per_node N tests/twist_many.py RUNS_JSON

RUNS_JSON: {"runs": [ARGV, ...], "ports": [PORT, ...]}, each ARGV the arguments of
`python -m megatron_twist` (["train", "--data-path", ...]). Each run goes through megatron_twist.cli.main,
the function `python -m megatron_twist` calls, which creates the process group and destroys it at the
end. Under torchrun every run gets its own rendezvous, rank 0 hosting the store on that run's free
port (a new process group on torchrun's store would meet the previous group's keys there). Rank 0
prints MARKER + the run's index before each run, so a caller can split the output per run. Exits at
the first run that fails, with its status.
"""

import json
import os
import sys

from megatron_twist.cli import main

MARKER = "[twist_many] run "

spec = json.loads(open(sys.argv[1]).read())
for i, argv in enumerate(spec["runs"]):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=str(spec["ports"][i]))
    if os.environ.get("RANK", "0") == "0":
        print(f"{MARKER}{i}", flush=True)
    status = main([str(a) for a in argv])
    if status:
        sys.exit(status)
