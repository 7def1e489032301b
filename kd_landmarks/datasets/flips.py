"""Horizontal-flip landmark permutations for the iBUG 68, COFW 29 and WFLW 98 point layouts.

Mirroring an image turns the subject's right eye into the left one, so after ``x -> -x`` the landmark
labels must be swapped too (paper, Section 4.3: "flip horizontally with the probability of 50%").
``perm = flip_permutation(K)`` is defined so that, after the flip, landmark ``i`` takes the mirrored
point that was stored at ``perm[i]``:  ``flipped[i] = mirror(points[perm[i]])``.

Each table below is written as left/right *pairs* read off the published layout; every index not in a
pair lies on the face's vertical midline and maps to itself. The permutation is therefore an
involution (``perm[perm] == arange(K)``), which the tests check along with the real-shape symmetry.
Indices are 0-based.

A custom set (``info.CUSTOM``) brings its own pairs, given in its description or derived by
:func:`derive_flip_pairs` from the mirror symmetry of its mean shape.
"""
from __future__ import annotations

import numpy as np

from kd_landmarks.datasets import info as info_lib


def _ibug68_pairs() -> list[tuple[int, int]]:
  """iBUG / 300W 68 points (Sagonas et al. 2013): 0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes,
  48-67 mouth. Point 0 is on the image's left (subject's right) side."""
  pairs = []
  # Jaw 0..16 runs from one ear to the other through the chin (8).
  pairs += [(i, 16 - i) for i in range(8)]
  # Brows: 17..21 (subject's right, outer -> inner) mirror 26..22 (left, outer -> inner).
  pairs += [(17 + i, 26 - i) for i in range(5)]
  # Nose: bridge 27-30 and the tip 33 are central; nostrils 31, 32 | 34, 35.
  pairs += [(31, 35), (32, 34)]
  # Eyes: right eye 36 (outer corner), 37, 38 (upper lid), 39 (inner corner), 40, 41 (lower lid);
  # left eye 42 (inner corner), 43, 44 (upper lid), 45 (outer corner), 46, 47 (lower lid).
  pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
  # Outer lip: 48 (corner) .. 51 (top centre) .. 54 (corner) .. 57 (bottom centre) .. 59.
  pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]
  # Inner lip: 60 (corner), 61, 62 (top centre), 63, 64 (corner), 65, 66 (bottom centre), 67.
  pairs += [(60, 64), (61, 63), (65, 67)]
  return pairs


def _cofw29_pairs() -> list[tuple[int, int]]:
  """COFW 29 points (Burgos-Artizzu et al. 2013, the LFPW 29-point scheme). Points come in
  right/left pairs ordered (subject's right, subject's left); the nose tip (20), the point under the
  nose (21), the four lip-centre points (24-27) and the chin (28) are central."""
  return [
      (0, 1),    # brow outer ends
      (2, 3),    # brow inner ends
      (4, 6),    # brow upper middles
      (5, 7),    # brow lower middles
      (8, 9),    # eye outer corners (info.outer_eye_corners)
      (10, 11),  # eye inner corners
      (12, 14),  # upper eyelid middles
      (13, 15),  # lower eyelid middles
      (16, 17),  # pupils (info.pupils)
      (18, 19),  # nose wings
      (22, 23),  # mouth corners
  ]


def _wflw98_pairs() -> list[tuple[int, int]]:
  """WFLW 98 points (Wu et al. 2018): 0-32 contour, 33-50 brows, 51-59 nose, 60-75 eyes,
  76-95 mouth, 96-97 pupils."""
  pairs = []
  # Contour 0..32 through the chin (16).
  pairs += [(i, 32 - i) for i in range(16)]
  # Brows: right upper 33 (outer) .. 37 (inner), right lower 38 (inner) .. 41 (outer);
  # left upper 42 (inner) .. 46 (outer), left lower 47 (outer) .. 50 (inner).
  pairs += [(33 + i, 46 - i) for i in range(5)]
  pairs += [(38 + i, 50 - i) for i in range(4)]
  # Nose: bridge 51-54 and 57 are central; nostrils 55, 56 | 58, 59.
  pairs += [(55, 59), (56, 58)]
  # Eyes: right 60 (outer corner), 61-63 (upper lid), 64 (inner corner), 65-67 (lower lid);
  # left 68 (inner corner), 69-71 (upper lid), 72 (outer corner), 73-75 (lower lid).
  pairs += [(60 + i, 72 - i) for i in range(5)]  # 60-72, 61-71, 62-70, 63-69, 64-68
  pairs += [(65, 75), (66, 74), (67, 73)]
  # Outer lip: 76 (corner) .. 79 (top centre) .. 82 (corner) .. 85 (bottom centre) .. 87.
  pairs += [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86)]
  # Inner lip: 88 (corner), 89, 90 (top centre), 91, 92 (corner), 93, 94 (bottom centre), 95.
  pairs += [(88, 92), (89, 91), (93, 95)]
  pairs += [(96, 97)]  # pupils
  return pairs


