"""The teachers' outputs on the train split (Tough and Tolerant, paper Section 3.2) as a tfds dataset.

``phase=cache_teachers`` writes them with the builder ``kd_landmarks_teachers`` (one config per dataset)
into ``WORKDIR/teacher_cache``; the dataset folder is
``WORKDIR/teacher_cache/kd_landmarks_teachers/<dataset>/<version>``. It is array_record, so any tfds user
reads it without TensorFlow and without this package (``tfds.builder_from_directory(folder)
.as_data_source('train')``; docs/datasets.md, "Reading prepared data from other tools"). One row per example of the
dataset's train split, ``disable_shuffling`` so that row ``i`` is the example whose ``index`` is ``i``:

  ``index`` int64 and ``image_id`` str: the join keys (the dataset's fields of the same names);
  ``tough``, ``tolerant`` float32 ``[K, 2]``: each teacher's landmarks **in stored-crop pixels** (the frame of
  the dataset's ``landmarks``), so that they go through the student's on-device augmentation like the
  ground truth and serve a student of any input size.

Its metadata (``builder.info.metadata``, ``metadata.json``) says what was predicted on and by whom: dataset,
dataset version, split size, the preparation options (stored crop size, ASM soft-landmarks setting, synthetic
sizes) and, per teacher, model, checkpoint (kind, step), input size, model directory. The student phase
checks it against its training split before training (:func:`check_matches`), so that a cache made by other
teachers (a colleague's, ``--config.teacher_cache_dir``) can be used without their checkpoints, and a stale one
is refused with what differs and the command that rebuilds it.

(The ``.npz`` cache of earlier versions, ``WORKDIR/teacher_cache/train.npz``, is no longer read; see
:data:`LEGACY_NPZ`.)
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Any, Mapping, Optional

from etils import epath
from google.protobuf import json_format
import numpy as np
import tensorflow_datasets as tfds

from kd_landmarks import errors
from kd_landmarks import provenance
from kd_landmarks.datasets import builder as builder_lib
from kd_landmarks.datasets import info as info_lib

BUILDER_NAME = "kd_landmarks_teachers"
SPLIT = "train"  # The split the student trains on; the rows cover all of it.
_KEYS = ("tough", "tolerant")
# Where the old .npz cache lived; only looked for to say that it must be rebuilt.
LEGACY_NPZ = os.path.join("teacher_cache", "train.npz")


class TeacherCacheError(errors.UserError, ValueError):
  """Teacher outputs that are missing, malformed or do not match the split they are joined with."""


class TeacherCacheMismatchError(TeacherCacheError):
  """Teacher outputs made for another dataset, dataset version, split size or set of indices."""


# ---------------------------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class TeacherOutputsConfig(tfds.core.BuilderConfig):
  dataset: str = ""


class KdLandmarksTeachers(tfds.core.GeneratorBasedBuilder):
  """Predictions of the Tough and Tolerant teachers on a ``kd_landmarks`` train split, stored-crop pixels."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Replaces the .npz teacher cache."}
  BUILDER_CONFIGS = [TeacherOutputsConfig(name=name, dataset=name,
                                          description=f"teacher outputs on kd_landmarks/{name} train")
                     for name in info_lib.DATASET_NAMES]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # As kd_landmarks.datasets.builder.KdLandmarks: tfds's default needs `importlib_resources`.
    return epath.Path(__file__)

  def __init__(self, *, rows: Optional[Mapping[str, Any]] = None, metadata: Optional[dict] = None, **kwargs):
    """``rows`` (``index``, ``image_id``, ``tough``, ``tolerant``, in index order) and ``metadata`` are what
    :func:`write_teacher_outputs` writes; reading needs neither."""
    kwargs.setdefault("file_format", "array_record")
    self._rows = rows
    self._metadata = metadata
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    num_landmarks = info_lib.get_info(self.builder_config.dataset).num_landmarks
    points = tfds.features.Tensor(shape=(num_landmarks, 2), dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({"index": tfds.features.Scalar(dtype=np.int64),
                                             "image_id": tfds.features.Text(),
                                             "tough": points, "tolerant": points}),
        metadata=tfds.core.MetadataDict(self._metadata or {}),
        disable_shuffling=True,  # Row i is the example whose index is i.
        homepage="https://arxiv.org/abs/2111.07047")

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._rows is None:
      raise TeacherCacheError("the teacher outputs are written by phase=cache_teachers of kd_landmarks.main "
                              "(write_teacher_outputs), not by `tfds build`")
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    rows = self._rows
    for position in range(len(rows["index"])):
      yield position, {"index": np.int64(rows["index"][position]), "image_id": str(rows["image_id"][position]),
                       "tough": rows["tough"][position], "tolerant": rows["tolerant"][position]}


