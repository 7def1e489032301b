"""Tests for kd_landmarks.augment: the image and every landmark set move together (Section 4.3)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks import augment
from kd_landmarks import coords
from kd_landmarks.cpu import kernels as cpu_kernels
from kd_landmarks.cpu import native
from kd_landmarks.datasets import flips

STORED_SIZE = 64
OUT_SIZE = 32
NUM_LANDMARKS = 68
PERM = flips.flip_permutation(NUM_LANDMARKS)
DOT_LANDMARK = 30  # a nose point: its partner under the flip is itself, so pick an eye point too
EYE_LANDMARK = 36  # right outer eye corner; after a flip the dot is labelled 45
GEOMETRY_ONLY = augment.AugmentConfig(photometric=False, noise=False)


def _random_shapes(seed, batch):
  """Landmarks spread over the middle of the stored crop (where the stored 1.5x margin puts them)."""
  rng = np.random.default_rng(seed)
  return rng.uniform(STORED_SIZE * 0.25, STORED_SIZE * 0.75, (batch, NUM_LANDMARKS, 2)).astype(np.float32)


def _dot_images(points):
  """uint8 images, black except for one Gaussian blob (sigma 1.2 px) centred on each given point."""
  grid = np.arange(STORED_SIZE, dtype=np.float64)
  xx, yy = np.meshgrid(grid, grid)
  blob = np.exp(-((xx[None] - points[:, 0, None, None]) ** 2 + (yy[None] - points[:, 1, None, None]) ** 2)
                / (2 * 1.2 ** 2))
  return np.repeat(np.round(255 * blob).astype(np.uint8)[..., None], 3, axis=-1)


def _centroid(image):
  """Intensity-weighted centroid (x, y) in pixels of a float [H, W, C] image."""
  weight = np.asarray(image).sum(-1)
  yy, xx = np.mgrid[: weight.shape[0], : weight.shape[1]]
  return np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()


@functools.lru_cache(maxsize=None)
def _jitted_augment(config, out_size=OUT_SIZE, kernels=augment.PORTABLE):
  return jax.jit(functools.partial(augment.augment, out_size=out_size, flip_permutation=PERM, config=config,
                                   kernels=kernels))


# augment's kernels in CPU training (kd_landmarks/cpu): the native warp and the batch-wide native noise.
NATIVE_KERNELS = augment.AugmentKernels(warp=cpu_kernels.warp_native, batch_noise=cpu_kernels.batch_noise_native)


# One compile per input structure (eager dispatch of the vmapped warp costs far more than compiling it).
_preprocess_eval = jax.jit(functools.partial(augment.preprocess_eval, out_size=OUT_SIZE))


def _is_flipped(out_to_input):
  return np.linalg.det(np.asarray(out_to_input)[..., :2]) < 0


def _dot_landmark_batch(seed, batch, landmark):
  shapes = _random_shapes(seed, batch)
  # Put the tracked landmark near the box centre so it stays in view under any rotation.
  shapes[:, landmark] = STORED_SIZE / 2 + np.random.default_rng(seed + 1).uniform(-4, 4, (batch, 2))
  return shapes, _dot_images(shapes[:, landmark])


@pytest.mark.parametrize("landmark", [DOT_LANDMARK, EYE_LANDMARK])
def test_drawn_dot_follows_its_landmark(landmark):
  batch = 8
  shapes, images = _dot_landmark_batch(3 + landmark, batch, landmark)
  out_images, out_sets, out_to_input = _jitted_augment(GEOMETRY_ONLY)(
      jax.random.key(landmark), images, {"landmarks": shapes})
  flipped = _is_flipped(out_to_input)
  assert 0 < flipped.sum() < batch  # the batch exercises both branches
  for b in range(batch):
    # After a flip, the point that was landmark j is labelled perm[j] (perm is an involution).
    label = PERM[landmark] if flipped[b] else landmark
    predicted = coords.to_pixels(np.asarray(out_sets["landmarks"][b, label]), OUT_SIZE)
    np.testing.assert_allclose(_centroid(out_images[b]), predicted, atol=1.0)


def test_drawn_dot_under_each_transform_alone():
  shapes, images = _dot_landmark_batch(11, 4, EYE_LANDMARK)
  configs = {
      "rotation": augment.AugmentConfig.disabled(rotation=True),
      "flip": augment.AugmentConfig.disabled(flip=True, flip_probability=1.0),
      "scale": augment.AugmentConfig.disabled(box_expansion=True, shift=True),
  }
  for name, config in configs.items():
    out_images, out_sets, out_to_input = _jitted_augment(config)(jax.random.key(5), images,
                                                                   {"landmarks": shapes})
    label = PERM[EYE_LANDMARK] if name == "flip" else EYE_LANDMARK
    assert _is_flipped(out_to_input).all() == (name == "flip")
    for b in range(len(images)):
      predicted = coords.to_pixels(np.asarray(out_sets["landmarks"][b, label]), OUT_SIZE)
      np.testing.assert_allclose(_centroid(out_images[b]), predicted, atol=1.0, err_msg=name)


def test_all_landmark_sets_move_together():
  batch = 8
  shapes = _random_shapes(0, batch)
  rng = np.random.default_rng(1)
  sets = {"landmarks": shapes, "soft_landmarks": shapes + rng.normal(0, 2, shapes.shape).astype(np.float32),
          "tough": rng.uniform(0, STORED_SIZE, shapes.shape).astype(np.float32)}
  images = np.zeros((batch, STORED_SIZE, STORED_SIZE, 3), np.uint8)
  _, out_sets, out_to_input = _jitted_augment(GEOMETRY_ONLY)(jax.random.key(2), images, sets)
  assert set(out_sets) == set(sets)
  flipped = _is_flipped(out_to_input)
  for key, points in sets.items():
    back = coords.apply_affine(np.asarray(out_to_input, np.float64),
                               coords.to_pixels(np.asarray(out_sets[key], np.float64), OUT_SIZE))
    # Undo the relabelling: output label i holds input point perm[i], so back[inverse_perm] = input.
    back = np.where(flipped[:, None, None], back[:, np.argsort(PERM)], back)
    np.testing.assert_allclose(back, points, atol=2e-3, err_msg=key)


def test_random_ranges_match_the_paper():
  shapes = _random_shapes(4, 16)
  images = np.zeros((16, STORED_SIZE, STORED_SIZE, 3), np.uint8)
  fn = _jitted_augment(GEOMETRY_ONLY)
  scales, angles, flipped = [], [], []
  for seed in range(8):
    _, _, out_to_input = fn(jax.random.key(100 + seed), images, {"landmarks": shapes})
    linear = np.asarray(out_to_input, np.float64)[:, :, :2]
    det = np.linalg.det(linear)
    side = np.sqrt(np.abs(det)) * OUT_SIZE
    base_side = (shapes.max(1) - shapes.min(1)).max(-1)
    scales.append(side / base_side)
    # Column 1 of R(theta) @ diag(f, 1) is (-sin, cos) whatever the flip.
    angles.append(np.degrees(np.arctan2(-linear[:, 0, 1], linear[:, 1, 1])))
    flipped.append(det < 0)
  scales, angles, flipped = map(np.concatenate, (scales, angles, flipped))
  assert scales.min() >= 1.0 - 1e-5 and scales.max() <= 1.1 + 1e-5  # "expand randomly up 10%"
  assert scales.max() - scales.min() > 0.07  # and it really varies
  assert np.abs(angles).max() <= 45.0 + 1e-3 and np.abs(angles).max() > 35.0  # "+-45 degree"
  assert 0.3 < flipped.mean() < 0.7  # "probability of 50%", 128 draws


def _symmetric_shapes(batch):
  """Configurations that are their own mirror image under PERM about the image's centre line: with
  pixel centres on integers, mirroring maps x to W - 1 - x."""
  shapes = _random_shapes(7, batch)
  for i in range(NUM_LANDMARKS):
    j = PERM[i]
    if i == j:
      shapes[:, i, 0] = (STORED_SIZE - 1) / 2
    elif i < j:
      shapes[:, j, 0] = STORED_SIZE - 1 - shapes[:, i, 0]
      shapes[:, j, 1] = shapes[:, i, 1]
  return shapes


def test_flip_of_symmetric_configuration_is_unchanged():
  shapes = _symmetric_shapes(4)
  np.testing.assert_allclose(shapes[:, PERM, 0], STORED_SIZE - 1 - shapes[:, :, 0], atol=1e-4)
  images = _dot_images(shapes[:, 10])  # any image content: the landmark check doesn't use it
  always_flip = augment.AugmentConfig.disabled(flip=True, flip_probability=1.0)
  _, flipped_sets, flipped_affine = _jitted_augment(always_flip)(jax.random.key(0), images,
                                                                  {"landmarks": shapes})
  _, plain_sets, _ = _preprocess_eval(images, {"landmarks": shapes})
  assert _is_flipped(flipped_affine).all()
  np.testing.assert_allclose(flipped_sets["landmarks"], plain_sets["landmarks"], atol=1e-5)
  # Without the relabelling the symmetric face would not map onto itself.
  assert np.abs(np.asarray(flipped_sets["landmarks"])[:, PERM] - plain_sets["landmarks"]).max() > 0.05


def test_flipped_image_is_the_mirror_image():
  shapes = _symmetric_shapes(4)
  images = np.random.default_rng(0).integers(0, 256, (4, STORED_SIZE, STORED_SIZE, 3), dtype=np.uint8)
  always_flip = augment.AugmentConfig.disabled(flip=True, flip_probability=1.0)
  flipped_images, _, _ = _jitted_augment(always_flip)(jax.random.key(0), images, {"landmarks": shapes})
  mirrored_input = images[:, :, ::-1]  # the box is symmetric about the image's centre line
  plain_images, _, _ = _preprocess_eval(mirrored_input, {"landmarks": shapes})
  np.testing.assert_allclose(flipped_images, plain_images, atol=1e-4)


def test_preprocess_eval_round_trip_and_box():
  shapes = _random_shapes(5, 4)
  soft = shapes + 1.5
  images = np.zeros((4, STORED_SIZE, STORED_SIZE, 3), np.uint8)
  out_images, out_sets, out_to_input = _preprocess_eval(images, {"landmarks": shapes, "soft_landmarks": soft})
  assert out_images.shape == (4, OUT_SIZE, OUT_SIZE, 3) and out_images.dtype == jnp.float32
  # The affine is the numpy crop of coords.py around the 1.05x square landmark box.
  box = coords.square_box_from_landmarks(shapes, scale=augment.EVAL_BOX_SCALE)
  np.testing.assert_allclose(out_to_input, coords.crop_affine(box, OUT_SIZE), atol=1e-4)
  for key, points in (("landmarks", shapes), ("soft_landmarks", soft)):
    back = coords.apply_affine(np.asarray(out_to_input, np.float64),
                               coords.to_pixels(np.asarray(out_sets[key], np.float64), OUT_SIZE))
    np.testing.assert_allclose(back, points, atol=0.01)
  # The landmark box spans 1/1.05 of the output: its extremes sit at +-0.5/1.05 on the long axis.
  extent = np.asarray(out_sets["landmarks"]).max(1) - np.asarray(out_sets["landmarks"]).min(1)
  np.testing.assert_allclose(extent.max(-1), 1 / augment.EVAL_BOX_SCALE, atol=1e-5)


def test_disabled_augment_equals_preprocess_eval():
  shapes = _random_shapes(6, 4)
  images = np.random.default_rng(2).integers(0, 256, (4, STORED_SIZE, STORED_SIZE, 3), dtype=np.uint8)
  expected = _preprocess_eval(images, {"landmarks": shapes})
  got = _jitted_augment(augment.AugmentConfig.disabled())(jax.random.key(9), images, {"landmarks": shapes})
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_full_augment_stays_in_range_and_is_deterministic_per_key():
  shapes = _random_shapes(8, 8)  # batch 8 like the dot tests: reuses the geometry-only compile
  images = np.random.default_rng(3).integers(0, 256, (8, STORED_SIZE, STORED_SIZE, 3), dtype=np.uint8)
  sets = {"landmarks": shapes}
  full = _jitted_augment(augment.AugmentConfig())
  first = full(jax.random.key(4), images, sets)
  again = full(jax.random.key(4), images, sets)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  out_images = np.asarray(first[0])
  assert out_images.dtype == np.float32 and out_images.min() >= 0.0 and out_images.max() <= 1.0
  # Photometric jitter changes the pixels, not the geometry drawn from the same key.
  geometry_only = _jitted_augment(GEOMETRY_ONLY)(jax.random.key(4), images, sets)
  np.testing.assert_allclose(geometry_only[1]["landmarks"], first[1]["landmarks"], atol=1e-6)
  assert np.abs(np.asarray(geometry_only[0]) - out_images).mean() > 0.01
  other = full(jax.random.key(5), images, sets)
  assert not np.allclose(other[2], first[2])  # another key, another draw


@pytest.mark.parametrize("fill_mode", ["constant", "nearest"])
def test_warp_equals_scipy_bilinear_sampling(fill_mode):
  # An independent bilinear sampler (jax.scipy.ndimage.map_coordinates, order 1) against the gather.
  image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  # A rotation + scale that samples outside the image too.
  affine = np.array([[0.9, -0.5, -3.0], [0.5, 0.9, 2.0]], np.float32)
  got = jax.jit(augment.warp_image, static_argnums=2, static_argnames=("fill_mode",))(
      image, affine, 16, fill_mode=fill_mode)
  grid = np.arange(16, dtype=np.float32)
  qx, qy = np.meshgrid(grid, grid)
  x = affine[0, 0] * qx + affine[0, 1] * qy + affine[0, 2]
  y = affine[1, 0] * qx + affine[1, 1] * qy + affine[1, 2]
  want = np.stack([jax.scipy.ndimage.map_coordinates(image[..., c].astype(np.float32), [y, x], order=1,
                                                      mode=fill_mode, cval=0.0) for c in range(3)], -1) / 255.0
  np.testing.assert_allclose(got, want, atol=1e-5)
  # On integer positions the sampler returns the pixel itself.
  identity = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]], np.float32)
  np.testing.assert_allclose(jax.jit(augment.warp_image, static_argnums=2)(image, identity, 8),
                             image[3:11, 2:10] / 255.0, atol=1e-6)


@pytest.mark.skipif(not native.available(), reason="no C++ compiler for the native kernels")
@pytest.mark.parametrize("fill_mode", ["constant", "nearest"])
def test_native_warp_equals_gather_in_a_batch_with_a_fill_value(fill_mode):
  """The C++ warp under augment's vmap (one call for the batch) against the jnp gather, by value: rotations,
  flips, scales and shifts that sample outside the crop, a fill value, and a bilinear value worked by hand."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 30, 26, 3), dtype=np.uint8)
  angles = rng.uniform(-1.2, 1.2, 5)
  flips_ = np.array([1, -1, 1, -1, 1], np.float32)
  affines = np.stack([np.array([[1.3 * np.cos(a) * f, -1.3 * np.sin(a), rng.uniform(-8, 30)],
                                [1.3 * np.sin(a) * f, 1.3 * np.cos(a), rng.uniform(-8, 34)]], np.float32)
                      for a, f in zip(angles, flips_)])

  def warp_all(warp):
    return np.asarray(jax.jit(jax.vmap(lambda i, a: warp(i, a, 20, fill_mode, 0.25)))(images, affines))

  gathered = warp_all(lambda i, a, s, m, v: augment.warp_image(i, a, s, fill_mode=m, fill_value=v))
  natively = warp_all(cpu_kernels.warp_native)
  assert natively.shape == (5, 20, 20, 3) and natively.dtype == np.float32
  np.testing.assert_allclose(natively, gathered, atol=2e-6)
  if fill_mode == "constant":
    assert np.isclose(natively, 0.25).mean() > 0.05  # the fill is really exercised
  # By hand: output pixel (0, 0) of an x/y shift by (1.25, 2.5) mixes pixels (2, 1), (2, 2), (3, 1), (3, 2).
  shift = np.array([[1.0, 0.0, 1.25], [0.0, 1.0, 2.5]], np.float32)
  image = images[0].astype(np.float64)
  expected = (0.5 * (0.75 * image[2, 1] + 0.25 * image[2, 2]) + 0.5 * (0.75 * image[3, 1] + 0.25 * image[3, 2]))
  got = np.asarray(native.affine_warp(images[0], shift, 4, fill_mode=fill_mode))[0, 0]
  np.testing.assert_allclose(got, expected / 255.0, atol=1e-6)


