"""The one error path shared by every command.

A mistake the user can fix (a config value, a flag, a file that is missing, malformed or truncated) raises a
:class:`UserError` whose message is one line naming the field or file and the fix. Every command
(``python -m kd_landmarks.main``, ``datasets prepare``, ``tfds_build``, ``deploy.predict``, ``deploy.export``)
prints it as ``error: <message>`` on stderr and exits with :data:`EXIT_CODE`; the Python API raises it
unchanged. Any other exception is a fault of the code and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys

EXIT_CODE = 2


class UserError(Exception):
  """A problem the user can fix; its message names the field or file and the fix, on one line."""


class ConfigError(UserError, ValueError):
  """A config value that cannot run (checked before the first step); the message names ``config.<field>``."""


class DataError(UserError, ValueError):
  """Data on disk that cannot be used as it is; the message names the file and what to do."""


class ArgumentError(UserError, ValueError):
  """An argument of a command or of an API call that cannot be used; the message names it and what to give."""


class MissingExtraError(UserError, ImportError):
  """An optional dependency a feature needs is not installed; the message names the pip extra."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder a step needs does not exist; the message names it and the command that makes it."""


class WriteError(UserError, OSError):
  """A file could not be written: a full disk, a read-only or unwritable folder. The message names the path;
  ``errno`` and ``filename`` are those of the OSError it replaces."""

  def __str__(self):  # The message alone: OSError's own form would print "[Errno 28] None: <file>".
    return str(self.args[0]) if self.args else super().__str__()


# The OSErrors of writing that the user fixes (space, permissions), with what each asks of them.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full: free space there or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space there or choose a folder on another disk",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or change its permissions",
    errno.EPERM: "permission denied: choose a folder you can write to, or change its permissions",
}


def write_error(error: OSError, path=None) -> WriteError | None:
  """The :class:`WriteError` for an OSError raised while writing ``path`` (the error's own file name when it
  has one), or None when the error is not one of space or permissions (a fault to keep its traceback)."""
  if isinstance(error, UserError) or error.errno not in _WRITE_FAILURES:
    return None
  where = error.filename if error.filename is not None else path
  where = os.fspath(where) if where is not None else "a file"
  converted = WriteError(f"cannot write {where}: {_WRITE_FAILURES[error.errno]}")
  converted.errno, converted.filename = error.errno, where  # Still an OSError a caller can inspect.
  return converted


def one_line(error: BaseException) -> str:
  """The message of ``error`` folded onto one line (a message never needs a traceback to be understood)."""
  return " ".join(str(error).split()) or type(error).__name__


def report(error: BaseException, stream=None) -> int:
  """Prints ``error: <message>`` and returns the exit code a command should end with."""
  print(f"error: {one_line(error)}", file=stream or sys.stderr)
  return EXIT_CODE
