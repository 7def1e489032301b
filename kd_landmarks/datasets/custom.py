"""Reading a user's own annotated faces: any number of points K >= 3, points may be missing.

The manual dir (``--manual_dir M``) holds the photos, one annotation file and, optionally, ``dataset.json``:

* ``annotations.csv``: a header row, then one face per row. Columns: ``image`` (a path relative to the
  annotation file's folder), ``x0, y0, x1, y1, ..., x{K-1}, y{K-1}`` (0-based pixels, pixel centres on
  integers, as :mod:`kd_landmarks.coords`), optionally ``v0 .. v{K-1}`` (1 annotated, 0 missing), optionally
  ``box_x0, box_y0, box_x1, box_y1`` (the face box, pixels) and ``split``. A point whose two cells are empty,
  or whose ``v`` is 0, is missing.
* ``annotations.jsonl``: one JSON object per line: ``{"image": ..., "points": [[x, y] or null, ...],
  "visible": [1, 0, ...] (optional), "box": [x0, y0, x1, y1] (optional), "split": ... (optional)}``.
* or no annotation file: iBUG ``.pts`` files beside the images (``face.jpg`` + ``face.pts``, 1-based as
  300W's; a point written ``-1 -1`` is missing). A ``.pts`` file's split is its first folder under the manual
  dir when that folder is one of the ``splits`` (by default ``train/`` and ``test/``).

``dataset.json`` (every field optional): ``name``, ``num_landmarks`` (checked against the rows),
``flip_pairs`` (``[[a, b], ...]``, or ``"derive"``, the default: from the mean shape's mirror symmetry),
``normalization`` (``{"points": [a, b]}``, e.g. the outer eye corners, or ``"box"``, the default: sqrt(w h) of
the face box), ``splits`` (default: the split column's values, else ``["train", "test"]``), ``test_fraction``
and ``split_seed`` (faces without a split column go to ``test`` with this probability; default 0.1 and 0),
``annotations`` (the annotation file's name, when not one of the defaults).

Every malformed input is one :class:`errors.DataError` naming the file and line: a row with another point
count than the others, NaN or infinity, a visible point far outside its photo, an image that does not exist,
a flip pairing that is not an involution, a face with fewer than 3 visible points, a normalising point that is
missing.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any, Optional

import numpy as np
from PIL import Image

from kd_landmarks import errors
from kd_landmarks import shapes
from kd_landmarks.datasets import info as info_lib
from kd_landmarks.datasets import readers

DESCRIPTION_FILE = "dataset.json"
CSV_FILE = "annotations.csv"
JSONL_FILE = "annotations.jsonl"
DEFAULT_SPLITS = ("train", "test")
DEFAULT_TEST_FRACTION = 0.1
# A visible point may lie off the photo (a face cut by the border), but not by more than this fraction of the
# photo's longer side: further out, the coordinates belong to another image or another unit.
FAR_OUTSIDE_FRACTION = 0.5
# How a .pts file marks a missing point (MERL-RAV's convention in the 1-based file).
PTS_MISSING = (-1.0, -1.0)
DESCRIPTION_FIELDS = ("name", "num_landmarks", "flip_pairs", "normalization", "splits", "test_fraction",
                      "split_seed", "annotations")


@dataclasses.dataclass
class CustomSet:
  """What the manual dir holds: the description as given (``flip_pairs`` None when to be derived) and the
  faces of each split (``RawExample`` with ``visible`` and ``face_box``; missing points hold NaN)."""
  description: dict
  splits: dict[str, list[readers.RawExample]]
  source: str  # the annotation file, or the manual dir for .pts files


def read_description(manual_dir) -> dict:
  """``dataset.json`` of the manual dir (``{}`` when absent), with its fields checked for type."""
  path = pathlib.Path(manual_dir) / DESCRIPTION_FILE
  if not path.exists():
    return {}
  try:
    description = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise errors.DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
  if not isinstance(description, dict):
    raise errors.DataError(f"{path}: expected a JSON object with fields {list(DESCRIPTION_FIELDS)}")
  unknown = sorted(set(description) - set(DESCRIPTION_FIELDS))
  if unknown:
    raise errors.DataError(f"{path}: unknown fields {unknown}; the fields are {list(DESCRIPTION_FIELDS)}")
  fraction = description.get("test_fraction", DEFAULT_TEST_FRACTION)
  if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise errors.DataError(f"{path}: test_fraction must be a number in (0, 1), got {fraction!r}")
  return description


def read_custom(manual_dir) -> CustomSet:
  """Reads the manual dir of a custom set (layout: module docstring); see :class:`CustomSet`."""
  manual_dir = readers.check_manual_dir(manual_dir, info_lib.CUSTOM)
  description = read_description(manual_dir)
  where = str(manual_dir / DESCRIPTION_FILE)
  annotation = _annotation_file(manual_dir, description)
  if annotation is None:
    rows, source = _read_pts_tree(manual_dir, description), str(manual_dir)
  elif annotation.suffix == ".csv":
    rows, source = _read_csv(annotation), str(annotation)
  else:
    rows, source = _read_jsonl(annotation), str(annotation)
  if not rows:
    raise errors.DataError(f"{source}: no face annotated; layout: `python -m kd_landmarks.datasets layout`")
  num_landmarks = len(rows[0].landmarks)
  given = description.get("num_landmarks")
  if given is not None and given != num_landmarks:
    raise errors.DataError(f"{rows[0].image_id}: {num_landmarks} points, but {where} says num_landmarks {given}")
  if num_landmarks < info_lib.MIN_CUSTOM_LANDMARKS:
    raise errors.DataError(f"{source}: {num_landmarks} points per face; a custom set needs at least "
                           f"{info_lib.MIN_CUSTOM_LANDMARKS}")
  splits = _assign_splits(rows, description, source=source, where=where)
  normalization = description.get("normalization", "box")
  resolved = {
      "name": str(description.get("name") or manual_dir.resolve().name),
      "num_landmarks": num_landmarks,
      "flip_pairs": None if description.get("flip_pairs", "derive") == "derive" else description["flip_pairs"],
      "normalization": normalization,
      "splits": list(splits),
      "format": "pts" if annotation is None else annotation.suffix[1:],
  }
  # Every field checked here, the flip pairs (an involution over 0..K-1) included, naming dataset.json.
  info_lib.custom_info(dict(resolved, flip_pairs=resolved["flip_pairs"] or []), where=where)
  if isinstance(normalization, dict):
    _check_normalizing_points_visible(splits, normalization["points"])
  return CustomSet(description=resolved, splits=splits, source=source)


# --------------------------------------------------------------------------------------------- rows


def _annotation_file(manual_dir: pathlib.Path, description: dict) -> Optional[pathlib.Path]:
  if "annotations" in description:
    path = manual_dir / str(description["annotations"])
    if not path.is_file() or path.suffix not in (".csv", ".jsonl"):
      raise errors.DataError(f"{manual_dir / DESCRIPTION_FILE}: annotations {description['annotations']!r} is not "
                             "a .csv or .jsonl file in the manual dir")
    return path
  found = [manual_dir / name for name in (CSV_FILE, JSONL_FILE) if (manual_dir / name).is_file()]
  if len(found) > 1:
    raise errors.DataError(f"{manual_dir}: both {CSV_FILE} and {JSONL_FILE}; keep one, or name it in "
                           f"{DESCRIPTION_FILE} (\"annotations\")")
  return found[0] if found else None


def _face(image_path: pathlib.Path, points, visible, box, split, *, where: str, image_id: str,
          num_landmarks: Optional[int], first_where: str) -> readers.RawExample:
  """One checked face: ``points`` [K, 2] (NaN where missing), ``visible`` [K] bool."""
  points = np.asarray(points, dtype=np.float64)
  visible = np.asarray(visible, dtype=bool)
  if num_landmarks is not None and len(points) != num_landmarks:
    raise errors.DataError(f"{where}: {len(points)} points, but {first_where} has {num_landmarks}; every face "
                           "of a set has the same points")
  if not np.all(np.isfinite(points[visible])):
    raise errors.DataError(f"{where}: a coordinate is NaN or infinite; leave a missing point's cells empty (or "
                           "flag it with v=0) instead")
  if visible.sum() < shapes.MIN_VISIBLE_POINTS:
    raise errors.DataError(f"{where}: {int(visible.sum())} annotated points; a face needs at least "
                           f"{shapes.MIN_VISIBLE_POINTS} to be placed")
  if not image_path.is_file():
    raise errors.DataError(f"{where}: image {image_path} does not exist; paths are relative to the annotation "
                           "file's folder")
  try:
    with Image.open(image_path) as image:
      width, height = image.size
  except (OSError, ValueError) as error:
    raise errors.DataError(f"{where}: cannot read image {image_path} ({error})") from None
  margin = FAR_OUTSIDE_FRACTION * max(width, height)
  seen = points[visible]
  outside = (seen[:, 0] < -margin) | (seen[:, 0] > width - 1 + margin) | (seen[:, 1] < -margin) | (
      seen[:, 1] > height - 1 + margin)
  if outside.any():
    index = int(np.flatnonzero(visible)[np.argmax(outside)])
    raise errors.DataError(
        f"{where}: point {index} at ({points[index, 0]:.1f}, {points[index, 1]:.1f}) lies far outside the "
        f"{width}x{height} image {image_path.name}; coordinates are 0-based pixels of that image")
  face_box = None
  if box is not None:
    face_box = np.asarray(box, dtype=np.float64)
    if face_box.shape != (4,) or not np.all(np.isfinite(face_box)) or not (
        face_box[2] > face_box[0] and face_box[3] > face_box[1]):
      raise errors.DataError(f"{where}: the face box must be 4 finite numbers x0, y0, x1, y1 with x1 > x0 and "
                             f"y1 > y0, got {np.asarray(box).tolist()}")
  return readers.RawExample(image_id=image_id, landmarks=points.astype(np.float32), image_path=str(image_path),
                            visible=visible, face_box=None if face_box is None else face_box.astype(np.float32),
                            split=split, where=where)


def _face_ids(rows: list[tuple]) -> list[str]:
  """``<relative image path>#<n>``: the n-th face of that photo in file order (as WFLW's ids)."""
  counts: dict[str, int] = {}
  ids = []
  for relative in rows:
    ids.append(f"{relative}#{counts.get(relative, 0)}")
    counts[relative] = counts.get(relative, 0) + 1
  return ids


