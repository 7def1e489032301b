"""Seed aggregation and the paired bootstrap interval of the report, against values computed by hand."""
import numpy as np
import pytest

from kd_landmarks.evaluation import stats


def test_mean_std_by_hand():
  # mean 0.7/3; deviations -0.1333, -0.0333, +0.1667: sum of squares 0.046667 / (3 - 1) -> std 0.152753.
  mean, std = stats.mean_std([0.1, 0.2, 0.4])
  assert mean == pytest.approx(0.7 / 3, abs=1e-12)
  assert std == pytest.approx(np.sqrt(0.046666666666666 / 2), rel=1e-9)
  assert stats.mean_std([0.3]) == (pytest.approx(0.3), None)  # one seed: no spread to report


def test_bootstrap_over_images_only_by_hand():
  """One seed, D = [0, 0, 0, 4]: a resample's mean is k, k ~ Binomial(4, 1/4): P = (81, 108, 54, 12, 1) / 256,
  cumulative 0.316, 0.738, 0.949, 0.996, 1. The 2.5th percentile is 0 and the 97.5th is 3; the mean is 1."""
  result = stats.paired_comparison(np.array([[0.0, 0.0, 0.0, 4.0]]), np.zeros((1, 4)))
  assert result["mean"] == 1.0
  assert (result["low"], result["high"]) == (0.0, 3.0)
  assert result["verdict"] == "not distinguishable"
  assert (result["num_seeds"], result["num_images"]) == (1, 4)


def test_bootstrap_over_seeds_and_images_by_hand():
  """D[s, i] = 2 s + 4 [i == 3] for seeds s = 0, 1 and images i = 0..3. A resample's mean is m + k with
  m ~ Binomial(2, 1/2) (seeds drawn) and k ~ Binomial(4, 1/4) (images drawn), independent: in 1024ths,
  P(0..6) = 81, 270, 351, 228, 79, 14, 1, cumulative 0.079, ..., 0.908 (<= 3), 0.985 (<= 4). So the 95%
  interval is [0, 4] around the mean 2. Resampling images only would give [1, 4], seeds only [1, 3]."""
  a = np.array([[0.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 6.0]])
  result = stats.paired_comparison(a + 0.5, np.full_like(a, 0.5))
  assert result["mean"] == pytest.approx(2.0)
  assert (result["low"], result["high"]) == (pytest.approx(0.0), pytest.approx(4.0))
  assert result["num_seeds"] == 2


def test_interval_matches_the_normal_approximation_on_many_faces():
  """One seed, 2,000 faces: the bootstrap interval of a mean is mean +- 1.96 sd / sqrt(N) (to ~5%)."""
  rng = np.random.default_rng(0)
  a = rng.normal(0.05, 0.02, size=(1, 2000))
  b = a + rng.normal(0.004, 0.01, size=(1, 2000))  # B is worse by 0.4 points on average
  result = stats.paired_comparison(a, b)
  d = (a - b)[0]
  half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
  assert result["low"] == pytest.approx(d.mean() - half, abs=0.05 * half)
  assert result["high"] == pytest.approx(d.mean() + half, abs=0.05 * half)
  assert result["verdict"] == "lower"
  assert stats.paired_comparison(b, a)["verdict"] == "higher"


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="one shape"):
    stats.paired_comparison(np.zeros((2, 3)), np.zeros((1, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    stats.paired_comparison(np.array([[np.nan]]), np.zeros((1, 1)))
