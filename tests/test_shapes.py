"""Tests of the ASM shape model and Soft-landmarks (paper Section 3.1, Eqs. 1-3)."""
import os
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_landmarks import shapes

KEYPOINTS_68 = str(pathlib.Path(__file__).resolve().parent / "data" / "keypoints_68")  # Shipped (MIT, see its README).


def _random_shapes(num_shapes=40, num_landmarks=5, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.uniform(0, 100, size=(num_landmarks, 2))
  # Anisotropic noise so that the eigenvalues are distinct (and the order is meaningful).
  scales = np.linspace(5.0, 0.5, num_landmarks * 2).reshape(num_landmarks, 2)
  return base + rng.normal(size=(num_shapes, num_landmarks, 2)) * scales


def test_fit_matches_numpy_covariance_and_is_sorted_orthonormal():
  data = _random_shapes()
  model = shapes.fit_shape_model(data)
  flat = data.reshape(len(data), -1)  # x0, y0, x1, y1, ...
  np.testing.assert_allclose(model.mean, flat.mean(axis=0))
  # An independent covariance (np.cov, N-1) must be V diag(lambda) V^T.
  covariance = np.cov(flat, rowvar=False)
  rebuilt = model.eigenvectors @ np.diag(model.eigenvalues) @ model.eigenvectors.T
  np.testing.assert_allclose(rebuilt, covariance, atol=1e-9)
  np.testing.assert_allclose(model.eigenvectors.T @ model.eigenvectors, np.eye(10), atol=1e-12)
  assert np.all(np.diff(model.eigenvalues) <= 0)
  assert model.num_landmarks == 5
  # lambda_i is the variance of b_i over the training set (the paper's definition).
  params = (flat - model.mean) @ model.eigenvectors
  np.testing.assert_allclose(params.var(axis=0, ddof=1), model.eigenvalues, atol=1e-9)


def test_flattening_order_is_x0_y0_x1_y1():
  # Only y of point 1 varies: the first eigenvector must be the unit vector at flat index 3.
  data = np.zeros((4, 3, 2))
  data[:, 1, 1] = [0.0, 1.0, 2.0, 3.0]
  model = shapes.fit_shape_model(data)
  np.testing.assert_allclose(np.abs(model.eigenvectors[:, 0]), np.eye(6)[3], atol=1e-12)
  np.testing.assert_allclose(model.eigenvalues[0], np.var([0, 1, 2, 3], ddof=1))


def test_all_kept_and_no_clip_returns_input():
  data = _random_shapes()
  model = shapes.fit_shape_model(data)
  out = shapes.soft_landmarks(data, model, keep=1.0, clip=None)
  np.testing.assert_allclose(out, data, atol=1e-9)


def test_none_kept_returns_mean():
  data = _random_shapes()
  model = shapes.fit_shape_model(data)
  out = shapes.soft_landmarks(data[:3], model, keep=0.0)
  np.testing.assert_allclose(out, np.broadcast_to(model.mean.reshape(5, 2), (3, 5, 2)), atol=1e-12)


def test_clip_limits_each_parameter_to_three_sigma():
  data = _random_shapes()
  model = shapes.fit_shape_model(data)
  # A shape far out along v_0 (10 sigma) and slightly along v_1 (1 sigma).
  sigma = np.sqrt(model.eigenvalues)
  far = model.mean + 10 * sigma[0] * model.eigenvectors[:, 0] + 1 * sigma[1] * model.eigenvectors[:, 1]
  out = shapes.soft_landmarks(far.reshape(1, 5, 2), model, keep=1.0)
  params = (out.reshape(-1) - model.mean) @ model.eigenvectors
  np.testing.assert_allclose(params[0], 3 * sigma[0], rtol=1e-9)  # clipped
  np.testing.assert_allclose(params[1], 1 * sigma[1], rtol=1e-9)  # untouched
  np.testing.assert_allclose(params[2:], 0.0, atol=1e-9)


def test_keep_counts():
  model = shapes.ShapeModel(mean=np.zeros(4), eigenvectors=np.eye(4), eigenvalues=np.array([6.0, 3.0, 1.0, 0.0]))
  # Paper: a fraction of all eigenvectors, floored.
  assert shapes.num_kept_components(model, 0.9, "eigenvectors") == 3
  assert shapes.num_kept_components(model, 0.5, "eigenvectors") == 2
  # Authors' code (sklearn): smallest m with cumulative ratio (0.6, 0.9, 1.0, 1.0) strictly above keep.
  assert shapes.num_kept_components(model, 0.5, "variance") == 1
  assert shapes.num_kept_components(model, 0.85, "variance") == 2
  assert shapes.num_kept_components(model, 0.95, "variance") == 3
  assert shapes.num_kept_components(model, 1.0, "variance") == 4
  # 90% of the 136 eigenvectors of a 68-point model.
  big = shapes.ShapeModel(mean=np.zeros(136), eigenvectors=np.eye(136), eigenvalues=np.ones(136))
  assert shapes.num_kept_components(big, 0.9, "eigenvectors") == 122


def test_variance_mode_keeps_dominant_direction_only():
  model = shapes.ShapeModel(mean=np.zeros(4), eigenvectors=np.eye(4), eigenvalues=np.array([6.0, 3.0, 1.0, 0.0]))
  point = np.array([[[1.0, 1.0], [1.0, 1.0]]])
  out = shapes.soft_landmarks(point, model, keep=0.5, keep_mode="variance", clip=None)
  np.testing.assert_allclose(out.reshape(-1), [1.0, 0.0, 0.0, 0.0])


def test_errors_are_clear():
  model = shapes.fit_shape_model(_random_shapes())
  with pytest.raises(ValueError, match="K=4 points but the shape model was fitted on K=5"):
    shapes.soft_landmarks(np.zeros((4, 2)), model)
  with pytest.raises(ValueError, match="unknown keep_mode"):
    shapes.soft_landmarks(np.zeros((5, 2)), model, keep_mode="pixels")
  with pytest.raises(ValueError, match=r"\[N, K, 2\]"):
    shapes.fit_shape_model(np.zeros((3, 10)))
  bad = _random_shapes()
  bad[7, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r"shapes \[7\]"):
    shapes.fit_shape_model(bad)


def test_batch_shape_and_dtype_preserved(tmp_path):
  data = _random_shapes().astype(np.float32)
  model = shapes.fit_shape_model(data)
  out = shapes.soft_landmarks(data.reshape(4, 10, 5, 2), model)
  assert out.shape == (4, 10, 5, 2) and out.dtype == np.float32
  path = os.path.join(tmp_path, "model")  # no suffix: saved and loaded under exactly this name
  shapes.save_shape_model(path, model)
  loaded = shapes.load_shape_model(path)
  np.testing.assert_array_equal(loaded.eigenvectors, model.eigenvectors)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), keep=st.floats(0.0, 1.0))