def test_bad_input_errors():
  shapes = _random_shapes(0, 2)
  images = np.zeros((2, STORED_SIZE, STORED_SIZE, 3), np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    augment.preprocess_eval(images.astype(np.float32), {"landmarks": shapes}, out_size=OUT_SIZE)
  with pytest.raises(ValueError, match="reference='landmarks' is not among"):
    augment.preprocess_eval(images, {"gt": shapes}, out_size=OUT_SIZE)
  with pytest.raises(ValueError, match="'soft' has shape"):
    augment.preprocess_eval(images, {"landmarks": shapes, "soft": shapes[:1]}, out_size=OUT_SIZE)
  with pytest.raises(ValueError, match=r"flips.flip_permutation\(68\)"):
    augment.augment(jax.random.key(0), images, {"landmarks": shapes}, out_size=OUT_SIZE,
                    flip_permutation=flips.flip_permutation(29))
  with pytest.raises(ValueError, match="flip_permutation is None"):
    augment.augment(jax.random.key(0), images, {"landmarks": shapes}, flip_permutation=None)
  with pytest.raises(ValueError, match="fill_mode"):
    augment.AugmentConfig(fill_mode="reflect")
  if native.available():
    with pytest.raises(ValueError, match=r"uint8 images \[\.\.\., H, W, C\] and affines"):
      native.affine_warp(images.astype(np.float32)[0], np.zeros((2, 3), np.float32), 8)
    with pytest.raises(ValueError, match="fill_mode='reflect'"):
      native.affine_warp(images[0], np.zeros((2, 3), np.float32), 8, fill_mode="reflect")


def test_standard_normal_is_gaussian():
  samples = np.asarray(jax.jit(augment.standard_normal, static_argnums=1)(jax.random.key(0), (301, 333)))
  assert samples.shape == (301, 333)  # an odd count: one Box-Muller half is dropped
  flat = samples.ravel()
  assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1.0) < 0.01
  # Mass within 1 and 2 sigma, and the Kolmogorov-Smirnov distance to N(0, 1).
  assert abs(np.mean(np.abs(flat) < 1.0) - 0.6827) < 0.005
  assert abs(np.mean(np.abs(flat) < 2.0) - 0.9545) < 0.003
  sorted_samples = np.sort(flat)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ks = np.abs(stats.norm.cdf(sorted_samples) - np.arange(1, flat.size + 1) / flat.size).max()
  assert ks < 0.005
  # A pure function of the key; another key, another draw, uncorrelated.
  again = np.asarray(jax.jit(augment.standard_normal, static_argnums=1)(jax.random.key(0), (301, 333)))
  np.testing.assert_array_equal(again, samples)
  other = np.asarray(augment.standard_normal(jax.random.key(1), (301, 333)))
  assert abs(np.corrcoef(other.ravel(), flat)[0, 1]) < 5.0 / np.sqrt(flat.size)


