"""Every error a user can cause, in one place at the bottom of the package.

Each is raised with a message that names the file or flag and the fix; the CLI maps them to exit
codes (bad input, a checkpoint or data that cannot be used: 2; a run that cannot go on: 1) and
prints the message without a traceback. They subclass ValueError / RuntimeError so callers that
already catch bad-input errors generically keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class DataError(ValueError):
    """Bad or missing training data (a missing path, an empty corpus, a tokenizer that does not match
    a prepared dataset, ...); the message names the path and the fix."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. every subnet of a round non-finite); raised on every rank together,
    with the last checkpoint intact. `twist` exits with code 1."""
