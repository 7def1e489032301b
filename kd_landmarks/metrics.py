"""Evaluation metrics of Section 4.2: NME, failure rate, AUC and the CED curve (numpy, pixels).

Conventions:
  * ``nme`` returns, per image, the mean over the K landmarks of the Euclidean error divided by the
    normalising distance of the *ground truth*, as a fraction (multiply by 100 for the paper's %).
    ``'inter_ocular'`` (the paper's default, Section 4.2): distance between the outer eye corners.
    ``'inter_pupil'`` (300W Table 3, lower half): distance between the pupil centres, each the mean of
    the dataset's pupil landmarks (the six eye-contour points of each eye in the 68-point scheme).
    Indices come from :func:`kd_landmarks.datasets.info.get_info`.
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

NORMALIZATIONS = ("inter_ocular", "inter_pupil")
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


def normalizing_distance(gt, *, dataset, normalization="inter_ocular"):
  """Per-image normalising distance (pixels) of ground truth ``[..., K, 2]``; shape ``[...]``."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization: {normalization!r}; choose from {list(NORMALIZATIONS)}")
  info = get_info(dataset)
  gt = np.asarray(gt, dtype=np.float64)
  if gt.ndim < 2 or gt.shape[-1] != 2 or gt.shape[-2] != info.num_landmarks:
    raise ValueError(
        f"landmarks must be [..., {info.num_landmarks}, 2] for dataset {info.name!r}, got shape {gt.shape}")
  if normalization == "inter_ocular":
    right, left = info.outer_eye_corners
    right_point, left_point = gt[..., right, :], gt[..., left, :]
  else:
    right_ids, left_ids = info.pupils
    right_point = gt[..., list(right_ids), :].mean(axis=-2)
    left_point = gt[..., list(left_ids), :].mean(axis=-2)
  return np.linalg.norm(right_point - left_point, axis=-1)


def nme(pred, gt, *, dataset, normalization="inter_ocular"):
  """Normalised mean error per image (a fraction; see the module docstring).

  Args:
    pred, gt: ``[..., K, 2]`` landmarks in pixels (the same frame, e.g. the original image).
    dataset: ``'300w'``, ``'cofw'``, ``'wflw'`` or ``'synthetic'`` (selects the eye indices).
    normalization: ``'inter_ocular'`` or ``'inter_pupil'``.

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
  distance = normalizing_distance(gt, dataset=dataset, normalization=normalization)
  if np.any(distance <= 0):
    bad = np.argwhere(np.atleast_1d(distance) <= 0)[0].tolist()
    raise ValueError(
        f"nme: image {bad} has a zero {normalization} distance (its eye landmarks coincide); "
        "check that the ground truth uses this dataset's landmark order.")
  errors = np.linalg.norm(pred - gt, axis=-1).mean(axis=-1)
  return errors / distance


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


def image_nmes(pred, gt, *, dataset: str) -> np.ndarray:
  """Per-image inter-ocular NME [N] (fractions): what every metric of a split summarises."""
  return np.asarray(nme(pred, gt, dataset=dataset, normalization="inter_ocular"), dtype=np.float64)


def split_metrics(pred, gt, *, dataset: str, nmes=None) -> dict:
  """NME (inter-ocular; plus inter-pupil for 300W-style data), FR@0.1 and AUC@0.1 of one split.

  ``nmes``: ``image_nmes(pred, gt, dataset=dataset)`` when the caller already has them.
  """
  nmes = image_nmes(pred, gt, dataset=dataset) if nmes is None else np.asarray(nmes, dtype=np.float64)
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
