"""Landmarks on video: reading and writing clips, tracking faces across frames, One Euro smoothing, and
the stability measures (jitter, lag) of a landmark track against a known ground truth.

Tracking (:class:`VideoTracker`): a face's crop on frame t is the evaluation crop around the square box of
its landmarks on frame t-1 (how ``augment.preprocess_eval`` frames a test face), its centre moved on by the
box's motion from frame t-2 to t-1 (``predict_motion``; none on the first frame after a detection), so
between detections the student sees faces framed as in evaluation, offset only by the change of motion.
On the moving clip of benchmarks/video.py (up to 3% of the face's side per frame) the demo's KD student,
which follows only part of a face's offset from its crop's centre, drifted off the face between detections
without that prediction (per-frame NME up to 74% with the detector every 10 frames) and stayed on it with
it (per-frame NME 7-24% with the detector every 30 frames). The detector runs (:class:`TrackingRule`):

  * on the first frame, and on every frame while no face is tracked;
  * every ``redetect_every`` frames (frame indices divisible by it; 0 switches the schedule off);
  * on a frame where a tracked face is *lost*: its new landmark box, compared with the box its crop was
    cut around, changed side by more than the factor ``1 + max_scale_change`` (either way), or moved its
    centre by more than ``max_shift`` of the side, or has less than ``min_inside`` of its area inside the
    frame. The shift bound sits at the edge of what the student saw in training (box centre jitter of
    +-5% of the side, box expansion 0-10%; the report's box-robustness table measures the NME beyond it):
    a face that moves further in one frame is re-found by the detector on that same frame.

On a detection frame the detector's faces replace the tracked ones; a detected face keeps the identity of
the tracked face whose landmark box it overlaps most (IoU >= ``match_iou``), else it gets a new identity.

Smoothing (:class:`OneEuroFilter`, Casiez, Roussel & Vogel, CHI 2012) runs per landmark coordinate of each
tracked identity on the frames' timestamps; the tracker cuts its crops from the raw (unsmoothed) landmarks,
so the filter's small lag never feeds back into the crops. ``beta`` multiplies the speed in face sides
(landmark-box sides) per second, so one setting serves every face size and video resolution.

Reading and writing video uses PyAV (extra ``video``: its wheel ships FFmpeg); a folder of frames needs no
extra.
"""
from __future__ import annotations

import dataclasses
import fractions
import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from kd_landmarks import coords
from kd_landmarks import errors
from kd_landmarks import metrics

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
# The frame rate given to a folder of frames (which stores none) unless the caller names one.
DEFAULT_FPS = 30.0

# One Euro defaults, chosen on the synthetic clips of benchmarks/video.py (`--sweep`; docs/deploy.md,
# "Video") with the demo's KD student in JAX: over min_cutoff in {0.3, 0.5, 1, 2, 4} Hz x beta in
# {0, 0.3, 1, 3, 10}, the lowest jitter on the static clip among the settings whose lag on the moving clip
# stays under 1 frame at 30 fps: static jitter 5.10% -> 0.94% of the inter-ocular distance, lag 0.93 frames.
DEFAULT_MIN_CUTOFF = 1.0
DEFAULT_BETA = 3.0
DEFAULT_D_CUTOFF = 1.0


class VideoReadError(errors.UserError):
  """A video or frame folder that cannot be read; the message names the file and the fix."""


def _require_av(what: str):
  try:
    import av  # Optional dependency: extra 'video' (PyAV, FFmpeg inside its wheel).
  except ImportError as error:
    raise errors.MissingExtraError(f"{what} needs PyAV: pip install 'kd_landmarks[video]'") from error
  return av


def is_video_file(path: str) -> bool:
  return os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------
# Reading and writing.


