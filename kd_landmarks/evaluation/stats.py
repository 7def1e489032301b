"""Uncertainty over seeds and test faces: mean +- std over seeds and the paired bootstrap CI of the report.

A comparison of two student losses A and B on one test split uses the per-image NMEs of both, paired by
seed index (seed k of every loss starts from the same initialisation and batch order, ``pipeline.training_seed``)
and by image: ``D[s, i] = NME_A[s, i] - NME_B[s, i]``. Its mean over seeds and images estimates how much A
lowers the NME on these faces; the 95% interval is a two-level percentile bootstrap that resamples seeds
(with replacement, S of S) and, independently, images (N of N), so that it covers both training noise
(seeds) and the finite test set (images). With one seed it covers the images only, and says so.
"""
from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
NUM_RESAMPLES = 10_000


def mean_std(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (``ddof=1``) over seeds; the std is None for a single value."""
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("mean_std: no values")
  return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def paired_differences(nmes_a, nmes_b) -> np.ndarray:
  """``D = A - B`` for per-image NMEs ``[S, N]`` of two models on the same seeds and images, checked."""
  a = np.asarray(nmes_a, dtype=np.float64)
  b = np.asarray(nmes_b, dtype=np.float64)
  if a.ndim != 2 or a.shape != b.shape or a.size == 0:
    raise ValueError(f"paired_differences: need two [seeds, images] arrays of one shape, got {a.shape} and "
                     f"{b.shape}; pair the models by seed and the faces by image id first")
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError("paired_differences: non-finite NME (a diverged model?); evaluate it again")
  return a - b


def bootstrap_means(differences, *, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> np.ndarray:
  """Bootstrap replicates of ``mean(D)``: each draws S seeds and N images with replacement (independently)."""
  differences = np.asarray(differences, dtype=np.float64)
  num_seeds, num_images = differences.shape
  rng = np.random.default_rng(seed)
  means = np.empty(num_resamples)
  # In chunks: one [chunk, S, N] gather at a time keeps memory bounded for large test sets.
  chunk = max(1, min(num_resamples, 2_000_000 // max(1, num_seeds * num_images)))
  for start in range(0, num_resamples, chunk):
    count = min(chunk, num_resamples - start)
    seeds = rng.integers(num_seeds, size=(count, num_seeds))
    images = rng.integers(num_images, size=(count, num_images))
    # mean over (s, i) of D[seeds[s], images[i]] = mean_s of (row seeds[s] averaged over the drawn images).
    rows = differences[seeds]                                       # [count, S, N]
    picked = np.take_along_axis(rows, images[:, None, :].repeat(num_seeds, axis=1), axis=2)
    means[start:start + count] = picked.mean(axis=(1, 2))
  return means


def paired_comparison(nmes_a, nmes_b, *, confidence: float = CONFIDENCE, num_resamples: int = NUM_RESAMPLES,
                      seed: int = 0) -> dict:
  """``{mean, low, high, num_seeds, num_images, verdict}`` of ``A - B`` (fractions of NME).

  ``low``/``high``: the percentile bootstrap interval at ``confidence``. The verdict is "lower" when the
  whole interval is below zero, "higher" when above, else "not distinguishable".
  """
  differences = paired_differences(nmes_a, nmes_b)
  means = bootstrap_means(differences, num_resamples=num_resamples, seed=seed)
  tail = 100.0 * (1.0 - confidence) / 2.0
  low, high = np.percentile(means, [tail, 100.0 - tail])
  if high < 0:
    verdict = "lower"
  elif low > 0:
    verdict = "higher"
  else:
    verdict = "not distinguishable"
  return {"mean": float(differences.mean()), "low": float(low), "high": float(high),
          "num_seeds": int(differences.shape[0]), "num_images": int(differences.shape[1]), "verdict": verdict}
