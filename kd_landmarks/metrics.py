"""Evaluation metrics of Section 4.2: NME, failure rate, AUC and the CED curve (numpy, pixels).

Conventions:
  * ``nme`` returns, per image, the mean over the K landmarks of the Euclidean error divided by the
    normalising distance of the *ground truth*, as a fraction (multiply by 100 for the paper's %).
    ``'inter_ocular'`` (the paper's default, Section 4.2): distance between the outer eye corners.
    ``'inter_pupil'`` (300W Table 3, lower half): distance between the pupil centres, each the mean of
    the dataset's pupil landmarks (the six eye-contour points of each eye in the 68-point scheme).
    ``'box'`` (a custom set's choice where no two points fit; COFW-68 and Menpo protocols): ``sqrt(w h)`` of
    the face box (x0, y0, x1, y1): the annotated one, else the bounding box of the visible ground truth.
    Indices and each dataset's default normaliser come from :func:`kd_landmarks.datasets.info.get_info`.
  * ``visible`` ``[..., K]`` (a custom set's annotated points): the mean runs over the visible points only,
    ``sum(v e) / sum(v)``; missing points count nowhere. Omitted: every point is visible.
  * A failure is an image with NME > threshold (0.1 in the paper); NME == threshold is a success.
  * The CED curve is ``y(x) = fraction of images with NME <= x``, sampled at ``x = 0, step, ..., threshold``.
  * AUC is the area under the CED curve on [0, threshold] by Simpson's rule, divided by the threshold,
    with step 1e-4: the convention of PIPNet (Jin et al. 2021) and STAR (Zhou et al. 2023) code, so our
    numbers compare with theirs. (Exactly, this area is ``mean(max(0, 1 - NME / threshold))``; the
    sampled Simpson value differs from it by O(step / threshold).)
"""
from __future__ import annotations

import numpy as np
from scipy import integrate

from kd_landmarks.datasets.info import INTER_PUPIL_DATASETS, WFLW_ATTRIBUTE_SPLITS, get_info

NORMALIZATIONS = ("inter_ocular", "inter_pupil", "box")
# Where the evaluation writes a model's metrics (MODEL_DIR/eval/metrics.json: {split: split_metrics(...)}),
# and metrics.json's one entry that is not a split: how the evaluated checkpoint was chosen.
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
SELECTION_KEY = "selection"
# Each model directory's validation NME per step, written by training after every validation and read by the
# report: [{"step": s, "val_nme": v}, ...] in step order.
VALIDATION_CURVE_FILE = "validation_curve.json"
# MODEL_DIR/eval/box_robustness.json: the NME with the evaluation crop's box shifted and scaled.
BOX_ROBUSTNESS_FILE = "box_robustness.json"
# The percentiles of the per-image NME the report prints beside the mean.
NME_PERCENTILES = (50, 90, 95, 99)


def default_normalization(dataset) -> str:
  """The normaliser a dataset's NME uses: inter-ocular for the built-in sets, a custom set's own choice."""
  return get_info(dataset).normalization


def normalization_text(dataset) -> str:
  """What the dataset's NME is divided by, in words (the report prints it)."""
  info = get_info(dataset)
  return scheme_normalization_text(info.normalization, info.outer_eye_corners if info.name == "custom" else None)


def scheme_normalization_text(normalization: str, normalizing_points=None) -> str:
  """:func:`normalization_text` from a scheme's fields (model.json's ``scheme``, which the model card reads
  without the dataset): ``normalizing_points`` are a custom set's own two points (None: the eye corners)."""
  if normalization == "box":
    return "the face box's sqrt(width x height) (the annotated box, else the visible points' bounding box)"
  if normalizing_points:
    return f"the distance between points {normalizing_points[0]} and {normalizing_points[1]}"
  return "the inter-ocular distance (outer eye corners)"