def read_video(path: str) -> Iterator[tuple[float, np.ndarray]]:
  """Yields (time in seconds, RGB uint8 frame ``[H, W, 3]``) of the first video stream of ``path``.

  Times are the frames' presentation timestamps from the start of the stream; a frame without one gets
  the time its index has at the stream's average rate."""
  av = _require_av(f"reading the video {path}")
  if not os.path.isfile(path):
    raise VideoReadError(f"{path}: video file not found")
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as error:
    raise VideoReadError(f"{path}: cannot open the video ({error})") from None
  with container:
    if not container.streams.video:
      raise VideoReadError(f"{path}: holds no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
    start = None
    try:
      for index, frame in enumerate(container.decode(stream)):
        if frame.time is None:
          time = index / rate
        else:
          start = frame.time if start is None else start
          time = frame.time - start
        yield float(time), frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, ValueError) as error:
      raise VideoReadError(f"{path}: cannot decode the video ({error})") from None


def frame_files(folder: str) -> list[str]:
  """The frames of a folder, by name (``frame_0009.png`` before ``frame_0010.png``)."""
  return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
          if name.lower().endswith(FRAME_EXTENSIONS) and os.path.isfile(os.path.join(folder, name))]


def read_frame_folder(folder: str, *, fps: float = DEFAULT_FPS) -> Iterator[tuple[float, np.ndarray]]:
  """Yields (index / fps, RGB uint8 frame) for the image files of ``folder`` in name order."""
  paths = frame_files(folder)
  if not paths:
    raise VideoReadError(f"{folder}: no frames (image files {FRAME_EXTENSIONS}) in the folder")
  shape = None
  for index, path in enumerate(paths):
    try:
      with Image.open(path) as image:
        frame = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
      raise VideoReadError(f"{path}: cannot decode the frame ({error})") from None
    if shape is not None and frame.shape != shape:
      raise VideoReadError(f"{path}: frame is {frame.shape[1]}x{frame.shape[0]}, the folder's first frame "
                           f"{shape[1]}x{shape[0]}; a frame folder holds frames of one size")
    shape = frame.shape
    yield index / fps, frame


def video_rate_and_length(path: str) -> tuple[float, int | None]:
  """The average frame rate a video declares (``DEFAULT_FPS`` where it declares none) and its frame count
  (None where the container does not say)."""
  av = _require_av(f"reading the video {path}")
  try:
    with av.open(path) as container:
      stream = container.streams.video[0] if container.streams.video else None
      rate = stream.average_rate if stream is not None else None
      frames = int(stream.frames) if stream is not None and stream.frames else None
  except (av.error.FFmpegError, OSError, ValueError) as error:
    raise VideoReadError(f"{path}: cannot open the video ({error})") from None
  return (float(rate) if rate else DEFAULT_FPS), frames


class VideoWriter:
  """Writes RGB uint8 frames to an H.264 ``.mp4`` (yuv420p, which every player reads) at a constant rate.

  Odd frame sizes are padded by one edge pixel (the codec needs even ones)."""

  def __init__(self, path: str, *, fps: float, crf: int = 20):
    av = _require_av(f"writing the video {path}")
    self.path = path
    self.fps = fractions.Fraction(fps).limit_denominator(1001)
    self.crf = int(crf)
    self._av = av
    self._container = av.open(path, mode="w")
    self._stream = None

  def write(self, frame: np.ndarray) -> None:
    frame = np.asarray(frame, dtype=np.uint8)
    height, width = frame.shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    if any(p[1] for p in pad):
      frame = np.pad(frame, pad, mode="edge")
    if self._stream is None:
      self._stream = self._container.add_stream("libx264", rate=self.fps)
      self._stream.width, self._stream.height = frame.shape[1], frame.shape[0]
      self._stream.pix_fmt = "yuv420p"
      self._stream.options = {"crf": str(self.crf)}
    for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
      self._container.mux(packet)

  def close(self) -> None:
    if self._stream is not None:
      for packet in self._stream.encode():
        self._container.mux(packet)
    self._container.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_video(path: str, frames: Iterable[np.ndarray], *, fps: float = DEFAULT_FPS, crf: int = 20) -> str:
  """Writes frames to an H.264 ``.mp4``; returns ``path``."""
  with VideoWriter(path, fps=fps, crf=crf) as writer:
    for frame in frames:
      writer.write(frame)
  return path


# ----------------------------------------------------------------------------------------------------
# One Euro filter.


