"""Face detectors for photos without a ground-truth box, and the learned map from a detector's box to the
face box the student was trained on.

The student (paper, Section 4.3) is trained and evaluated on crops around the *landmark* box
(:func:`kd_landmarks.coords.square_box_from_landmarks`). A detector's box sits elsewhere: dlib's HOG box,
for instance, cuts through the forehead and ends above the chin. Feeding the student a crop of the detector
box shifts and rescales the face it sees and costs accuracy, so :class:`BoxMap` maps a detector box
(centre_x, centre_y, width) to the landmark box (centre_x, centre_y, side). The map is fitted per detector
on the training set (:func:`fit_box_map`) and stored in the model directory; :data:`DEFAULT_BOX_MAPS` is
the documented fallback.

Detectors (all ship their models inside a PyPI package; nothing is downloaded at run time):
  * ``dlib_hog``: dlib's HOG + linear SVM frontal face detector (``dlib-bin``), upsampling the image once
    so that faces down to ~40 px are found. The default: on the real fixture (takeo, 150x225) it finds the
    face in 28 ms; ``dlib_cnn`` also finds it but takes 1.4 s on this 2-core CPU.
  * ``dlib_hog_fast``: the same without upsampling: faces from ~80 px, 7 ms on takeo (for video).
  * ``dlib_cnn``: dlib's MMOD CNN detector, model file from the ``face_recognition_models`` package.
OpenCV's Haar/LBP cascades are not offered: opencv-python-headless 5.0 ships neither ``cv2.data``
cascade files nor ``cv2.CascadeClassifier``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from kd_landmarks import coords
from kd_landmarks import errors
from kd_landmarks import files

BOX_MAP_JSON = "box_map.json"


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected face. ``box`` = (x0, y0, x1, y1): the box's outer extent in pixel coordinates of
  :mod:`kd_landmarks.coords` (pixel centres on integers, so pixels 10..20 inclusive span 9.5..20.5)."""
  box: tuple[float, float, float, float]
  score: float

  @property
  def centre_width(self) -> np.ndarray:
    """(centre_x, centre_y, width) — what :class:`BoxMap` reads."""
    x0, y0, x1, y1 = self.box
    return np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0], dtype=np.float64)


class FaceDetector(Protocol):
  """Finds faces in an RGB uint8 image ``[H, W, 3]``; returns them best first."""
  name: str

  def detect(self, image: np.ndarray) -> list[Detection]:
    ...


def _check_rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"a detector needs an RGB uint8 image [H, W, 3]; got {image.dtype} {image.shape}")
  return np.ascontiguousarray(image)


def _dlib_rect_to_box(rect) -> tuple[float, float, float, float]:
  # dlib rectangles hold inclusive pixel indices: their outer extent is half a pixel wider on each side.
  return (rect.left() - 0.5, rect.top() - 0.5, rect.right() + 0.5, rect.bottom() + 0.5)


class DlibHogDetector:
  """dlib's HOG frontal face detector. ``score`` is the SVM margin (positive = face).

  ``upsample`` = 1 doubles the image first so that faces down to ~40 px are found (80 px without), at
  about 4x the time; the two settings frame faces differently, so they are separate detectors
  (``dlib_hog``, ``dlib_hog_fast``) with separate box maps.
  """

  def __init__(self, upsample: int = 1, threshold: float = 0.0):
    import dlib  # Imported here so that kd_landmarks imports without the optional detector packages.
    self._detector = dlib.get_frontal_face_detector()
    self.upsample = int(upsample)
    self.threshold = float(threshold)
    self.name = {0: "dlib_hog_fast", 1: "dlib_hog"}.get(self.upsample, f"dlib_hog_upsample{self.upsample}")

  def detect(self, image):
    rects, scores, _ = self._detector.run(_check_rgb(image), self.upsample, self.threshold)
    found = [Detection(_dlib_rect_to_box(r), float(s)) for r, s in zip(rects, scores)]
    return sorted(found, key=lambda d: -d.score)


class DlibCnnDetector:
  """dlib's MMOD CNN face detector (model from ``face_recognition_models``). ``score`` is its confidence."""
  name = "dlib_cnn"

  def __init__(self, upsample: int = 0):
    import dlib  # Optional dependency (the dlib detectors), as above.
    self._detector = dlib.cnn_face_detection_model_v1(dlib_model_path("mmod_human_face_detector.dat"))
    self.upsample = int(upsample)

  def detect(self, image):
    found = [Detection(_dlib_rect_to_box(d.rect), float(d.confidence))
             for d in self._detector(_check_rgb(image), self.upsample)]
    return sorted(found, key=lambda d: -d.score)


DETECTORS = {"dlib_hog": DlibHogDetector, "dlib_hog_fast": lambda: DlibHogDetector(upsample=0),
             "dlib_cnn": DlibCnnDetector}
DEFAULT_DETECTOR = "dlib_hog"


