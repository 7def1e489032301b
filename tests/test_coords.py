"""The unit conventions of kd_landmarks/coords.py, checked against independent computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks import coords


def test_normalised_extent_is_minus_half_to_half_and_flip_is_negation():
  size = 224
  extent = np.array([[-0.5, -0.5], [size - 0.5, size - 0.5]])
  np.testing.assert_allclose(coords.to_normalized(extent, size), [[-0.5, -0.5], [0.5, 0.5]])
  # A pixel-index mirror x -> W - 1 - x is exactly a sign change in normalised coordinates.
  x = np.array([[3.0, 10.0], [200.25, 17.5]])
  mirrored = x.copy()
  mirrored[:, 0] = size - 1 - x[:, 0]
  np.testing.assert_allclose(coords.to_normalized(mirrored, size)[:, 0], -coords.to_normalized(x, size)[:, 0],
                             atol=1e-7)


def test_pixels_round_trip_with_rectangular_size():
  points = np.random.default_rng(0).uniform(-0.5, 99.5, size=(5, 2))
  back = coords.to_pixels(coords.to_normalized(points, (100, 60)), (100, 60))
  np.testing.assert_allclose(back, points, atol=1e-4)


@pytest.mark.parametrize("use_jax", [False, True])
def test_apply_affine_matches_matrix_product(use_jax):
  rng = np.random.default_rng(1)
  affine = rng.normal(size=(3, 2, 3))
  points = rng.normal(size=(3, 11, 2))
  expected = np.einsum("bij,bkj->bki", affine[..., :2], points) + affine[:, None, :, 2]
  if use_jax:
    got = np.asarray(jax.jit(coords.apply_affine)(jnp.asarray(affine, jnp.float32),
                                                 jnp.asarray(points, jnp.float32)))
    np.testing.assert_allclose(got, expected, atol=1e-5)
  else:
    np.testing.assert_allclose(coords.apply_affine(affine, points), expected, atol=1e-12)


def test_invert_and_compose():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(2, 3)) + np.eye(2, 3)
  b = rng.normal(size=(2, 3)) + np.eye(2, 3)
  p = rng.normal(size=(4, 2))
  np.testing.assert_allclose(coords.apply_affine(coords.compose_affine(a, b), p),
                             coords.apply_affine(a, coords.apply_affine(b, p)), atol=1e-12)
  np.testing.assert_allclose(coords.apply_affine(coords.invert_affine(a), coords.apply_affine(a, p)), p,
                             atol=1e-10)


def test_square_box_and_crop_affine_map_crop_extent_onto_box():
  points = np.array([[10.0, 20.0], [50.0, 30.0], [30.0, 100.0]])
  cx, cy, side = coords.square_box_from_landmarks(points, scale=1.5)
  assert (cx, cy) == (30.0, 60.0) and side == pytest.approx(1.5 * 80.0)
  affine = coords.crop_affine(np.array([cx, cy, side]), 64)
  corners = coords.apply_affine(affine, np.array([[-0.5, -0.5], [63.5, 63.5]]))
  np.testing.assert_allclose(corners, [[cx - side / 2, cy - side / 2], [cx + side / 2, cy + side / 2]])
