"""The one exception type of the data package.

Every data problem a user can cause (a missing path, an empty corpus, a
tokenizer that does not match a prepared dataset, ...) is raised as
:class:`DataError` with a message that names the file and says how to fix it.
It subclasses :class:`ValueError` so callers that already catch bad-input
errors generically keep working, while the CLI can catch exactly this type and
print the message without a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad or missing training data; the message names the path and the fix."""
