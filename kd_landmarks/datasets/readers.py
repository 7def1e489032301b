"""Readers for the official layouts of 300W, COFW and WFLW, as users download them.

Every reader returns a list of :class:`RawExample` with landmarks in *original-image pixels* under the
convention of :mod:`kd_landmarks.coords` (0-based, pixel centres on integers):
  * 300W ``.pts`` files are 1-based (MATLAB/iBUG convention): we subtract 1.
  * COFW ``phis`` come from MATLAB (1-based): we subtract 1.
  * WFLW annotations are used as given (the LAB toolkit draws them directly on 0-based pixel grids).

Nothing is dropped silently: a malformed file names the file and line, a split whose size differs from the
official one is an error unless ``allow_partial`` is set (fixtures, or a deliberate subset).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np

from kd_landmarks import errors
from kd_landmarks.datasets import images as images_lib
from kd_landmarks.datasets import info as info_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the official archives yourself (their licences forbid redistribution) and extract them so that
`--manual_dir` (the tfds manual_dir) has this layout:

300w: the four 68-point sets from https://ibug.doc.ic.ac.uk/resources/facial-point-annotations/
      (300-W: https://ibug.doc.ic.ac.uk/resources/300-W/), each image next to its .pts file:
        <manual_dir>/afw/*.jpg + *.pts                       (337 faces)
        <manual_dir>/helen/trainset/*.jpg + *.pts            (2000)
        <manual_dir>/helen/testset/*.jpg + *.pts             (330)
        <manual_dir>/lfpw/trainset/*.png + *.pts             (811)
        <manual_dir>/lfpw/testset/*.png + *.pts              (224)
        <manual_dir>/ibug/*.jpg + *.pts                      (135)
cofw: COFW colour (Burgos-Artizzu et al. 2013), COFW_color.zip from https://data.caltech.edu/records/20099
      (formerly http://www.vision.caltech.edu/xpburgos/ICCV13/), MATLAB v7.3 files:
        <manual_dir>/COFW_train_color.mat                    (IsTr, phisTr, bboxesTr: 1345 faces)
        <manual_dir>/COFW_test_color.mat                     (IsT, phisT, bboxesT: 507 faces)
wflw: WFLW (Wu et al. 2018, https://wywu.github.io/projects/LAB/WFLW.html): extract WFLW_images.tar.gz
      and WFLW_annotations.tar.gz:
        <manual_dir>/WFLW_images/<event folder>/*.jpg
        <manual_dir>/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_train.txt  (7500)
        <manual_dir>/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt   (2500)
custom: your own photos, any number of points K >= 3, missing points allowed (docs/datasets.md):
        <manual_dir>/annotations.csv    image,x0,y0,...,x{K-1},y{K-1}[,v0..v{K-1}][,box_x0,box_y0,box_x1,box_y1][,split]
     or <manual_dir>/annotations.jsonl  {"image": ..., "points": [[x, y] or null, ...], "split": ...}
     or <manual_dir>/<split>/**/face.jpg + face.pts   (iBUG .pts beside each image; "-1 -1" = missing)
        <manual_dir>/dataset.json       optional: name, flip_pairs, normalization, splits, test_fraction
"""

# Official sizes (paper Section 4.1); 300W per source folder so that an error can say which part is missing.
SOURCES_300W = {
    "train": ("afw", "helen/trainset", "lfpw/trainset"),
    "test_common": ("helen/testset", "lfpw/testset"),
    "test_challenging": ("ibug",),
    "test_full": ("helen/testset", "lfpw/testset", "ibug"),
}
FOLDER_COUNTS_300W = {"afw": 337, "helen/trainset": 2000, "lfpw/trainset": 811,
                      "helen/testset": 330, "lfpw/testset": 224, "ibug": 135}
WFLW_ATTRIBUTES = info_lib.WFLW_ATTRIBUTES
EXPECTED_COUNTS = {
    "300w": {"train": 3148, "test_common": 554, "test_challenging": 135, "test_full": 689},
    "cofw": {"train": 1345, "test": 507},
    "wflw": {"train": 7500, "test": 2500, "test_pose": 326, "test_expression": 314,
             "test_illumination": 698, "test_makeup": 206, "test_occlusion": 736, "test_blur": 773},
}
COFW_FILES = {"train": ("COFW_train_color.mat", "IsTr", "phisTr", "bboxesTr"),
              "test": ("COFW_test_color.mat", "IsT", "phisT", "bboxesT")}
