"""The one error path shared by every command.

A mistake the user can fix (a config value, a flag, a file that is missing, malformed or truncated) raises a
:class:`UserError` whose message is one line naming the field or file and the fix. Every command
(``python -m kd_landmarks.main``, ``datasets prepare``, ``tfds_build``, ``deploy.predict``, ``deploy.export``)
prints it as ``error: <message>`` on stderr and exits with :data:`EXIT_CODE`; the Python API raises it
unchanged. Any other exception is a fault of the code and keeps its traceback.
"""
from __future__ import annotations

import sys

EXIT_CODE = 2


class UserError(Exception):
  """A problem the user can fix; its message names the field or file and the fix, on one line."""


class ConfigError(UserError, ValueError):
  """A config value that cannot run (checked before the first step); the message names ``config.<field>``."""


class DataError(UserError, ValueError):
  """Data on disk that cannot be used as it is; the message names the file and what to do."""


class MissingInputError(UserError, FileNotFoundError):
  """An input a phase reads is not there yet (unprepared data, an untrained teacher, no teacher outputs); the
  message names it and the command that makes it."""


def one_line(error: BaseException) -> str:
  """The message of ``error`` folded onto one line (a message never needs a traceback to be understood)."""
  return " ".join(str(error).split()) or type(error).__name__


def report(error: BaseException, stream=None) -> int:
  """Prints ``error: <message>`` and returns the exit code a command should end with."""
  print(f"error: {one_line(error)}", file=stream or sys.stderr)
  return EXIT_CODE
