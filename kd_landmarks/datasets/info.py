"""Facts about each landmark dataset, in one table: what metrics, augmentation and configs look up.

Indices are 0-based. Flip permutations live in :mod:`kd_landmarks.datasets.flips` (filled per dataset
there and attached here) so that the horizontal-flip logic has one home.

The table holds the four built-in datasets and, once a prepared ``custom`` set has been read
(:func:`register_custom`, called by ``kd_landmarks.datasets.load_split`` and the pipeline with the data dir),
the user's own landmark scheme under the name ``custom``: its point count, flip pairs, normaliser and splits
come from the prepared data's metadata, not from this file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from kd_landmarks import errors


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_landmarks: int
  # Outer eye corners (inter-ocular normalisation, paper Section 4.2): (subject's right eye, left eye); a custom
  # set's two normalising points, or None when it is normalised by the face box.
  outer_eye_corners: Optional[tuple[int, int]]
  # Landmarks whose mean is each pupil centre (inter-pupil normalisation, Table 3): (right, left); None for a
  # custom set.
  pupils: Optional[tuple[tuple[int, ...], tuple[int, ...]]]
  splits: tuple[str, ...]
  train_split: str = "train"
  # The NME's default normaliser: "inter_ocular" (the distance between `outer_eye_corners`; for a custom set
  # the two points its description names) or "box" (sqrt(w * h) of the face box: COFW-68 and Menpo).
  normalization: str = "inter_ocular"
  # Left/right pairs of a custom set (flips.py holds the built-in tables); every other point is on the midline.
  flip_pairs: Optional[tuple[tuple[int, int], ...]] = None
  # A custom set's own name (its description's "name"); the table and the files know it as "custom".
  label: str = ""
  # m~ of the Soft-landmarks (Section 3.1): the share of the shape variance they keep unless `prepare
  # --soft_keep` or config.soft_landmarks.keep say otherwise. The paper's 0.9 but for the synthetic faces.
  soft_keep: float = 0.9


DATASETS = {
    "300w": DatasetInfo(
        name="300w", num_landmarks=68, outer_eye_corners=(36, 45),
        pupils=(tuple(range(36, 42)), tuple(range(42, 48))),
        splits=("train", "test_common", "test_challenging", "test_full")),
    "cofw": DatasetInfo(
        name="cofw", num_landmarks=29, outer_eye_corners=(8, 9),
        # COFW's 29-point scheme annotates the pupils directly (points 16 and 17).
        pupils=((16,), (17,)),
        splits=("train", "test")),
    "wflw": DatasetInfo(
        name="wflw", num_landmarks=98, outer_eye_corners=(60, 72),
        # WFLW annotates the pupils directly (points 96 and 97).
        pupils=((96,), (97,)),
        splits=("train", "test", "test_pose", "test_expression", "test_illumination", "test_makeup",
                "test_occlusion", "test_blur")),
    # The procedurally rendered default (68-point iBUG layout). Its shapes vary along few directions: 90% of
    # their variance is 3 of 136 components, which moves the Soft-landmarks 6.2% NME from the ground truth
    # (training split), so far that a Tolerant teacher learning them exactly would be at 0.66 of the demo's
    # L2 student; 95% (4 components) moves them 4.8%, still visibly smoothed (docs/demo_results.md).
    "synthetic": DatasetInfo(
        name="synthetic", num_landmarks=68, outer_eye_corners=(36, 45),
        pupils=(tuple(range(36, 42)), tuple(range(42, 48))),
        splits=("train", "test"), soft_keep=0.95),
}


# The user's own annotated set: prepared from a manual dir in one documented layout (docs/datasets.md).
CUSTOM = "custom"
# Every name the builders and the commands accept (the custom entry joins DATASETS when registered).
DATASET_NAMES = tuple(DATASETS) + (CUSTOM,)
MIN_CUSTOM_LANDMARKS = 3

# WFLW's six attribute flags, in the annotation files' order (and the stored ``attributes`` field's).
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
# The test subset of each flag (Table 4), as a split name, in the same order.
WFLW_ATTRIBUTE_SPLITS = tuple(f"test_{name}" for name in WFLW_ATTRIBUTES)
# Datasets whose results are also reported with inter-pupil normalisation (300W's Table 3).
INTER_PUPIL_DATASETS = ("300w", "synthetic")


def get_info(name: str) -> DatasetInfo:
  """Looks up a dataset by name, with an error that lists the known ones."""
  try:
    return DATASETS[name.lower()]
  except KeyError:
    if name.lower() == CUSTOM:
      raise errors.ConfigError(
          "dataset 'custom' is described by its prepared data: give its data dir (--config.data_dir=D, "
          "`--data_dir D`), where `python -m kd_landmarks.datasets prepare --dataset custom --manual_dir M "
          "--data_dir D` wrote it") from None
    raise ValueError(f"unknown dataset: {name!r}; choose from {sorted(DATASET_NAMES)}") from None


def custom_info(description: Mapping[str, Any], *, where: str = "dataset.json") -> DatasetInfo:
  """The table entry of a custom set from its resolved description (what the builder stores in the prepared
  data's metadata under ``custom``): ``name``, ``num_landmarks``, ``flip_pairs``, ``normalization`` (``{"points":
  [a, b]}`` or ``"box"``) and ``splits`` (``train`` among them). Raises :class:`errors.DataError` naming
  ``where`` and the field."""
  def fail(message):
    raise errors.DataError(f"{where}: {message}")

  num_landmarks = description.get("num_landmarks")
  if not isinstance(num_landmarks, int) or num_landmarks < MIN_CUSTOM_LANDMARKS:
    fail(f"num_landmarks must be an integer >= {MIN_CUSTOM_LANDMARKS}, got {num_landmarks!r}")
  splits = tuple(description.get("splits") or ())
  if "train" not in splits or len(splits) < 2 or len(set(splits)) != len(splits):
    fail(f"splits must name 'train' and at least one evaluation split, each once, got {list(splits)}")
  normalization = description.get("normalization")
  eye_corners = None
  if normalization == "box":
    pass
  elif isinstance(normalization, Mapping) and set(normalization) == {"points"}:
    points = normalization["points"]
    if (not isinstance(points, (list, tuple)) or len(points) != 2
        or not all(isinstance(p, int) and 0 <= p < num_landmarks for p in points) or points[0] == points[1]):
      fail(f"normalization.points must be two different point indices in 0..{num_landmarks - 1}, got {points!r}")
    eye_corners = (int(points[0]), int(points[1]))
  else:
    fail(f"normalization must be {{\"points\": [a, b]}} (e.g. the outer eye corners) or \"box\", got "
         f"{normalization!r}")
  pairs = check_flip_pairs(description.get("flip_pairs"), num_landmarks, where=f"{where}: flip_pairs")
  return DatasetInfo(
      name=CUSTOM, num_landmarks=num_landmarks, outer_eye_corners=eye_corners, pupils=None, splits=splits,
      normalization="box" if eye_corners is None else "inter_ocular", flip_pairs=pairs,
      label=str(description.get("name") or CUSTOM))


def check_flip_pairs(pairs, num_landmarks: int, *, where: str) -> tuple[tuple[int, int], ...]:
  """``pairs`` as a tuple of (a, b) after checking they make an involution: each index in 0..K-1 at most
  once, never paired with itself (a point on the midline is simply left out)."""
  if not isinstance(pairs, (list, tuple)):
    raise errors.DataError(f"{where}: expected a list of [a, b] pairs, got {pairs!r}")
  seen = {}
  result = []
  for position, pair in enumerate(pairs):
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
      raise errors.DataError(f"{where}: pair {position} is {pair!r}, not two point indices [a, b]")
    a, b = pair
    for index in (a, b):
      if not 0 <= index < num_landmarks:
        raise errors.DataError(f"{where}: pair {position} {list(pair)} names point {index}, outside 0..{num_landmarks - 1}")
    if a == b:
      raise errors.DataError(f"{where}: pair {position} pairs point {a} with itself; leave a midline point out")
    for index in (a, b):
      if index in seen:
        raise errors.DataError(
            f"{where}: point {index} is in pair {seen[index]} and pair {position}; a flip must swap each point "
            "with exactly one other (an involution): list each point in at most one pair")
      seen[index] = position
    result.append((int(a), int(b)))
  return tuple(result)


def register_custom(dataset_info: DatasetInfo) -> DatasetInfo:
  """Puts a custom set's entry in the table under ``custom`` (replacing an earlier one): from then on
  :func:`get_info`, the metrics, the flips and the builders know its scheme."""
  if dataset_info.name != CUSTOM:
    raise ValueError(f"register_custom takes the entry named {CUSTOM!r}, got {dataset_info.name!r}")
  DATASETS[CUSTOM] = dataset_info
  return dataset_info
