"""Tests for kd_landmarks.datasets.flips: structure of each permutation and symmetry on real shapes."""
import os
import pathlib

import numpy as np
import pytest

from kd_landmarks.datasets import flips
from kd_landmarks.datasets import info

# Shipped with the tests (tests/data/keypoints_68, MIT, see its README).
KEYPOINTS_68_CSV = str(pathlib.Path(__file__).resolve().parent / "data" / "keypoints_68" / "keypoints_frames_train.csv")


@pytest.mark.parametrize("dataset", ["300w", "cofw", "wflw", "synthetic"])
def test_involution_and_eye_pairs(dataset):
  dataset_info = info.get_info(dataset)
  perm = flips.flip_permutation(dataset)
  assert perm.shape == (dataset_info.num_landmarks,)
  assert sorted(perm.tolist()) == list(range(dataset_info.num_landmarks))  # a permutation
  np.testing.assert_array_equal(perm[perm], np.arange(dataset_info.num_landmarks))
  right, left = dataset_info.outer_eye_corners
  assert perm[right] == left and perm[left] == right
  right_pupil, left_pupil = dataset_info.pupils
  np.testing.assert_array_equal(np.sort(perm[list(right_pupil)]), np.sort(left_pupil))


@pytest.mark.parametrize(
    "num_landmarks, central_points",
    [
        # iBUG 68: chin, nose bridge 27-30, nose tip 33, lip centres 51, 57, 62, 66.
        (68, [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]),
        # COFW 29: nose tip, under-nose, four lip centres, chin.
        (29, [20, 21, 24, 25, 26, 27, 28]),
        # WFLW 98: chin 16, nose bridge 51-54, nose centre 57, lip centres 79, 85, 90, 94.
        (98, [16, 51, 52, 53, 54, 57, 79, 85, 90, 94]),
    ])
def test_fixed_points_are_exactly_the_midline(num_landmarks, central_points):
  perm = flips.flip_permutation(num_landmarks)
  np.testing.assert_array_equal(np.flatnonzero(perm == np.arange(num_landmarks)), central_points)


def test_known_pairs_from_the_layouts():
  # Read off the published diagrams by hand (0-based).
  ibug = flips.flip_permutation(68)
  assert ibug[0] == 16 and ibug[17] == 26 and ibug[39] == 42 and ibug[48] == 54 and ibug[60] == 64
  assert ibug[40] == 47 and ibug[41] == 46  # lower lids: 40 sits under 38, its mirror 47 under 43
  wflw = flips.flip_permutation(98)
  assert wflw[64] == 68 and wflw[65] == 75 and wflw[38] == 50 and wflw[96] == 97 and wflw[76] == 82
  cofw = flips.flip_permutation(29)
  assert cofw[22] == 23 and cofw[18] == 19 and cofw[4] == 6


def test_unknown_layout_raises_clear_error():
  with pytest.raises(ValueError, match="no flip permutation for 5 landmarks"):
    flips.flip_permutation(5)
  with pytest.raises(ValueError, match="unknown dataset"):
    flips.flip_permutation("aflw")


def _aligned_shapes(path):
  """Real 68-point shapes, each centred on its eye midpoint, rolled so the eyes are level and scaled
  to unit inter-ocular distance (removes pose so the mean is a frontal face)."""
  table = np.genfromtxt(path, delimiter=",", skip_header=1)[:, 1:]
  shapes = table.reshape(-1, 68, 2)
  right_eye, left_eye = shapes[:, 36:42].mean(1), shapes[:, 42:48].mean(1)
  centre = (right_eye + left_eye) / 2
  axis = left_eye - right_eye
  scale = np.linalg.norm(axis, axis=-1)
  cos, sin = axis[:, 0] / scale, axis[:, 1] / scale
  rot = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)  # rotates axis onto +x
  return np.einsum("nij,nkj->nki", rot, shapes - centre[:, None]) / scale[:, None, None]


@pytest.mark.skipif(not os.path.exists(KEYPOINTS_68_CSV), reason="real 68-point shapes not present")
def test_permutation_recovered_from_real_mean_shape():
  """Independent derivation: mirror the mean of 3,462 real faces and match every point to its nearest
  mirrored point. On a near-symmetric face this matching *is* the flip permutation."""
  mean_shape = _aligned_shapes(KEYPOINTS_68_CSV).mean(0)
  mirrored = mean_shape * np.array([-1.0, 1.0])
  distances = np.linalg.norm(mean_shape[:, None] - mirrored[None], axis=-1)
  np.testing.assert_array_equal(distances.argmin(axis=1), flips.flip_permutation(68))

  def rms_residual(perm):
    return np.sqrt(np.mean(np.sum((mirrored[perm] - mean_shape) ** 2, axis=-1)))

  good = rms_residual(flips.flip_permutation(68))
  assert good < 0.05  # in inter-ocular units
  assert rms_residual(np.arange(68)) > 10 * good  # forgetting the permutation is badly wrong