@pytest.mark.skipif(not native.available(), reason="no C++ compiler for the native kernels")
def test_native_noise_is_gaussian_and_a_pure_function_of_the_key():
  """The C++ noise on a mid-grey batch with std 0.01 (no clip): (out - 0.5) / 0.01 is N(0, 1) by mean,
  spread, 1- and 2-sigma mass, Kolmogorov-Smirnov distance and its 16-bit tails; per-image std honoured."""
  images = np.full((4, 100, 101, 3), 0.5, np.float32)
  stds = np.array([0.01, 0.01, 0.0, 0.02], np.float32)
  out = np.asarray(jax.jit(native.gaussian_noise)(jax.random.key(0), images, stds))
  z = ((out[:2] - 0.5) / 0.01).ravel().astype(np.float64)
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
  assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.005 and abs(np.mean(np.abs(z) < 2.0) - 0.9545) < 0.003
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ks = np.abs(stats.norm.cdf(np.sort(z)) - np.arange(1, z.size + 1) / z.size).max()
  assert ks < 0.005 and np.abs(z).max() < 4.34
  np.testing.assert_array_equal(out[2], images[2])  # std 0: unchanged
  assert abs((out[3] - 0.5).std() / 0.02 - 1.0) < 0.02
  np.testing.assert_array_equal(out, np.asarray(native.gaussian_noise(jax.random.key(0), images, stds)))
  other = np.asarray(native.gaussian_noise(jax.random.key(1), images, stds))
  assert abs(np.corrcoef(((other[:2] - 0.5) / 0.01).ravel(), z)[0, 1]) < 5.0 / np.sqrt(z.size)
  # Clipped into [0, 1].
  clipped = np.asarray(native.gaussian_noise(jax.random.key(2), np.ones((1, 8, 8, 3), np.float32),
                                             np.array([0.5], np.float32)))
  assert clipped.max() == 1.0 and clipped.min() < 1.0


