"""The ASM shape model and the Soft-landmarks of Section 3.1 (Eqs. 1-3).

A face shape is flattened as ``f = (x0, y0, x1, y1, ..., x_{K-1}, y_{K-1})`` (length 2K), i.e.
``landmarks.reshape(..., 2 * K)`` of a ``[..., K, 2]`` array. The shape model holds the mean shape
``f_bar``, the eigenvectors ``V`` of the covariance of the training shapes (columns, sorted by
decreasing eigenvalue) and the eigenvalues ``lambda_i`` (variances of the parameters ``b_i``):

  Eq. 1:  f ~= f_bar + V b
  Eq. 2:  b = V^T (f - f_bar)
  Eq. 3:  f_new = f_bar + V_m b~,   b~_i = clip(b_i, -3 sqrt(lambda_i), +3 sqrt(lambda_i))

where only the first ``m~`` eigenvectors are used. Two readings of "90%":

* ``keep_mode='variance'`` (the default): the components that explain 90% of the variance, as the
  authors' public code does (``sklearn.decomposition.PCA(n_components=0.9)``). On 3,462 real 68-point
  shapes in the builder's crop frame this keeps 3 of 136 components and moves the shapes by 5.7%
  inter-ocular NME: the visibly smoothed Soft-landmarks of the paper's Figs. 1-3.
* ``keep_mode='eigenvectors'``: 90% of *all* the eigenvectors, the paper text's literal wording. The same
  shapes keep 122 of 136 components holding 99.94% of the variance and move by only 0.55% NME, so the
  Tolerant teacher would learn almost the ground truth (docs/method.md, "Soft-landmarks").

This runs once at dataset-preparation time, so it is plain numpy in float64.

**Missing points** (a custom set may leave some points of a face unannotated). The shape model needs complete
shapes, so a missing point is *filled from the model* and the fill refined iteratively, an EM-style PCA with
missing data (:func:`fit_shape_model_with_missing`): each incomplete shape is explained by the model through
its visible points alone (:func:`reconstruct_missing`: a scale, a translation and the kept shape parameters,
fitted by least squares), its missing points are set to that explanation, the model is refitted on the filled
shapes, and so on until the fills stop moving. Fitting on complete shapes only would be simpler but biases the
mean (faces with a point hidden are often the turned or occluded ones) and fails when every face misses a
point; the fill uses every visible coordinate and no missing one. Filled points only complete the shapes
(the stored crop box, the soft landmarks); their visibility flags keep them out of every loss and metric.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from kd_landmarks import errors

KEEP_MODES = ("variance", "eigenvectors")
# A shape with missing points is placed by a scale and a translation (3 unknowns) from its visible points.
MIN_VISIBLE_POINTS = 3
DEFAULT_KEEP_MODE = "variance"  # The authors' code; see the module docstring and docs/method.md.
DEFAULT_KEEP = 0.9  # Section 3.1: "we choose the parameter m~ as 90%".


def soft_landmark_options(options=None, *, default_keep: float = DEFAULT_KEEP) -> dict:
  """``{"keep", "keep_mode"}`` of the stored Soft-landmarks: ``default_keep`` (a dataset's own, e.g.) and the
  default mode updated by the values of ``options`` that are not None (the ``prepare`` flags,
  ``config.soft_landmarks``), checked; a bad value is one line naming it."""
  unknown = set(options or {}) - {"keep", "keep_mode"}
  if unknown:
    raise errors.ArgumentError(f"unknown soft-landmark options {sorted(unknown)}; choose from ['keep', 'keep_mode']")
  given = {key: value for key, value in (options or {}).items() if value is not None}
  merged = {"keep": default_keep, "keep_mode": DEFAULT_KEEP_MODE, **given}
  keep, keep_mode = merged["keep"], merged["keep_mode"]
  if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 <= float(keep) <= 1.0:
    raise errors.ArgumentError(f"keep={keep!r} is not a fraction in [0, 1] (the paper's m~ is 0.9)")
  if keep_mode not in KEEP_MODES:
    raise errors.ArgumentError(f"keep_mode={keep_mode!r}: choose from {list(KEEP_MODES)}")
  return {"keep": float(keep), "keep_mode": str(keep_mode)}


@dataclasses.dataclass(frozen=True, eq=False)
class ShapeModel:
  """A fitted point-distribution model (Section 3.1).

  Attributes:
    mean: ``[2K]`` mean shape ``f_bar``, flattened as x0, y0, x1, y1, ...
    eigenvectors: ``[2K, 2K]``; column ``i`` is ``v_i``; columns sorted by decreasing eigenvalue.
    eigenvalues: ``[2K]`` variances ``lambda_i`` of ``b_i`` (sample covariance, ``N - 1`` in the
      denominator, as ``sklearn.decomposition.PCA.explained_variance_``), decreasing, >= 0.
  """
  mean: np.ndarray
  eigenvectors: np.ndarray
  eigenvalues: np.ndarray

  @property
  def num_landmarks(self) -> int:
    return self.mean.shape[0] // 2

  @property
  def dimension(self) -> int:
    return self.mean.shape[0]


def fit_shape_model(landmarks) -> ShapeModel:
  """Fits the mean shape and the eigen-decomposition of the shape covariance (Eqs. 1-2).

  Args:
    landmarks: ``[N, K, 2]`` training shapes (any consistent unit, e.g. crop pixels), N >= 2.

  Returns:
    A :class:`ShapeModel`. Each eigenvector's sign is fixed so that its largest-magnitude component is
    positive, which makes the result deterministic (an eigenvector's sign is otherwise arbitrary).
  """
  shapes = np.asarray(landmarks, dtype=np.float64)
  if shapes.ndim != 3 or shapes.shape[-1] != 2:
    raise ValueError(
        f"fit_shape_model: landmarks must be [N, K, 2], got shape {shapes.shape}; "
        "stack the training shapes along a first axis.")
  num_shapes, num_landmarks, _ = shapes.shape
  if num_shapes < 2:
    raise ValueError(f"fit_shape_model: need at least 2 shapes to estimate a covariance, got {num_shapes}.")
  if not np.all(np.isfinite(shapes)):
    bad = sorted(set(np.argwhere(~np.isfinite(shapes))[:, 0].tolist()))
    raise ValueError(
        f"fit_shape_model: shapes {bad[:10]}{'...' if len(bad) > 10 else ''} (index along axis 0) hold "
        "NaN/inf coordinates; drop or fix them before fitting.")
  flat = shapes.reshape(num_shapes, 2 * num_landmarks)
  mean = flat.mean(axis=0)
  centred = flat - mean
  covariance = centred.T @ centred / (num_shapes - 1)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  order = np.argsort(eigenvalues)[::-1]
  eigenvalues = eigenvalues[order]
  eigenvectors = eigenvectors[:, order]
  # eigh may return tiny negative values for the null space of a rank-deficient covariance
  # (N - 1 < 2K); a variance cannot be negative, and sqrt(lambda) is taken below.
  eigenvalues = np.maximum(eigenvalues, 0.0)
  largest = np.argmax(np.abs(eigenvectors), axis=0)
  signs = np.sign(eigenvectors[largest, np.arange(eigenvectors.shape[1])])
  eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
  return ShapeModel(mean=mean, eigenvectors=eigenvectors, eigenvalues=eigenvalues)


def num_kept_components(model: ShapeModel, keep: float, keep_mode: str = DEFAULT_KEEP_MODE) -> int:
  """The number ``m~`` of eigenvectors that :func:`soft_landmarks` uses.

  ``keep_mode='eigenvectors'`` (the paper): ``floor(keep * 2K)`` eigenvectors (e.g. 122 of 136 for
  300W at keep=0.9). ``keep_mode='variance'`` (the authors' code, sklearn's convention): the smallest
  ``m`` whose cumulative explained-variance ratio is strictly greater than ``keep``. ``keep=0`` keeps
  none and ``keep=1`` keeps all in both modes.
  """
  if keep_mode not in KEEP_MODES:
    raise ValueError(f"unknown keep_mode: {keep_mode!r}; choose from {list(KEEP_MODES)}")
  keep = float(keep)
  if not 0.0 <= keep <= 1.0:
    raise ValueError(f"keep must be a fraction in [0, 1], got {keep}")
  dimension = model.dimension
  if keep == 0.0:
    return 0
  if keep == 1.0:
    return dimension
  if keep_mode == "eigenvectors":
    # The epsilon keeps e.g. 0.9 * 130 = 116.99999999999999 from flooring to 116.
    return int(np.floor(keep * dimension + 1e-9))
  total = model.eigenvalues.sum()
  if total <= 0.0:
    return 0  # All training shapes are identical: there is no variance to keep.
  ratio = np.cumsum(model.eigenvalues) / total
  return int(min(np.searchsorted(ratio, keep, side="right") + 1, dimension))


def soft_landmarks(landmarks, model: ShapeModel, *, keep=0.9, keep_mode=DEFAULT_KEEP_MODE, clip=3.0):
  """Soft-landmarks (Eqs. 2-3): project on the shape model, clip, rebuild from the kept eigenvectors.

  Args:
    landmarks: ``[..., K, 2]`` shapes in the unit the model was fitted in.
    model: from :func:`fit_shape_model`, with the same K.
    keep: fraction ``m~`` (see :func:`num_kept_components`); the paper uses 0.9.
    keep_mode: ``'variance'`` (default, the authors' code) or ``'eigenvectors'`` (the paper's wording).
    clip: each ``b_i`` is limited to ``+-clip * sqrt(lambda_i)`` (3 in the paper, after Cootes et al.);
      ``None`` disables the limit.

  Returns:
    ``[..., K, 2]`` soft landmarks, float64 (float32 if the input is float32).
  """
  points = np.asarray(landmarks)
  if points.ndim < 2 or points.shape[-1] != 2:
    raise ValueError(f"soft_landmarks: landmarks must be [..., K, 2], got shape {points.shape}")
  num_landmarks = points.shape[-2]
  if num_landmarks != model.num_landmarks:
    raise ValueError(
        f"soft_landmarks: landmarks have K={num_landmarks} points but the shape model was fitted on "
        f"K={model.num_landmarks}; fit a shape model on this dataset's training shapes.")
  if clip is not None and not clip >= 0:
    raise ValueError(f"soft_landmarks: clip must be >= 0 or None, got {clip}")
  flat = points.astype(np.float64).reshape(-1, 2 * num_landmarks)
  if not np.all(np.isfinite(flat)):
    bad = sorted(set(np.argwhere(~np.isfinite(flat))[:, 0].tolist()))
    raise ValueError(
        f"soft_landmarks: shapes {bad[:10]} (flattened leading index) hold NaN/inf coordinates; "
        "soft landmarks of a missing point are undefined, fix or drop those shapes.")
  num_kept = num_kept_components(model, keep, keep_mode)
  basis = model.eigenvectors[:, :num_kept]  # V_m, [2K, m]
  params = (flat - model.mean) @ basis  # Eq. 2, one row per shape.
  if clip is not None:
    limit = clip * np.sqrt(model.eigenvalues[:num_kept])
    params = np.clip(params, -limit, limit)
  rebuilt = model.mean + params @ basis.T  # Eq. 3
  out_dtype = np.float32 if points.dtype == np.float32 else np.float64
  return rebuilt.reshape(points.shape).astype(out_dtype)


def save_shape_model(path, model: ShapeModel) -> None:
  """Writes the model as an ``.npz`` (keys ``mean``, ``eigenvectors``, ``eigenvalues``) at exactly ``path``."""
  # Through a file object: np.savez would append ".npz" to a path without it, and load would miss it.
  with open(path, "wb") as stream:
    np.savez(stream, mean=model.mean, eigenvectors=model.eigenvectors, eigenvalues=model.eigenvalues)


def load_shape_model(path) -> ShapeModel:
  """Reads a model written by :func:`save_shape_model`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no shape model at {path}; fit one with kd_landmarks.shapes.fit_shape_model")
  with np.load(path) as data:
    return ShapeModel(mean=data["mean"], eigenvectors=data["eigenvectors"], eigenvalues=data["eigenvalues"])


def reconstruct_missing(landmarks, visible, model: ShapeModel, *, keep=0.9, keep_mode=DEFAULT_KEEP_MODE) -> np.ndarray:
  """Fills the missing points of each shape from the model, fitted to its visible points only.

  Per shape with visible set S the model is placed by a scale ``a`` and translation ``t`` and shaped by the
  kept parameters: ``p_k ~= a (f_bar_k + V_k b) + t`` for k in S. With ``z = a b`` this is linear in
  ``(a, t, z)`` and solved by least squares (Eq. 2 with the pose unknown); the missing points are
  ``a (f_bar + V_m b) + t``. The model's frame may differ from the shapes' by any scale and translation
  (e.g. crop-normalised model, original-pixel shapes). ``b`` is not clipped (Eq. 3's limit): with the pose
  free, ``b`` is not measured in the model frame's units, and the fill is the least-squares explanation of
  what was annotated; the soft landmarks later clip the completed shape as usual. At most ``|S| - 3``
  parameters are fitted, so that the equations outnumber the unknowns at least twice (at least 3 visible
  points are needed).

  Args:
    landmarks: ``[N, K, 2]``; missing entries may hold anything (NaN included).
    visible: ``[N, K]`` bool.
    model: a :class:`ShapeModel` with the same K.

  Returns:
    ``[N, K, 2]`` float64: visible points unchanged, missing ones filled.
  """
  points = np.asarray(landmarks, dtype=np.float64)
  visible = np.asarray(visible, dtype=bool)
  if points.ndim != 3 or points.shape[-1] != 2 or visible.shape != points.shape[:2]:
    raise ValueError(f"reconstruct_missing: landmarks [N, K, 2] and visible [N, K], got {points.shape} and "
                     f"{visible.shape}")
  num_landmarks = points.shape[1]
  if num_landmarks != model.num_landmarks:
    raise ValueError(f"reconstruct_missing: K={num_landmarks} points but the model has K={model.num_landmarks}")
  num_kept = num_kept_components(model, keep, keep_mode)
  mean = model.mean.reshape(num_landmarks, 2)
  basis = model.eigenvectors[:, :num_kept].reshape(num_landmarks, 2, num_kept)
  filled = points.copy()
  for row in np.flatnonzero(~visible.all(axis=1)):
    seen = np.flatnonzero(visible[row])
    if seen.size < MIN_VISIBLE_POINTS:
      raise ValueError(f"reconstruct_missing: shape {row} has {seen.size} visible point(s); at least "
                       f"{MIN_VISIBLE_POINTS} place it")
    components = min(num_kept, seen.size - 3)
    # Unknowns (a, t_x, t_y, z_1..z_m); rows x then y of each visible point.
    design = np.zeros((seen.size, 2, 3 + components))
    design[:, :, 0] = mean[seen]
    design[:, 0, 1] = 1.0
    design[:, 1, 2] = 1.0
    design[:, :, 3:] = basis[seen, :, :components]
    solution = np.linalg.lstsq(design.reshape(-1, 3 + components), points[row, seen].reshape(-1), rcond=None)[0]
    scale, translation, weighted = solution[0], solution[1:3], solution[3:]
    shape = scale * mean + basis[:, :, :components] @ weighted + translation  # a (f_bar + V b) + t
    missing = ~visible[row]
    filled[row, missing] = shape[missing]
  return filled


def fit_shape_model_with_missing(landmarks, visible, *, keep=0.9, keep_mode=DEFAULT_KEEP_MODE,
                                 max_iterations=200, tolerance=1e-7) -> tuple[ShapeModel, np.ndarray]:
  """Fits the shape model (Eqs. 1-2) on shapes with missing points, filling them from the model iteratively.

  Each shape is put in its own box frame (centre and side of its points' square box; the builder's
  normalised-crop frame up to one scale and offset shared by all shapes, which leaves the kept components
  and the fills unchanged). Start: the mean of each point over the shapes where it is visible, in the frame
  of the visible points' box, placed on each shape by :func:`reconstruct_missing` (no components yet). Then
  repeat: box-normalise the filled shapes, fit the model, refill the missing points from it with ``keep``
  components, until no fill moves by more than ``tolerance`` box sides (or ``max_iterations``).

  Args:
    landmarks: ``[N, K, 2]`` training shapes in one unit (e.g. original-image pixels), N >= 2.
    visible: ``[N, K]`` bool; every point must be visible in at least one shape and every shape must show
      at least :data:`MIN_VISIBLE_POINTS` points.

  Returns:
    ``(model, filled)``: the model in the box frame and the filled ``[N, K, 2]`` shapes in the input unit
    (visible points unchanged). Complete shapes give exactly ``fit_shape_model`` of their box-normalised
    form.
  """
  points = np.asarray(landmarks, dtype=np.float64)
  visible = np.asarray(visible, dtype=bool)
  if points.ndim != 3 or points.shape[-1] != 2 or visible.shape != points.shape[:2]:
    raise ValueError(f"fit_shape_model_with_missing: landmarks [N, K, 2] and visible [N, K], got "
                     f"{points.shape} and {visible.shape}")
  never = np.flatnonzero(~visible.any(axis=0))
  if never.size:
    raise ValueError(f"fit_shape_model_with_missing: points {never.tolist()} are missing in every shape; the "
                     "model cannot place them")
  if not np.all(np.isfinite(points[visible])):
    raise ValueError("fit_shape_model_with_missing: visible points hold NaN/inf coordinates")
  # Start: per-point mean over the shapes that show it, each in the frame of its visible points' box.
  centre, side = _box_frames(points, visible)
  in_box = (points - centre[:, None, :]) / side[:, None, None]
  counts = visible.sum(axis=0)
  start_mean = np.where(visible[..., None], in_box, 0.0).sum(axis=0) / counts[:, None]
  start = ShapeModel(mean=start_mean.reshape(-1), eigenvectors=np.eye(start_mean.size),
                     eigenvalues=np.zeros(start_mean.size))
  filled = reconstruct_missing(points, visible, start, keep=0.0)
  model = None
  for _ in range(max_iterations):
    centre, side = _box_frames(filled, np.ones_like(visible))
    model = fit_shape_model((filled - centre[:, None, :]) / side[:, None, None])
    refilled = reconstruct_missing(points, visible, model, keep=keep, keep_mode=keep_mode)
    change = np.abs(refilled - filled).max(axis=(1, 2)) / side
    filled = refilled
    if not change.size or change.max() <= tolerance:
      break
  centre, side = _box_frames(filled, np.ones_like(visible))
  model = fit_shape_model((filled - centre[:, None, :]) / side[:, None, None])
  return model, filled


def _box_frames(points: np.ndarray, visible: np.ndarray):
  """Centre ``[N, 2]`` and side ``[N]`` of each shape's square box over its visible points."""
  inf = np.where(visible[..., None], points, np.inf)
  low = inf.min(axis=1)
  high = np.where(visible[..., None], points, -np.inf).max(axis=1)
  side = (high - low).max(axis=1)
  if np.any(side <= 0):
    bad = np.flatnonzero(side <= 0)
    raise ValueError(f"shapes {bad[:10].tolist()} have all their visible points at one place (a zero-size box)")
  return (low + high) / 2.0, side