# ------------------------------------------------------------------------------------------- checks


def _rows_in_order(index, num_rows: int, *, where: str) -> np.ndarray:
  """Permutation putting the rows in ``index`` order, after checking ``index`` is a permutation of 0..N-1."""
  index = np.asarray(index)
  if index.shape != (num_rows,):
    raise TeacherCacheError(f"{where}: index must have shape ({num_rows},) to match the predictions, "
                            f"got {index.shape}")
  if not np.issubdtype(index.dtype, np.integer):
    raise TeacherCacheError(f"{where}: index must be integers (the examples' `index` field), got {index.dtype}")
  _check_each_index_once(index, num_rows, where=where, error=TeacherCacheError)
  return np.argsort(index, kind="stable")


def _check_each_index_once(index: np.ndarray, num_examples: int, *, where: str, error=TeacherCacheMismatchError):
  if np.array_equal(np.sort(index), np.arange(num_examples)):
    return
  values, counts = np.unique(index, return_counts=True)
  duplicates = values[counts > 1]
  missing = np.setdiff1d(np.arange(num_examples), values)
  outside = values[(values < 0) | (values >= num_examples)]
  raise error(f"{where}: index must hold each of 0..{num_examples - 1} exactly once (one prediction per example "
              f"of the split); missing {missing[:5].tolist()}, duplicates {duplicates[:5].tolist()}, "
              f"outside {outside[:5].tolist()}")


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


# ------------------------------------------------------------------------------------ write and read


def dataset_dir(cache_dir, dataset: str, version=KdLandmarksTeachers.VERSION) -> pathlib.Path:
  """The tfds dataset folder under the data dir ``cache_dir`` (what ``builder_from_directory`` takes)."""
  return pathlib.Path(cache_dir) / BUILDER_NAME / info_lib.get_info(dataset).name / str(version)


def resolve(path, dataset: str) -> pathlib.Path:
  """The dataset folder of ``path``: the folder itself (it holds ``dataset_info.json``) or, for a tfds data
  dir such as ``WORKDIR/teacher_cache``, its ``kd_landmarks_teachers/<dataset>/<version>``."""
  path = pathlib.Path(os.path.expanduser(os.fspath(path)))
  if (path / "dataset_info.json").is_file():
    return path
  return dataset_dir(path, dataset)