@pytest.mark.parametrize("noise_impl", ["jnp", "native"])
def test_noise_std_is_drawn_per_image_within_its_range(noise_impl):
  if noise_impl == "native" and not native.available():
    pytest.skip("no C++ compiler for the native kernels")
  kernels = NATIVE_KERNELS if noise_impl == "native" else augment.PORTABLE
  """augment's Gaussian noise: the difference to the same draw without noise has, per image, a standard
  deviation in [0, max_noise_std], different from image to image, and no correlation between images."""
  shapes = _random_shapes(3, 6)
  images = np.full((6, STORED_SIZE, STORED_SIZE, 3), 128, np.uint8)  # mid-grey: the clip never acts
  sets = {"landmarks": shapes}
  noisy_config = augment.AugmentConfig(photometric=False, max_noise_std=0.04)
  noisy = _jitted_augment(noisy_config, kernels=kernels)(jax.random.key(7), images, sets)[0]
  clean = _jitted_augment(GEOMETRY_ONLY)(jax.random.key(7), images, sets)[0]
  noise = np.asarray(noisy - clean).reshape(6, -1)
  inside = np.asarray(clean).reshape(6, -1) > 0.3  # where the warp read the grey crop (no clip at 0 or 1)
  stds = np.array([noise[i][inside[i]].std() for i in range(6)])
  assert np.all(stds <= 0.04 * 1.03) and stds.max() - stds.min() > 0.005
  means = np.array([noise[i][inside[i]].mean() for i in range(6)])
  assert np.all(np.abs(means) < 4 * stds / np.sqrt(inside.sum(axis=1)) + 1e-6)
  assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 5.0 / np.sqrt(noise.shape[1])