def _read_csv(path: pathlib.Path) -> list[readers.RawExample]:
  with open(path, newline="", encoding="utf-8") as f:
    table = list(csv.reader(f))
  if not table:
    raise errors.DataError(f"{path}: empty file; the first row names the columns (image, x0, y0, ...)")
  header = [name.strip() for name in table[0]]
  if "image" not in header:
    raise errors.DataError(f"{path}:1: no 'image' column (found {header[:6]}...)")
  num_landmarks = 0
  while f"x{num_landmarks}" in header and f"y{num_landmarks}" in header:
    num_landmarks += 1
  if num_landmarks == 0:
    raise errors.DataError(f"{path}:1: no point columns; name them x0, y0, x1, y1, ...")
  has_flags = "v0" in header
  box_columns = ["box_x0", "box_y0", "box_x1", "box_y1"]
  has_box = any(name in header for name in box_columns)
  if has_box and not all(name in header for name in box_columns):
    raise errors.DataError(f"{path}:1: a face box needs all four columns {box_columns}")
  if has_flags and not all(f"v{k}" in header for k in range(num_landmarks)):
    raise errors.DataError(f"{path}:1: visibility columns must be v0 .. v{num_landmarks - 1}, one per point")
  column = {name: position for position, name in enumerate(header)}
  extra = [name for name in header if name.startswith(("x", "y")) and name[1:].isdigit()
           and int(name[1:]) >= num_landmarks]
  if extra:
    raise errors.DataError(f"{path}:1: point columns {extra} after a gap; name them x0, y0, ... without gaps")
  body = [(line_number, cells) for line_number, cells in enumerate(table[1:], start=2) if any(c.strip() for c in cells)]
  ids = _face_ids([cells[column["image"]].strip() if len(cells) == len(header) else "" for _, cells in body])
  examples = []
  for (line_number, cells), image_id in zip(body, ids):
    where = f"{path}:{line_number}"
    if len(cells) != len(header):
      raise errors.DataError(f"{where}: {len(cells)} fields, the header has {len(header)} (a point too many or "
                             "too few?)")
    cell = {name: cells[position].strip() for name, position in column.items()}
    points = np.full((num_landmarks, 2), np.nan)
    visible = np.ones(num_landmarks, bool)
    for k in range(num_landmarks):
      x, y = cell[f"x{k}"], cell[f"y{k}"]
      flag = cell.get(f"v{k}", "1")
      if flag not in ("0", "1"):
        raise errors.DataError(f"{where}: v{k} must be 0 (missing) or 1 (annotated), got {flag!r}")
      if flag == "0" or (x == "" and y == ""):
        visible[k] = False
        continue
      try:
        points[k] = float(x), float(y)
      except ValueError:
        raise errors.DataError(f"{where}: point {k} ({x!r}, {y!r}) is not two numbers (leave both cells empty "
                               "for a missing point)") from None
    box = None
    if has_box:
      try:
        box = [float(cell[name]) for name in box_columns]
      except ValueError:
        raise errors.DataError(f"{where}: face box {[cell[name] for name in box_columns]} is not 4 numbers") from None
    examples.append(_face(path.parent / cell["image"], points, visible, box, cell.get("split") or None,
                          where=where, image_id=image_id, num_landmarks=None, first_where=str(path)))
  return examples


