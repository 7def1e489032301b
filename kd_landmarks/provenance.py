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
# (real path, size, mtime_ns, inode) -> records_digest of the shard: a process hashes each unchanged shard
# once, although every training phase and the report fingerprint the same prepared split.
_RECORD_DIGESTS: dict[tuple, str] = {}
_RECORDS_PER_READ = 256  # records_digest reads a shard in slices, not whole (a 300W split is ~0.5 GB).


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


def records_digest(path) -> str:
  """SHA-256 of the examples in one array_record shard, each tf.Example re-serialised deterministically
  (its features in key order), with its length before it; memoised per process while the file's size, mtime and inode stay the same.

  Not the file's bytes: protobuf writes a map's entries in an order that follows the writing process's hash
  seed, so the same faces prepared twice gave shards whose every record differed in its bytes (measured: 1,200
  of 1,200 synthetic faces, decoded values identical). Re-serialising costs about 0.05 s per 18 MB shard.
  """
  # Imported here: only a prepared split is fingerprinted, and these come with tfds (heavy to import).
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  path = os.path.realpath(os.fspath(path))
  stat = os.stat(path)
  key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
  if key not in _RECORD_DIGESTS:
    digest = hashlib.sha256()
    reader = array_record_module.ArrayRecordReader(path)
    try:
      total = reader.num_records()
      for start in range(0, total, _RECORDS_PER_READ):
        for record in reader.read(start, min(start + _RECORDS_PER_READ, total)):
          example = tf_example_pb2.Example()
          example.ParseFromString(record)
          canonical_bytes = example.SerializeToString(deterministic=True)
          digest.update(len(canonical_bytes).to_bytes(8, "little") + canonical_bytes)
    finally:
      reader.close()
    _RECORD_DIGESTS[key] = digest.hexdigest()
  return _RECORD_DIGESTS[key]


def records_fingerprint(paths: Iterable) -> str:
  """SHA-256 over the names and examples (:func:`records_digest`) of ``paths``, a split's array_record
  shards: any changed value, added, removed or renamed shard changes it; where the files live, and which
  process wrote them, does not."""
  digest = hashlib.sha256()
  for path in sorted(os.fspath(p) for p in paths):
    digest.update(f"{os.path.basename(path)}\t{records_digest(path)}\n".encode())
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
