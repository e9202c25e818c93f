"""The one base class of user errors.

A `UserError` says that something a user gave tessera is wrong (a file, a flag, a config.json field, a
request, a budget), names it and says what was expected. The CLI prints it as one line `tessera: error: ...`
with exit status 2 and the HTTP server answers it with a 400. Every other exception is a bug and keeps its
traceback: a kernel launcher's shape check, say, is a ValueError that is not a UserError.

A UserError is a ValueError, so Python callers that catch bad arguments the usual way keep catching it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something a user gave tessera is wrong; the message names it and what was expected."""


class UserFileNotFound(UserError, FileNotFoundError):
    """A file or folder a user named (or that a checkpoint or corpus must hold) does not exist."""