def get_detector(name: str = DEFAULT_DETECTOR) -> FaceDetector:
  """Builds a detector by name, with an error listing the known ones and how to install them."""
  if name not in DETECTORS:
    raise errors.ArgumentError(f"unknown face detector: {name!r}; choose from {sorted(DETECTORS)}")
  try:
    return DETECTORS[name]()
  except ImportError as error:
    raise errors.MissingExtraError(f"face detector {name!r} needs dlib: pip install -e '.[bench]' (dlib-bin)") from error


def dlib_model_path(filename: str) -> str:
  """Path of a model file shipped by the ``face_recognition_models`` package.

  Found without importing the package: its ``__init__`` imports ``pkg_resources``, which setuptools>=81
  no longer provides.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise errors.MissingFileError(f"{filename} ships in the face_recognition_models package: "
                            "pip install face_recognition_models (or pip install -e '.[bench]')")
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", filename)
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path} is missing: reinstall face_recognition_models")
  return path


# ----------------------------------------------------------------------------------------------------
# Detector box -> landmark box.


@dataclasses.dataclass(frozen=True)
class BoxMap:
  """A similarity-equivariant linear map from a detector box to the landmark box:

      landmark_cx   = det_cx + offset_x * det_w
      landmark_cy   = det_cy + offset_y * det_w
      landmark_side = side_scale * det_w

  Offsets and scale are relative to the detector width so that one map serves faces of every size and
  position. ``source`` says where the numbers come from ("fitted on ..." or "default: ...").
  """
  offset_x: float
  offset_y: float
  side_scale: float
  source: str
  num_faces: int = 0
  # Residual spread on the fitting set, in units of the landmark box side (cx, cy, side).
  residual_std: tuple[float, float, float] = (float("nan"),) * 3

  def __call__(self, detector_box_cw) -> np.ndarray:
    """``[..., 3]`` (det_cx, det_cy, det_w) -> ``[..., 3]`` landmark box (cx, cy, side)."""
    cw = np.asarray(detector_box_cw, dtype=np.float64)
    cx, cy, w = cw[..., 0], cw[..., 1], cw[..., 2]
    return np.stack([cx + self.offset_x * w, cy + self.offset_y * w, self.side_scale * w], axis=-1)

  @property
  def fitted(self) -> bool:
    return not self.source.startswith("default")

  def to_json(self) -> dict:
    return {"offset_x": self.offset_x, "offset_y": self.offset_y, "side_scale": self.side_scale,
            "source": self.source, "num_faces": self.num_faces,
            # null, not NaN, when unknown: NaN is not valid JSON for other readers.
            "residual_std": [float(v) if np.isfinite(v) else None for v in self.residual_std]}

  @classmethod
  def from_json(cls, record: dict, where: str) -> "BoxMap":
    try:
      return cls(offset_x=float(record["offset_x"]), offset_y=float(record["offset_y"]),
                 side_scale=float(record["side_scale"]), source=str(record["source"]),
                 num_faces=int(record.get("num_faces", 0)),
                 residual_std=tuple(float("nan") if v is None else float(v)
                                    for v in record.get("residual_std", [None] * 3)))
    except (KeyError, TypeError, ValueError) as error:
      raise errors.DataError(f"{where}: malformed box map {record!r} ({error}); rerun "
                       "`python -m kd_landmarks.deploy.predict fit-box-map`") from None


# Fallbacks when no map was fitted for a model. Measured on the one real annotated fixture
# (takeo, 300W-style 68 points): dlib_hog's box (upsample 1) is (35.5, 75.5, 126.5, 166.5), the landmark
# box is centred 8% of the detector width lower and is 4% larger. The x offset (-3%) is that face's pose;
# a left-right symmetric detector has zero mean x offset, so the default uses 0. One face is a rough guide
# only: `fit-box-map` on the training set replaces it.
DEFAULT_BOX_MAPS = {
    "dlib_hog": BoxMap(0.0, 0.08, 1.04, source="default: measured on one fixture photo (takeo)"),
    # Without upsampling the HOG box on takeo is (30.5, 64.5, 135.5, 169.5): larger and higher.
    "dlib_hog_fast": BoxMap(0.0, 0.11, 0.90, source="default: measured on one fixture photo (takeo)"),
    "dlib_cnn": BoxMap(0.0, 0.24, 1.00, source="default: measured on one fixture photo (takeo)"),
}


def fit_box_map_from_pairs(detector_boxes_cw, landmark_boxes, *, source: str) -> BoxMap:
  """Least-squares fit of :class:`BoxMap` from matched pairs ``[N, 3]`` (det cx, cy, w) and (cx, cy, side).

  Each of the three equations is linear in one unknown; weighting every face equally (rather than by
  its pixel size) means minimising the residuals divided by the detector width, whose solution is the
  mean of the per-face ratios.
  """
  det = np.asarray(detector_boxes_cw, dtype=np.float64).reshape(-1, 3)
  target = np.asarray(landmark_boxes, dtype=np.float64).reshape(-1, 3)
  if len(det) == 0 or len(det) != len(target):
    raise ValueError(f"fitting a box map needs N>0 matched pairs; got {len(det)} detector boxes and "
                     f"{len(target)} landmark boxes")
  width = det[:, 2]
  if np.any(width <= 0):
    raise ValueError("detector boxes must have positive width")
  ratios = np.stack([(target[:, 0] - det[:, 0]) / width, (target[:, 1] - det[:, 1]) / width,
                     target[:, 2] / width], axis=-1)
  offset_x, offset_y, side_scale = ratios.mean(axis=0)
  box_map = BoxMap(float(offset_x), float(offset_y), float(side_scale), source=source, num_faces=len(det))
  residual = (box_map(det) - target) / target[:, 2:3]
  return dataclasses.replace(box_map, residual_std=tuple(float(v) for v in residual.std(axis=0)))


def box_iou(box_a, box_b) -> float:
  """Intersection over union of two (x0, y0, x1, y1) boxes."""
  ax0, ay0, ax1, ay1 = box_a
  bx0, by0, bx1, by1 = box_b
  inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
  union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
  return float(inter / union) if union > 0 else 0.0


def match_detection(detections: Sequence[Detection], landmarks_px, *, min_iou: float = 0.3):
  """The detection that overlaps the landmarks' square box most (IoU >= ``min_iou``), else None.

  Used to pair detections with annotated faces (fitting the map, benchmarks): a detection of another
  face in the same photo must not be paired with this face's landmarks.
  """
  cx, cy, side = coords.square_box_from_landmarks(landmarks_px)
  target = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
  best, best_iou = None, min_iou
  for detection in detections:
    iou = box_iou(detection.box, target)
    if iou >= best_iou:
      best, best_iou = detection, iou
  return best


def fit_box_map(detector: FaceDetector, examples, *, source: str, min_iou: float = 0.3,
                progress: bool = True) -> tuple[BoxMap, dict]:
  """Fits the detector's :class:`BoxMap` on annotated images.

  ``examples`` yields dicts with ``image`` (RGB uint8) and ``landmarks`` (``[K, 2]`` pixels of that image),
  e.g. the stored training crops of :func:`kd_landmarks.datasets.load_split`. Returns the map and
  counts (images seen, faces matched, missed) so that a caller can report how much data the fit saw.
  """

  det_boxes, landmark_boxes = [], []
  seen = missed = 0
  start = time.perf_counter()
  for example in tqdm(examples, desc=f"fit box map ({detector.name})", disable=not progress):
    seen += 1
    landmarks = np.asarray(example["landmarks"], dtype=np.float64)
    match = match_detection(detector.detect(np.asarray(example["image"])), landmarks, min_iou=min_iou)
    if match is None:
      missed += 1
      continue
    det_boxes.append(match.centre_width)
    landmark_boxes.append(coords.square_box_from_landmarks(landmarks))
  stats = {"images": seen, "matched": len(det_boxes), "missed": missed,
           "seconds": round(time.perf_counter() - start, 2)}
  if not det_boxes:
    raise ValueError(f"{detector.name} found none of the {seen} annotated faces; cannot fit a box map")
  return fit_box_map_from_pairs(det_boxes, landmark_boxes, source=source), stats


def save_box_map(model_dir: str, detector_name: str, box_map: BoxMap) -> str:
  """Stores (or replaces) one detector's map in ``model_dir/box_map.json``; other detectors' maps stay."""
  path = os.path.join(model_dir, BOX_MAP_JSON)
  maps = _read_box_map_file(path) if os.path.exists(path) else {}
  maps[detector_name] = box_map.to_json()
  with files.atomic_write(path) as f:
    json.dump(maps, f, indent=2, sort_keys=True)
  return path


def load_box_map(model_dir: str | None, detector_name: str) -> BoxMap:
  """The fitted map for this detector from ``model_dir/box_map.json``, else the documented default."""
  if model_dir is not None:
    path = os.path.join(model_dir, BOX_MAP_JSON)
    if os.path.exists(path):
      maps = _read_box_map_file(path)
      if detector_name in maps:
        return BoxMap.from_json(maps[detector_name], f"{path}[{detector_name!r}]")
  if detector_name not in DEFAULT_BOX_MAPS:
    raise errors.DataError(f"no box map for detector {detector_name!r} in {model_dir} and no default; run "
                     "`python -m kd_landmarks.deploy.predict fit-box-map`")
  return DEFAULT_BOX_MAPS[detector_name]


def _read_box_map_file(path: str) -> dict:
  try:
    with open(path) as f:
      maps = json.load(f)
  except json.JSONDecodeError as error:
    raise errors.DataError(f"{path} is not valid JSON ({error}); delete it and rerun fit-box-map") from None
  if not isinstance(maps, dict):
    raise errors.DataError(f"{path} must hold an object keyed by detector name")
  return maps
