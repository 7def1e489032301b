"""Fingerprints of what made a trained model, so that every model and every number of the report can be
traced to its inputs, and a re-run can tell a model made from other inputs from one it may keep.

A model directory's ``model.json`` records under ``provenance`` the inputs that determine its weights
(``kd_landmarks.pipeline.model_provenance``: the config fields that change the weights, the prepared data's
content, and for a distilled student the teacher outputs it learned from) and :func:`fingerprint` of them.
Both sides of a comparison are plain JSON, so :func:`differences` can name each input that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

# Characters of a fingerprint printed in the report and in messages (48 bits: no two models of one workdir
# collide by chance).
SHORT = 12
# (real path, size, mtime_ns, inode) -> SHA-256 of the file: a process hashes each unchanged file once,
# although every training phase and the report fingerprint the same prepared split.
_FILE_DIGESTS: dict[tuple, str] = {}


def canonical(value: Any) -> Any:
  """``value`` as JSON reads it back (tuples as lists, numpy scalars as numbers, keys as strings)."""
  return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _json_default(value):
  if hasattr(value, "item"):  # numpy scalars
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def fingerprint(inputs: Mapping[str, Any]) -> str:
  """SHA-256 (hex) of ``inputs`` as canonical JSON: the same inputs give the same fingerprint in any process."""
  text = json.dumps(canonical(dict(inputs)), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def short(value: str | None) -> str:
  return value[:SHORT] if value else "none"


def file_digest(path) -> str:
  """SHA-256 of one file's bytes (memoised per process while its size, mtime and inode stay the same)."""
  path = os.path.realpath(os.fspath(path))
  stat = os.stat(path)
  key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
  if key not in _FILE_DIGESTS:
    with open(path, "rb") as f:
      _FILE_DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
  return _FILE_DIGESTS[key]


def files_fingerprint(paths: Iterable) -> str:
  """SHA-256 over the names and contents of ``paths`` (a split's record shards): any edited byte, added,
  removed or renamed shard changes it; where the files live does not."""
  digest = hashlib.sha256()
  for path in sorted(os.fspath(p) for p in paths):
    digest.update(f"{os.path.basename(path)}\t{file_digest(path)}\n".encode())
  return digest.hexdigest()


def differences(stored: Mapping[str, Any] | None, configured: Mapping[str, Any]) -> list[str]:
  """Each input of ``configured`` that ``stored`` (a model's recorded provenance) does not equal, as
  ``"config.optimizer.learning_rate 0.001 -> 1e-12"``; [] when they agree. ``stored`` None (a model trained
  before provenance was recorded) differs in everything: one entry says so."""
  if stored is None:
    return ["inputs not recorded (trained before model.json recorded its provenance)"]
  found: list[str] = []
  _walk(canonical(dict(stored)), canonical(dict(configured)), "", found)
  return found


def _walk(stored, configured, prefix: str, found: list[str]) -> None:
  if isinstance(stored, dict) and isinstance(configured, dict):
    for key in sorted(set(stored) | set(configured)):
      if key == "fingerprint" and not prefix:
        continue  # The hash of the rest: the rest names what changed.
      _walk(stored.get(key, "(absent)"), configured.get(key, "(absent)"), f"{prefix}{key}.", found)
    return
  if stored != configured:
    found.append(f"{prefix[:-1]} {_brief(stored)} -> {_brief(configured)}")


def _brief(value) -> str:
  text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
  if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
    return short(value)  # A SHA-256: its first characters tell two apart.
  return text if len(text) <= 80 else text[:77] + "..."