def _check_one_euro(min_cutoff, beta, d_cutoff) -> None:
  if not min_cutoff > 0 or not d_cutoff > 0 or not beta >= 0:
    raise ValueError(f"One Euro smoothing needs min_cutoff > 0 Hz, beta >= 0 and d_cutoff > 0 Hz; got "
                     f"min_cutoff={min_cutoff}, beta={beta}, d_cutoff={d_cutoff}")


def _alpha(cutoff, dt):
  tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, dtype=np.float64))
  return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
  """The One Euro filter (Casiez et al. 2012) on an array of signals sampled at the same times.

  Each element is filtered on its own: an exponential smoother whose cutoff frequency rises with the
  element's (smoothed) speed, ``cutoff = min_cutoff + beta * |speed| / scale``: low cutoff at rest (no
  jitter), high cutoff in motion (little lag). ``scale`` turns the speed into the unit ``beta`` reads
  (here face sides per second). ``min_cutoff`` and ``d_cutoff`` in Hz.
  """

  def __init__(self, min_cutoff: float = DEFAULT_MIN_CUTOFF, beta: float = DEFAULT_BETA,
               d_cutoff: float = DEFAULT_D_CUTOFF):
    _check_one_euro(min_cutoff, beta, d_cutoff)
    self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
    self._value = self._speed = self._time = None

  def __call__(self, value, time: float, scale: float = 1.0) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if self._value is None:
      self._value, self._speed, self._time = value.copy(), np.zeros_like(value), float(time)
      return value.copy()
    dt = float(time) - self._time
    if not dt > 0:  # A repeated or out-of-order timestamp: nothing to smooth over.
      return self._value.copy()
    speed = (value - self._value) / dt
    self._speed = self._speed + _alpha(self.d_cutoff, dt) * (speed - self._speed)
    cutoff = self.min_cutoff + self.beta * np.abs(self._speed) / float(scale)
    self._value = self._value + _alpha(cutoff, dt) * (value - self._value)
    self._time = float(time)
    return self._value.copy()


@dataclasses.dataclass(frozen=True)
class Smoothing:
  """One Euro parameters of the landmark smoothing."""
  min_cutoff: float = DEFAULT_MIN_CUTOFF
  beta: float = DEFAULT_BETA
  d_cutoff: float = DEFAULT_D_CUTOFF

  def __post_init__(self):
    _check_one_euro(self.min_cutoff, self.beta, self.d_cutoff)

  def new_filter(self) -> OneEuroFilter:
    return OneEuroFilter(self.min_cutoff, self.beta, self.d_cutoff)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Tracking.


def landmark_box(landmarks) -> np.ndarray:
  """(cx, cy, side) of the square landmark box the student's crops are framed on."""
  return coords.square_box_from_landmarks(np.asarray(landmarks, dtype=np.float64))


def box_corners(box) -> tuple[float, float, float, float]:
  cx, cy, side = (float(v) for v in box)
  return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _iou(a, b) -> float:
  ax0, ay0, ax1, ay1 = a
  bx0, by0, bx1, by1 = b
  inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
  union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
  return inter / union if union > 0 else 0.0


def inside_fraction(box, frame_shape) -> float:
  """The fraction of the square box's area inside the frame (pixel extent -0.5 .. W - 0.5)."""
  x0, y0, x1, y1 = box_corners(box)
  height, width = frame_shape[:2]
  area = (x1 - x0) * (y1 - y0)
  if not area > 0:
    return 0.0
  inside = (max(0.0, min(x1, width - 0.5) - max(x0, -0.5)) * max(0.0, min(y1, height - 0.5) - max(y0, -0.5)))
  return inside / area


