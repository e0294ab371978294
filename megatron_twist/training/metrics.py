"""The run's metrics file (``--metrics-file``): one JSON object, written atomically at the end.

It is stamped (``"megatron_twist": "metrics"``) so that a rerun may replace it and nothing else
(outputs.check_output_file refuses to replace a file megatron-twist did not write).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import outputs


class MetricsFile:
    """Written by the logging rank only (the caller decides)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"megatron_twist": outputs.METRICS, **record}, f, indent=1)
        os.replace(tmp, self.path)
