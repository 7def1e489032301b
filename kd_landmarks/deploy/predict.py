"""Landmarks on real photos: detector -> training crop -> student -> landmarks on the original photo.

Usage::

  python -m kd_landmarks.deploy.predict --workdir RUN [--model student_kd] [--checkpoint MODEL_DIR_OR_FILE] \
      IMAGE_OR_DIR ... [--out DIR] [--overwrite] [--detector dlib_hog] [--threads N]
  kd-landmarks-predict ...      (the same, as the installed console script)
  python -m kd_landmarks.deploy.predict --workdir RUN clip.mp4 [--frame_folders FRAMES_DIR] [--redetect_every 30] \
      [--no_smoothing | --min_cutoff HZ --beta B] [--fps 30]
  python -m kd_landmarks.deploy.predict fit-box-map --workdir RUN [--model student_kd] --data_dir DATA \
      [--detector dlib_hog] [--split train] [--max_images N]

For each image ``--out`` receives ``<name>.json`` (per face: detector box and score, the crop box, the
landmarks in original-image pixels) and ``<name>.png`` (an overlay); ``summary.json`` lists every input with
its status (``ok``, ``no_face``, ``error`` with the reason, or ``skipped`` for non-image files in a folder).
Files that ``--out`` already holds are kept: a run that would write one stops before any work, naming it,
unless ``--overwrite``.
A video file (``video.VIDEO_EXTENSIONS``; extra ``video``), or with ``--frame_folders`` a folder of frames,
is tracked frame by frame (:mod:`kd_landmarks.deploy.video`): ``<name>.jsonl`` (one record per frame) and
``<name>.mp4`` (the overlay).

The crop reproduces evaluation (paper Section 4.3, ``augment.preprocess_eval``): the square landmark box
scaled by ``EVAL_BOX_SCALE``. A photo has no landmarks, so the landmark box is predicted from the detector's
box by the :class:`kd_landmarks.deploy.detect.BoxMap` learned on the training set (``fit-box-map``).

The Python API is :class:`Predictor` (``from kd_landmarks import Predictor``); the CLI runs it. A model
directory runs in JAX; ``--checkpoint`` may also name an exported ``.onnx`` (ONNX Runtime) or ``.tflite``
(LiteRT) file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageOps
from tqdm import tqdm

from kd_landmarks import augment
from kd_landmarks.training import checkpoint
from kd_landmarks import coords
from kd_landmarks import datasets
from kd_landmarks import errors
from kd_landmarks import files
from kd_landmarks.deploy import detect
from kd_landmarks.deploy import runtimes
from kd_landmarks.deploy import video
from kd_landmarks.datasets import images as image_io
from kd_landmarks.datasets import info

DEFAULT_MODEL = "student_kd"
# Photos with a longer side are shrunk for detection only (landmarks use the full-resolution photo).
MAX_DETECT_SIDE = 1280
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SUMMARY_JSON = "summary.json"


def eval_box_scale() -> float:
  """The evaluation crop's margin around the landmark box (contract: ``augment.EVAL_BOX_SCALE``)."""
  return float(augment.EVAL_BOX_SCALE)