def _photometric(config, image, seed=0):
  return np.asarray(jax.jit(augment._photometric, static_argnums=2)(  # pylint: disable=protected-access
      jax.random.key(seed), jnp.asarray(image), config))


def test_photometric_jitters_do_what_their_names_say():
  rng = np.random.default_rng(0)
  image = rng.uniform(0.3, 0.7, (16, 16, 3)).astype(np.float32)  # away from the clip at 0 and 1
  none = dict(photometric=True, noise=False, max_brightness_delta=0.0, max_contrast_delta=0.0,
              max_saturation_delta=0.0, max_color_gain_delta=0.0)
  np.testing.assert_allclose(_photometric(augment.AugmentConfig(**none), image), image, atol=1e-6)
  # Brightness: one offset for every pixel and channel.
  shifted = _photometric(augment.AugmentConfig(**{**none, "max_brightness_delta": 0.2}), image) - image
  assert np.ptp(shifted) < 1e-5 and abs(shifted.mean()) > 1e-4
  # Contrast: scales deviations from the mean by one factor in [0.8, 1.2], keeping the mean; over seeds
  # the factor spreads over that range (a jitter that does nothing has factor 1 for every seed).
  factors = []
  for seed in range(12):
    contrasted = _photometric(augment.AugmentConfig(**{**none, "max_contrast_delta": 0.2}), image, seed)
    np.testing.assert_allclose(contrasted.mean(), image.mean(), atol=1e-5)
    ratio = ((contrasted - image.mean()) / (image - image.mean()))[np.abs(image - image.mean()) > 0.05]
    assert np.ptp(ratio) < 1e-3
    factors.append(ratio.mean())
  assert 0.8 - 1e-4 <= min(factors) < 0.93 and 1.07 < max(factors) <= 1.2 + 1e-4
  # Saturation: scales each pixel's deviation from its luma (Rec. 601) by one factor in [0.7, 1.3]; the
  # luma itself is kept, and a grey image stays grey and unchanged.
  luma = lambda x: x @ np.array([0.299, 0.587, 0.114], np.float32)
  factors = []
  for seed in range(12):
    saturated = _photometric(augment.AugmentConfig(**{**none, "max_saturation_delta": 0.3}), image, seed)
    np.testing.assert_allclose(luma(saturated), luma(image), atol=1e-5)
    deviation = image - luma(image)[..., None]
    ratio = ((saturated - luma(saturated)[..., None]) / deviation)[np.abs(deviation) > 0.05]
    assert np.ptp(ratio) < 2e-3
    factors.append(ratio.mean())
  assert 0.7 - 1e-4 <= min(factors) < 0.85 and 1.15 < max(factors) <= 1.3 + 1e-4
  grey = np.repeat(image[..., :1], 3, axis=-1)
  np.testing.assert_allclose(_photometric(augment.AugmentConfig(**{**none, "max_saturation_delta": 0.3}),
                                          grey), grey, atol=1e-6)
  # Colour gains: one factor per channel.
  gained = _photometric(augment.AugmentConfig(**{**none, "max_color_gain_delta": 0.1}), image) / image
  assert np.ptp(gained.reshape(-1, 3), axis=0).max() < 1e-5 and np.ptp(gained[0, 0]) > 1e-4


