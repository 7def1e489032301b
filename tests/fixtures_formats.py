"""Tiny generators of each official dataset layout, written exactly as the originals are.

* 300W: ``<folder>/<stem>.jpg`` next to ``<stem>.pts`` (1-based ``x y`` lines between braces).
* COFW: MATLAB v7.3 .mat files (HDF5 with the 512-byte MATLAB header), cell arrays as object references
  into ``#refs#`` and every array stored transposed, as MATLAB writes them.
* WFLW: ``list_98pt_rect_attr_{train,test}.txt`` lines of 196 coordinates, box, 6 flags, image path.

Each writer returns the ground truth it wrote (0-based original-image pixels) so tests can compare.
"""
from __future__ import annotations

import pathlib
import shutil
import time

import h5py
import numpy as np
from PIL import Image

from kd_landmarks.deploy import export

TAKEO_DIR = pathlib.Path(export.FIXTURE_DIR)  # shipped in the package (kd_landmarks/data/takeo)


def random_face_landmarks(rng: np.random.Generator, num_landmarks: int, *, width: int, height: int):
  """A jittered ring-and-centre point set inside the image: enough variation for a shape model."""
  angles = np.linspace(0.0, 2 * np.pi, num_landmarks, endpoint=False)
  radius = np.where(np.arange(num_landmarks) % 2 == 0, 1.0, 0.5)
  unit = np.stack([np.cos(angles) * radius, np.sin(angles) * radius], axis=-1)
  unit = unit + rng.normal(scale=0.05, size=unit.shape)
  side = rng.uniform(0.3, 0.5) * min(width, height)
  centre = np.array([rng.uniform(0.4, 0.6) * width, rng.uniform(0.4, 0.6) * height])
  return (unit * side / 2 + centre).astype(np.float32)


def random_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def pts_text(landmarks_0based: np.ndarray) -> str:
  """The iBUG .pts text for 0-based landmarks (the file is 1-based)."""
  lines = ["version: 1", f"n_points:  {len(landmarks_0based)}", "{"]
  lines += [f"{x + 1:.6f} {y + 1:.6f}" for x, y in landmarks_0based]
  lines.append("}")
  return "\n".join(lines) + "\n"