@dataclasses.dataclass(frozen=True)
class TrackingRule:
  """When the detector runs and when a tracked face counts as lost (module docstring)."""
  redetect_every: int = 30
  max_scale_change: float = 0.15
  max_shift: float = 0.15
  min_inside: float = 0.5
  match_iou: float = 0.3
  # The crop's centre moves on by the face's last frame-to-frame motion (constant velocity): a student that
  # follows only part of a face's offset from the crop centre then trails a moving face by less.
  predict_motion: bool = True

  def __post_init__(self):
    if self.redetect_every < 0:
      raise ValueError(f"redetect_every must be >= 0 (0: only when tracking is lost); got {self.redetect_every}")
    if not self.max_scale_change > 0 or not self.max_shift > 0 or not 0 <= self.min_inside <= 1:
      raise ValueError(f"TrackingRule needs max_scale_change > 0, max_shift > 0 and 0 <= min_inside <= 1; "
                       f"got {self}")

  def scheduled(self, index: int) -> bool:
    return self.redetect_every > 0 and index % self.redetect_every == 0

  def lost_reason(self, crop_box, new_box, frame_shape) -> str | None:
    """Why the landmarks ``new_box`` found in the crop around ``crop_box`` are not trusted, else None."""
    side, new_side = float(crop_box[2]), float(new_box[2])
    if not np.all(np.isfinite(new_box)) or not new_side > 0:
      return "degenerate landmarks"
    ratio = new_side / side
    if ratio > 1 + self.max_scale_change or ratio < 1 / (1 + self.max_scale_change):
      return f"scale changed x{ratio:.2f}"
    shift = math.hypot(new_box[0] - crop_box[0], new_box[1] - crop_box[1]) / side
    if shift > self.max_shift:
      return f"moved {shift:.2f} of its side"
    inside = inside_fraction(new_box, frame_shape)
    if inside < self.min_inside:
      return f"{inside:.2f} of the face inside the frame"
    return None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class TrackedFace:
  """One face on one frame, in frame pixels."""
  track_id: int
  source: str                               # 'detection' or 'tracking'
  box: tuple[float, float, float, float]    # detector box, or on tracked frames the box the crop came from
  score: float | None                       # the detector's score (None on tracked frames)
  crop_box: tuple[float, float, float]      # the landmark box (cx, cy, side) the crop was cut around
  landmarks: np.ndarray                     # [K, 2], smoothed when smoothing is on
  raw_landmarks: np.ndarray                 # [K, 2], the student's output

  def to_json(self) -> dict:
    return {"id": self.track_id, "source": self.source,
            "box": [round(float(v), 3) for v in self.box],
            "score": None if self.score is None else round(float(self.score), 4),
            "crop_box": [round(float(v), 3) for v in self.crop_box],
            "landmarks": np.round(self.landmarks, 3).tolist()}


@dataclasses.dataclass
class FrameResult:
  """The faces of one frame; ``detector_ran`` says whether the detector ran on it, and ``lost`` why
  tracking was given up on it (empty where it was not)."""
  index: int
  time: float
  detector_ran: bool
  faces: list[TrackedFace]
  lost: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return {"frame": self.index, "time": round(float(self.time), 6), "detector_ran": self.detector_ran,
            "lost": self.lost, "faces": [face.to_json() for face in self.faces]}


@dataclasses.dataclass
class _Track:
  track_id: int
  raw_landmarks: np.ndarray
  filter: OneEuroFilter | None
  previous_box: np.ndarray | None = None   # the landmark box one frame before raw_landmarks'

  def crop_box(self, predict_motion: bool) -> np.ndarray:
    box = landmark_box(self.raw_landmarks)
    if predict_motion and self.previous_box is not None:
      box[:2] += box[:2] - self.previous_box[:2]
    return box

  def advance(self, landmarks) -> None:
    self.previous_box = None if self.raw_landmarks is None else landmark_box(self.raw_landmarks)
    self.raw_landmarks = np.asarray(landmarks, dtype=np.float64)