_PAIRS_BY_NUM_LANDMARKS = {68: _ibug68_pairs, 29: _cofw29_pairs, 98: _wflw98_pairs}


def _permutation_from_pairs(num_landmarks: int, pairs: list[tuple[int, int]]) -> np.ndarray:
  perm = np.arange(num_landmarks)
  seen = set()
  for a, b in pairs:
    if a in seen or b in seen or a == b:
      raise AssertionError(f"flip table for {num_landmarks} points lists index {a} or {b} twice")
    seen.update((a, b))
    perm[a], perm[b] = b, a
  return perm


def flip_permutation(dataset_or_num_landmarks) -> np.ndarray:
  """The horizontal-flip permutation ``perm[K]``: after mirroring, landmark ``i`` is old ``perm[i]``.

  Args:
    dataset_or_num_landmarks: a dataset name known to :func:`info.get_info` (``'300w'``, ``'cofw'``,
      ``'wflw'``, ``'synthetic'``, a registered ``'custom'``) or a landmark count (68, 29 or 98).

  Returns:
    int32 array of length K; an involution.
  """
  if isinstance(dataset_or_num_landmarks, str):
    dataset_info = info_lib.get_info(dataset_or_num_landmarks)
    if dataset_info.flip_pairs is not None:
      return _permutation_from_pairs(dataset_info.num_landmarks, list(dataset_info.flip_pairs)).astype(np.int32)
    num_landmarks = dataset_info.num_landmarks
  else:
    num_landmarks = int(dataset_or_num_landmarks)
  try:
    pairs = _PAIRS_BY_NUM_LANDMARKS[num_landmarks]()
  except KeyError:
    raise ValueError(
        f"no flip permutation for {num_landmarks} landmarks; known layouts: "
        f"{sorted(_PAIRS_BY_NUM_LANDMARKS)} (iBUG 68, COFW 29, WFLW 98). Disable flipping "
        "(AugmentConfig(flip=False)) or add the layout's left/right pairs to kd_landmarks/datasets/flips.py"
    ) from None
  return _permutation_from_pairs(num_landmarks, pairs).astype(np.int32)


def derive_flip_pairs(mean_shape) -> tuple[tuple[int, int], ...]:
  """Left/right pairs read off the mirror symmetry of a mean shape ``[K, 2]`` (x to the right, upright face).

  For a vertical mirror line ``x = x0`` each point is paired with the point nearest to its mirror image, a
  point nearest to its own mirror image staying on the midline: pairs are taken greedily by the symmetric
  cost ``c(i, j) = |mirror(p_i) - p_j|^2 + |mirror(p_j) - p_i|^2``, cheapest first, each point once, so the
  result is an involution by construction. The line is the one whose pairing costs least in total, searched
  over the points' x range (a scheme with more points on one side than the other would bias the mean x).

  Returns:
    the pairs ``(a, b)`` with ``a < b``, sorted; every index not in a pair lies on the midline.
  """
  points = np.asarray(mean_shape, dtype=np.float64)
  if points.ndim != 2 or points.shape[1] != 2 or not np.all(np.isfinite(points)):
    raise ValueError(f"derive_flip_pairs: mean_shape must be finite [K, 2], got shape {points.shape}")
  low, high = points[:, 0].min(), points[:, 0].max()
  best = None
  for axis in np.linspace(low, high, _AXIS_CANDIDATES):
    total, pairs = _mirror_pairs(points, float(axis))
    if best is None or total < best[0] - 1e-12:
      best = (total, pairs)
  return best[1]


# Candidate mirror lines across the shape's width: 1/400 of the width apart.
_AXIS_CANDIDATES = 401


def _mirror_pairs(points: np.ndarray, axis: float) -> tuple[float, tuple[tuple[int, int], ...]]:
  """(total cost, pairs) of the greedy pairing about the line ``x = axis``."""
  mirrored = points.copy()
  mirrored[:, 0] = 2.0 * axis - points[:, 0]
  # cost[i, j]: how far p_j lies from p_i's mirror image; symmetrised so that (i, j) and (j, i) cost the same.
  cost = np.square(mirrored[:, None, :] - points[None, :, :]).sum(-1)
  cost = cost + cost.T
  rows, cols = np.triu_indices(len(points))
  order = np.lexsort((cols, rows, cost[rows, cols]))  # cheapest first; ties by index (deterministic)
  taken = np.zeros(len(points), bool)
  pairs = []
  total = 0.0
  for i, j in zip(rows[order], cols[order]):
    if taken[i] or taken[j]:
      continue
    taken[i] = taken[j] = True
    # A self-pair costs 2 |mirror(p_i) - p_i|^2; a pair counts once for each of its two points.
    total += cost[i, j] * (1 if i == j else 2) / 2
    if i != j:
      pairs.append((int(i), int(j)))
    if taken.all():  # Every point placed: the rest of the K (K + 1) / 2 candidates are all skipped.
      break
  return total, tuple(sorted(pairs))