def write_300w(root, counts: dict[str, int], *, seed: int = 0, size=(96, 80), takeo_in: str | None = None):
  """Writes a 300W tree with ``counts[folder]`` faces per folder; returns {relative image path: landmarks}.

  ``takeo_in`` names a folder that also receives the real takeo photo with its real annotation.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  written = {}
  for folder, count in counts.items():
    folder_path = root / folder
    folder_path.mkdir(parents=True, exist_ok=True)
    extension = ".png" if folder.startswith("lfpw") else ".jpg"
    for i in range(count):
      stem = f"{folder.replace('/', '_')}_{i:04d}"
      landmarks = random_face_landmarks(rng, 68, width=size[0], height=size[1])
      Image.fromarray(random_image(rng, *size)).save(folder_path / (stem + extension))
      (folder_path / (stem + ".pts")).write_text(pts_text(landmarks))
      written[f"{folder}/{stem}{extension}"] = landmarks
    if folder == takeo_in:
      shutil.copy(TAKEO_DIR / "takeo.ppm", folder_path / "takeo.ppm")
      shutil.copy(TAKEO_DIR / "takeo.pts", folder_path / "takeo.pts")
      written[f"{folder}/takeo.ppm"] = read_takeo_landmarks()
  return written


def read_takeo_landmarks() -> np.ndarray:
  """takeo.pts parsed independently of the reader under test (numpy text parsing), 0-based."""
  lines = (TAKEO_DIR / "takeo.pts").read_text().splitlines()
  start = lines.index("{") + 1
  end = lines.index("}")
  return np.loadtxt(lines[start:end], dtype=np.float64).astype(np.float32) - 1.0


# ---------------------------------------------------------------------------------------------- COFW

_MATLAB_HEADER_BYTES = 512


def _matlab_header() -> bytes:
  text = ("MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: "
          + time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(0)) + " HDF5 schema 1.00 .")
  header = text.ljust(116).encode("ascii") + b"\x00" * 8 + b"\x00\x02" + b"IM"
  return header.ljust(_MATLAB_HEADER_BYTES, b"\x00")


def _set_class(dataset, matlab_class: str) -> None:
  dataset.attrs.create("MATLAB_class", np.bytes_(matlab_class))


def write_matlab_v73(path, variables: dict) -> None:
  """Writes a MATLAB v7.3 file: numeric arrays transposed; lists become N x 1 cell arrays of references."""
  path = pathlib.Path(path)
  with h5py.File(path, "w", userblock_size=_MATLAB_HEADER_BYTES, libver="earliest") as f:
    refs_group = f.create_group("#refs#")
    counter = 0
    for name, value in variables.items():
      if isinstance(value, list):
        refs = np.empty((1, len(value)), dtype=h5py.ref_dtype)  # MATLAB's N x 1 cell, transposed.
        for i, element in enumerate(value):
          element = np.asarray(element)
          cell = refs_group.create_dataset(f"r{counter}", data=element.T)
          counter += 1
          _set_class(cell, "uint8" if element.dtype == np.uint8 else "double")
          refs[0, i] = cell.ref
        dataset = f.create_dataset(name, data=refs)
        _set_class(dataset, "cell")
      else:
        value = np.asarray(value, dtype=np.float64)
        dataset = f.create_dataset(name, data=value.T)
        _set_class(dataset, "double")
  with open(path, "r+b") as f:
    f.write(_matlab_header())


def write_cofw(root, *, num_train: int, num_test: int, seed: int = 0, size=(72, 64), grey_index: int = 1):
  """Writes COFW_{train,test}_color.mat; returns {split: list of (image HxWx3, landmarks 0-based, flags)}.

  Example ``grey_index`` of each split is stored as a 2-D greyscale image, as some COFW images are.
  """
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  written = {}
  for split, count, (file_name, images_key, phis_key, boxes_key) in (
      ("train", num_train, ("COFW_train_color.mat", "IsTr", "phisTr", "bboxesTr")),
      ("test", num_test, ("COFW_test_color.mat", "IsT", "phisT", "bboxesT"))):
    images, phis, boxes, truth = [], [], [], []
    for i in range(count):
      image = random_image(rng, *size)
      if i == grey_index:
        image = image[:, :, 0]
      landmarks = random_face_landmarks(rng, 29, width=size[0], height=size[1])
      flags = rng.integers(0, 2, size=29)
      images.append(image)
      phis.append(np.concatenate([landmarks[:, 0] + 1, landmarks[:, 1] + 1, flags]))  # MATLAB 1-based
      lo, hi = landmarks.min(0), landmarks.max(0)
      boxes.append([lo[0] + 1, lo[1] + 1, hi[0] - lo[0], hi[1] - lo[1]])
      rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
      truth.append((rgb, landmarks, flags))
    write_matlab_v73(root / file_name, {images_key: images, phis_key: np.array(phis),
                                        boxes_key: np.array(boxes)})
    written[split] = truth
  return written


# ---------------------------------------------------------------------------------------------- WFLW


def wflw_line(landmarks: np.ndarray, flags, relative_path: str) -> str:
  lo, hi = landmarks.min(0), landmarks.max(0)
  numbers = [f"{v:.6f}" for v in landmarks.reshape(-1)]
  numbers += [str(int(v)) for v in (lo[0], lo[1], hi[0], hi[1])]
  numbers += [str(int(v)) for v in flags]
  return " ".join(numbers + [relative_path])


def write_wflw(root, *, num_train: int, test_flags, seed: int = 0, size=(96, 88)):
  """Writes WFLW_images/ and the two annotation files; ``test_flags`` is one 6-flag row per test face.

  The last two faces of each split share one photo (WFLW lists every face of a photo on its own line).
  Returns {split: list of (image id, landmarks, flags)}.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  annotation_dir = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
  annotation_dir.mkdir(parents=True, exist_ok=True)
  written = {}
  for split, rows in (("train", [[0] * 6] * num_train), ("test", list(test_flags))):
    lines, truth = [], []
    for i, flags in enumerate(rows):
      photo = min(i, len(rows) - 2) if len(rows) >= 2 else i
      relative_path = f"{7 + photo % 3}--Event/{split}_{photo:04d}.jpg"
      image_path = root / "WFLW_images" / relative_path
      if not image_path.exists():
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(rng, *size)).save(image_path)
      landmarks = random_face_landmarks(rng, 98, width=size[0], height=size[1])
      lines.append(wflw_line(landmarks, flags, relative_path))
      face_index = sum(1 for previous_id, _, _ in truth if previous_id.startswith(relative_path + "#"))
      truth.append((f"{relative_path}#{face_index}", landmarks, np.asarray(flags, np.int32)))
    (annotation_dir / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(lines) + "\n")
    written[split] = truth
  return written


