"""Errors caused by the user's files or settings, not by a bug in kpt.

The command line prints any :class:`UserError` as one line ``kpt: error: <message>`` and exits with
status 2 (``--debug`` shows the traceback). Library code raises the most specific subclass and names the
file, and the record, row or key where it is known, plus what was expected.
"""

from __future__ import annotations

__all__ = ["DataError", "UserError"]


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config value): shown without a traceback."""


class DataError(UserError, ValueError):
    """A data file, record or label that cannot be right; the message names the file (and record)."""