def test_soft_landmarks_is_a_projection(seed, keep):
  # Without clipping Eq. 3 is an orthogonal projection onto mean + span(V_m): applying it twice
  # changes nothing, and the residual is orthogonal to the kept eigenvectors.
  data = _random_shapes(seed=seed)
  model = shapes.fit_shape_model(data)
  once = shapes.soft_landmarks(data, model, keep=keep, clip=None)
  twice = shapes.soft_landmarks(once, model, keep=keep, clip=None)
  np.testing.assert_allclose(twice, once, atol=1e-8)
  kept = shapes.num_kept_components(model, keep)
  residual = (data - once).reshape(len(data), -1)
  np.testing.assert_allclose(residual @ model.eigenvectors[:, :kept], 0.0, atol=1e-8)


def _read_keypoints_csv(path):
  rows = np.genfromtxt(path, delimiter=",", skip_header=1, usecols=range(1, 137))
  return rows.reshape(-1, 68, 2)


@pytest.mark.skipif(not os.path.exists(KEYPOINTS_68), reason="real 68-point shapes not available")
def test_real_68_point_shapes_soft_have_less_variance_than_hard():
  train = _read_keypoints_csv(os.path.join(KEYPOINTS_68, "keypoints_frames_train.csv"))
  test = _read_keypoints_csv(os.path.join(KEYPOINTS_68, "keypoints_frames_test.csv"))
  assert train.shape[1:] == (68, 2) and len(train) > 1000
  model = shapes.fit_shape_model(train)

  def spread(points):  # total variance around the per-coordinate mean (Fig. 3's "less variation")
    return points.reshape(len(points), -1).var(axis=0).sum()

  hard = spread(test)
  soft_90 = shapes.soft_landmarks(test, model, keep=0.9, keep_mode="eigenvectors")
  soft_50 = shapes.soft_landmarks(test, model, keep=0.5, keep_mode="eigenvectors")
  soft_var = shapes.soft_landmarks(test, model, keep=0.9, keep_mode="variance")
  assert spread(soft_90) < hard
  assert spread(soft_50) <= spread(soft_90)
  assert spread(soft_var) < spread(soft_90)  # 90% of variance uses far fewer than 90% of eigenvectors
  assert shapes.num_kept_components(model, 0.9, "variance") < shapes.num_kept_components(model, 0.9, "eigenvectors")
  # Soft landmarks stay close to the hard ones (same face, smoothed): mean error well under 2 px.
  assert np.abs(soft_90 - test).mean() < 2.0