# -------------------------------------------------------------------------------------------- custom

# Subsets of the iBUG 68 points (0-based) for custom schemes: 5 points (outer eye corners, nose tip, mouth
# corners, as phones' face unlock annotates) and 21 (jaw, brows, nose, eye corners, mouth).
POINTS_5 = (36, 45, 30, 48, 54)
POINTS_21 = (0, 4, 8, 12, 16, 17, 21, 22, 26, 27, 30, 31, 35, 36, 39, 42, 45, 48, 51, 54, 57)


def write_custom(root, *, form: str, points=POINTS_5, num_faces: int = 12, image_size: int = 64,
                 splits=None, missing_per_face: int = 0, keep_visible=(), seed: int = 0, description=None):
  """A custom set in ``form`` ('csv', 'jsonl' or 'pts'): synthetic faces (kd_landmarks.datasets.synthetic)
  with ``points`` of their 68, ``missing_per_face`` of them (never those in ``keep_visible``) left out of each
  face. ``splits``: one split name per face (None: no split column, test_fraction divides them).

  Returns a list of dicts (``image`` relative path, ``split``, ``landmarks`` [K, 2] 0-based with NaN where
  missing, ``visible`` [K]) in file order."""
  from kd_landmarks.datasets import synthetic  # pylint: disable=g-import-not-at-top (renders only here)
  import json  # pylint: disable=g-import-not-at-top (only the custom writer needs it)

  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  faces = []
  for i, example in enumerate(synthetic.generate("train", num_examples=num_faces, image_size=image_size,
                                                 seed=seed)):
    split = None if splits is None else splits[i]
    folder = f"{split}/" if form == "pts" and split is not None else ""
    relative = f"{folder}face_{i:03d}.png"
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(example["image"])).save(root / relative)
    landmarks = np.asarray(example["landmarks"], np.float64)[list(points)]
    visible = np.ones(len(points), bool)
    candidates = [k for k in range(len(points)) if k not in keep_visible]
    visible[rng.choice(candidates, size=missing_per_face, replace=False)] = False
    landmarks[~visible] = np.nan
    faces.append({"image": relative, "split": split, "landmarks": landmarks, "visible": visible})
  if form == "csv":
    header = ["image"] + [f"{axis}{k}" for k in range(len(points)) for axis in "xy"]
    header += ["split"] if splits is not None else []
    lines = [",".join(header)]
    for face in faces:
      cells = [face["image"]] + ["" if np.isnan(v) else f"{v:.4f}" for v in face["landmarks"].reshape(-1)]
      cells += [face["split"]] if splits is not None else []
      lines.append(",".join(cells))
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
  elif form == "jsonl":
    lines = []
    for face in faces:
      row = {"image": face["image"], "points": [None if not v else [float(x), float(y)]
                                                for (x, y), v in zip(face["landmarks"], face["visible"])]}
      if splits is not None:
        row["split"] = face["split"]
      lines.append(json.dumps(row))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
  else:
    for face in faces:
      missing_marked = np.where(face["visible"][:, None], face["landmarks"], -2.0)  # "-1 -1" in the 1-based file
      (root / face["image"]).with_suffix(".pts").write_text(pts_text(missing_marked))
  if description is not None:
    (root / "dataset.json").write_text(json.dumps(description))
  return faces
