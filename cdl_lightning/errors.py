"""Exceptions for mistakes a user can fix (a bad path, a bad value, a mismatch): ``cdl`` prints them as one short
message and exits with status 2, without a traceback (``--debug`` or ``CDL_DEBUG=1`` shows it)."""

from __future__ import annotations

__all__ = ["UserError", "UserValueError", "UserFileNotFoundError"]


class UserError(Exception):
    """Base of the errors that name a user's mistake and its fix."""


class UserValueError(UserError, ValueError):
    """A value (option, config key, data) that cannot work; still a `ValueError` for Python callers."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder named by an option does not exist; still a `FileNotFoundError` for Python callers."""
