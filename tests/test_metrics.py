"""Tests of NME, FR, AUC and the CED curve (paper Section 4.2) on hand-made cases."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_landmarks import metrics


def _face(num_landmarks, right, left, seed=0):
  """Random landmarks with the outer eye corners at (10, 20) and (110, 20): inter-ocular 100 px."""
  points = np.random.default_rng(seed).uniform(0, 200, size=(num_landmarks, 2))
  points[right] = (10.0, 20.0)
  points[left] = (110.0, 20.0)
  return points


@pytest.mark.parametrize("dataset,num_landmarks,right,left",
                         [("300w", 68, 36, 45), ("cofw", 29, 8, 9), ("wflw", 98, 60, 72)])
def test_perfect_and_uniform_shift(dataset, num_landmarks, right, left):
  gt = _face(num_landmarks, right, left)
  assert metrics.nme(gt, gt, dataset=dataset) == 0.0
  # Every point moved by (3, 4): a 5 px error over a 100 px inter-ocular distance.
  np.testing.assert_allclose(metrics.nme(gt + [3.0, 4.0], gt, dataset=dataset), 0.05)


def test_error_of_one_point_is_averaged_over_k():
  gt = _face(68, 36, 45)
  pred = gt.copy()
  pred[10] += (0.0, 68.0)  # one landmark 68 px off: mean error 1 px, NME 0.01
  np.testing.assert_allclose(metrics.nme(pred, gt, dataset="300w"), 0.01)


def test_normalised_by_ground_truth_not_prediction():
  gt = _face(68, 36, 45)
  pred = gt.copy()
  pred[45] = (210.0, 20.0)  # the prediction's eyes are 200 px apart; the gt's stay 100 px
  np.testing.assert_allclose(metrics.nme(pred, gt, dataset="300w"), 100.0 / 68 / 100.0)


def test_inter_pupil_uses_mean_of_eye_contours():
  gt = _face(68, 36, 45)
  gt[36:42] = [(0, 0), (10, -5), (20, -5), (30, 0), (20, 5), (10, 5)]  # right eye centred at (15, 0)
  gt[42:48] = [(60, 0), (70, -5), (80, -5), (90, 0), (80, 5), (70, 5)]  # left eye centred at (75, 0)
  np.testing.assert_allclose(metrics.normalizing_distance(gt, dataset="300w", normalization="inter_pupil"), 60.0)
  np.testing.assert_allclose(metrics.normalizing_distance(gt, dataset="300w"), 90.0)  # corners 36 / 45
  np.testing.assert_allclose(metrics.nme(gt + [6.0, 0.0], gt, dataset="300w", normalization="inter_pupil"), 0.1)
  # WFLW annotates the pupils (96, 97).
  wflw = _face(98, 60, 72)
  wflw[96], wflw[97] = (0.0, 0.0), (0.0, 50.0)
  np.testing.assert_allclose(metrics.nme(wflw + [0.0, 5.0], wflw, dataset="wflw", normalization="inter_pupil"), 0.1)


def test_batch_shape():
  gt = np.stack([_face(68, 36, 45, seed=s) for s in range(6)]).reshape(2, 3, 68, 2)
  shifts = np.arange(6, dtype=np.float64).reshape(2, 3, 1, 1) * np.array([1.0, 0.0])
  out = metrics.nme(gt + shifts, gt, dataset="300w")
  assert out.shape == (2, 3)
  np.testing.assert_allclose(out.reshape(-1), np.arange(6) / 100.0)


def test_failure_rate_and_auc_by_hand():
  # All perfect: the CED is 1 on [0, 0.1]; AUC 1, FR 0.
  assert metrics.failure_rate_and_auc(np.zeros(5)) == (0.0, pytest.approx(1.0))
  # A failure and a success at exactly the threshold (<= counts as success).
  fr, _ = metrics.failure_rate_and_auc([0.05, 0.1, 0.2, 0.3])
  assert fr == 0.5
  # One image at NME 0.05: the CED steps from 0 to 1 at 0.05, area 0.05, AUC 0.5.
  fr, auc = metrics.failure_rate_and_auc([0.05])
  assert fr == 0.0 and auc == pytest.approx(0.5, abs=1e-3)
  # NMEs uniform on [0, 0.2]: CED y = x / 0.2 on [0, 0.1]: area 0.025, AUC 0.25; half fail.
  uniform = (np.arange(20000) + 0.5) / 20000 * 0.2
  fr, auc = metrics.failure_rate_and_auc(uniform)
  assert fr == 0.5 and auc == pytest.approx(0.25, abs=1e-4)
  # A different threshold (e.g. 0.08 for 300W in other papers) rescales the area.
  fr, auc = metrics.failure_rate_and_auc(uniform, threshold=0.05)
  assert fr == pytest.approx(0.75) and auc == pytest.approx(0.125, abs=1e-4)


def test_ced_curve_by_hand():
  xs, ys = metrics.ced_curve([0.0, 0.02, 0.02, 0.5], threshold=0.04, step=0.01)
  np.testing.assert_allclose(xs, [0.0, 0.01, 0.02, 0.03, 0.04])
  np.testing.assert_allclose(ys, [0.25, 0.25, 0.75, 0.75, 0.75])
  xs, _ = metrics.ced_curve([0.01])  # defaults: threshold 0.1, step 1e-4
  assert len(xs) == 1001 and xs[-1] == 0.1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 0.3), min_size=1, max_size=50))
def test_auc_matches_exact_integral(nmes):
  # Independently: the area under the CED on [0, T] is mean(max(0, T - NME)), so AUC -> that / T.
  _, auc = metrics.failure_rate_and_auc(nmes)
  exact = np.mean(np.maximum(0.0, 1.0 - np.asarray(nmes) / 0.1))
  assert abs(auc - exact) < 2e-3
  assert 0.0 <= auc <= 1.0 + 1e-9


def test_errors_are_clear():
  gt = _face(68, 36, 45)
  with pytest.raises(ValueError, match=r"\[\.\.\., 29, 2\] for dataset 'cofw'"):
    metrics.nme(gt, gt, dataset="cofw")
  with pytest.raises(ValueError, match="unknown dataset"):
    metrics.nme(gt, gt, dataset="aflw")
  with pytest.raises(ValueError, match="unknown normalization"):
    metrics.nme(gt, gt, dataset="300w", normalization="bbox")
  collapsed = gt.copy()
  collapsed[45] = collapsed[36]
  with pytest.raises(ValueError, match="zero inter_ocular distance"):
    metrics.nme(gt, collapsed, dataset="300w")
  bad = gt.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match=r"pred holds NaN/inf \(first at index \[3, 1\]\)"):
    metrics.nme(bad, gt, dataset="300w")
  with pytest.raises(ValueError, match="at least one"):
    metrics.failure_rate_and_auc([])
