"""One run per workdir: a lock file naming the run that holds it (pid, host, start time).

Two runs on one workdir would interleave their checkpoints, teacher caches and evaluations, and each print
numbers that belong to the other's model. :func:`acquire` creates ``WORKDIR/LOCK_FILE`` atomically
(``O_CREAT | O_EXCL``, which NFS honours too) and writes who holds it; a second run stops at once with:

  WORKDIR is in use by pid 1234 on host-a since 2026-12-02 16:30:01 UTC (...); wait for it, or if that run
  is gone, pass --break_lock (or delete WORKDIR/.kd_landmarks.lock)

A lock left by a process of *this* host that no longer exists (killed, crashed) is stale and taken over with
a log line; one from another host cannot be checked from here, hence ``break_lock``.

Multi-host runs: only process 0 takes the lock (the hosts of one run share its workdir) and tells the other
processes whether it got it, so that every process stops with the same message when the workdir is in use.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import time
from typing import Callable

from jax.experimental import multihost_utils
import numpy as np

from kd_landmarks import errors

LOCK_FILE = ".kd_landmarks.lock"


class WorkdirLockedError(errors.UserError, RuntimeError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by another user.
    return True
  return True


def _describe(holder: dict) -> str:
  started = datetime.datetime.fromtimestamp(float(holder.get("time", 0)), datetime.timezone.utc)
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {started:%Y-%m-%d %H:%M:%S} UTC "
          f"({' '.join(holder.get('argv', []))[:200]})")


def _read_holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # Half-written or corrupt: a holder we cannot name.


def _try_create(path: str, holder: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(holder, f)
  return True


class WorkdirLock:
  """The lock held by this run; :meth:`release` (or leaving the ``with`` block) removes it."""

  def __init__(self, path: str | None, holder: dict | None):
    self.path = path
    self.holder = holder

  def release(self) -> None:
    if self.path is None:
      return
    if (_read_holder(self.path) or {}).get("token") == self.holder["token"]:  # Never remove another's.
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self.path = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _acquire_local(workdir: str, break_lock: bool) -> tuple[WorkdirLock | None, str]:
  """Process-local attempt: (lock, '') or (None, the error message)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  host = socket.gethostname()
  holder = {"pid": os.getpid(), "host": host, "time": time.time(), "argv": sys.argv,
            "token": f"{host}:{os.getpid()}:{time.time_ns()}"}
  for _ in range(3):  # A stale lock removed between two runs' attempts: retry the atomic create.
    if _try_create(path, holder):
      return WorkdirLock(path, holder), ""
    other = _read_holder(path)
    if other is None:
      continue  # Released meanwhile.
    stale = bool(other) and other.get("host") == host and not _pid_alive(int(other.get("pid", -1)))
    if stale or break_lock:
      logging.warning("taking over the lock %s of %s (%s)", path, _describe(other) if other else "unknown",
                      "its process is gone" if stale else "--break_lock")
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
      continue
    who = _describe(other) if other else "an unknown run (unreadable lock file)"
    return None, (f"{workdir} is in use by {who}; wait for that run to finish, or if it is gone (e.g. its "
                  f"machine crashed), pass --break_lock or delete {path}")
  return None, f"could not take the lock {path} (it keeps reappearing); another run is starting there"


_MESSAGE_BYTES = 2048  # The broadcast carries process 0's error text (UTF-8, zero-padded).


def _encode(message: str) -> np.ndarray:
  data = message.encode("utf-8")[:_MESSAGE_BYTES]
  return np.frombuffer(data.ljust(_MESSAGE_BYTES, b"\0"), dtype=np.uint8).copy()


def _decode(payload) -> str:
  return bytes(np.asarray(payload, dtype=np.uint8)).rstrip(b"\0").decode("utf-8", errors="replace")


def acquire(workdir: str, *, break_lock: bool = False, process_index: int = 0, process_count: int = 1,
            broadcast: Callable[[np.ndarray], np.ndarray] | None = None) -> WorkdirLock:
  """Takes the workdir's lock for this run, or raises :class:`WorkdirLockedError` naming the holder.

  With several processes, only ``process_index`` 0 touches the file; ``broadcast`` (default:
  ``multihost_utils.broadcast_one_to_all``) sends its outcome, the error text or nothing, to the others:
  they get a lock object that holds nothing, or the same error as process 0.
  """
  lock, message = (None, "")
  if process_index == 0:
    lock, message = _acquire_local(workdir, break_lock)
  if process_count > 1:
    broadcast = broadcast or multihost_utils.broadcast_one_to_all
    message = _decode(broadcast(_encode(message if lock is None else "")))
    if message:
      raise WorkdirLockedError(message)
    return lock if lock is not None else WorkdirLock(None, None)
  if lock is None:
    raise WorkdirLockedError(message)
  return lock
