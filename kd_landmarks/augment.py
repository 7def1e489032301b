"""On-device augmentation of face crops and *every* landmark set with them (paper, Section 4.3).

Section 4.3: the face box comes from the ground-truth landmarks, is "expanded randomly up 10%", the face
is resized to 224x224, "we randomly rotate each image by +-45 degree and flip horizontally with the
probability of 50%", and images are augmented "in terms of brightness, contrast, and color modification
as well as adding Gaussian noises".

Everything here is a pure function of (rng, arrays), written in ``jax.numpy`` so that it runs inside the
jitted training step on the accelerator; the per-example work is ``jax.vmap``-ed over the batch.

Geometry. For each example we draw a box (centre c, side L), an angle theta and a flip f in {+1, -1},
and build one affine ``out_to_input`` that maps an output pixel q to the stored-crop pixel

    p = c + L * R(theta) @ diag(f, 1) @ u,     u = (q + 0.5) / out_size - 0.5   (normalised output coords)

The image is resampled once through it (bilinear) and every landmark set is mapped through its inverse,
normalised with :func:`coords.to_normalized`, and, when flipped, relabelled with the flip permutation
(``kd_landmarks.datasets.flips``). Predictions map back to the original photo with
``crop_to_original o out_to_input o to_pixels``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kd_landmarks import coords
from kd_landmarks.config_lib import EVAL_BOX_SCALE, AugmentConfig  # noqa: F401  (re-exported)

# ITU-R BT.601 luma weights, for the saturation jitter's grey image.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class AugmentKernels:
  """The two costly pieces of :func:`augment`, swappable without changing its distribution.

  None keeps the portable jax.numpy form; ``kd_landmarks/cpu`` supplies native ones for CPU training.

  Fields:
    warp: ``(image_uint8 [H, W, C], out_to_input [2, 3], out_size, fill_mode, fill_value) -> float32
      [out, out, C]`` in [0, 1], bilinear, as :func:`warp_image` (called per example under ``jax.vmap``).
    batch_noise: ``(rng, images [B, H, W, C], noise_std [B]) -> clip(images + noise_std[b] * z, 0, 1)`` with
      ``z`` ~ N(0, 1): the whole batch's Gaussian noise in one call (other draws than the per-example
      :func:`standard_normal`, the same distribution up to the tails).
  """
  warp: Callable | None = None
  batch_noise: Callable | None = None


PORTABLE = AugmentKernels()


# ----------------------------------------------------------------------------------------------------
# Geometry.


def _landmark_box(points):
  """jnp twin of coords.square_box_from_landmarks (scale 1): centre [2] and side of one [K, 2] set."""
  lo = points.min(axis=0)
  hi = points.max(axis=0)
  return (lo + hi) / 2.0, (hi - lo).max()


def _out_to_input_affine(centre, side, angle, flip_sign, out_size):
  """The [2, 3] affine p = centre + side * R(angle) @ diag(flip_sign, 1) @ ((q + 0.5) / out - 0.5)."""
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotation_flip = jnp.stack([jnp.stack([cos * flip_sign, -sin]), jnp.stack([sin * flip_sign, cos])])
  linear = rotation_flip * (side / out_size)
  # Output pixel q = 0 sits at normalised u = 0.5 / out - 0.5 on both axes.
  u0 = jnp.full((2,), 0.5 / out_size - 0.5, dtype=linear.dtype)
  offset = centre + side * _matvec(rotation_flip, u0)
  return jnp.concatenate([linear, offset[:, None]], axis=1)


def _invert_similarity(affine):
  """Inverse of a [2, 3] affine whose linear part is scale * orthogonal (rotation, maybe reflected)."""
  linear, offset = affine[:, :2], affine[:, 2]
  scale_squared = jnp.abs(linear[0, 0] * linear[1, 1] - linear[0, 1] * linear[1, 0])
  linear_inv = linear.T / scale_squared
  return jnp.concatenate([linear_inv, (-_matvec(linear_inv, offset))[:, None]], axis=1)


def _matvec(matrix, vector):
  """[2, 2] @ [2] written out: on GPU a tiny ``@`` may run in TF32 (~1e-3 relative error, 0.3 px at
  320 px); landmark geometry must stay exact to float32."""
  return jnp.stack([matrix[0, 0] * vector[0] + matrix[0, 1] * vector[1],
                    matrix[1, 0] * vector[0] + matrix[1, 1] * vector[1]])


def _relabel(per_point, flip, flip_permutation):
  """``per_point`` ([K, ...]) relabelled by the flip permutation when the image was flipped."""
  if flip_permutation is None:
    return per_point
  return jnp.where(flip, per_point[flip_permutation], per_point)


def _transform_landmark_sets(landmark_sets, out_to_input, flip, flip_permutation, out_size):
  """Maps every set into normalised output coordinates and relabels them when the image was flipped."""
  input_to_out = _invert_similarity(out_to_input)
  result = {}
  for key, points in landmark_sets.items():
    normalised = coords.to_normalized(coords.apply_affine(input_to_out, points), out_size)
    result[key] = _relabel(normalised, flip, flip_permutation).astype(jnp.float32)
  return result


# ----------------------------------------------------------------------------------------------------
# Resampling: an [H, W, C] uint8 image read at float pixel coordinates (x, y) with pixel centres on
# integers, bilinear, as float32 in the image's 0..255 range.


def _sample_gather(image, x, y, fill_mode, fill_value):
  height, width, channels = image.shape
  if fill_mode == "nearest":
    x = jnp.clip(x, 0.0, width - 1.0)
    y = jnp.clip(y, 0.0, height - 1.0)
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  wx = (x - x0)[..., None]
  wy = (y - y0)[..., None]
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  flat = image.reshape(height * width, channels)

  def tap(yi, xi):
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
    value = flat[index].astype(jnp.float32)  # gather uint8 (4x less memory traffic), then widen
    return jnp.where(inside[..., None], value, jnp.float32(fill_value))

  top = (1.0 - wx) * tap(y0, x0) + wx * tap(y0, x0 + 1)
  bottom = (1.0 - wx) * tap(y0 + 1, x0) + wx * tap(y0 + 1, x0 + 1)
  return (1.0 - wy) * top + wy * bottom


def warp_image(image_uint8, out_to_input, out_size, *, fill_mode="constant", fill_value=0.0):
  """Resamples one [H, W, C] image through ``out_to_input`` into float32 [out, out, C] in [0, 1] (bilinear)."""
  grid = jnp.arange(out_size, dtype=jnp.float32)
  qx, qy = jnp.meshgrid(grid, grid)  # qx varies along columns (x), qy along rows (y)
  x = out_to_input[0, 0] * qx + out_to_input[0, 1] * qy + out_to_input[0, 2]
  y = out_to_input[1, 0] * qx + out_to_input[1, 1] * qy + out_to_input[1, 2]
  warped = _sample_gather(image_uint8, x, y, fill_mode, fill_value * 255.0)
  return warped / 255.0


def _warp_portable(image_uint8, out_to_input, out_size, fill_mode, fill_value):
  """:func:`warp_image` with the signature of :attr:`AugmentKernels.warp`."""
  return warp_image(image_uint8, out_to_input, out_size, fill_mode=fill_mode, fill_value=fill_value)


# ----------------------------------------------------------------------------------------------------
# Photometric jitter on one float image in [0, 1].


def standard_normal(rng, shape):
  """N(0, 1) samples by Box-Muller on both 16-bit halves of each random uint32.

  Same distribution as ``jax.random.normal`` up to 16-bit resolution (tails cut at 4.7 sigma, which
  pixel noise never needs) from half the random bits and no inverse erf: ~1.5x faster than
  ``jax.random.normal`` on XLA CPU at 4 x 224 x 224 x 3, where the noise dominates the augmentation.
  """
  size = math.prod(shape)
  bits = jax.random.bits(rng, ((size + 1) // 2,), jnp.uint32)
  # (k + 0.5) / 2**16 lies in (0, 1): log never sees 0.
  u1 = ((bits >> 16).astype(jnp.float32) + 0.5) * (1.0 / 65536.0)
  u2 = ((bits & 0xFFFF).astype(jnp.float32) + 0.5) * (1.0 / 65536.0)
  radius = jnp.sqrt(-2.0 * jnp.log(u1))
  angle = (2.0 * math.pi) * u2
  samples = jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)])
  return samples[:size].reshape(shape)


def _photometric(rng, image, config, *, noise=True):
  """Brightness, contrast, saturation and colour-gain jitter, then (``noise``) Gaussian noise with a standard
  deviation drawn from U(0, max_noise_std), on one image (Section 4.3)."""
  brightness_key, contrast_key, saturation_key, gain_key, noise_key, std_key = jax.random.split(rng, 6)
  if config.photometric:
    def factor(key, delta, shape=()):
      return jax.random.uniform(key, shape, minval=1.0 - delta, maxval=1.0 + delta)

    brightness = jax.random.uniform(brightness_key, (), minval=-config.max_brightness_delta,
                                    maxval=config.max_brightness_delta)
    image = image + brightness
    mean = image.mean()  # contrast pivots about the image's mean, as PIL and tf.image do
    image = (image - mean) * factor(contrast_key, config.max_contrast_delta) + mean
    # A weighted sum, not `image @ luma`: XLA CPU runs that [H*W, 3] x [3] dot ~10x slower.
    grey = (image[..., 0] * _LUMA[0] + image[..., 1] * _LUMA[1] + image[..., 2] * _LUMA[2])[..., None]
    image = (image - grey) * factor(saturation_key, config.max_saturation_delta) + grey
    image = image * factor(gain_key, config.max_color_gain_delta, (3,))
    image = jnp.clip(image, 0.0, 1.0)
  if config.noise and noise:
    noise_std = jax.random.uniform(std_key, (), maxval=config.max_noise_std)
    image = jnp.clip(image + noise_std * standard_normal(noise_key, image.shape), 0.0, 1.0)
  return image


# Folded into augment's key for a batch-wide noise draw (independent of the per-example keys).
_BATCH_NOISE_STREAM = 0x6E6F6973


def _add_batch_noise(rng, images, config, batch_noise):
  """Gaussian noise for a whole batch [B, H, W, C] in one ``batch_noise`` call (per-image std from
  U(0, max_noise_std))."""
  std_key, normal_key = jax.random.split(jax.random.fold_in(rng, _BATCH_NOISE_STREAM))
  noise_std = jax.random.uniform(std_key, (images.shape[0],), maxval=config.max_noise_std)
  return batch_noise(normal_key, images, noise_std)


# ----------------------------------------------------------------------------------------------------
# Public API.


def augment(rng, images_uint8, landmark_sets: Mapping[str, jax.Array], *, reference="landmarks",
            out_size=224, flip_permutation, config: AugmentConfig = AugmentConfig(),
            kernels: AugmentKernels = PORTABLE, point_masks: Mapping[str, jax.Array] | None = None,
            first_example=0, global_batch_size: int | None = None):
  """Random geometric + photometric augmentation of a batch and all of its landmark sets (Section 4.3).

  Args:
    rng: a JAX PRNG key; example ``i`` of the global batch draws with ``jax.random.split(rng, G)[i]``
      (``G = global_batch_size``). The split is partitionable (an example's key depends on its row only), so a
      row is augmented alike whether the batch sits on one device or is split over eight.
    images_uint8: uint8 [B, S, S, 3] stored face crops.
    landmark_sets: dict name -> [B, K, 2] in stored-crop pixels (ground truth, soft landmarks, teacher
      predictions...); all go through the same transform.
    reference: the key whose landmarks define the face box (the ground truth, as in the paper).
    out_size: side of the output (the model's input), 224 in the paper.
    flip_permutation: int [K] from ``flips.flip_permutation`` (may be None only if config.flip is off).
    config: an :class:`AugmentConfig`.
    kernels: an :class:`AugmentKernels` (the portable jax.numpy forms by default).
    point_masks: dict name -> [B, K] per-point flags (e.g. ``visible``: which points are annotated); a
      flipped example's flags are relabelled with the flip permutation like its landmarks, so that flag i
      stays with landmark i. Returned in the landmark dict under the same names.
    first_example: the global row of this block's first example (a device's offset in a sharded batch; may
      be traced).
    global_batch_size: rows of the global batch (None: this block is the whole batch).

  Returns:
    (images float32 [B, out, out, 3] in [0, 1], dict of the same keys with [B, K, 2] in normalised
    output coordinates (and the point masks, [B, K], their dtype kept), out_to_input float32 [B, 2, 3]
    mapping output pixels to stored-crop pixels).
  """
  batch_size = _validate(images_uint8, landmark_sets, point_masks or {}, reference, flip_permutation, config.flip)
  batch_noise = config.noise and kernels.batch_noise is not None
  warp = kernels.warp or _warp_portable
  perm = None
  if config.flip:
    perm = jnp.asarray(np.asarray(flip_permutation), dtype=jnp.int32)

  def one_example(key, image, sets, masks):
    box_key, shift_key, angle_key, flip_key, photo_key = jax.random.split(key, 5)
    centre, base_side = _landmark_box(sets[reference])
    if config.box_expansion:
      scale = 1.0 + jax.random.uniform(box_key, (), maxval=config.max_box_expansion)
    else:
      scale = EVAL_BOX_SCALE
    if config.shift:
      centre = centre + base_side * jax.random.uniform(shift_key, (2,), minval=-config.max_shift,
                                                       maxval=config.max_shift)
    angle = 0.0
    if config.rotation:
      max_angle = math.radians(config.max_rotation_degrees)
      angle = jax.random.uniform(angle_key, (), minval=-max_angle, maxval=max_angle)
    flip = jnp.bool_(False)
    if config.flip:
      flip = jax.random.bernoulli(flip_key, config.flip_probability)
    flip_sign = jnp.where(flip, -1.0, 1.0)
    out_to_input = _out_to_input_affine(centre, base_side * scale, angle, flip_sign, out_size)
    warped = warp(image, out_to_input, out_size, config.fill_mode, config.fill_value)
    warped = _photometric(photo_key, warped, config, noise=not batch_noise)
    new_sets = _transform_landmark_sets(sets, out_to_input, flip, perm, out_size)
    for name, mask in masks.items():
      new_sets[name] = _relabel(mask, flip, perm)
    return warped, new_sets, out_to_input.astype(jnp.float32)

  keys = jax.random.split(rng, global_batch_size or batch_size)
  if global_batch_size is not None:
    keys = lax.dynamic_slice_in_dim(keys, first_example, batch_size)
  sets = {key: jnp.asarray(value, dtype=jnp.float32) for key, value in landmark_sets.items()}
  masks = {key: jnp.asarray(value) for key, value in (point_masks or {}).items()}
  images, new_sets, out_to_input = jax.vmap(one_example)(keys, jnp.asarray(images_uint8), sets, masks)
  if batch_noise:
    # One draw for this block (the CPU kernels' batch noise): other blocks of the global batch fold in their
    # offset, so no two devices add the same noise.
    noise_rng = rng if global_batch_size is None else jax.random.fold_in(rng, first_example)
    images = _add_batch_noise(noise_rng, images, config, kernels.batch_noise)
  return images, new_sets, out_to_input


def preprocess_eval(images_uint8, landmark_sets: Mapping[str, jax.Array], *, reference="landmarks",
                    out_size=224, box_perturbation=None):
  """Deterministic evaluation crop: the landmark box scaled by EVAL_BOX_SCALE, no flip/rotation/jitter.

  Same arguments and outputs as :func:`augment` (without rng and randomness). ``box_perturbation``
  ``(shift_x, shift_y, scale)`` moves that crop box's centre by ``shift`` times its side and scales its side
  by ``scale`` (the same for every image; ``(0, 0, 1)`` is the evaluation crop): the box-robustness table.
  """
  _validate(images_uint8, landmark_sets, {}, reference, None, False)
  perturbation = jnp.asarray((0.0, 0.0, 1.0) if box_perturbation is None else box_perturbation, jnp.float32)

  def one_example(image, sets):
    centre, base_side = _landmark_box(sets[reference])
    side = base_side * EVAL_BOX_SCALE
    centre = centre + perturbation[:2] * side
    out_to_input = _out_to_input_affine(centre, side * perturbation[2], 0.0, 1.0, out_size)
    warped = warp_image(image, out_to_input, out_size)
    new_sets = _transform_landmark_sets(sets, out_to_input, False, None, out_size)
    return warped, new_sets, out_to_input.astype(jnp.float32)

  sets = {key: jnp.asarray(value, dtype=jnp.float32) for key, value in landmark_sets.items()}
  return jax.vmap(one_example)(jnp.asarray(images_uint8), sets)


def _validate(images, landmark_sets, point_masks, reference, flip_permutation, flip_enabled):
  """Shape checks (static under jit); returns the batch size."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"augment: images must be [B, S, S, 3], got shape {tuple(images.shape)}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"augment: images must be uint8 stored crops, got {images.dtype}; pass the "
                     "'image' field of the dataset unchanged")
  if not landmark_sets:
    raise ValueError("augment: landmark_sets is empty; pass at least {'landmarks': [B, K, 2]}")
  if reference not in landmark_sets:
    raise ValueError(f"augment: reference={reference!r} is not among the landmark sets "
                     f"{sorted(landmark_sets)}")
  batch_size = images.shape[0]
  num_landmarks = landmark_sets[reference].shape[-2]
  for key, points in landmark_sets.items():
    if points.shape != (batch_size, num_landmarks, 2):
      raise ValueError(f"augment: landmark set {key!r} has shape {tuple(points.shape)}; expected "
                       f"({batch_size}, {num_landmarks}, 2) like images and {reference!r}")
  for name, mask in point_masks.items():
    if np.shape(mask) != (batch_size, num_landmarks):
      raise ValueError(f"augment: point mask {name!r} has shape {tuple(np.shape(mask))}; expected "
                       f"({batch_size}, {num_landmarks}), one flag per landmark")
  if flip_enabled:
    if flip_permutation is None:
      raise ValueError("augment: config.flip is on but flip_permutation is None; pass "
                       "flips.flip_permutation(dataset) or use AugmentConfig(flip=False)")
    if np.shape(flip_permutation) != (num_landmarks,):
      raise ValueError(f"augment: flip_permutation has shape {np.shape(flip_permutation)}, landmarks "
                       f"have K={num_landmarks}; use flips.flip_permutation({num_landmarks})")
  return batch_size
