r"""Hard vs Soft-landmarks on real 68-point shapes, both readings of "keep 90%" (paper Section 3.1, Figs. 2-3).

Fits the ASM shape model on the training shapes of ``keypoints_frames_train.csv`` in the frame the dataset
builder uses (each face's landmark box x STORED_CROP_SCALE, normalised to [-0.5, 0.5]:
``builder._split_generators``), then for both ``keep_mode``s prints how many components are kept, the share
of the variance they hold and how far the soft landmarks move from the hard ones (inter-ocular NME, mean
over faces, train and test CSVs), and writes a PNG:

* top row: three test faces (best, median, worst by the variance-mode displacement), hard landmarks
  (black) with the soft landmarks of each reading overlaid;
* bottom row (Fig. 3's point clouds): every test face's landmarks, hard and under each reading, on the
  mean shape's frame -- the soft clouds are tighter where the model smooths.

  python tools/soft_landmarks_figure.py --csv_dir tests/data/keypoints_68 \
      --output docs/figures/soft_landmarks.png
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kd_landmarks import coords  # noqa: E402
from kd_landmarks import metrics  # noqa: E402
from kd_landmarks import shapes  # noqa: E402
from kd_landmarks.datasets import images as images_lib  # noqa: E402

KEEP = 0.9
MODES = ("variance", "eigenvectors")
COLOURS = {"hard": "black", "variance": "tab:red", "eigenvectors": "tab:blue"}
FRAME_SIZE = 256  # stored-crop pixels; the normalised frame (and so every number printed) does not depend on it


def read_csv(path) -> np.ndarray:
  """``[N, 68, 2]`` shapes from a keypoints CSV (header row, image name, then x0, y0, ..., x67, y67)."""
  rows = np.genfromtxt(path, delimiter=",", skip_header=1, usecols=range(1, 137))
  if rows.ndim != 2 or rows.shape[1] != 136 or not np.all(np.isfinite(rows)):
    raise ValueError(f"{path}: expected rows of an image name and 136 finite coordinates")
  return rows.reshape(-1, 68, 2)


def to_builder_frame(shapes_px: np.ndarray) -> np.ndarray:
  """Each shape in its own stored-crop frame, normalised (what the builder fits the shape model in)."""
  out = []
  for landmarks in shapes_px:
    crop_to_original = images_lib.stored_crop_affine(landmarks, size=FRAME_SIZE)
    crop = coords.apply_affine(coords.invert_affine(crop_to_original), landmarks.astype(np.float64))
    out.append(coords.to_normalized(crop, FRAME_SIZE))
  return np.stack(out)


def measure(train: np.ndarray, test: np.ndarray) -> tuple[shapes.ShapeModel, dict]:
  """Shape model fitted on ``train`` and, per keep_mode, components, variance held, NME moved."""
  model = shapes.fit_shape_model(train)
  total = model.eigenvalues.sum()
  results = {}
  for mode in MODES:
    kept = shapes.num_kept_components(model, KEEP, mode)
    row = {"kept": kept, "dimension": model.dimension, "variance": float(model.eigenvalues[:kept].sum() / total)}
    for name, data in (("train", train), ("test", test)):
      soft = shapes.soft_landmarks(data, model, keep=KEEP, keep_mode=mode)
      nmes = metrics.nme(soft, data, dataset="300w")
      row[f"nme_{name}"] = float(np.mean(nmes))
      row[f"nmes_{name}"] = np.asarray(nmes)
      row[f"soft_{name}"] = soft
    results[mode] = row
  return model, results


def plot(test: np.ndarray, results: dict, output: pathlib.Path) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(12, 8), dpi=100)
  FigureCanvasAgg(figure)
  order = np.argsort(results["variance"]["nmes_test"])
  picks = [("least moved", order[0]), ("median", order[len(order) // 2]), ("most moved", order[-1])]
  for column, (title, row) in enumerate(picks):
    ax = figure.add_subplot(2, 3, column + 1)
    ax.scatter(test[row, :, 0], test[row, :, 1], s=14, c=COLOURS["hard"], label="hard (ground truth)")
    for mode in MODES:
      soft = results[mode]["soft_test"][row]
      ax.scatter(soft[:, 0], soft[:, 1], s=10, c=COLOURS[mode], alpha=0.8,
                 label=f"soft, {mode} ({results[mode]['kept']} comp.): NME "
                       f"{100 * results[mode]['nmes_test'][row]:.1f}%")
    ax.set_title(f"test face {row} ({title})", fontsize=9)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="lower center")
  clouds = [("hard landmarks", test, COLOURS["hard"])] + [
      (f"soft, keep_mode='{mode}' ({results[mode]['kept']} of {results[mode]['dimension']} comp., "
       f"{100 * results[mode]['variance']:.2f}% var.)", results[mode]["soft_test"], COLOURS[mode]) for mode in MODES]
  for column, (title, data, colour) in enumerate(clouds):
    ax = figure.add_subplot(2, 3, 4 + column)
    ax.scatter(data[..., 0].ravel(), data[..., 1].ravel(), s=0.3, c=colour, alpha=0.25)
    ax.set_title(title, fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlim(-0.5, 0.5)
    ax.set_ylim(0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
  figure.suptitle(f"Hard vs Soft-landmarks (Section 3.1, keep {KEEP}, clip ±3√λ), {len(test)} real test shapes "
                  "in the builder's normalised crop frame", fontsize=10)
  figure.tight_layout()
  output.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(output)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--csv_dir", required=True, help="folder with keypoints_frames_{train,test}.csv")
  parser.add_argument("--output", default="docs/figures/soft_landmarks.png")
  args = parser.parse_args(argv)
  paths = [os.path.join(args.csv_dir, f"keypoints_frames_{split}.csv") for split in ("train", "test")]
  for path in paths:
    if not os.path.exists(path):
      raise SystemExit(f"{path} does not exist; pass --csv_dir the folder holding the keypoints CSVs")
  train, test = (to_builder_frame(read_csv(path)) for path in paths)
  _, results = measure(train, test)
  print(f"shape model fitted on {len(train)} train shapes; displacement = mean inter-ocular NME(soft, hard)")
  print("| keep_mode | components kept | variance held | NME moved, train | NME moved, test |")
  print("|---|---|---|---|---|")
  for mode in MODES:
    r = results[mode]
    print(f"| {mode} | {r['kept']} of {r['dimension']} | {100 * r['variance']:.2f}% | "
          f"{100 * r['nme_train']:.2f}% | {100 * r['nme_test']:.2f}% |")
  plot(test, results, pathlib.Path(args.output))
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