def crop_for_landmark_box(image: np.ndarray, landmark_box, *, image_size: int,
                          box_scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Cuts the student's input: the landmark box (cx, cy, side) scaled by ``box_scale``, resized to
  ``image_size``. Returns (crop float32 ``[S, S, 3]`` in [0, 1], crop-pixels -> image-pixels affine)."""
  cx, cy, side = (float(v) for v in landmark_box)
  if not side > 0:
    raise ValueError(f"a face box needs a positive side; got {side}")
  crop_to_image = coords.crop_affine(np.array([cx, cy, side * box_scale]), image_size)
  crop = image_io.crop_face(image, crop_to_image, image_size)
  return crop.astype(np.float32) / 255.0, crop_to_image


def landmarks_to_image(landmarks_normalized, crop_to_image, image_size: int) -> np.ndarray:
  """Student output (normalised coordinates of the crop, ``[..., K, 2]``) -> original-image pixels."""
  crop_px = coords.to_pixels(np.asarray(landmarks_normalized, dtype=np.float64), image_size)
  return np.asarray(coords.apply_affine(np.asarray(crop_to_image, dtype=np.float64), crop_px))


@dataclasses.dataclass
class FaceLandmarks:
  """One face in one photo, in original-image pixels."""
  box: tuple[float, float, float, float]   # the detector's (or the caller's) box (x0, y0, x1, y1)
  score: float | None                      # the detector's score; None for a box the caller gave
  crop_box: tuple[float, float, float]     # the landmark box (cx, cy, side) predicted from the box
  landmarks: np.ndarray                    # [K, 2]

  def to_json(self) -> dict:
    return {"box": [round(float(v), 3) for v in self.box],
            "score": None if self.score is None else round(float(self.score), 4),
            "crop_box": [round(float(v), 3) for v in self.crop_box],
            "landmarks": np.round(self.landmarks, 3).tolist()}


class Predictor:
  """A trained student as facial landmarks on photos, in JAX, ONNX Runtime or LiteRT::

    from kd_landmarks import Predictor
    predictor = Predictor.load("runs/300w")                      # or RUN/student_kd, student_kd.onnx, .tflite
    landmarks = predictor.predict(photo)                         # [faces, K, 2] photo pixels, dlib finds faces
    landmarks = predictor.predict(photo, boxes=[(x0, y0, x1, y1)])  # your own face boxes: no dlib needed

  ``runner`` maps uint8 crops ``[B, S, S, 3]`` to normalised landmarks ``[B, K, 2]``
  (:mod:`kd_landmarks.deploy.runtimes`). Face boxes (the detector's, or the caller's) go through ``box_map`` to
  the landmark box the student was trained on, and the crop is the evaluation crop (paper Section 4.3).
  All faces of a photo run in one batch. The detector is built on first use, so a caller who gives boxes
  never needs dlib.
  """

  def __init__(self, runner, *, detector: str | detect.FaceDetector = detect.DEFAULT_DETECTOR,
               box_map: detect.BoxMap | None = None, box_scale: float | None = None):
    self.runner = runner
    self.meta = dict(runner.meta)
    self.image_size = int(runner.image_size)
    self.num_landmarks = int(runner.num_landmarks)
    self.backend = runner.backend
    if isinstance(detector, str):
      self.detector_name, self._detector = detector, None
    else:
      self.detector_name, self._detector = detector.name, detector
    self.box_map = detect.load_box_map(None, self.detector_name) if box_map is None else box_map
    self.box_scale = eval_box_scale() if box_scale is None else float(box_scale)

  @classmethod
  def load(cls, path: str, *, backend: str | None = None, model: str = DEFAULT_MODEL,
           detector: str | detect.FaceDetector = detect.DEFAULT_DETECTOR, threads: int = 1,
           box_scale: float | None = None) -> "Predictor":
    """From a training workdir (its ``model`` directory), a model directory (``model.json`` + checkpoint:
    JAX) or an exported file (``.onnx``: ONNX Runtime; ``.tflite``: LiteRT). ``backend`` only checks the
    choice: a checkpoint runs in JAX, a file in its own runtime. The box map is the one fitted for
    ``detector`` in the model directory (or beside the exported file), else the documented default."""

    if backend is not None and backend not in runtimes.BACKENDS:
      raise errors.ArgumentError(f"unknown backend {backend!r}; choose from {runtimes.BACKENDS}")
    if os.path.isfile(path):
      runner = runtimes.runner_for_file(path, threads=threads)
      folder = os.path.dirname(os.path.abspath(path))
      parent = os.path.dirname(folder)
      if not os.path.exists(os.path.join(folder, detect.BOX_MAP_JSON)) and os.path.exists(
          os.path.join(parent, "model.json")):
        folder = parent  # MODEL_DIR/export/<file>: the map fitted in the model directory after the export
    elif os.path.isdir(path):
      folder = path
      if not os.path.exists(os.path.join(path, checkpoint.MODEL_JSON)):
        folder = resolve_model_dir(path, model, None)  # a training workdir
      module, variables, meta = checkpoint.load_inference_variables(folder)
      runner = runtimes.JaxRunner(module, variables, meta)
    else:
      raise errors.MissingFileError(f"{path}: no such workdir, model directory or exported model file")
    if backend is not None and backend != runner.backend:
      raise errors.ArgumentError(f"{path} runs in {runner.backend}, not {backend}: pass a model directory for jax, "
                              "an exported .onnx file for onnx or a .tflite file for litert (kd-landmarks-export "
                              "writes them)")
    detector_name = detector if isinstance(detector, str) else detector.name
    return cls(runner, detector=detector, box_map=detect.load_box_map(folder, detector_name),
               box_scale=box_scale)

  @classmethod
  def from_module(cls, module, variables, meta: dict, **kwargs) -> "Predictor":
    """A JAX predictor from what :func:`kd_landmarks.training.checkpoint.load_inference_variables` returns."""

    return cls(runtimes.JaxRunner(module, variables, meta), **kwargs)

  @property
  def detector(self) -> detect.FaceDetector:
    if self._detector is None:
      self._detector = detect.get_detector(self.detector_name)
    return self._detector

  def landmarks_for_boxes(self, image: np.ndarray, landmark_boxes) -> np.ndarray:
    """Runs the student on the crops around landmark boxes (cx, cy, side), all in one batch; returns
    ``[F, K, 2]`` image pixels."""
    cuts = [crop_for_landmark_box(image, box, image_size=self.image_size, box_scale=self.box_scale)
            for box in landmark_boxes]
    if not cuts:
      return np.zeros((0, self.num_landmarks, 2))
    # The crop is uint8 resampled / 255 (image_io.crop_face): x 255 and rounding gives the bytes back.
    crops = np.stack([np.round(crop * 255.0).astype(np.uint8) for crop, _ in cuts])
    normalized = np.asarray(self.runner(crops))
    if normalized.shape != (len(cuts), self.num_landmarks, 2):
      raise ValueError(f"the model returned {normalized.shape} for {len(cuts)} faces; expected "
                       f"{(len(cuts), self.num_landmarks, 2)}")
    return np.stack([landmarks_to_image(points, crop_to_image, self.image_size)
                     for points, (_, crop_to_image) in zip(normalized, cuts)])

  def landmarks_for_box(self, image: np.ndarray, landmark_box) -> np.ndarray:
    """One landmark box (cx, cy, side) -> ``[K, 2]`` image pixels."""
    return self.landmarks_for_boxes(image, [landmark_box])[0]

  def detect(self, image: np.ndarray) -> list[detect.Detection]:
    """Runs the detector, on a copy shrunk to ``MAX_DETECT_SIDE`` for large photos (HOG with upsampling
    on a 12-megapixel photo takes tens of seconds and gigabytes), with boxes scaled back to the photo."""
    height, width = image.shape[:2]
    shrink = max(height, width) / MAX_DETECT_SIDE
    if shrink <= 1.0:
      return self.detector.detect(image)
    small_size = (max(1, round(width / shrink)), max(1, round(height / shrink)))
    small = np.asarray(Image.fromarray(image).resize(small_size, Image.Resampling.BILINEAR,
                                                     reducing_gap=2.0))
    scale_x, scale_y = width / small_size[0], height / small_size[1]
    # Box extents scale about the image's outer corner (-0.5, -0.5) in the pixel-centre convention.
    return [detect.Detection(((x0 + 0.5) * scale_x - 0.5, (y0 + 0.5) * scale_y - 0.5,
                              (x1 + 0.5) * scale_x - 0.5, (y1 + 0.5) * scale_y - 0.5), d.score)
            for d in self.detector.detect(small) for x0, y0, x1, y1 in [d.box]]

  def predict_faces(self, image: np.ndarray, boxes=None) -> list[FaceLandmarks]:
    """Landmarks with their boxes: of every detected face (best first) or of each box given."""
    image = _check_photo(image)
    if boxes is None:
      found = [(d.box, d.score) for d in self.detect(image)]
    else:
      boxes = check_boxes(boxes)
      scores = boxes[:, 4] if boxes.shape[1] == 5 else [None] * len(boxes)
      found = [(tuple(float(v) for v in box[:4]), None if score is None else float(score))
               for box, score in zip(boxes, scores)]
    landmark_boxes = [self.box_map(detect.Detection(box, 0.0).centre_width) for box, _ in found]
    landmarks = self.landmarks_for_boxes(image, landmark_boxes)
    return [FaceLandmarks(box=tuple(float(v) for v in box), score=score,
                          crop_box=tuple(float(v) for v in landmark_box), landmarks=points)
            for (box, score), landmark_box, points in zip(found, landmark_boxes, landmarks)]

  def predict_video(self, source, *, fps: float | None = None, redetect_every: int | None = None,
                    smoothing: bool = True, min_cutoff: float = video.DEFAULT_MIN_CUTOFF,
                    beta: float = video.DEFAULT_BETA, rule: video.TrackingRule | None = None):
    """Landmarks on every frame of a video, tracked (:mod:`kd_landmarks.deploy.video`); yields
    :class:`kd_landmarks.deploy.video.FrameResult` (per face: identity, box, landmarks ``[K, 2]`` frame
    pixels, ``source`` 'detection' or 'tracking').

    ``source``: a video file (extra ``video``), a folder of frames (name order), or an iterable of RGB uint8
    frames. ``fps`` times the frames of a folder or an iterable (default ``video.DEFAULT_FPS``); a video file
    has its own timestamps. The detector runs on the first frame, every ``redetect_every`` frames and where
    tracking is lost (``rule``: :class:`kd_landmarks.deploy.video.TrackingRule`). ``smoothing``: the One Euro
    filter with ``min_cutoff`` (Hz) and ``beta``."""
    rule = rule or video.TrackingRule()
    if redetect_every is not None:
      rule = dataclasses.replace(rule, redetect_every=int(redetect_every))
    filter_params = video.Smoothing(min_cutoff, beta) if smoothing else None
    rate = video.DEFAULT_FPS if fps is None else float(fps)
    if not rate > 0:
      raise errors.ArgumentError(f"fps must be positive; got {fps}")
    if isinstance(source, (str, os.PathLike)):
      path = os.fspath(source)
      frames = (video.read_frame_folder(path, fps=rate) if os.path.isdir(path) else video.read_video(path))
    else:
      frames = ((index / rate, _check_photo(frame)) for index, frame in enumerate(source))
    return video.track_frames(self, frames, rule=rule, smoothing=filter_params)

  def predict(self, image: np.ndarray, boxes=None) -> np.ndarray:
    """Landmarks ``[F, K, 2]`` in pixels of ``image`` (RGB uint8 ``[H, W, 3]``; pixel centres on integers,
    0-based), one row per face: per box of ``boxes`` in their order, else per face the detector finds, best
    first. ``boxes``: ``[F, 4]`` face boxes (x0, y0, x1, y1), framed as the predictor's detector frames faces,
    or ``[F, 5]`` with a detector's score last (recorded by :meth:`predict_faces`, not used); anything else
    raises :class:`errors.ArgumentError` (:func:`check_boxes`)."""
    faces = self.predict_faces(image, boxes)
    return np.stack([face.landmarks for face in faces]) if faces else np.zeros((0, self.num_landmarks, 2))


def check_boxes(boxes) -> np.ndarray:
  """``boxes`` as float64 ``[F, 4]`` or ``[F, 5]`` (x0, y0, x1, y1[, score]); raises
  :class:`errors.ArgumentError` for any other shape (a flat list of 8 numbers is not two faces), a box that
  is not finite, or one with x1 <= x0 or y1 <= y0."""
  try:
    array = np.asarray(boxes, dtype=np.float64)
  except (ValueError, TypeError) as error:
    raise errors.ArgumentError(f"boxes must be numbers of shape [F, 4] (x0, y0, x1, y1) or [F, 5] (with a "
                            f"score); got {boxes!r} ({error})") from None
  if array.size == 0:
    return np.zeros((0, 4))
  if array.ndim != 2 or array.shape[1] not in (4, 5):
    one = " (one face: [[x0, y0, x1, y1]])" if array.ndim == 1 and array.shape[0] in (4, 5) else ""
    raise errors.ArgumentError(f"boxes must have shape [F, 4] (x0, y0, x1, y1) or [F, 5] (with a score), one row "
                            f"per face; got shape {list(array.shape)}{one}")
  if not np.isfinite(array).all():
    raise errors.ArgumentError(f"boxes must be finite; got {array.tolist()}")
  if not (array[:, 2] > array[:, 0]).all() or not (array[:, 3] > array[:, 1]).all():
    raise errors.ArgumentError(f"face boxes are (x0, y0, x1, y1) with x1 > x0 and y1 > y0; got {array.tolist()}")
  return array


def _check_photo(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise errors.ArgumentError(f"a photo is RGB uint8 [H, W, 3] (read it with kd_landmarks.deploy.predict.read_photo); "
                               f"got {image.dtype} {image.shape}")
  return image


def read_photo(path: str) -> np.ndarray:
  """Reads a photo as uint8 RGB, upright: the EXIF orientation that phones write is applied, so that
  detection sees an upright face and the landmarks are in the frame every viewer shows."""
  try:
    with Image.open(path) as photo:
      return image_io.to_rgb8(ImageOps.exif_transpose(photo), source=path)
  except image_io.ImageReadError:
    raise
  except FileNotFoundError:
    raise image_io.ImageReadError(f"{path}: image file not found") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise image_io.ImageReadError(f"{path}: cannot decode the image ({error})") from None


def draw_overlay(image: np.ndarray, faces: Sequence[FaceLandmarks]):
  """The photo with each detector box (red), crop box (blue) and landmarks (green); a PIL image."""
  overlay = Image.fromarray(image)
  draw = ImageDraw.Draw(overlay)
  radius = max(1.0, min(image.shape[:2]) / 200.0)
  for face in faces:
    # Boxes are drawn in PIL's pixel-corner frame: ours (pixel centres on integers) shifted by +0.5.
    draw.rectangle([v + 0.5 for v in face.box], outline=(255, 0, 0))
    cx, cy, side = face.crop_box
    draw.rectangle([cx - side / 2 + 0.5, cy - side / 2 + 0.5, cx + side / 2 + 0.5, cy + side / 2 + 0.5],
                   outline=(0, 128, 255))
    for x, y in face.landmarks:
      x, y = x + 0.5, y + 0.5
      draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(0, 255, 0))
  return overlay


def expand_inputs(inputs: Sequence[str], *, frame_folders: bool = False) -> tuple[list[str], list[dict]]:
  """Files to run on (folders expanded, sorted; with ``frame_folders`` a folder is one clip of frames and
  stays whole) and the records of what was skipped and why."""
  files, skipped = [], []
  for entry in inputs:
    if os.path.isdir(entry) and frame_folders:
      files.append(entry)
    elif os.path.isdir(entry):
      for name in sorted(os.listdir(entry)):
        path = os.path.join(entry, name)
        if os.path.isdir(path):
          skipped.append({"image": path, "status": "skipped",
                          "reason": "a folder (not searched; --frame_folders reads a folder as a clip)"})
        elif name.lower().endswith(IMAGE_EXTENSIONS + video.VIDEO_EXTENSIONS):
          files.append(path)
        else:
          skipped.append({"image": path, "status": "skipped",
                          "reason": f"not an image {IMAGE_EXTENSIONS} or video {video.VIDEO_EXTENSIONS} "
                                    "extension"})
    else:
      # Named explicitly: try it whatever its extension; a missing file is reported as an error.
      files.append(entry)
  return files, skipped


def _output_stem(path: str, used: dict) -> str:
  stem = os.path.splitext(os.path.basename(path))[0] or "image"
  count = used.get(stem, 0)
  used[stem] = count + 1
  return stem if count == 0 else f"{stem}_{count}"  # Two inputs named alike must not overwrite each other.


def _is_clip(path: str) -> bool:
  return os.path.isdir(path) or path.lower().endswith(video.VIDEO_EXTENSIONS)


def planned_outputs(files_to_run: Sequence[str]) -> list[tuple[str, str, tuple[str, ...]]]:
  """``(input, stem, output file names)`` for each input, in order: ``<stem>.json`` and ``<stem>.png`` for a
  photo, ``<stem>.jsonl`` and ``<stem>.mp4`` for a clip. Every input gets its stem, read or not, so that the
  names are known before any is read."""
  used: dict = {}
  plan = []
  for path in files_to_run:
    stem = _output_stem(path, used)
    plan.append((path, stem, (stem + ".jsonl", stem + ".mp4") if _is_clip(path) else (stem + ".json",
                                                                                       stem + ".png")))
  return plan


def check_out_dir(out_dir: str, inputs: Sequence[str], *, frame_folders: bool = False,
                  overwrite: bool = False) -> None:
  """Raises :class:`errors.ArgumentError` when ``out_dir`` holds an input photo, video or frame (the overlays
  (``<name>.png``, ``<name>.mp4``), JSON files and ``summary.json`` written there could overwrite it, and a
  later run on the folder would read them back), or, unless ``overwrite``, a file this run would write."""
  to_run, _ = expand_inputs(inputs, frame_folders=frame_folders)
  out_real = os.path.realpath(out_dir)
  for path in to_run:
    if os.path.isdir(path) and os.path.realpath(path) == out_real:
      raise errors.ArgumentError(f"--out {out_dir} is the frame folder {path}: predict writes <name>.png, "
                              "<name>.mp4 and <name>.json(l) there, which would add files to the clip; choose "
                              "another --out")
    if os.path.dirname(os.path.realpath(path)) == out_real:
      raise errors.ArgumentError(f"--out {out_dir} is the folder of the input {path}: predict writes <name>.png "
                              "overlays and <name>.json there, which would overwrite photos; choose another --out")
  if overwrite:
    return
  names = [SUMMARY_JSON] + [name for _, _, outputs in planned_outputs(to_run) for name in outputs]
  existing = [os.path.join(out_dir, name) for name in names if os.path.lexists(os.path.join(out_dir, name))]
  if existing:
    others = f" (and {len(existing) - 1} other file(s) this run writes)" if len(existing) > 1 else ""
    raise errors.ArgumentError(f"--out {out_dir} already holds {existing[0]}{others}: pass --overwrite "
                            "(overwrite=True) to replace them, or choose another --out")


def predict_files(predictor: Predictor, inputs: Sequence[str], out_dir: str, *,
                  progress: bool = True, frame_folders: bool = False, fps: float | None = None,
                  rule: video.TrackingRule | None = None,
                  smoothing: video.Smoothing | None = video.Smoothing(), overwrite: bool = False) -> dict:
  """Runs :class:`Predictor` on files and folders; writes per-image JSON + PNG, per video (a video file,
  or a folder of frames with ``frame_folders``) JSON lines + an overlay ``.mp4`` (:func:`predict_clip`), and
  ``summary.json`` into ``out_dir``. Never raises for a bad image or video: it is reported in the summary.
  Raises :class:`errors.ArgumentError` before any work when ``out_dir`` holds an input, or a file this run would
  write unless ``overwrite`` (:func:`check_out_dir`). Each file is written whole or not at all: a full disk
  stops the run with :class:`kd_landmarks.errors.WriteError` naming the file, leaving no part of one."""
  check_out_dir(out_dir, inputs, frame_folders=frame_folders, overwrite=overwrite)
  with files.writing(out_dir):
    os.makedirs(out_dir, exist_ok=True)
  to_run, records = expand_inputs(inputs, frame_folders=frame_folders)
  box_map_note = {"detector": predictor.detector_name, **predictor.box_map.to_json(),
                  "fitted": predictor.box_map.fitted}
  plan = planned_outputs(to_run)
  for path, stem, _ in tqdm(plan, desc="predict", unit="input", disable=not progress or len(plan) < 2):
    if _is_clip(path):
      records.append(predict_clip(predictor, path, out_dir, stem, fps=fps, rule=rule, smoothing=smoothing,
                                  progress=progress))
      continue
    record: dict[str, Any] = {"image": path}
    try:
      image = read_photo(path)
    except image_io.ImageReadError as error:
      records.append({**record, "status": "error", "reason": str(error)})
      continue
    try:
      faces = predictor.predict_faces(image)
    except (ValueError, RuntimeError) as error:  # e.g. a degenerate crop box, a dlib failure on odd input
      records.append({**record, "status": "error", "reason": f"{type(error).__name__}: {error}"})
      continue
    result = {"image": path, "width": int(image.shape[1]), "height": int(image.shape[0]),
              "model": predictor.meta.get("model"), "dataset": predictor.meta.get("dataset"),
              "checkpoint": predictor.meta.get("checkpoint"), "box_map": box_map_note,
              "faces": [face.to_json() for face in faces]}
    json_path = os.path.join(out_dir, stem + ".json")
    with files.atomic_write(json_path) as f:
      json.dump(result, f, indent=1)
    png_path = os.path.join(out_dir, stem + ".png")
    with files.atomic_write(png_path, "wb") as f:
      draw_overlay(image, faces).save(f, format="PNG")
    records.append({**record, "status": "ok" if faces else "no_face", "faces": len(faces),
                    "json": json_path, "png": png_path})
  summary = {"box_map": box_map_note,
             "counts": {status: sum(r["status"] == status for r in records)
                        for status in ("ok", "no_face", "error", "skipped")},
             "images": records}
  if any("video" in r for r in records):
    summary["video"] = {"tracking": (rule or video.TrackingRule()).to_json(),
                        "smoothing": smoothing.to_json() if smoothing else None}
  with files.atomic_write(os.path.join(out_dir, SUMMARY_JSON)) as f:
    json.dump(summary, f, indent=1)
  return summary


def predict_clip(predictor: Predictor, path: str, out_dir: str, stem: str, *, fps: float | None = None,
                 rule: video.TrackingRule | None = None, smoothing: video.Smoothing | None = video.Smoothing(),
                 progress: bool = True) -> dict:
  """Tracks the faces of a video file or frame folder; writes ``<stem>.jsonl`` (one JSON record per frame:
  ``frame``, ``time`` s, ``detector_ran``, ``lost``, ``faces`` with ``id``, ``source``, ``box``, ``score``,
  ``crop_box``, ``landmarks``) and ``<stem>.mp4`` (the overlay) into ``out_dir``. Returns the summary record;
  a video that cannot be read, or a missing ``video`` extra, is an ``error`` record naming the reason, and
  leaves neither file (both are written under temporary names and renamed when the clip is done)."""
  record: dict[str, Any] = {"video": path}
  jsonl_path = os.path.join(out_dir, stem + ".jsonl")
  overlay_path = os.path.join(out_dir, stem + ".mp4")
  # The container format follows the extension, so the temporary name keeps ".mp4".
  partial_overlay = os.path.join(out_dir, f"{stem}.partial-{os.getpid()}.mp4")
  frames_done = detector_frames = face_frames = 0
  try:
    if os.path.isdir(path):
      rate = video.DEFAULT_FPS if fps is None else float(fps)
      frames, total = video.read_frame_folder(path, fps=rate), len(video.frame_files(path))
    else:
      (rate, total), frames = video.video_rate_and_length(path), video.read_video(path)
    tracker = video.VideoTracker(predictor, rule=rule, smoothing=smoothing)
    with files.writing(overlay_path), files.atomic_write(jsonl_path) as lines, \
        video.VideoWriter(partial_overlay, fps=rate) as writer:
      for time, frame in tqdm(frames, desc=os.path.basename(os.path.normpath(path)), unit="frame", total=total,
                              disable=not progress, dynamic_ncols=True):
        result = tracker.update(frame, time)
        lines.write(json.dumps(result.to_json()) + "\n")
        writer.write(np.asarray(draw_overlay(frame, result.faces)))
        frames_done += 1
        detector_frames += result.detector_ran
        face_frames += bool(result.faces)
    os.replace(partial_overlay, overlay_path)
  except (video.VideoReadError, ImportError) as error:
    return {**record, "status": "error", "reason": str(error), "frames": frames_done}
  except (ValueError, RuntimeError) as error:  # e.g. a dlib failure on an odd frame
    return {**record, "status": "error", "reason": f"{path}: frame {frames_done}: {type(error).__name__}: {error}",
            "frames": frames_done}
  finally:
    if os.path.exists(partial_overlay):
      os.remove(partial_overlay)
  if frames_done == 0:
    return {**record, "status": "error", "reason": f"{path}: the video holds no frame", "frames": 0}
  return {**record, "status": "ok" if face_frames else "no_face", "frames": frames_done,
          "detector_frames": detector_frames, "frames_with_faces": face_frames,
          "identities": tracker.next_id, "jsonl": jsonl_path, "video_overlay": overlay_path}


def resolve_model_dir(workdir: str | None, model: str, checkpoint_path: str | None) -> str:
  """``--checkpoint`` (a model directory) wins; else ``WORKDIR/MODEL``, which must hold a trained model: if
  not, the error names the training phase that makes it and the models the workdir has."""
  if checkpoint_path:
    return checkpoint_path
  if not workdir:
    raise errors.ArgumentError("give --workdir RUN (the training workdir) or --checkpoint MODEL_DIR")
  model_dir = os.path.join(workdir, model)
  if os.path.exists(os.path.join(model_dir, checkpoint.MODEL_JSON)):
    return model_dir
  if not os.path.isdir(workdir):
    raise errors.MissingFileError(f"--workdir {workdir} does not exist: give the training workdir")
  trained = sorted(name for name in os.listdir(workdir)
                   if os.path.exists(os.path.join(workdir, name, checkpoint.MODEL_JSON)))
  others = f"; it has {', '.join(trained)} (pass --model NAME)" if trained else "; it holds no trained model"
  raise errors.MissingFileError(f"{workdir} has no trained {model} ({model_dir}/{checkpoint.MODEL_JSON} is "
                                f"missing){others}. Train it: {_training_command(workdir, model)}")


def _training_command(workdir: str, model: str) -> str:
  """The command whose phase writes ``WORKDIR/<model>`` (``student_<loss>[_seed<k>]``, ``teacher_<name>``)."""
  command = f"python -m kd_landmarks.main --config <config>:phase={{phase}} --workdir {workdir}"
  if model.startswith("teacher_"):
    return "`" + command.format(phase=model) + "`"
  if model.startswith("student_"):
    loss = model[len("student_"):].split("_seed")[0]
    return "`" + command.format(phase="student") + f" --config.student_loss={loss}` (after the teachers)"
  return "`" + command.format(phase="all") + "`"


def _training_examples(dataset: str, split: str, data_dir: str | None, max_images: int | None):
  source = datasets.load_split(dataset, split, data_dir)
  count = len(source) if max_images is None else min(len(source), max_images)
  # Evenly spaced, so that a capped fit still sees the whole split rather than its first shard.
  for index in np.unique(np.linspace(0, len(source) - 1, count).round().astype(int)):
    yield source[int(index)]


def fit_box_map_for_model(model_dir: str, *, detector_name: str = detect.DEFAULT_DETECTOR,
                          dataset: str | None = None, split: str | None = None,
                          data_dir: str | None = None, max_images: int | None = None,
                          progress: bool = True) -> tuple[detect.BoxMap, dict]:
  """Learns the detector-box -> landmark-box map on the model's training split (the stored crops:
  image + ground-truth landmarks in crop pixels) and stores it in ``model_dir/box_map.json``."""
  meta = checkpoint.read_model_json(model_dir)
  dataset = dataset or meta["dataset"]
  if dataset == info.CUSTOM and data_dir is not None:  # Its splits are the prepared set's.
    datasets.register_custom(data_dir)
  split = split or info.get_info(dataset).train_split
  detector = detect.get_detector(detector_name)
  examples = _training_examples(dataset, split, data_dir, max_images)
  box_map, stats = detect.fit_box_map(detector, examples, source=f"fitted on {dataset}/{split}",
                                      progress=progress)
  detect.save_box_map(model_dir, detector_name, box_map)
  return box_map, stats


def _fit_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m kd_landmarks.deploy.predict fit-box-map",
      description="Learn the detector-box -> training-crop map on the training set; stores box_map.json.")
  parser.add_argument("--workdir")
  parser.add_argument("--model", default=DEFAULT_MODEL)
  parser.add_argument("--checkpoint", help="a model directory (overrides WORKDIR/MODEL)")
  parser.add_argument("--data_dir", help="where `python -m kd_landmarks.datasets prepare` wrote the data")
  parser.add_argument("--dataset", help="default: the model's dataset (model.json)")
  parser.add_argument("--split", help="default: the dataset's training split")
  parser.add_argument("--detector", default=detect.DEFAULT_DETECTOR, choices=sorted(detect.DETECTORS))
  parser.add_argument("--max_images", type=int, help="fit on this many evenly spaced images")
  args = parser.parse_args(argv)
  model_dir = resolve_model_dir(args.workdir, args.model, args.checkpoint)
  box_map, stats = fit_box_map_for_model(model_dir, detector_name=args.detector, dataset=args.dataset,
                                         split=args.split, data_dir=args.data_dir,
                                         max_images=args.max_images)
  print(json.dumps({"box_map": box_map.to_json(), "fit": stats,
                    "written": os.path.join(model_dir, detect.BOX_MAP_JSON)}, indent=1))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a mistake the user can fix is one ``error:`` line and exit ``errors.EXIT_CODE``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv and argv[0] == "fit-box-map":
      return _fit_main(argv[1:])
    return _predict_main(argv)
  except errors.UserError as error:
    return errors.report(error)


def _predict_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m kd_landmarks.deploy.predict",
      description="Facial landmarks on photos and videos with a trained student (see also: fit-box-map).")
  parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
  parser.add_argument("--workdir")
  parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory name inside the workdir")
  parser.add_argument("--checkpoint", help="a model directory or an exported .onnx/.tflite file "
                      "(overrides WORKDIR/MODEL)")
  parser.add_argument("--out", default="predictions")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace files in --out that this run writes (without it, an existing one is an error)")
  parser.add_argument("--detector", default=detect.DEFAULT_DETECTOR, choices=sorted(detect.DETECTORS))
  parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime / LiteRT threads")
  clips = parser.add_argument_group("video", "video files (extra 'video') and, with --frame_folders, folders "
                                    "of frames: tracked, smoothed, one JSON line per frame and an overlay .mp4")
  clips.add_argument("--frame_folders", action="store_true",
                     help="read each folder input as the frames of one video, in name order")
  clips.add_argument("--fps", type=float, default=video.DEFAULT_FPS,
                     help="frame rate of a folder of frames (a video file has its own)")
  clips.add_argument("--redetect_every", type=int, default=video.TrackingRule.redetect_every,
                     help="run the detector every N frames besides the first and lost frames (0: never)")
  clips.add_argument("--no_smoothing", action="store_true", help="turn the One Euro landmark filter off")
  clips.add_argument("--min_cutoff", type=float, default=video.DEFAULT_MIN_CUTOFF,
                     help="One Euro minimum cutoff frequency, Hz (lower: steadier at rest)")
  clips.add_argument("--beta", type=float, default=video.DEFAULT_BETA,
                     help="One Euro speed coefficient, per face side per second (higher: less lag in motion)")
  args = parser.parse_args(argv)
  # Before loading the model: a refused --out or a bad video setting costs nothing.
  check_out_dir(args.out, args.inputs, frame_folders=args.frame_folders, overwrite=args.overwrite)
  try:
    if not args.fps > 0:
      raise ValueError(f"--fps {args.fps}: a frame rate must be positive")
    rule = video.TrackingRule(redetect_every=args.redetect_every)
    smoothing = None if args.no_smoothing else video.Smoothing(args.min_cutoff, args.beta)
  except ValueError as error:  # The video module's own checks name the setting.
    raise errors.ArgumentError(str(error)) from None
  model_dir = resolve_model_dir(args.workdir, args.model, args.checkpoint)
  predictor = Predictor.load(model_dir, detector=args.detector, threads=args.threads)
  if not predictor.box_map.fitted:
    print(f"note: no box map fitted for {args.detector} in {model_dir}; using the {predictor.box_map.source}."
          " Run `python -m kd_landmarks.deploy.predict fit-box-map` for accurate crops.", file=sys.stderr)
  summary = predict_files(predictor, args.inputs, args.out, frame_folders=args.frame_folders, fps=args.fps,
                          rule=rule, smoothing=smoothing, overwrite=args.overwrite)
  counts = summary["counts"]
  print(f"{counts['ok']} input(s) with faces, {counts['no_face']} without a face, {counts['error']} "
        f"unreadable, {counts['skipped']} skipped -> {os.path.join(args.out, 'summary.json')}")
  for record in summary["images"]:
    if record["status"] in ("error", "no_face"):
      # An error's reason already names the file.
      print(f"  {record['status']}: {record.get('reason', record.get('image', record.get('video')))}")
  failed = counts["error"] + counts["skipped"]
  if counts["ok"] + counts["no_face"] == 0:  # Nothing was processed: a script must see the failure.
    print(f"error: all {failed} input(s) failed (none could be read as an image or video)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
