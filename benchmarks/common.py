"""Helpers shared by the benchmark scripts (each script's own directory is on sys.path when run)."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident set, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def prepare_out(path, worker: bool = False) -> Path:
    """The benchmark's --out folder: new, empty, or one a benchmark made (marked); a user's own
    non-empty folder is refused before any work (SystemExit naming the fix), never written into.
    Worker processes get the folder their parent already claimed."""
    from megatron_twist.outputs import OutputError, check_output, claim_directory

    out = Path(path)
    if worker:
        return out
    try:
        check_output(out, ("benchmark",), "--out", overwrite_flag=None)
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None
    return claim_directory(out, "benchmark")