def test_default_augmentation_never_reads_outside_the_stored_crop():
  """The stored margin (datasets.images.STORED_CROP_SCALE) must hold every output pixel of the paper's
  augmentation at its extremes (1.1x box, 45 degrees), so training images get no black corners."""
  from kd_landmarks.datasets import images
  size, out_size, batch = 96, 32, 256
  # A landmark box of side size / STORED_CROP_SCALE centred in the crop, as the builder stores it.
  side = size / images.STORED_CROP_SCALE
  corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32) * side / 2 + (size - 1) / 2
  landmarks = np.broadcast_to(corners, (batch, 4, 2)).astype(np.float32)
  config = augment.AugmentConfig(photometric=False, noise=False, flip=False)
  _, _, out_to_input = jax.jit(functools.partial(
      augment.augment, out_size=out_size, flip_permutation=None, config=config))(
          jax.random.key(3), jnp.zeros((batch, size, size, 3), jnp.uint8), {"landmarks": jnp.asarray(landmarks)})
  extent = np.array([[-0.5, -0.5], [out_size - 0.5, -0.5], [out_size - 0.5, out_size - 0.5],
                     [-0.5, out_size - 0.5]])
  reached = coords.apply_affine(np.asarray(out_to_input, np.float64), np.broadcast_to(extent, (batch, 4, 2)))
  assert reached.min() >= -0.5 and reached.max() <= size - 0.5, (reached.min(), reached.max())