def write_teacher_outputs(cache_dir, *, dataset: str, index, image_id, tough, tolerant,
                          metadata: Mapping[str, Any]) -> pathlib.Path:
  """Writes both teachers' predictions as the tfds dataset ``kd_landmarks_teachers/<dataset>`` in the data dir
  ``cache_dir``, rows reordered so that row ``i`` is the example with ``index == i``.

  Args:
    cache_dir: tfds data dir (``WORKDIR/teacher_cache``); an earlier build there is replaced.
    dataset: ``300w``, ``cofw``, ``wflw`` or ``synthetic``.
    index: ``[N]`` int, each example's ``index`` field (any order, e.g. as batches came off the pipeline).
    image_id: ``[N]`` str, each example's ``image_id``, in the same order.
    tough: ``[N, K, 2]`` Tough-Teacher predictions, stored-crop pixels, in the same order as ``index``.
    tolerant: ``[N, K, 2]`` Tolerant-Teacher predictions, likewise.
    metadata: what :func:`check_matches` compares (``dataset``, ``dataset_version``, ``num_examples``,
      ``preparation``) and the teachers' description (``teachers``); JSON-serialisable.
  Returns:
    The dataset folder written.
  """
  name = info_lib.get_info(dataset).name
  where = os.fspath(dataset_dir(cache_dir, name))
  num_landmarks = info_lib.get_info(name).num_landmarks
  tough = _check_predictions("tough", tough, where=where, num_landmarks=num_landmarks)
  tolerant = _check_predictions("tolerant", tolerant, where=where, num_landmarks=num_landmarks)
  if tough.shape != tolerant.shape:
    raise TeacherCacheError(f"{where}: tough {tough.shape} and tolerant {tolerant.shape} shapes differ")
  image_id = np.asarray([str(i) for i in image_id])
  if image_id.shape != (tough.shape[0],):
    raise TeacherCacheError(f"{where}: {image_id.shape[0]} image ids for {tough.shape[0]} predictions")
  order = _rows_in_order(index, tough.shape[0], where=where)
  rows = {"index": np.arange(tough.shape[0], dtype=np.int64), "image_id": image_id[order],
          "tough": tough[order], "tolerant": tolerant[order]}
  return _write_rows(cache_dir, name, rows, dict(metadata))


def _write_rows(cache_dir, dataset: str, rows: Mapping[str, Any], metadata: dict) -> pathlib.Path:
  """Builds the dataset from ``rows`` as given (no checks: tests forge bad caches with it)."""
  folder = dataset_dir(cache_dir, dataset)
  if folder.exists():
    # The teachers changed (or the data): replace the whole folder, before tfds opens it (it would read a
    # damaged dataset_info.json there). tfds writes into a temporary folder and renames it, so an
    # interrupted build never leaves a dataset_info.json beside partial records.
    shutil.rmtree(folder)
  builder = KdLandmarksTeachers(config=dataset, data_dir=os.fspath(cache_dir), rows=rows, metadata=metadata)
  tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return folder


@dataclasses.dataclass(frozen=True)
class TeacherOutputs:
  """Read from a teacher-output dataset: ``tough``/``tolerant`` float32 ``[N, K, 2]`` in index order (what
  ``input_pipeline.make_train_iterator(teacher_cache=...)`` joins), ``image_id`` ``[N]``, the metadata, and
  ``content``: the SHA-256 of its records (:func:`kd_landmarks.provenance.records_fingerprint`), which a
  student trained on them records."""
  path: pathlib.Path
  tough: np.ndarray
  tolerant: np.ndarray
  image_id: np.ndarray
  metadata: dict
  content: str = ""

  def as_cache(self) -> dict[str, np.ndarray]:
    return {"tough": self.tough, "tolerant": self.tolerant}


def load_teacher_outputs(path, *, dataset: str, rebuild: str = "") -> TeacherOutputs:
  """Reads the teacher-output dataset at ``path`` (dataset folder or data dir, see :func:`resolve`) the way
  any tfds user does (``builder_from_directory``, array_record data source) and checks each ``index``
  0..N-1 is there exactly once. Errors end with ``rebuild`` (the command that rewrites the cache)."""
  try:
    return _load(resolve(path, dataset))
  except TeacherCacheError as error:
    if not rebuild:
      raise
    raise type(error)(f"{error}. Rebuild them: {rebuild}") from None


