"""Writing a file so that a failure leaves nothing a re-run would trust.

:func:`atomic_write` writes beside the target and renames over it only when the whole file was written: a
full disk, a read-only folder or a killed process leaves either the old file or none, never half of one,
and a full disk or a refused write reaches the user as one :class:`kd_landmarks.errors.WriteError` line
naming the file.
"""
from __future__ import annotations

import contextlib
import os

from kd_landmarks import errors


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
  """``with atomic_write(path) as f: ...`` writes ``path`` whole or not at all (see the module docstring)."""
  path = os.fspath(path)
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with open(temporary, mode, **open_kwargs) as f:
      yield f
    os.replace(temporary, path)
  except BaseException as error:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    if isinstance(error, OSError) and (converted := errors.write_error(error, path)) is not None:
      raise converted from None
    raise


@contextlib.contextmanager
def writing(path):
  """Turns a full disk or a refused write inside the block into one :class:`errors.WriteError` naming
  ``path`` (or the file the OSError names); any other error passes unchanged."""
  try:
    yield
  except OSError as error:
    converted = errors.write_error(error, path)
    if converted is None:
      raise
    raise converted from None