WFLW_ANNOTATION_DIR = "WFLW_annotations/list_98pt_rect_attr_train_test"
WFLW_IMAGE_DIR = "WFLW_images"


class DatasetFormatError(errors.UserError, ValueError):
  """Input that does not follow the official layout; the message names the file (and line) and the fix."""


@dataclasses.dataclass
class RawExample:
  """One annotated face as read from the official files (original-image pixels)."""
  image_id: str
  landmarks: np.ndarray                     # float32 [K, 2]
  image_path: Optional[str] = None          # read lazily, so that listing a split stays cheap
  image: Optional[np.ndarray] = None        # uint8 [H, W, 3] when the format embeds the pixels (COFW)
  attributes: Optional[np.ndarray] = None   # int32 [6] (WFLW)
  occluded: Optional[np.ndarray] = None     # int32 [K] (COFW)
  # A custom set (kd_landmarks.datasets.custom): which points are annotated (bool [K]; missing ones hold NaN
  # until the shape model fills them), the annotated face box (x0, y0, x1, y1), the split the file names and
  # where the face was read (file:line, for errors).
  visible: Optional[np.ndarray] = None
  face_box: Optional[np.ndarray] = None
  split: Optional[str] = None
  where: str = ""

  def load_image(self) -> np.ndarray:
    if self.image is not None:
      return images_lib.as_rgb(self.image, source=self.image_id)
    return images_lib.read_image(self.image_path)