def normalizing_distance(gt, *, dataset, normalization=None, visible=None, face_box=None):
  """Per-image normalising distance (pixels) of ground truth ``[..., K, 2]``; shape ``[...]``.

  ``normalization`` None: the dataset's (:func:`default_normalization`). ``visible`` and ``face_box`` (x0,
  y0, x1, y1 ``[..., 4]``) serve the ``'box'`` normaliser."""
  normalization = normalization or default_normalization(dataset)
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization: {normalization!r}; choose from {list(NORMALIZATIONS)}")
  info = get_info(dataset)
  gt = np.asarray(gt, dtype=np.float64)
  if gt.ndim < 2 or gt.shape[-1] != 2 or gt.shape[-2] != info.num_landmarks:
    raise ValueError(
        f"landmarks must be [..., {info.num_landmarks}, 2] for dataset {info.name!r}, got shape {gt.shape}")
  if normalization == "box":
    box = landmark_box(gt, visible) if face_box is None else np.asarray(face_box, dtype=np.float64)
    return np.sqrt((box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1]))
  if normalization == "inter_ocular" and info.outer_eye_corners is None:
    raise ValueError(f"dataset {info.label or info.name!r} names no two normalising points; use 'box'")
  if normalization == "inter_pupil" and info.pupils is None:
    raise ValueError(f"dataset {info.label or info.name!r} names no pupils; inter-pupil NME is not defined")
  if normalization == "inter_ocular":
    right, left = info.outer_eye_corners
    right_point, left_point = gt[..., right, :], gt[..., left, :]
  else:
    right_ids, left_ids = info.pupils
    right_point = gt[..., list(right_ids), :].mean(axis=-2)
    left_point = gt[..., list(left_ids), :].mean(axis=-2)
  return np.linalg.norm(right_point - left_point, axis=-1)


def landmark_box(points, visible=None) -> np.ndarray:
  """The bounding box (x0, y0, x1, y1) ``[..., 4]`` of ``points`` ``[..., K, 2]`` over the visible ones."""
  points = np.asarray(points, dtype=np.float64)
  mask = np.ones(points.shape[:-1], bool) if visible is None else np.asarray(visible, bool)
  low = np.where(mask[..., None], points, np.inf).min(axis=-2)
  high = np.where(mask[..., None], points, -np.inf).max(axis=-2)
  return np.concatenate([low, high], axis=-1)


