"""The one place where landmark coordinates change units.

Conventions (used everywhere in kd_landmarks):
  * Landmarks are arrays ``[..., K, 2]`` holding (x, y).
  * Pixel coordinates are 0-based with pixel *centres* on integers: the centre of the top-left pixel is
    (0, 0) and an image of width W spans x in [-0.5, W - 0.5]. (300W ``.pts`` files are 1-based: subtract 1.)
  * Normalised coordinates are zero-centred (paper, Section 3.3): the image extent maps to [-0.5, 0.5],
    so ``x_norm = (x_px + 0.5) / W - 0.5``. A horizontal flip is then exactly ``x_norm -> -x_norm``.
  * Affine transforms are ``[..., 2, 3]`` matrices ``A`` mapping a point p (pixels) to ``A[:, :2] @ p + A[:, 2]``.

Functions work on numpy and jax arrays alike (they only use operators and ``.shape``).
"""
from __future__ import annotations

import numpy as np


def to_normalized(points_px, image_size):
  """Pixels -> zero-centred normalised coordinates. ``image_size`` is a scalar (square) or (width, height)."""
  width, height = _wh(image_size)
  scale = np.array([width, height], dtype=np.float32)
  return (points_px + 0.5) / scale - 0.5


def to_pixels(points_norm, image_size):
  """Zero-centred normalised coordinates -> pixels (inverse of :func:`to_normalized`)."""
  width, height = _wh(image_size)
  scale = np.array([width, height], dtype=np.float32)
  return (points_norm + 0.5) * scale - 0.5


def apply_affine(affine, points):
  """Applies ``[..., 2, 3]`` affine(s) to points ``[..., K, 2]``."""
  # Written out element by element rather than as a matmul: on GPUs/TPUs a float32 matmul runs at reduced
  # precision by default, which moved points by ~0.2 px at 320 px (measured on an H200).
  x = points[..., 0]
  y = points[..., 1]
  a = affine[..., None, :, :]
  new_x = a[..., 0, 0] * x + a[..., 0, 1] * y + a[..., 0, 2]
  new_y = a[..., 1, 0] * x + a[..., 1, 1] * y + a[..., 1, 2]
  stack = np.stack if isinstance(points, np.ndarray) else _jnp_stack
  return stack([new_x, new_y], axis=-1)


def invert_affine(affine):
  """Inverse of a numpy ``[..., 2, 3]`` affine."""
  affine = np.asarray(affine, dtype=np.float64)
  linear_inv = np.linalg.inv(affine[..., :2])
  offset = -(linear_inv @ affine[..., 2:3])
  return np.concatenate([linear_inv, offset], axis=-1)


def compose_affine(outer, inner):
  """Returns the affine of ``outer(inner(p))`` for numpy ``[..., 2, 3]`` affines."""
  outer = np.asarray(outer, dtype=np.float64)
  inner = np.asarray(inner, dtype=np.float64)
  linear = outer[..., :2] @ inner[..., :2]
  offset = outer[..., :2] @ inner[..., 2:3] + outer[..., 2:3]
  return np.concatenate([linear, offset], axis=-1)


def square_box_from_landmarks(points_px, *, scale=1.0):
  """The face box of Section 4.3: a square around the landmarks' bounding box, side ``scale * max(w, h)``.

  Returns ``[..., 3]`` = (centre_x, centre_y, side) in the points' pixel frame.
  """
  points_px = np.asarray(points_px, dtype=np.float64)
  lo = points_px.min(axis=-2)
  hi = points_px.max(axis=-2)
  centre = (lo + hi) / 2.0
  side = scale * (hi - lo).max(axis=-1)
  return np.concatenate([centre, side[..., None]], axis=-1)


def crop_affine(box, out_size):
  """Affine mapping *crop* pixels of an ``out_size`` square crop to the pixels of the image the ``box``
  (centre_x, centre_y, side) lives in. Its inverse maps image pixels into the crop."""
  box = np.asarray(box, dtype=np.float64)
  cx, cy, side = box[..., 0], box[..., 1], box[..., 2]
  s = side / out_size
  zeros = np.zeros_like(s)
  # The crop's extent [-0.5, out_size - 0.5] maps onto the box's extent [cx - side/2, cx + side/2].
  tx = cx - side / 2.0 + 0.5 * s
  ty = cy - side / 2.0 + 0.5 * s
  row0 = np.stack([s, zeros, tx], axis=-1)
  row1 = np.stack([zeros, s, ty], axis=-1)
  return np.stack([row0, row1], axis=-2)


def _jnp_stack(arrays, axis):
  # Measured start-up cost: jax takes 1.5 s to import (2-core Xeon); `prepare` and the readers use this
  # module on numpy arrays only and never pay it.
  import jax.numpy as jnp
  return jnp.stack(arrays, axis=axis)


def _wh(image_size):
  if np.ndim(image_size) == 0:
    return float(image_size), float(image_size)
  width, height = image_size
  return float(width), float(height)