def _missing(path, dataset: str) -> DatasetFormatError:
  return DatasetFormatError(
      f"{dataset}: expected {path} but it does not exist.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def check_manual_dir(manual_dir, dataset: str) -> pathlib.Path:
  """Returns the manual dir as a Path, or raises naming the expected path and where to get the data."""
  if manual_dir is None:
    raise DatasetFormatError(f"{dataset}: no --manual_dir given.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    raise _missing(manual_dir, dataset)
  if not any(manual_dir.iterdir()):  # tfds would stop with a bare AssertionError.
    raise DatasetFormatError(
        f"{dataset}: --manual_dir {manual_dir} is empty; extract the official {dataset} archives into it "
        "(where to get them and the layout: `python -m kd_landmarks.datasets layout`)")
  return manual_dir


def check_count(dataset: str, split: str, count: int, *, allow_partial: bool, detail: str = "") -> None:
  """An empty split is always an error; a size other than the official one is unless ``allow_partial``."""
  expected = EXPECTED_COUNTS[dataset][split]
  if count == 0:
    raise DatasetFormatError(f"{dataset} split {split!r} is empty (the official data has {expected} "
                             f"examples){detail}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if count != expected and not allow_partial:
    raise DatasetFormatError(
        f"{dataset} split {split!r} has {count} examples but the official data has {expected}{detail}. "
        "Complete the manual dir (layout below), or pass allow_partial=True (`--allow_partial`) to build "
        f"from a subset on purpose.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def _check_num_landmarks(landmarks: np.ndarray, dataset: str, where: str) -> None:
  expected = info_lib.get_info(dataset).num_landmarks
  if landmarks.shape != (expected, 2):
    raise DatasetFormatError(f"{where}: {landmarks.shape[0]} landmarks but {dataset} has {expected}")
  if not np.all(np.isfinite(landmarks)):
    raise DatasetFormatError(f"{where}: landmarks contain NaN or infinity")


# ----------------------------------------------------------------------------------------------- 300W


def read_pts(path) -> np.ndarray:
  """Reads an iBUG ``.pts`` file (``version: 1``, ``n_points: K``, ``{``, K lines ``x y``, ``}``).

  Returns float32 ``[K, 2]`` in 0-based pixels (the file's 1-based values minus 1).
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
  except OSError as error:
    raise DatasetFormatError(f"{path}: cannot be read ({images_lib.unreadable_reason(path, error)}); restore it "
                             "from the official archive") from None
  num_points = None
  line_number = 0
  # Header: key: value lines until "{".
  while line_number < len(lines):
    text = lines[line_number].strip()
    line_number += 1
    if not text:
      continue
    if text == "{":
      break
    key, sep, value = text.partition(":")
    if not sep:
      raise DatasetFormatError(f"{path}:{line_number}: expected a 'key: value' header line or '{{', "
                               f"got {text!r}")
    if key.strip() == "n_points":
      try:
        num_points = int(value)
      except ValueError:
        raise DatasetFormatError(f"{path}:{line_number}: n_points must be an integer, got {value.strip()!r}") \
            from None
  else:
    raise DatasetFormatError(f"{path}: no '{{' line opening the point list")
  if num_points is None:
    raise DatasetFormatError(f"{path}: header has no 'n_points:' line")
  points = []
  closed = False
  while line_number < len(lines):
    text = lines[line_number].strip()
    line_number += 1
    if not text:
      continue
    if text == "}":
      closed = True
      break
    fields = text.split()
    if len(fields) != 2:
      raise DatasetFormatError(f"{path}:{line_number}: expected 'x y', got {text!r}")
    try:
      points.append((float(fields[0]), float(fields[1])))
    except ValueError:
      raise DatasetFormatError(f"{path}:{line_number}: coordinates must be numbers, got {text!r}") from None
    if not all(np.isfinite(points[-1])):
      raise DatasetFormatError(f"{path}:{line_number}: non-finite coordinate {text!r}")
  if not closed:
    raise DatasetFormatError(f"{path}:{line_number}: no closing '}}' after the points")
  if len(points) != num_points:
    raise DatasetFormatError(f"{path}: header says n_points {num_points} but the file lists {len(points)}")
  return np.asarray(points, dtype=np.float32).reshape(-1, 2) - 1.0


def list_images_by_stem(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """Image files of ``folder`` by stem; a stem may have several (``e1.jpg`` and ``e1.png``)."""
  images: dict[str, list[pathlib.Path]] = {}
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() in IMAGE_EXTENSIONS:
      images.setdefault(path.stem, []).append(path)
  return images


def image_of_pts(pts_path: pathlib.Path, images_by_stem: dict[str, list[pathlib.Path]]) -> pathlib.Path:
  """The one image beside ``pts_path`` (``images_by_stem``: :func:`list_images_by_stem` of its folder); none, or
  several (``e1.jpg`` and ``e1.png``), is a :class:`DatasetFormatError` naming the file."""
  if pts_path.stem not in images_by_stem:
    raise DatasetFormatError(f"{pts_path}: no image next to it (expected {pts_path.stem} with one of "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
  candidates = images_by_stem[pts_path.stem]
  if len(candidates) > 1:  # Which photo the points belong to cannot be told: never pick one silently.
    raise DatasetFormatError(f"{pts_path}: {len(candidates)} images for one annotation: "
                             f"{' and '.join(str(p) for p in candidates)}; keep the one the points belong to "
                             "(the official archive's) and move the other out of the manual dir")
  return candidates[0]


def read_300w(manual_dir, split: str, *, allow_partial: bool = False) -> list[RawExample]:
  """Lists one 300W split (``train``, ``test_common``, ``test_challenging``, ``test_full``), sorted by path."""
  if split not in SOURCES_300W:
    raise ValueError(f"unknown 300w split {split!r}; choose from {sorted(SOURCES_300W)}")
  manual_dir = check_manual_dir(manual_dir, "300w")
  examples = []
  shortfalls = []
  for folder in SOURCES_300W[split]:
    folder_path = manual_dir / folder
    if not folder_path.is_dir():
      if not allow_partial:
        raise _missing(folder_path, "300w")
      shortfalls.append(f"{folder}: missing")
      continue
    pts_files = sorted(folder_path.glob("*.pts"))
    images_by_stem = list_images_by_stem(folder_path)
    unannotated = sorted(set(images_by_stem) - {p.stem for p in pts_files})
    if unannotated:
      logging.warning("300w: %d images in %s have no .pts file and are not part of 300W (e.g. %s)",
                      len(unannotated), folder_path, images_by_stem[unannotated[0]][0].name)
    if len(pts_files) != FOLDER_COUNTS_300W[folder]:
      shortfalls.append(f"{folder}: {len(pts_files)} of {FOLDER_COUNTS_300W[folder]}")
    for pts_path in pts_files:
      landmarks = read_pts(pts_path)
      _check_num_landmarks(landmarks, "300w", str(pts_path))
      image_path = image_of_pts(pts_path, images_by_stem)
      examples.append(RawExample(image_id=image_path.relative_to(manual_dir).as_posix(),
                                 landmarks=landmarks, image_path=str(image_path)))
  detail = f" ({'; '.join(shortfalls)} .pts files)" if shortfalls else ""
  check_count("300w", split, len(examples), allow_partial=allow_partial, detail=detail)
  return examples


# ----------------------------------------------------------------------------------------------- COFW


def _read_mat(path: pathlib.Path, names: Sequence[str]) -> dict:
  """Reads named variables of a MATLAB file: v7.3 (HDF5) with h5py, older versions with scipy.io.

  Returns numpy arrays in MATLAB's own axis order (HDF5 stores MATLAB arrays transposed); a cell array
  becomes an object array of numpy arrays.
  """
  import h5py  # pylint: disable=g-import-not-at-top  (COFW v7.3 only; 0.24 s to import, measured)
  if h5py.is_hdf5(path):
    out = {}
    with h5py.File(path, "r") as f:
      for name in names:
        if name not in f:
          raise DatasetFormatError(f"{path}: no variable {name!r} (found {sorted(f.keys())}); is this the "
                                   "official COFW colour file?")
        dataset = f[name]
        if dataset.dtype == h5py.ref_dtype:
          refs = np.asarray(dataset).T
          cells = np.empty(refs.shape, dtype=object)
          for position, ref in np.ndenumerate(refs):
            cells[position] = np.asarray(f[ref]).T
          out[name] = cells
        else:
          out[name] = np.asarray(dataset).T
    return out
  import scipy.io  # pylint: disable=g-import-not-at-top  (COFW before v7.3 only; 0.42 s, measured)
  try:
    contents = scipy.io.loadmat(path)
  except Exception as error:  # pylint: disable=broad-except
    raise DatasetFormatError(f"{path}: neither a MATLAB v7.3 (HDF5) nor an older .mat file ({error})") \
        from None
  out = {}
  for name in names:
    if name not in contents:
      raise DatasetFormatError(f"{path}: no variable {name!r} (found "
                               f"{sorted(k for k in contents if not k.startswith('__'))})")
    out[name] = contents[name]
  return out


def read_cofw(manual_dir, split: str, *, allow_partial: bool = False) -> list[RawExample]:
  """Reads a COFW colour split (``train`` or ``test``) from its .mat file; images are held in memory."""
  if split not in COFW_FILES:
    raise ValueError(f"unknown cofw split {split!r}; choose from {sorted(COFW_FILES)}")
  manual_dir = check_manual_dir(manual_dir, "cofw")
  file_name, images_key, phis_key, boxes_key = COFW_FILES[split]
  path = manual_dir / file_name
  if not path.is_file():
    raise _missing(path, "cofw")
  variables = _read_mat(path, (images_key, phis_key, boxes_key))
  cells = variables[images_key]
  if cells.dtype != object:
    raise DatasetFormatError(f"{path}: {images_key} must be a cell array of images, got {cells.dtype} "
                             f"{cells.shape}")
  cells = cells.reshape(-1)
  phis = np.asarray(variables[phis_key], dtype=np.float64)
  boxes = np.asarray(variables[boxes_key], dtype=np.float64)
  num_landmarks = info_lib.get_info("cofw").num_landmarks
  if phis.ndim != 2 or phis.shape[1] != 3 * num_landmarks:
    raise DatasetFormatError(f"{path}: {phis_key} must be N x {3 * num_landmarks} (29 x, 29 y, 29 occlusion "
                             f"flags) for COFW's {num_landmarks} landmarks, got {phis.shape}")
  if phis.shape[0] != cells.shape[0] or boxes.shape != (cells.shape[0], 4):
    raise DatasetFormatError(f"{path}: {images_key} has {cells.shape[0]} images, {phis_key} {phis.shape[0]} "
                             f"rows and {boxes_key} shape {boxes.shape} (expected N x 4)")
  examples = []
  for i, image in enumerate(cells):
    image_id = f"{file_name}/{images_key}/{i}"
    try:
      image = images_lib.as_rgb(np.asarray(image), source=f"{path}: {images_key}{{{i + 1}}}")
    except images_lib.ImageReadError as error:
      raise DatasetFormatError(str(error)) from None
    landmarks = np.stack([phis[i, :num_landmarks], phis[i, num_landmarks:2 * num_landmarks]], axis=-1)
    landmarks = (landmarks - 1.0).astype(np.float32)  # MATLAB 1-based -> 0-based pixel centres.
    _check_num_landmarks(landmarks, "cofw", f"{path}: {phis_key} row {i + 1}")
    flags = phis[i, 2 * num_landmarks:]
    if not np.all(np.isin(flags, (0.0, 1.0))):
      raise DatasetFormatError(f"{path}: {phis_key} row {i + 1}: occlusion flags must be 0 or 1, got "
                               f"{sorted(set(flags.tolist()))}")
    examples.append(RawExample(image_id=image_id, landmarks=landmarks, image=image,
                               occluded=flags.astype(np.int32)))
  check_count("cofw", split, len(examples), allow_partial=allow_partial, detail=f" in {path}")
  return examples


# ----------------------------------------------------------------------------------------------- WFLW


def parse_wflw_line(text: str, *, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """Parses one WFLW annotation line: 196 coordinates, x_min y_min x_max y_max, 6 flags, image path."""
  num_landmarks = info_lib.get_info("wflw").num_landmarks
  num_numbers = 2 * num_landmarks + 4 + len(WFLW_ATTRIBUTES)
  fields = text.split(maxsplit=num_numbers)
  if len(fields) != num_numbers + 1:
    raise DatasetFormatError(f"{where}: expected {num_numbers} numbers ({2 * num_landmarks} coordinates, 4 box, "
                             f"6 attribute flags) then the image path, got {len(fields)} fields")
  try:
    numbers = np.asarray([float(x) for x in fields[:num_numbers]], dtype=np.float64)
  except ValueError as error:
    raise DatasetFormatError(f"{where}: {error}") from None
  if not np.all(np.isfinite(numbers)):
    raise DatasetFormatError(f"{where}: non-finite number")
  landmarks = numbers[:2 * num_landmarks].reshape(num_landmarks, 2).astype(np.float32)
  box = numbers[2 * num_landmarks:2 * num_landmarks + 4]
  flags = numbers[2 * num_landmarks + 4:]
  if not np.all(np.isin(flags, (0.0, 1.0))):
    raise DatasetFormatError(f"{where}: the 6 attribute flags must be 0 or 1, got {flags.tolist()}")
  return landmarks, box, flags.astype(np.int32), fields[-1].strip()


def read_wflw(manual_dir, split: str, *, allow_partial: bool = False) -> list[RawExample]:
  """Reads a WFLW split: ``train``, ``test`` or an attribute subset ``test_<attribute>`` (paper Table 4)."""
  expected_splits = EXPECTED_COUNTS["wflw"]
  if split not in expected_splits:
    raise ValueError(f"unknown wflw split {split!r}; choose from {sorted(expected_splits)}")
  manual_dir = check_manual_dir(manual_dir, "wflw")
  source = "train" if split == "train" else "test"
  path = manual_dir / WFLW_ANNOTATION_DIR / f"list_98pt_rect_attr_{source}.txt"
  if not path.is_file():
    raise _missing(path, "wflw")
  image_dir = manual_dir / WFLW_IMAGE_DIR
  if not image_dir.is_dir():
    raise _missing(image_dir, "wflw")
  attribute = split[len("test_"):] if split.startswith("test_") else None
  examples = []
  faces_per_image: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for line_number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      where = f"{path}:{line_number}"
      landmarks, _, flags, relative_path = parse_wflw_line(text, where=where)
      # WFLW lists several faces of one photo on separate lines: the id counts them in file order.
      face_index = faces_per_image.get(relative_path, 0)
      faces_per_image[relative_path] = face_index + 1
      if attribute is not None and not flags[WFLW_ATTRIBUTES.index(attribute)]:
        continue
      examples.append(RawExample(image_id=f"{relative_path}#{face_index}", landmarks=landmarks,
                                 image_path=str(image_dir / relative_path), attributes=flags))
  check_count("wflw", split, len(examples), allow_partial=allow_partial, detail=f" in {path}")
  return examples


READERS: dict[str, Callable[..., list[RawExample]]] = {"300w": read_300w, "cofw": read_cofw,
                                                       "wflw": read_wflw}


def read_split(dataset: str, manual_dir, split: str, *, allow_partial: bool = False) -> list[RawExample]:
  """Reads one split of an official dataset (see :data:`MANUAL_DOWNLOAD_INSTRUCTIONS` for the layout)."""
  name = info_lib.get_info(dataset).name
  if name not in READERS:
    raise ValueError(f"{dataset!r} has no official files to read; choose from {sorted(READERS)}")
  return READERS[name](manual_dir, split, allow_partial=allow_partial)
