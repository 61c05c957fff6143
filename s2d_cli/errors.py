"""Errors a user can fix get exit code 2 and one line on stderr; anything else is exit 1."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input or usage: printed as one line, exit code 2, no traceback."""


def located(path, line: int | None, what: str) -> UsageError:
    """`file:line: what` — the form every input error takes."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UsageError(f"{where}: {what}")