class VideoTracker:
  """Landmarks frame by frame with a :class:`kd_landmarks.Predictor` (any backend): ``update(frame, time)``.

  ``predictor`` needs ``predict_faces(image)`` (detector + box map + student) and
  ``landmarks_for_boxes(image, landmark_boxes)`` (student on given landmark boxes)."""

  def __init__(self, predictor, *, rule: TrackingRule | None = None, smoothing: Smoothing | None = Smoothing()):
    self.predictor = predictor
    self.rule = rule or TrackingRule()
    self.smoothing = smoothing
    self.tracks: list[_Track] = []
    self.next_id = 0
    self.frame_index = 0

  def _output(self, track: _Track, time: float, side: float) -> np.ndarray:
    if track.filter is None:
      return track.raw_landmarks.copy()
    return track.filter(track.raw_landmarks, time, scale=side)

  def update(self, frame: np.ndarray, time: float) -> FrameResult:
    index = self.frame_index
    self.frame_index += 1
    lost: list[str] = []
    if self.tracks and not self.rule.scheduled(index):
      crop_boxes = [track.crop_box(self.rule.predict_motion) for track in self.tracks]
      landmarks = self.predictor.landmarks_for_boxes(frame, crop_boxes)
      for track, crop_box, points in zip(self.tracks, crop_boxes, landmarks):
        reason = self.rule.lost_reason(crop_box, landmark_box(points), frame.shape)
        if reason is not None:
          lost.append(f"face {track.track_id}: {reason}")
      if not lost:
        faces = []
        for track, crop_box, points in zip(self.tracks, crop_boxes, landmarks):
          track.advance(points)
          faces.append(TrackedFace(track.track_id, "tracking", box_corners(crop_box), None,
                                   tuple(float(v) for v in crop_box),
                                   self._output(track, time, float(crop_box[2])), track.raw_landmarks))
        return FrameResult(index, float(time), False, faces)
    return FrameResult(index, float(time), True, self._detect(frame, time), lost)

  def _detect(self, frame: np.ndarray, time: float) -> list[TrackedFace]:
    detected = self.predictor.predict_faces(frame)
    boxes = [box_corners(landmark_box(face.landmarks)) for face in detected]
    previous = [box_corners(landmark_box(track.raw_landmarks)) for track in self.tracks]
    # Greedy matching by IoU, best pairs first: each old identity goes to at most one detected face.
    pairs = sorted(((_iou(new, old), i, j) for i, new in enumerate(boxes) for j, old in enumerate(previous)),
                   reverse=True)
    match: dict[int, int] = {}
    used: set[int] = set()
    for iou, i, j in pairs:
      if iou < self.rule.match_iou:
        break
      if i not in match and j not in used:
        match[i] = j
        used.add(j)
    tracks, faces = [], []
    for i, face in enumerate(detected):
      if i in match:
        track = self.tracks[match[i]]
      else:
        track = _Track(self.next_id, None, self.smoothing.new_filter() if self.smoothing else None)
        self.next_id += 1
      # No motion is carried across a detection: the jump from the tracked box to the detected one is a
      # correction, not the face's motion.
      track.raw_landmarks, track.previous_box = np.asarray(face.landmarks, dtype=np.float64), None
      tracks.append(track)
      faces.append(TrackedFace(track.track_id, "detection", tuple(face.box), face.score,
                               tuple(face.crop_box), self._output(track, time, float(face.crop_box[2])),
                               track.raw_landmarks))
    self.tracks = tracks
    return faces


def track_frames(predictor, frames: Iterable[tuple[float, np.ndarray]], *, rule: TrackingRule | None = None,
                 smoothing: Smoothing | None = Smoothing()) -> Iterator[FrameResult]:
  """Runs a :class:`VideoTracker` over (time, frame) pairs."""
  tracker = VideoTracker(predictor, rule=rule, smoothing=smoothing)
  for time, frame in frames:
    yield tracker.update(frame, time)


# ----------------------------------------------------------------------------------------------------
# Stability of a landmark track against a known ground truth ([T, K, 2] frame pixels, one face).


def per_frame_nme(pred, gt, *, dataset: str = "synthetic") -> np.ndarray:
  """Inter-ocular NME of each frame [T] (fractions)."""
  return np.asarray(metrics.nme(pred, gt, dataset=dataset), dtype=np.float64)


def jitter(pred, gt, *, dataset: str = "synthetic") -> float:
  """Frame-to-frame landmark displacement not explained by the ground truth's own motion, over the
  inter-ocular distance: mean over frames t >= 1 and landmarks of
  ``||(pred_t - pred_{t-1}) - (gt_t - gt_{t-1})|| / iod_t``."""
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  if len(pred) < 2:
    raise ValueError("jitter needs at least two frames")
  iod = metrics.normalizing_distance(gt, dataset=dataset)
  residual = np.diff(pred, axis=0) - np.diff(gt, axis=0)
  return float((np.linalg.norm(residual, axis=-1) / iod[1:, None]).mean())


