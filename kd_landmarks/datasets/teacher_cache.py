"""Cached predictions of the two teachers (Tough and Tolerant, paper Section 3.2) for the train split.

The student phase reads these instead of running two EfficientNet-B3 forward passes per step. One ``.npz``
per split: ``tough`` and ``tolerant`` float32 ``[N, K, 2]`` **in stored-crop pixels** (the frame of the
dataset's ``landmarks``), row ``i`` = the example whose ``index`` is ``i``. Being in the stored frame,
they go through the same on-device augmentation as the ground truth.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

_KEYS = ("tough", "tolerant")


class TeacherCacheError(ValueError):
  """A cache file that is missing, malformed or does not match its dataset."""


def _rows_in_order(index, num_rows: int, *, where: str) -> np.ndarray:
  """Permutation putting the rows in ``index`` order, after checking ``index`` is a permutation of 0..N-1."""
  index = np.asarray(index)
  if index.shape != (num_rows,):
    raise TeacherCacheError(f"{where}: index must have shape ({num_rows},) to match the predictions, "
                            f"got {index.shape}")
  if not np.issubdtype(index.dtype, np.integer):
    raise TeacherCacheError(f"{where}: index must be integers (the examples' `index` field), got {index.dtype}")
  if not np.array_equal(np.sort(index), np.arange(num_rows)):
    values, counts = np.unique(index, return_counts=True)
    duplicates = values[counts > 1]
    raise TeacherCacheError(
        f"{where}: index must hold each of 0..{num_rows - 1} exactly once (one prediction per example of the "
        f"split); got min {index.min() if num_rows else None}, max {index.max() if num_rows else None}, "
        f"duplicates {duplicates[:5].tolist()}")
  return np.argsort(index, kind="stable")


def _check_predictions(name: str, value, *, where: str, num_landmarks=None) -> np.ndarray:
  value = np.asarray(value)
  if value.ndim != 3 or value.shape[-1] != 2:
    raise TeacherCacheError(f"{where}: {name} must be [N, K, 2] landmarks in stored-crop pixels, got shape "
                            f"{value.shape}")
  if value.shape[0] == 0:
    raise TeacherCacheError(f"{where}: {name} is empty (0 examples); the cache must cover the whole split")
  if num_landmarks is not None and value.shape[1] != num_landmarks:
    raise TeacherCacheError(f"{where}: {name} has {value.shape[1]} landmarks, expected {num_landmarks}")
  if not np.issubdtype(value.dtype, np.floating):
    raise TeacherCacheError(f"{where}: {name} must be floating point, got {value.dtype}")
  if not np.all(np.isfinite(value)):
    raise TeacherCacheError(f"{where}: {name} contains NaN or infinity (a diverged teacher?)")
  return value.astype(np.float32)


def write_teacher_cache(path, *, index, tough, tolerant) -> pathlib.Path:
  """Writes both teachers' predictions, reordered so that row ``i`` is the example with ``index == i``.

  Args:
    path: the ``.npz`` file to write (parent folders are created).
    index: ``[N]`` int, each example's ``index`` field (any order, e.g. as batches came off the pipeline).
    tough: ``[N, K, 2]`` Tough-Teacher predictions, stored-crop pixels, in the same order as ``index``.
    tolerant: ``[N, K, 2]`` Tolerant-Teacher predictions, likewise.
  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  where = os.fspath(path)
  tough = _check_predictions("tough", tough, where=where)
  tolerant = _check_predictions("tolerant", tolerant, where=where)
  if tough.shape != tolerant.shape:
    raise TeacherCacheError(f"{where}: tough {tough.shape} and tolerant {tolerant.shape} shapes differ")
  order = _rows_in_order(index, tough.shape[0], where=where)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename, so that an interrupted run never leaves a truncated cache that looks valid.
  temporary = path.with_name(path.name + ".tmp.npz")
  np.savez(temporary, tough=tough[order], tolerant=tolerant[order],
           index=np.arange(tough.shape[0], dtype=np.int64))
  os.replace(temporary, path)
  return path


def load_teacher_cache(path, *, num_examples=None, num_landmarks=None) -> dict[str, np.ndarray]:
  """Reads a cache written by :func:`write_teacher_cache`: ``{'tough', 'tolerant'}`` float32 ``[N, K, 2]``.

  ``num_examples`` / ``num_landmarks``, when given, are checked against the split the cache must match.
  """
  path = pathlib.Path(path)
  where = os.fspath(path)
  if not path.is_file():
    raise TeacherCacheError(f"{where}: no teacher cache; after training both teachers write it with the "
                            "phase=cache_teachers run of kd_landmarks.main, or set teachers_online=True")
  try:
    with np.load(path, allow_pickle=False) as contents:
      arrays = {key: contents[key] for key in contents.files}
  except (OSError, ValueError) as error:
    raise TeacherCacheError(f"{where}: not a readable .npz file ({error}); delete it and write it again") \
        from None
  missing = [key for key in _KEYS + ("index",) if key not in arrays]
  if missing:
    raise TeacherCacheError(f"{where}: missing arrays {missing} (found {sorted(arrays)}); delete it and "
                            "write it again")
  tough = _check_predictions("tough", arrays["tough"], where=where, num_landmarks=num_landmarks)
  tolerant = _check_predictions("tolerant", arrays["tolerant"], where=where, num_landmarks=num_landmarks)
  if tough.shape != tolerant.shape:
    raise TeacherCacheError(f"{where}: tough {tough.shape} and tolerant {tolerant.shape} shapes differ")
  if not np.array_equal(arrays["index"], np.arange(tough.shape[0])):
    raise TeacherCacheError(f"{where}: rows are not in index order 0..N-1; write it with write_teacher_cache")
  if num_examples is not None and tough.shape[0] != num_examples:
    raise TeacherCacheError(f"{where}: {tough.shape[0]} rows but the split has {num_examples} examples; it was "
                            "written for another dataset or split size; write it again")
  return {"tough": tough, "tolerant": tolerant}