def _read_jsonl(path: pathlib.Path) -> list[readers.RawExample]:
  parsed = []
  with open(path, encoding="utf-8") as f:
    for line_number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        row = json.loads(text)
      except json.JSONDecodeError as error:
        raise errors.DataError(f"{where}: not valid JSON ({error.msg})") from None
      if not isinstance(row, dict) or "image" not in row or "points" not in row:
        raise errors.DataError(f"{where}: each line is an object with 'image' and 'points' (and optionally "
                               "'visible', 'box', 'split')")
      parsed.append((where, row))
  ids = _face_ids([str(row["image"]) for _, row in parsed])
  examples, first = [], None
  for (where, row), image_id in zip(parsed, ids):
    raw_points = row["points"]
    if not isinstance(raw_points, list):
      raise errors.DataError(f"{where}: 'points' must be a list of [x, y] (or null for a missing point)")
    points = np.full((len(raw_points), 2), np.nan)
    visible = np.ones(len(raw_points), bool)
    for k, point in enumerate(raw_points):
      if point is None:
        visible[k] = False
      elif (isinstance(point, list) and len(point) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)):
        points[k] = point
      else:
        raise errors.DataError(f"{where}: point {k} is {point!r}, not [x, y] or null")
    flags = row.get("visible")
    if flags is not None:
      if not isinstance(flags, list) or len(flags) != len(raw_points) or any(v not in (0, 1) for v in flags):
        raise errors.DataError(f"{where}: 'visible' must hold one 0 or 1 per point ({len(raw_points)}), got {flags!r}")
      if any(flag and point is None for flag, point in zip(flags, raw_points)):
        raise errors.DataError(f"{where}: a point flagged visible is null")
      visible &= np.asarray(flags, bool)
    example = _face(path.parent / str(row["image"]), points, visible, row.get("box"), row.get("split"),
                    where=where, image_id=image_id, num_landmarks=None if first is None else len(first.landmarks),
                    first_where=first.where if first else "")
    first = first or example
    examples.append(example)
  return examples