def lag_frames(pred, gt) -> float:
  """How many frames the prediction trails the ground truth's motion: the least-squares ``d`` in
  ``gt_t - pred_t = d * v_t`` over all frames and landmarks, with ``v_t`` the ground truth's velocity per
  frame (central differences). A track delayed by ``d`` frames on smooth motion gives ``d``; a constant
  offset of the prediction cancels on a path that returns to its start (velocities sum to 0)."""
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  if len(pred) < 3:
    raise ValueError("lag needs at least three frames")
  velocity = np.gradient(gt, axis=0)
  speed_squared = float((velocity ** 2).sum())
  if not speed_squared > 0:
    raise ValueError("lag needs a moving ground truth")
  return float(((gt - pred) * velocity).sum() / speed_squared)


def stability(pred, gt, *, dataset: str = "synthetic") -> dict:
  """NME per frame (mean), jitter and lag of one track (see the functions above)."""
  result = {"nme": float(per_frame_nme(pred, gt, dataset=dataset).mean()),
            "jitter": jitter(pred, gt, dataset=dataset)}
  if float((np.gradient(np.asarray(gt, np.float64), axis=0) ** 2).sum()) > 0:
    result["lag_frames"] = lag_frames(pred, gt)
  return result


# ----------------------------------------------------------------------------------------------------
# Clips with a known motion.


def similarity(angle_degrees: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0), centre=(0.0, 0.0)) -> np.ndarray:
  """The [2, 3] affine rotating by ``angle`` and scaling about ``centre``, then shifting by ``shift``."""
  angle = math.radians(angle_degrees)
  linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  centre = np.asarray(centre, np.float64)
  offset = centre - linear @ centre + np.asarray(shift, np.float64)
  return np.concatenate([linear, offset[:, None]], axis=1)


def warped_clip(image: np.ndarray, landmarks, affines: Sequence[np.ndarray], *, noise_std: float = 0.0,
                seed: int = 0, size: tuple[int, int] | None = None):
  """Frames of ``image`` moved by one affine each (image pixels -> frame pixels), with Gaussian sensor noise
  of ``noise_std`` grey levels drawn afresh per frame, and the landmarks moved exactly with them.

  Returns (frames uint8 ``[T, H, W, 3]``, ground truth ``[T, K, 2]`` frame pixels). Resampling is bilinear
  in the pixel-centre convention of :mod:`kd_landmarks.coords`, so the landmarks follow the drawn face
  exactly; outside the image the frame is the image's border colour."""
  image = np.asarray(image, dtype=np.uint8)
  height, width = size or image.shape[:2]
  rng = np.random.default_rng(seed)
  landmarks = np.asarray(landmarks, np.float64)
  frames, truths = [], []
  for affine in affines:
    affine = np.asarray(affine, np.float64)
    inverse = coords.invert_affine(affine)
    # PIL's AFFINE takes the frame -> image map in pixel-corner coordinates: shift by half a pixel.
    linear, offset = inverse[:, :2], inverse[:, 2]
    corner_offset = offset + 0.5 - linear @ np.array([0.5, 0.5])
    data = (linear[0, 0], linear[0, 1], corner_offset[0], linear[1, 0], linear[1, 1], corner_offset[1])
    fill = tuple(int(v) for v in np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]),
                                           axis=0))
    warped = Image.fromarray(image).transform((width, height), Image.Transform.AFFINE, data,
                                              resample=Image.Resampling.BILINEAR, fillcolor=fill)
    pixels = np.asarray(warped, dtype=np.float32)
    if noise_std > 0:
      pixels = pixels + rng.normal(0.0, noise_std, pixels.shape).astype(np.float32)
    frames.append(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    truths.append(coords.apply_affine(affine, landmarks))
  return np.stack(frames), np.stack(truths)
