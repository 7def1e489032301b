"""Facts about each landmark dataset, in one table: what metrics, augmentation and configs look up.

Indices are 0-based. Flip permutations live in :mod:`kd_landmarks.datasets.flips` (filled per dataset
there and attached here) so that the horizontal-flip logic has one home.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_landmarks: int
  # Outer eye corners (inter-ocular normalisation, paper Section 4.2): (subject's right eye, left eye).
  outer_eye_corners: tuple[int, int]
  # Landmarks whose mean is each pupil centre (inter-pupil normalisation, Table 3): (right, left).
  pupils: tuple[tuple[int, ...], tuple[int, ...]]
  splits: tuple[str, ...]
  train_split: str = "train"


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
    # The procedurally rendered default (68-point iBUG layout).
    "synthetic": DatasetInfo(
        name="synthetic", num_landmarks=68, outer_eye_corners=(36, 45),
        pupils=(tuple(range(36, 42)), tuple(range(42, 48))),
        splits=("train", "test")),
}


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
    raise ValueError(f"unknown dataset: {name!r}; choose from {sorted(DATASETS)}") from None