def nme(pred, gt, *, dataset, normalization=None, visible=None, face_box=None):
  """Normalised mean error per image (a fraction; see the module docstring).

  Args:
    pred, gt: ``[..., K, 2]`` landmarks in pixels (the same frame, e.g. the original image).
    dataset: ``'300w'``, ``'cofw'``, ``'wflw'``, ``'synthetic'`` or a registered ``'custom'`` (selects the
      eye indices and the default normaliser).
    normalization: ``'inter_ocular'``, ``'inter_pupil'``, ``'box'``; None: the dataset's default.
    visible: ``[..., K]`` bool, the annotated points (default: all); the mean runs over these.
    face_box: ``[..., 4]`` (x0, y0, x1, y1) for ``'box'`` (default: the visible ground truth's box).

  Returns:
    ``[...]`` NME of each image.
  """
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  if pred.shape != gt.shape:
    raise ValueError(f"nme: pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
  for name, array in (("pred", pred), ("gt", gt)):
    if not np.all(np.isfinite(array)):
      bad = np.argwhere(~np.isfinite(array))[0].tolist()
      raise ValueError(f"nme: {name} holds NaN/inf (first at index {bad}); every landmark needs a value.")
  distance = normalizing_distance(gt, dataset=dataset, normalization=normalization, visible=visible,
                                  face_box=face_box)
  if np.any(distance <= 0):
    bad = np.argwhere(np.atleast_1d(distance) <= 0)[0].tolist()
    raise ValueError(
        f"nme: image {bad} has a zero {normalization or default_normalization(dataset)} distance (its "
        "normalising landmarks coincide); check that the ground truth uses this dataset's landmark order.")
  point_errors = np.linalg.norm(pred - gt, axis=-1)
  if visible is None:
    return point_errors.mean(axis=-1) / distance
  visible = np.broadcast_to(np.asarray(visible, bool), point_errors.shape)
  if np.any(visible.sum(axis=-1) == 0):
    raise ValueError("nme: an image has no visible point; its error is undefined")
  return (point_errors * visible).sum(axis=-1) / visible.sum(axis=-1) / distance


def _check_nmes(nmes, threshold, step):
  nmes = np.asarray(nmes, dtype=np.float64).reshape(-1)
  if nmes.size == 0:
    raise ValueError("need at least one NME value")
  if not np.all(np.isfinite(nmes)) or np.any(nmes < 0):
    raise ValueError("NME values must be finite and >= 0")
  if not threshold > 0 or not 0 < step <= threshold:
    raise ValueError(f"need threshold > 0 and 0 < step <= threshold, got threshold={threshold}, step={step}")
  return nmes


# A face fails when its NME exceeds this (Section 4.2: FR and AUC at 0.1).
FAILURE_THRESHOLD = 0.1


def ced_curve(nmes, *, threshold=FAILURE_THRESHOLD, step=1e-4):
  """Cumulative error distribution: ``x = 0, step, ..., threshold`` and ``y = mean(nmes <= x)``."""
  nmes = _check_nmes(nmes, threshold, step)
  num_steps = int(round(threshold / step))
  # linspace, not arange(0, threshold + step, step): arange can overshoot by a float-rounding sample.
  xs = np.linspace(0.0, threshold, num_steps + 1)
  ys = np.searchsorted(np.sort(nmes), xs, side="right") / nmes.size
  return xs, ys


def failure_rate_and_auc(nmes, *, threshold=FAILURE_THRESHOLD, step=1e-4):
  """(FR, AUC): fraction of images with NME > threshold, and the CED area (Simpson) / threshold."""
  nmes = _check_nmes(nmes, threshold, step)
  xs, ys = ced_curve(nmes, threshold=threshold, step=step)
  failure_rate = float(np.mean(nmes > threshold))
  auc = float(integrate.simpson(ys, x=xs) / threshold)
  return failure_rate, auc


# ----------------------------------------------------------------------------------------------------
# A split's summary, as the evaluation writes it and the report reads it.


# What the NME reads besides pred and gt where the data has it (a custom set): the annotated points [N, K] and
# the face box [N, 4] (x0, y0, x1, y1).
NME_FIELDS = ("visible", "face_box")


def nme_fields(arrays) -> dict:
  """The :data:`NME_FIELDS` present in ``arrays`` (a prediction result, an eval npz, a batch), as keywords of
  :func:`image_nmes`, :func:`split_metrics` and :func:`nme`."""
  return {key: np.asarray(arrays[key]) for key in NME_FIELDS if key in arrays}


def image_nmes(pred, gt, *, dataset: str, visible=None, face_box=None) -> np.ndarray:
  """Per-image NME [N] (fractions) with the dataset's normaliser (inter-ocular for the built-in sets), over
  the visible points: what every metric of a split summarises."""
  return np.asarray(nme(pred, gt, dataset=dataset, visible=visible, face_box=face_box), dtype=np.float64)


def split_metrics(pred, gt, *, dataset: str, nmes=None, visible=None, face_box=None) -> dict:
  """NME (the dataset's normaliser; plus inter-pupil for 300W-style data), FR@0.1 and AUC@0.1 of one split.

  ``nmes``: ``image_nmes(pred, gt, dataset=dataset, ...)`` when the caller already has them.
  """
  if nmes is None:
    nmes = image_nmes(pred, gt, dataset=dataset, visible=visible, face_box=face_box)
  nmes = np.asarray(nmes, dtype=np.float64)
  failure_rate, auc = failure_rate_and_auc(nmes, threshold=FAILURE_THRESHOLD)
  result = {"nme": float(np.mean(nmes)), "fr": float(failure_rate), "auc": float(auc), "count": int(len(nmes))}
  if dataset in INTER_PUPIL_DATASETS:
    result["nme_inter_pupil"] = float(np.mean(nme(pred, gt, dataset=dataset,
                                                          normalization="inter_pupil")))
  return result


def attribute_subsets(attributes, *, dataset: str, split: str) -> dict[str, np.ndarray]:
  """Rows of each WFLW attribute subset (Table 4) in the ``test`` split: {"test_<attribute>": rows}.

  Empty for any other dataset or split, or without ``attributes`` [N, 6]. A face is in a subset when its
  flag is set (non-zero, the reader's rule for the subsets it stores as their own splits); subsets
  without a face are left out rather than reported as NaN.
  """
  if dataset != "wflw" or split != "test" or attributes is None:
    return {}
  attributes = np.asarray(attributes)
  subsets = {}
  for column, subset in enumerate(WFLW_ATTRIBUTE_SPLITS):
    rows = np.flatnonzero(attributes[:, column] != 0)
    if rows.size:
      subsets[subset] = rows
  return subsets


def nme_percentiles(nmes) -> dict[str, float]:
  """``{'p50': ..., 'p90': ..., 'p95': ..., 'p99': ...}`` of per-image NMEs (numpy's linear interpolation
  between order statistics)."""
  nmes = np.asarray(nmes, dtype=np.float64).reshape(-1)
  if nmes.size == 0:
    raise ValueError("need at least one NME value")
  return {f"p{q}": float(v) for q, v in zip(NME_PERCENTILES, np.percentile(nmes, NME_PERCENTILES))}
