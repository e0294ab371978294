"""``twist_references``: `twist train` reference runs done together, one launch per group (suite time)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def twist_references(tmp_path_factory, run_twist_many):
    """``twist_references(nproc, runs)`` -> {name: folder}: the `twist train` runs ``runs`` (name ->
    the arguments after `python -m megatron_twist`), one after the other in ONE launch of ``nproc``
    ranks (run_twist_many: its start-up paid once), done once per session; asking again for the same
    runs gives the same folders. Each folder holds the run's central model (``central/``, --save) and
    its ``metrics.json`` (--metrics-file)."""
    done = {}

    def get(nproc: int, runs: dict) -> dict:
        key = json.dumps([nproc, {name: list(map(str, argv)) for name, argv in runs.items()}], sort_keys=True)
        if key not in done:
            root = tmp_path_factory.mktemp("twist_references")
            argvs = []
            for name, argv in runs.items():
                (root / name).mkdir()
                argvs.append([*argv, "--save", root / name / "central", "--metrics-file", root / name / "metrics.json"])
            run_twist_many(nproc, argvs)
            done[key] = {name: root / name for name in runs}
        return done[key]

    return get