def _whitened_shapes(variances, num_shapes=60, seed=0):
  """``num_shapes`` shapes of 5 points (10 dimensions) whose sample covariance has exactly ``variances`` as
  eigenvalues along a random orthonormal basis ``E`` (returned): more shapes than dimensions."""
  rng = np.random.default_rng(seed)
  dimension = len(variances)
  z = rng.normal(size=(num_shapes, dimension))
  z -= z.mean(axis=0)
  # Whiten: z^T z / (N - 1) = I exactly, so the eigenvalues are the variances given.
  u, singular, vt = np.linalg.svd(z, full_matrices=False)
  z = u @ vt * np.sqrt(num_shapes - 1)
  basis, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
  mean = rng.uniform(-0.3, 0.3, size=dimension)
  flat = mean + (z * np.sqrt(variances)) @ basis.T
  return flat.reshape(num_shapes, dimension // 2, 2), mean, basis


def test_default_soft_landmarks_keep_90_percent_of_the_variance_by_hand():
  """Eigenvalues 50, 25, 10, 6, 4, 2.5, 1.2, 0.7, 0.4, 0.2 (sum 100): cumulative 0.50, 0.75, 0.85, 0.91, ...
  The default (variance, keep 0.9) keeps 4 components, keep 0.5 keeps 2 (first ratio above 0.5), keep 1.0
  all 10, the paper's wording 9. A test shape with parameters b = (5, 1, -0.5, 2, 1, 0.7, 0, ...) sigma:
  b_0 is clipped to 3 sigma_0 in every reading, the default also drops b_4.. (Eq. 3 by hand below)."""
  variances = np.array([50, 25, 10, 6, 4, 2.5, 1.2, 0.7, 0.4, 0.2]) * 1e-4
  data, mean, basis = _whitened_shapes(variances)
  model = shapes.fit_shape_model(data)
  np.testing.assert_allclose(model.eigenvalues, variances, rtol=1e-9)
  assert [shapes.num_kept_components(model, keep) for keep in (0.9, 0.5, 1.0)] == [4, 2, 10]
  assert shapes.num_kept_components(model, 0.9, "eigenvectors") == 9
  sigma = np.sqrt(variances)
  b = np.array([5, 1, -0.5, 2, 1, 0.7, 0, 0, 0, 0]) * sigma
  shape = (mean + basis @ b).reshape(1, 5, 2)

  def by_hand(num_kept):
    kept = np.minimum(b[:num_kept], 3 * sigma[:num_kept])  # only b_0 exceeds its limit
    return (mean + basis[:, :num_kept] @ kept).reshape(1, 5, 2)

  default = shapes.soft_landmarks(shape, model)
  np.testing.assert_allclose(default, by_hand(4), atol=1e-12)
  np.testing.assert_allclose(shapes.soft_landmarks(shape, model, keep=1.0), by_hand(10), atol=1e-12)
  np.testing.assert_allclose(shapes.soft_landmarks(shape, model, keep=0.5), by_hand(2), atol=1e-12)
  np.testing.assert_allclose(shapes.soft_landmarks(shape, model, keep_mode="eigenvectors"), by_hand(9),
                             atol=1e-12)

  def displacement(soft):  # length of the 10-vector moved (orthonormal basis: the norm of b - b~)
    return float(np.linalg.norm(soft - shape))

  # keep 1.0 moves the shape only through the clip (2 sigma_0 along v_0); keep 0.9 also drops 1 and 0.7
  # sigma of v_4, v_5; keep 0.5 drops -0.5 and 2 sigma of v_2, v_3 as well.
  expected = {1.0: np.sqrt(4 * variances[0]),
              0.9: np.sqrt(4 * variances[0] + variances[4] + 0.49 * variances[5]),
              0.5: np.sqrt(4 * variances[0] + 0.25 * variances[2] + 4 * variances[3] + variances[4]
                           + 0.49 * variances[5])}
  for keep, value in expected.items():
    assert displacement(shapes.soft_landmarks(shape, model, keep=keep)) == pytest.approx(value, rel=1e-9), keep
  assert 0 < expected[1.0] < expected[0.9] < expected[0.5]
  # The clip acts: without it keep 1.0 returns the shape itself.
  np.testing.assert_allclose(shapes.soft_landmarks(shape, model, keep=1.0, clip=None), shape, atol=1e-12)
