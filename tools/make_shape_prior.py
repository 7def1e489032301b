r"""Fits the 68-point shape prior used by the synthetic face renderer and writes it as a small npz.

Input: the real iBUG-68 annotations in ``keypoints_frames_{train,test}.csv`` (4,232 faces, MIT licence,
from the PyPI package facial-keypoints-detecter 1.0.0; see the README next to them). Each row is an image
name followed by x0, y0, ..., x67, y67 in pixels.

Model (a point-distribution model: the ASM form of the paper's Section 3.1, Eq. 1):
  1. Generalised Procrustes alignment: each shape is centred, scaled to unit Frobenius norm and rotated
     (no reflection) onto the current mean; the mean is re-estimated, re-normalised and kept in the
     orientation of the starting reference, until it stops moving.
  2. The aligned frame is rotated so that the mean's eye centres lie on a horizontal line (image axes:
     x right, y down, the subject's right eye on the image left).
  3. PCA of the aligned shapes: mean, the top ``--num_modes`` unit-norm modes and their standard deviations,
     so a shape is ``mean + sum_k b_k * modes[k]`` with ``b_k ~ N(0, stddevs[k]^2)``.

Output arrays (float32 unless noted): ``mean [68, 2]``, ``modes [M, 68, 2]`` (orthonormal as 136-vectors),
``stddevs [M]``, ``explained_variance_ratio [M]``, ``num_shapes`` (int64), ``source`` (str).

The npz is written byte-for-byte reproducibly (fixed zip timestamps, no compression, a deterministic
eigenvector sign convention), so re-running this script on the same CSVs reproduces the shipped file:

  python tools/make_shape_prior.py --csv_dir tests/data/keypoints_68 \
      --output kd_landmarks/datasets/data/shape_prior_68.npz
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import pathlib
import sys
import zipfile

import numpy as np

NUM_LANDMARKS = 68
CSV_NAMES = ("keypoints_frames_train.csv", "keypoints_frames_test.csv")
SOURCE = ("facial-keypoints-detecter 1.0.0 (PyPI, MIT licence), "
          "facial_keypoints_detecter/__data_subpkg__/keypoints_frames_{train,test}.csv")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CSV_DIR = REPO_ROOT / "tests" / "data" / "keypoints_68"  # Shipped (MIT, see its README).
DEFAULT_OUTPUT = REPO_ROOT / "kd_landmarks" / "datasets" / "data" / "shape_prior_68.npz"
RIGHT_EYE = slice(36, 42)  # The subject's right eye: on the image's left in a frontal face.
LEFT_EYE = slice(42, 48)


def read_shapes(csv_dir) -> np.ndarray:
  """Reads every row of the two CSVs (train first, then test) into float64 ``[N, 68, 2]``."""
  csv_dir = pathlib.Path(csv_dir)
  shapes = []
  for name in CSV_NAMES:
    path = csv_dir / name
    if not path.is_file():
      raise FileNotFoundError(
          f"{path} not found: pass --csv_dir pointing at the folder with {', '.join(CSV_NAMES)} "
          "(from the PyPI package facial-keypoints-detecter 1.0.0, __data_subpkg__/).")
    with open(path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None or len(header) != 1 + 2 * NUM_LANDMARKS:
        raise ValueError(f"{path}:1: expected a header of {1 + 2 * NUM_LANDMARKS} columns "
                         f"(image name, then x0,y0,...,x67,y67), got {0 if header is None else len(header)}")
      for line_number, row in enumerate(reader, start=2):
        if len(row) != 1 + 2 * NUM_LANDMARKS:
          raise ValueError(f"{path}:{line_number}: expected {1 + 2 * NUM_LANDMARKS} columns, got {len(row)}")
        try:
          values = [float(v) for v in row[1:]]
        except ValueError as e:
          raise ValueError(f"{path}:{line_number}: non-numeric coordinate ({e})") from None
        shape = np.asarray(values, dtype=np.float64).reshape(NUM_LANDMARKS, 2)
        if not np.all(np.isfinite(shape)):
          raise ValueError(f"{path}:{line_number}: non-finite coordinate")
        shapes.append(shape)
  if not shapes:
    raise ValueError(f"no shapes found in {csv_dir}")
  return np.stack(shapes)


def normalize_shapes(shapes: np.ndarray) -> np.ndarray:
  """Removes translation and scale: centroid 0, Frobenius norm 1 (per shape)."""
  centred = shapes - shapes.mean(axis=-2, keepdims=True)
  norms = np.sqrt((centred ** 2).sum(axis=(-2, -1), keepdims=True))
  if np.any(norms == 0):
    raise ValueError("a shape has all 68 points at one location")
  return centred / norms


def rotate_onto(shapes: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Rotates centred shapes ``[N, K, 2]`` (no reflection, no scaling) to best match ``target [K, 2]``.

  Orthogonal Procrustes: with ``X^T Y = U S V^T`` the best rotation is ``U V^T``, with the last singular
  direction flipped where that would be a reflection.
  """
  cross = shapes.swapaxes(-1, -2) @ target  # [N, 2, 2]
  u, _, vt = np.linalg.svd(cross)
  det = np.linalg.det(u @ vt)
  u[..., :, -1] *= np.sign(det)[..., None]
  return shapes @ (u @ vt)