def _read_pts_tree(manual_dir: pathlib.Path, description: dict) -> list[readers.RawExample]:
  split_folders = set(description.get("splits") or DEFAULT_SPLITS)
  examples, first = [], None
  images_by_folder = {}  # Each folder listed once, not once per face.
  for pts_path in sorted(manual_dir.rglob("*.pts")):
    where = str(pts_path)
    try:
      points = readers.read_pts(pts_path).astype(np.float64)  # 0-based: the file's values minus 1
    except readers.DatasetFormatError as error:
      raise errors.DataError(str(error)) from None
    visible = ~np.all(points == np.asarray(PTS_MISSING) - 1.0, axis=1)
    points[~visible] = np.nan
    if pts_path.parent not in images_by_folder:
      images_by_folder[pts_path.parent] = readers.list_images_by_stem(pts_path.parent)
    image = readers.image_of_pts(pts_path, images_by_folder[pts_path.parent])
    relative = image.relative_to(manual_dir)
    top = relative.parts[0] if len(relative.parts) > 1 else None
    split = top if top in split_folders else None
    example = _face(image, points, visible, None, split, where=where, image_id=relative.as_posix(),
                    num_landmarks=None if first is None else len(first.landmarks),
                    first_where=first.where if first else "")
    first = first or example
    examples.append(example)
  return examples