def _load(folder: pathlib.Path) -> TeacherOutputs:
  where = os.fspath(folder)
  if not (folder / "dataset_info.json").is_file():
    raise TeacherCacheError(f"{where}: no teacher outputs (no dataset_info.json)")
  try:
    builder = tfds.builder_from_directory(where)
  except (json_format.ParseError, ValueError) as error:  # tfds' errors for a damaged JSON name no file.
    raise TeacherCacheError(f"{where}/dataset_info.json (or features.json, metadata.json beside it) cannot be "
                            f"read ({errors.one_line(error)}): the teacher outputs are damaged") from None
  if SPLIT not in builder.info.splits:
    raise TeacherCacheError(f"{where}: no {SPLIT!r} split (has {list(builder.info.splits)}); not a "
                            f"{BUILDER_NAME} dataset")
  missing = [key for key in ("index", "image_id") + _KEYS if key not in builder.info.features]
  if missing:
    raise TeacherCacheError(f"{where}: features {missing} missing; not a {BUILDER_NAME} dataset")
  try:
    builder_lib.check_records(builder.info.splits[SPLIT], folder, SPLIT, builder_name=BUILDER_NAME,
                              fix="the teacher outputs are damaged")
  except errors.DataError as error:
    raise TeacherCacheError(str(error)) from None
  source = builder.as_data_source(split=SPLIT)
  rows = source.__getitems__(list(range(len(source)))) if len(source) else []
  if not rows:
    raise TeacherCacheError(f"{where}: 0 rows; the cache must cover the whole train split")
  index = np.asarray([row["index"] for row in rows], np.int64)
  _check_each_index_once(index, len(rows), where=where)
  order = np.argsort(index, kind="stable")
  tough = _check_predictions("tough", np.stack([row["tough"] for row in rows])[order], where=where)
  tolerant = _check_predictions("tolerant", np.stack([row["tolerant"] for row in rows])[order], where=where)
  image_id = np.asarray([row["image_id"].decode("utf-8") if isinstance(row["image_id"], bytes)
                         else str(row["image_id"]) for row in rows])[order]
  return TeacherOutputs(path=folder, tough=tough, tolerant=tolerant, image_id=image_id,
                        metadata=dict(builder.info.metadata or {}),
                        content=provenance.records_fingerprint(builder.info.splits[SPLIT].filepaths))


def check_matches(outputs: TeacherOutputs, *, dataset: str, dataset_version: str, num_examples: int,
                  num_landmarks: int, preparation: Mapping[str, Any], rebuild: str,
                  train_content: str | None = None) -> None:
  """Refuses teacher outputs that were not made on this training split: another dataset, dataset version,
  split size, preparation (crop size, soft landmarks, synthetic sizes), landmark count or, where both are
  known, content (``train_content``: the split's record fingerprint, which outputs written before it was
  recorded lack). The error names every difference and ``rebuild`` (the command that rewrites the cache).
  Index coverage is checked on read.
  """
  stored = outputs.metadata
  wanted = {"dataset": info_lib.get_info(dataset).name, "dataset_version": str(dataset_version),
            "num_examples": int(num_examples)}
  differences = [f"{key} {stored.get(key)!r} (the training split: {value!r})"
                 for key, value in wanted.items() if stored.get(key) != value]
  if outputs.tough.shape[0] != num_examples and stored.get("num_examples") == num_examples:
    differences.append(f"{outputs.tough.shape[0]} rows (the training split: {num_examples} examples)")
  made_on = stored.get("train_content")
  if made_on and train_content and made_on != train_content:
    differences.append(f"training split content {provenance.short(made_on)} (the training split: "
                       f"{provenance.short(train_content)}; prepared again since)")
  if outputs.tough.shape[1] != num_landmarks:
    differences.append(f"{outputs.tough.shape[1]} landmarks (the dataset: {num_landmarks})")
  stored_preparation = stored.get("preparation") or {}
  for key in sorted(set(preparation) | set(stored_preparation)):
    if key == "split_sizes":
      continue  # Other splits do not matter; the train split's size is compared above.
    if stored_preparation.get(key) != preparation.get(key):
      differences.append(f"preparation option {key} {stored_preparation.get(key)!r} "
                         f"(the training split: {preparation.get(key)!r})")
  if differences:
    raise TeacherCacheMismatchError(
        f"{outputs.path}: the teacher outputs do not match the training split: {'; '.join(differences)}. "
        f"Rebuild them: {rebuild}")