def generalized_procrustes(shapes: np.ndarray, *, max_iterations: int = 100, tolerance: float = 1e-12):
  """Aligns all shapes to their common mean. Returns (aligned ``[N, K, 2]``, mean ``[K, 2]``, iterations)."""
  normalized = normalize_shapes(shapes)
  # Most faces are upright, so the plain mean is an upright starting reference; every later mean is
  # rotated back onto it so that the frame cannot drift.
  reference = normalize_shapes(normalized.mean(axis=0))
  mean = reference
  for iteration in range(1, max_iterations + 1):
    aligned = rotate_onto(normalized, mean)
    new_mean = normalize_shapes(aligned.mean(axis=0))
    new_mean = rotate_onto(new_mean[None], reference)[0]
    change = np.abs(new_mean - mean).max()
    mean = new_mean
    if change < tolerance:
      break
  aligned = rotate_onto(normalized, mean)
  return aligned, mean, iteration


def level_eyes(aligned: np.ndarray, mean: np.ndarray):
  """Rotates the frame so the mean's eye centres are horizontal, right eye (subject's) on the left."""
  delta = mean[LEFT_EYE].mean(axis=0) - mean[RIGHT_EYE].mean(axis=0)
  angle = np.arctan2(delta[1], delta[0])
  cos, sin = np.cos(-angle), np.sin(-angle)
  rotation = np.array([[cos, sin], [-sin, cos]])  # Row-vector form: p @ rotation rotates by -angle.
  return aligned @ rotation, mean @ rotation


def principal_modes(aligned: np.ndarray, mean: np.ndarray, num_modes: int):
  """PCA of the aligned shapes: the top modes (unit 136-vectors), their std devs and variance ratios."""
  num_shapes = aligned.shape[0]
  residuals = (aligned - mean).reshape(num_shapes, -1)
  covariance = residuals.T @ residuals / (num_shapes - 1)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  order = np.argsort(eigenvalues)[::-1]
  eigenvalues = np.clip(eigenvalues[order], 0.0, None)
  eigenvectors = eigenvectors[:, order]
  if num_modes > eigenvalues.size:
    raise ValueError(f"--num_modes={num_modes} exceeds the {eigenvalues.size} available dimensions")
  modes = eigenvectors[:, :num_modes].T
  # Eigenvectors are defined up to sign; fix it so the output is reproducible: largest |entry| positive.
  largest = np.take_along_axis(modes, np.abs(modes).argmax(axis=1)[:, None], axis=1)
  modes = modes * np.sign(largest)
  stddevs = np.sqrt(eigenvalues[:num_modes])
  ratios = eigenvalues[:num_modes] / eigenvalues.sum()
  return modes.reshape(num_modes, NUM_LANDMARKS, 2), stddevs, ratios


def fit_shape_prior(shapes: np.ndarray, *, num_modes: int = 20) -> dict[str, np.ndarray]:
  """Fits the whole prior (see the module docstring) and returns the arrays to store."""
  aligned, mean, _ = generalized_procrustes(shapes)
  aligned, mean = level_eyes(aligned, mean)
  # PCA around the mean of the final aligned set (equal to ``mean`` up to the normalisation).
  modes, stddevs, ratios = principal_modes(aligned, aligned.mean(axis=0), num_modes)
  return {
      "mean": aligned.mean(axis=0).astype(np.float32),
      "modes": modes.astype(np.float32),
      "stddevs": stddevs.astype(np.float32),
      "explained_variance_ratio": ratios.astype(np.float32),
      "num_shapes": np.asarray(shapes.shape[0], dtype=np.int64),
      "source": np.asarray(SOURCE),
  }


def write_reproducible_npz(path, arrays: dict[str, np.ndarray]) -> None:
  """Like ``np.savez`` but byte-for-byte reproducible: fixed member order, timestamps, no compression."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
    for name in sorted(arrays):
      member = io.BytesIO()
      np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.external_attr = 0o644 << 16
      archive.writestr(info, member.getvalue())
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--csv_dir", default=os.environ.get("KD_LANDMARKS_KEYPOINTS68_DIR", str(DEFAULT_CSV_DIR)),
                      help="folder holding keypoints_frames_{train,test}.csv")
  parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
  parser.add_argument("--num_modes", type=int, default=20)
  args = parser.parse_args(argv)
  shapes = read_shapes(args.csv_dir)
  arrays = fit_shape_prior(shapes, num_modes=args.num_modes)
  write_reproducible_npz(args.output, arrays)
  kept = float(arrays["explained_variance_ratio"].sum())
  print(f"{args.output}: {shapes.shape[0]} shapes, {args.num_modes} modes keeping {kept:.1%} of the variance")
  return 0


if __name__ == "__main__":
  sys.exit(main())