# --------------------------------------------------------------------------------------------- splits


def _assign_splits(rows, description: dict, *, source: str, where: str) -> dict[str, list]:
  named = [row.split for row in rows]
  with_split = [split is not None for split in named]
  if any(with_split) and not all(with_split):
    first_without = rows[with_split.index(False)].where
    raise errors.DataError(f"{first_without}: no split, while other faces name one; give every face a split "
                           "or none (then test_fraction assigns them)")
  if all(with_split):
    listed = list(description.get("splits") or dict.fromkeys(["train"] + sorted(set(named) - {"train"})))
    for row in rows:
      if row.split not in listed:
        raise errors.DataError(f"{row.where}: split {row.split!r} is not among the splits {listed} ({where})")
    splits = {name: [row for row in rows if row.split == name] for name in listed}
  else:
    listed = list(description.get("splits") or DEFAULT_SPLITS)
    if listed != list(DEFAULT_SPLITS):
      raise errors.DataError(f"{source}: faces name no split, so they are divided into {list(DEFAULT_SPLITS)}; "
                             f"add a split column (or split folders for .pts files) for the splits {listed}")
    fraction = float(description.get("test_fraction", DEFAULT_TEST_FRACTION))
    rng = np.random.default_rng(np.random.SeedSequence([int(description.get("split_seed", 0)), 0x7E57]))
    is_test = rng.random(len(rows)) < fraction
    splits = {"train": [row for row, test in zip(rows, is_test) if not test],
              "test": [row for row, test in zip(rows, is_test) if test]}
  for name, members in splits.items():
    if not members:
      raise errors.DataError(f"{source}: split {name!r} has no face; annotate faces for it or change the splits "
                             f"(or test_fraction) in {where}")
  if len(splits["train"]) < 2:
    raise errors.DataError(f"{source}: the train split has {len(splits['train'])} face; the shape model needs at "
                           "least 2")
  return splits


def _check_normalizing_points_visible(splits, points) -> None:
  for members in splits.values():
    for row in members:
      for index in points:
        if not row.visible[index]:
          raise errors.DataError(
              f"{row.where}: point {index} is missing, but the NME is normalised by the distance of points "
              f"{list(points)}; annotate it, or normalise by the face box (\"normalization\": \"box\" in "
              f"{DESCRIPTION_FILE})")


def missing_everywhere(train: list) -> list[int]:
  """Points missing in every training face (the shape model cannot place them)."""
  visible = np.stack([row.visible for row in train])
  return np.flatnonzero(~visible.any(axis=0)).tolist()
