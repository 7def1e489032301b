"""Procedurally rendered faces with exact 68-point landmarks: the dataset that needs no download.

Each example is drawn from its own random stream keyed by (split, seed, index), so any example can be
rendered alone (:func:`render_example`) and a split is the same however it is generated.

How an example is made:
  1. Shape: ``mean + sum_k b_k * mode_k`` from the point-distribution model fitted to 4,232 real iBUG-68
     annotations (``data/shape_prior_68.npz``, see ``tools/make_shape_prior.py``): the paper's ASM form
     (Section 3.1, Eq. 1) with ``b_k ~ N(0, sigma_k^2)`` clipped as in Eq. 3 (here at +-2.5 sigma rather than
     3), so expression and identity come from the real modes.
  2. Pose: out-of-plane yaw by rotating the shape about a vertical axis after lifting it onto a cylinder
     (with the nose and lips standing out), which squashes the far half of the face; then in-plane rotation
     (+-30 degrees), scale and translation, keeping every landmark inside the image.
  3. Drawing (PIL, supersampled 2x then box-filtered): background texture and clutter, hair, neck, the skin
     region bounded by the jaw line and a forehead arc, brows along the brow points, eyes (sclera polygon from
     the eye points, iris and pupil clipped to it), nose ridge, base and nostrils, lips filled from the outer
     mouth contour and a darker inner mouth; then random occluders (bar, hand, sunglasses, blob), lighting
     gradient, contrast, blur and noise.

Landmarks are float32 pixels, 0-based with pixel centres on integers (:mod:`kd_landmarks.coords`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import time
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NUM_LANDMARKS = 68
SHAPE_PRIOR_PATH = pathlib.Path(__file__).resolve().parent / "data" / "shape_prior_68.npz"
# Each split draws from its own family of random streams, so train and test never share an example.
SPLIT_KEYS = {"train": 0x7452, "test": 0x5445}

# iBUG 68 index groups.
JAW = np.arange(0, 17)
RIGHT_BROW = np.arange(17, 22)  # The subject's right: the image's left in a frontal face.
LEFT_BROW = np.arange(22, 27)
NOSE_RIDGE = np.arange(27, 31)
NOSE_BASE = np.arange(31, 36)
RIGHT_EYE = np.arange(36, 42)
LEFT_EYE = np.arange(42, 48)
OUTER_LIPS = np.arange(48, 60)
INNER_LIPS = np.arange(60, 68)

# How far each landmark stands out of the face cylinder, in units of the cylinder radius: the nose most, the
# lips a little, the eyes sit slightly back. Only used for the yaw rotation.
_PROTRUSION = np.zeros(NUM_LANDMARKS)
_PROTRUSION[NOSE_RIDGE] = [0.08, 0.16, 0.24, 0.34]
_PROTRUSION[NOSE_BASE] = [0.14, 0.2, 0.24, 0.2, 0.14]
_PROTRUSION[np.r_[RIGHT_BROW, LEFT_BROW]] = 0.04
_PROTRUSION[np.r_[RIGHT_EYE, LEFT_EYE]] = -0.04
_PROTRUSION[np.r_[OUTER_LIPS, INNER_LIPS]] = 0.1

# Colour palettes (RGB) the renderer interpolates between.
_SKIN_TONES = np.array([[255, 224, 196], [234, 189, 157], [198, 145, 110], [160, 110, 75], [110, 72, 48],
                        [72, 46, 32]], dtype=np.float64)
_HAIR_COLOURS = np.array([[20, 16, 14], [55, 38, 28], [100, 70, 45], [170, 130, 80], [200, 180, 140],
                          [150, 150, 150], [130, 60, 30]], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """Knobs of the renderer; the defaults give the synthetic dataset. Fractions are of the image size."""
  supersample: int = 2  # Draw at this multiple and box-filter down: anti-aliasing and sub-pixel geometry.
  face_size_range: tuple[float, float] = (0.42, 0.68)  # Side of the landmarks' square box.
  max_rotation_degrees: float = 30.0  # In-plane.
  max_yaw_degrees: float = 30.0  # Out-of-plane, by the cylinder model.
  max_translation: float = 0.15  # Of the face centre from the image centre (then clipped to fit).
  max_mode_sigmas: float = 2.5  # Shape coefficients are clipped to this many standard deviations.
  # Mode 0 of the prior is yaw (62% of its variance); linear modes extrapolate badly, so it is narrowed
  # and the geometric yaw above does the rest.
  yaw_mode_scale: float = 0.3
  margin: float = 1.0  # Landmarks stay at least this many pixels inside the image.
  max_gaze: float = 0.12  # Iris offset from the eye centre, as a fraction of the inter-ocular distance.
  hair_probability: float = 0.75
  clutter_count_range: tuple[int, int] = (3, 14)
  occluder_probability: float = 0.3
  blur_probability: float = 0.5
  max_blur_sigma: float = 1.2  # Pixels at 128 px, scaled with the image size.
  max_noise_std: float = 10.0  # Grey levels.
  grayscale_probability: float = 0.08

  def __post_init__(self):
    if self.supersample < 1:
      raise ValueError(f"RenderConfig.supersample must be >= 1, got {self.supersample}")
    low, high = self.face_size_range
    if not 0 < low <= high < 1:
      raise ValueError(f"RenderConfig.face_size_range must satisfy 0 < low <= high < 1, got {self.face_size_range}")
    for name in ("hair_probability", "occluder_probability", "blur_probability", "grayscale_probability"):
      value = getattr(self, name)
      if not 0 <= value <= 1:
        raise ValueError(f"RenderConfig.{name} must be a probability in [0, 1], got {value}")


DEFAULT_CONFIG = RenderConfig()


class ShapePrior(NamedTuple):
  mean: np.ndarray  # [68, 2], centroid 0, about unit Frobenius norm, eyes level, y down.
  modes: np.ndarray  # [M, 68, 2], orthonormal.
  stddevs: np.ndarray  # [M]


@functools.lru_cache(maxsize=None)
def load_shape_prior(path: str | None = None) -> ShapePrior:
  """Loads the point-distribution model shipped in ``data/shape_prior_68.npz`` (or ``path``)."""
  path = pathlib.Path(path) if path is not None else SHAPE_PRIOR_PATH
  if not path.is_file():
    raise FileNotFoundError(
        f"shape prior {path} is missing: regenerate it with `python tools/make_shape_prior.py "
        f"--csv_dir <folder with keypoints_frames_{{train,test}}.csv> --output {path}`")
  with np.load(path, allow_pickle=False) as data:
    prior = ShapePrior(mean=data["mean"].astype(np.float64), modes=data["modes"].astype(np.float64),
                       stddevs=data["stddevs"].astype(np.float64))
  if prior.mean.shape != (NUM_LANDMARKS, 2) or prior.modes.shape[1:] != (NUM_LANDMARKS, 2):
    raise ValueError(f"{path}: expected mean [68, 2] and modes [M, 68, 2], got {prior.mean.shape} and "
                     f"{prior.modes.shape}")
  return prior


def example_rng(split: str, index: int, seed: int) -> np.random.Generator:
  """The random stream of one example: a function of (split, seed, index) only."""
  if split not in SPLIT_KEYS:
    raise ValueError(f"unknown synthetic split: {split!r}; choose from {sorted(SPLIT_KEYS)}")
  if index < 0 or seed < 0:
    raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
  return np.random.default_rng(np.random.SeedSequence([SPLIT_KEYS[split], int(seed), int(index)]))


def sample_shape(rng: np.random.Generator, config: RenderConfig = DEFAULT_CONFIG,
                 prior: ShapePrior | None = None) -> np.ndarray:
  """Draws a canonical (upright, frontal-frame) shape ``[68, 2]``: Eq. 1, ``mean + V b``, with each ``b_k``
  Gaussian with the mode's variance and clipped to ``config.max_mode_sigmas`` standard deviations (Eq. 3)."""
  prior = prior if prior is not None else load_shape_prior()
  sigmas = rng.standard_normal(prior.stddevs.shape)
  sigmas = np.clip(sigmas, -config.max_mode_sigmas, config.max_mode_sigmas)
  sigmas[0] *= config.yaw_mode_scale
  return prior.mean + np.tensordot(sigmas * prior.stddevs, prior.modes, axes=1)


def to_canvas(points_px: np.ndarray, supersample: int) -> np.ndarray:
  """Output-image pixels -> the coordinates to hand PIL when drawing on the ``supersample``-times canvas.

  Output pixel centre p is canvas pixel centre ``ss * p + (ss - 1) / 2`` (the box filter averages canvas
  pixels ``ss * p .. ss * p + ss - 1``). PIL's fill behaves as if it rounded vertices down to integers, which
  moves shapes up-left by half a canvas pixel on average; the extra 0.5 turns that into rounding to nearest,
  leaving no bias (measured in tests/test_synthetic.py)."""
  return points_px * supersample + supersample / 2


def _lerp_palette(palette: np.ndarray, t: float) -> np.ndarray:
  position = t * (len(palette) - 1)
  low = int(min(math.floor(position), len(palette) - 2))
  frac = position - low
  return palette[low] * (1 - frac) + palette[low + 1] * frac


def _colour(values) -> tuple[int, int, int]:
  # Plain Python: called ~30 times an image, where numpy's per-call overhead dominates.
  return tuple(min(255, max(0, int(round(float(v))))) for v in values)


def _ellipse_points(centre, radii, angle, start, stop, count) -> np.ndarray:
  """Points on a rotated ellipse between two parameter angles (radians)."""
  t = np.linspace(start, stop, count)
  local = np.stack([radii[0] * np.cos(t), radii[1] * np.sin(t)], axis=-1)
  cos, sin = math.cos(angle), math.sin(angle)
  return local @ np.array([[cos, sin], [-sin, cos]]) + np.asarray(centre)


def _face_geometry(shape: np.ndarray, hairline: float):
  """Auxiliary points in the canonical frame: forehead arc, hair outline and fringe, neck; all follow the
  landmarks. ``hairline`` is the fringe's height above the brows, as a fraction of the brow-to-chin height."""
  jaw_left, jaw_right = shape[0], shape[16]
  centre_x = (jaw_left[0] + jaw_right[0]) / 2
  top_y = (jaw_left[1] + jaw_right[1]) / 2
  half_width = (jaw_right[0] - jaw_left[0]) / 2
  chin_y = shape[8, 1]
  brow_top = shape[17:27, 1].min()
  face_height = chin_y - brow_top
  # The forehead rises above the brows by about 0.45 of the brow-to-chin height.
  forehead_height = (top_y - brow_top) + 0.45 * face_height
  angles = np.linspace(math.pi, 2 * math.pi, 15)[1:-1]  # Over the top, from point 0's side to point 16's.
  forehead = np.stack([centre_x + half_width * np.cos(angles), top_y + forehead_height * np.sin(angles)], axis=-1)
  # Blend the arc's ends into points 0 and 16 so the outline is continuous.
  head_outline = np.concatenate([shape[JAW], forehead[::-1]], axis=0)
  centre = np.array([centre_x, (top_y - forehead_height + chin_y) / 2])
  # Hair: the upper head outline (down to jaw points 2 and 14) enlarged about the head centre, drawn behind.
  hair = (np.concatenate([shape[[2, 1, 0]], forehead, shape[[16, 15, 14]]]) - centre) * 1.12 + centre
  # Fringe: the band between the forehead arc and a lower, narrower arc at the hairline, drawn over the skin.
  fringe_height = (top_y - brow_top) + hairline * face_height
  inner_angles = angles[::-1]
  hairline_arc = np.stack([centre_x + 0.97 * half_width * np.cos(inner_angles),
                           top_y + fringe_height * np.sin(inner_angles)], axis=-1)
  fringe = np.concatenate([shape[[0]], forehead, shape[[16]], hairline_arc])
  # The neck is narrower than the jaw (it starts 12% in from jaw points 5 and 11) and widens downwards.
  neck_top_left = shape[5] + 0.12 * (shape[11] - shape[5])
  neck_top_right = shape[11] + 0.12 * (shape[5] - shape[11])
  neck_drop = 1.2 * face_height
  neck = np.array([neck_top_left, neck_top_right, neck_top_right + [0.2 * half_width, neck_drop],
                   neck_top_left + [-0.2 * half_width, neck_drop]])
  shoulders_centre = np.array([centre_x, chin_y + 0.75 * face_height + 0.5 * face_height])
  return {"head": head_outline, "hair": hair, "fringe": fringe, "neck": neck, "shoulders_centre": shoulders_centre[None],
          "half_width": half_width, "face_height": face_height}


def _yaw(points: np.ndarray, protrusion: np.ndarray, centre_x: float, radius: float, yaw: float) -> np.ndarray:
  """Rotates points lifted onto a vertical cylinder about its axis, orthographic view (out-of-plane yaw).

  Depth is the cylinder's ``sqrt(r^2 - u^2)`` plus each point's protrusion, so the half of the face turning
  away is squashed and the nose swings towards it.
  """
  u = points[:, 0] - centre_x
  depth = np.sqrt(np.clip(radius ** 2 - u ** 2, 0.0, None)) + protrusion * radius
  out = points.copy()
  out[:, 0] = centre_x + u * math.cos(yaw) + depth * math.sin(yaw)
  return out


def _place(points: np.ndarray, landmarks: np.ndarray, rng, image_size: int, config: RenderConfig):
  """In-plane rotation, scale and translation: returns the affine (as a function) keeping landmarks inside."""
  angle = math.radians(rng.uniform(-config.max_rotation_degrees, config.max_rotation_degrees))
  cos, sin = math.cos(angle), math.sin(angle)
  rotation = np.array([[cos, sin], [-sin, cos]])
  rotated = landmarks @ rotation
  lo, hi = rotated.min(axis=0), rotated.max(axis=0)
  box_side = (hi - lo).max()
  face_size = rng.uniform(*config.face_size_range) * image_size
  usable = image_size - 1 - 2 * config.margin
  scale = face_size / box_side
  extent = (hi - lo) * scale
  if extent.max() > usable:  # A long face rotated 30 degrees can be taller than the image: shrink it.
    scale *= usable / extent.max()
    extent = (hi - lo) * scale
  box_centre = (lo + hi) / 2 * scale
  wanted = (image_size - 1) / 2 + rng.uniform(-1, 1, size=2) * config.max_translation * image_size
  # Clip the box centre so the whole landmark box lies in [margin, size - 1 - margin].
  low_centre = config.margin + extent / 2
  high_centre = image_size - 1 - config.margin - extent / 2
  centre = np.clip(wanted, low_centre, high_centre)
  offset = centre - box_centre
  return lambda p: (p @ rotation) * scale + offset, scale, angle


def _random_colour(rng, saturation: float) -> np.ndarray:
  """A uniform random RGB colour pulled towards its grey by ``1 - saturation``."""
  colour = rng.uniform(0, 255, size=3)
  return colour.mean() + saturation * (colour - colour.mean())


def _draw_clutter(draw: ImageDraw.ImageDraw, rng, size: int, count: int, saturation: float) -> None:
  for _ in range(count):
    colour = _colour(_random_colour(rng, saturation))
    kind = rng.integers(4)
    centre = rng.uniform(-0.1, 1.1, size=2) * size
    extent = rng.uniform(0.05, 0.45) * size
    if kind == 0:
      draw.ellipse([*(centre - extent / 2), *(centre + extent / 2 * rng.uniform(0.3, 1.5))], fill=colour)
    elif kind == 1:
      polygon = _ellipse_points(centre, (extent / 2, extent / 2 * rng.uniform(0.2, 1)), rng.uniform(0, math.pi),
                                0, 2 * math.pi, 5)[:4]
      draw.polygon(_flat(polygon), fill=colour)
    elif kind == 2:
      vertices = centre + rng.uniform(-extent / 2, extent / 2, size=(int(rng.integers(3, 7)), 2))
      draw.polygon(_flat(vertices), fill=colour)
    else:
      end = centre + rng.uniform(-extent, extent, size=2)
      draw.line(_flat([centre, end]), fill=colour, width=max(1, int(rng.uniform(0.005, 0.04) * size)))


def _background(rng, image_size: int, supersample: int, config: RenderConfig) -> Image.Image:
  """A smooth random colour field (low-resolution noise, upsampled) plus clutter shapes, supersampled."""
  grid = int(rng.integers(2, 7))
  # Scenes range from greyish to vivid; one saturation for the whole background.
  saturation = rng.uniform(0.2, 1.0)
  field = _random_colour(rng, saturation) + rng.normal(0, 45, size=(grid, grid, 3))
  field = field.mean(axis=-1, keepdims=True) + saturation * (field - field.mean(axis=-1, keepdims=True))
  field = np.clip(field, 0, 255).astype(np.uint8)
  # Smooth at the output size, then a nearest-neighbour blow-up that the final box filter undoes exactly:
  # bilinear resizing straight to the supersampled size costs 4x as much for the same look.
  image = Image.fromarray(field).resize((image_size, image_size), Image.BILINEAR)
  size = image_size * supersample
  if supersample > 1:
    image = image.resize((size, size), Image.NEAREST)
  draw = ImageDraw.Draw(image)
  _draw_clutter(draw, rng, size, int(rng.integers(config.clutter_count_range[0], config.clutter_count_range[1] + 1)),
                saturation)
  return image


def _flat(points) -> list[float]:
  """Points ``[N, 2]`` as the flat [x0, y0, x1, ...] list PIL takes (much faster than tuples)."""
  return np.asarray(points, dtype=np.float64).ravel().tolist()


def _polygon(draw, points, fill) -> None:
  draw.polygon(_flat(points), fill=fill)


def _draw_occluder(draw: ImageDraw.ImageDraw, mask_draw: ImageDraw.ImageDraw, rng, pixels, skin, iod) -> None:
  """A bar, a hand-like blob, sunglasses or a random blob over part of the face (drawn into the mask too)."""
  kind = rng.integers(4)
  face_centre = pixels[27:48].mean(axis=0) * 0.5 + pixels[48:68].mean(axis=0) * 0.5
  face_size = np.ptp(pixels[:NUM_LANDMARKS], axis=0).max()
  shapes = []  # (kind, points or box) drawn with one colour.
  if kind == 0:  # A bar (a pole, a microphone, a strap) across part of the face.
    angle = rng.uniform(0, math.pi)
    width = rng.uniform(0.1, 0.25) * face_size
    centre = face_centre + rng.uniform(-0.35, 0.35, size=2) * face_size
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    length = 2.5 * face_size
    bar = np.array([centre - direction * length / 2 - normal * width / 2, centre + direction * length / 2
                    - normal * width / 2, centre + direction * length / 2 + normal * width / 2,
                    centre - direction * length / 2 + normal * width / 2])
    colour = _colour(rng.uniform(0, 255, size=3))
    shapes.append(("polygon", bar))
  elif kind == 1:  # A hand: a palm and four fingers, skin-toned.
    colour = _colour(skin * rng.uniform(0.8, 1.1))
    side = rng.choice([-1.0, 1.0])
    centre = face_centre + np.array([side * rng.uniform(0.2, 0.5), rng.uniform(0.0, 0.45)]) * face_size
    palm_radius = rng.uniform(0.18, 0.26) * face_size
    shapes.append(("ellipse", np.array([centre - palm_radius, centre + palm_radius])))
    finger_angle = rng.uniform(-math.pi, 0) if rng.uniform() < 0.5 else rng.uniform(-2.2, -0.9)
    for finger in range(4):
      a = finger_angle + (finger - 1.5) * 0.3
      direction = np.array([math.cos(a), math.sin(a)])
      normal = np.array([-direction[1], direction[0]])
      length = palm_radius * rng.uniform(1.6, 2.2)
      width = palm_radius * 0.4
      base = centre + normal * (finger - 1.5) * width * 0.9
      shapes.append(("polygon", np.array([base - normal * width / 2, base + direction * length - normal * width / 2,
                                          base + direction * length + normal * width / 2, base + normal * width / 2])))
  elif kind == 2:  # Sunglasses over both eyes.
    colour = _colour(rng.uniform(0, 60, size=3))
    for eye in (RIGHT_EYE, LEFT_EYE):
      centre = pixels[eye].mean(axis=0)
      radius = iod * rng.uniform(0.28, 0.38)
      shapes.append(("ellipse", np.array([centre - radius * np.array([1.0, 0.75]),
                                          centre + radius * np.array([1.0, 0.75])])))
    shapes.append(("line", pixels[[39, 42]].mean(axis=0, keepdims=True) + np.array([[-0.2, 0], [0.2, 0]]) * iod))
  else:  # A random blob (an object held in front of the face).
    colour = _colour(rng.uniform(0, 255, size=3))
    centre = face_centre + rng.uniform(-0.45, 0.45, size=2) * face_size
    radius = rng.uniform(0.15, 0.35) * face_size
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=7))
    radii = radius * rng.uniform(0.6, 1.2, size=7)
    shapes.append(("polygon", centre + np.stack([np.cos(angles), np.sin(angles)], -1) * radii[:, None]))
  for target, fill in ((draw, colour), (mask_draw, 255)):
    for kind_name, geometry in shapes:
      if kind_name == "polygon":
        _polygon(target, geometry, fill)
      elif kind_name == "ellipse":
        target.ellipse([*geometry[0], *geometry[1]], fill=fill)
      else:
        target.line(_flat(geometry), fill=fill, width=max(1, int(0.08 * iod)))


_NOISE_BANK_SIZE = 512


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
  """A fixed block of unit Gaussian noise; images take random windows of it (drawing fresh noise per image
  costs more than all the drawing)."""
  return np.random.default_rng(0x4E4F495345).standard_normal((_NOISE_BANK_SIZE, _NOISE_BANK_SIZE, 3),
                                                              dtype=np.float32)


def _sensor_noise(rng, image_size: int, std: float) -> np.ndarray:
  """Gaussian pixel noise ``[S, S, 3]`` of standard deviation ``std`` (a random window of the bank)."""
  if image_size > _NOISE_BANK_SIZE:
    return np.float32(std) * rng.standard_normal((image_size, image_size, 3), dtype=np.float32)
  y, x = rng.integers(0, _NOISE_BANK_SIZE - image_size + 1, size=2)
  window = _noise_bank()[y:y + image_size, x:x + image_size]
  if rng.uniform() < 0.5:  # Transposing the window multiplies the distinct patterns by two.
    window = window.transpose(1, 0, 2)
  return np.float32(std) * window


def render_example(split: str, index: int, *, image_size: int = 128, seed: int = 0,
                   config: RenderConfig = DEFAULT_CONFIG, return_occlusion: bool = False) -> dict:
  """Renders example ``index`` of ``split``: ``image`` uint8 [S, S, 3], ``landmarks`` float32 [68, 2] pixels,
  ``image_id`` str (and ``occluded`` int32 [68], 1 where an occluder covers the landmark, if asked)."""
  if image_size < 16:
    raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
  rng = example_rng(split, index, seed)
  ss = config.supersample
  big = image_size * ss

  # --- Geometry, all in the canonical frame first, then posed. ---
  shape = sample_shape(rng, config)
  geometry = _face_geometry(shape, hairline=rng.uniform(0.1, 0.4))
  aux_names = ("head", "hair", "fringe", "neck", "shoulders_centre")
  aux = [geometry[name] for name in aux_names]
  points = np.concatenate([shape] + aux, axis=0)
  protrusion = np.concatenate([_PROTRUSION] + [np.zeros(len(a)) for a in aux])
  centre_x = (shape[0, 0] + shape[16, 0]) / 2
  radius = geometry["half_width"] * 1.15
  yaw = math.radians(rng.uniform(-config.max_yaw_degrees, config.max_yaw_degrees))
  points = _yaw(points, protrusion, centre_x, radius, yaw)
  to_image, scale, _ = _place(points, points[:NUM_LANDMARKS], rng, image_size, config)
  pixels = to_image(points)
  landmarks = pixels[:NUM_LANDMARKS].astype(np.float32)
  canvas_points = to_canvas(pixels, ss)
  split_points = np.split(canvas_points, np.cumsum([NUM_LANDMARKS] + [len(a) for a in aux])[:-1])
  marks = split_points[0]
  head, hair, fringe, neck, shoulders_centre = split_points[1:]
  iod = float(np.linalg.norm(marks[LEFT_EYE].mean(axis=0) - marks[RIGHT_EYE].mean(axis=0)))
  face_height = geometry["face_height"] * scale * ss

  # --- Colours. ---
  skin = _lerp_palette(_SKIN_TONES, rng.uniform()) * rng.uniform(0.92, 1.08, size=3)
  hair_colour = _lerp_palette(_HAIR_COLOURS, rng.uniform()) * rng.uniform(0.85, 1.15, size=3)
  brow_colour = np.minimum(hair_colour, skin * 0.55) * rng.uniform(0.7, 1.0)
  lip_colour = skin * np.array([0.85, 0.55, 0.55]) * rng.uniform(0.8, 1.05) + rng.uniform(-10, 10, size=3)
  sclera_colour = np.array([235, 232, 225.0]) * rng.uniform(0.8, 1.0)
  iris_colour = _lerp_palette(np.array([[40, 25, 15], [90, 60, 30], [70, 110, 60], [80, 120, 170.0]]), rng.uniform())
  mouth_colour = np.array([70, 20, 25.0]) * rng.uniform(0.4, 1.0)
  shadow = rng.uniform(0.75, 0.9)

  # --- Drawing. ---
  image = _background(rng, image_size, ss, config)
  draw = ImageDraw.Draw(image)
  # Clothes and neck, behind the head.
  clothes_centre = shoulders_centre[0]
  clothes_radii = np.array([1.1, 0.55]) * face_height
  draw.ellipse([*(clothes_centre - clothes_radii), *(clothes_centre + clothes_radii)],
               fill=_colour(rng.uniform(0, 255, size=3)))
  _polygon(draw, neck, _colour(skin * shadow))
  has_hair = rng.uniform() < config.hair_probability
  if has_hair:
    _polygon(draw, hair, _colour(hair_colour))
  _polygon(draw, head, _colour(skin))
  if has_hair and rng.uniform() < 0.7:
    _polygon(draw, fringe, _colour(hair_colour))
  # Brows: thick strokes along the brow points.
  brow_width = max(1, int(round(rng.uniform(0.08, 0.14) * iod)))
  for brow in (RIGHT_BROW, LEFT_BROW):
    draw.line(_flat(marks[brow]), fill=_colour(brow_colour), width=brow_width, joint="curve")
  # Eyes: sclera polygon, iris and pupil clipped to it by a mask, then the lid outline.
  # Only the eyes' bounding box is composited (a full-canvas mask and paste cost more than the rest).
  eye_points = marks[np.r_[RIGHT_EYE, LEFT_EYE]]
  box_lo = np.floor(eye_points.min(axis=0)).astype(int) - 1
  box_hi = np.ceil(eye_points.max(axis=0)).astype(int) + 2
  box = (int(box_lo[0]), int(box_lo[1]), int(box_hi[0]), int(box_hi[1]))
  eyes = image.crop(box)
  eye_mask = Image.new("L", eyes.size, 0)
  mask_draw = ImageDraw.Draw(eye_mask)
  iris_draw = ImageDraw.Draw(eyes)
  gaze = rng.uniform(-config.max_gaze, config.max_gaze, size=2) * np.array([1.0, 0.5]) * iod
  for eye in (RIGHT_EYE, LEFT_EYE):
    outline = marks[eye] - box_lo
    _polygon(mask_draw, outline, 255)
    _polygon(iris_draw, outline, _colour(sclera_colour))
    eye_width = np.linalg.norm(marks[eye[3]] - marks[eye[0]])
    centre = outline.mean(axis=0) + gaze
    iris_radius = 0.24 * eye_width
    iris_draw.ellipse(_flat([centre - iris_radius, centre + iris_radius]), fill=_colour(iris_colour))
    pupil_radius = 0.45 * iris_radius
    iris_draw.ellipse(_flat([centre - pupil_radius, centre + pupil_radius]), fill=(12, 10, 10))
  image.paste(eyes, box[:2], eye_mask)
  lid_colour = _colour(np.minimum(brow_colour, skin * 0.4))
  lid_width = max(1, int(round(0.05 * iod)))
  for eye in (RIGHT_EYE, LEFT_EYE):
    draw.line(_flat(marks[eye[[0, 1, 2, 3]]]), fill=lid_colour, width=lid_width + 1, joint="curve")
    draw.line(_flat(marks[eye[[3, 4, 5, 0]]]), fill=lid_colour, width=lid_width, joint="curve")
  # Nose: a shadowed ridge, a darker base line, nostrils.
  nose_shadow = _colour(skin * 0.78)
  # The ridge's shadow falls on the side the face turns away from.
  side = marks[30, 0] - (marks[0, 0] + marks[16, 0]) / 2
  ridge_offset = np.array([math.copysign(0.05 * iod, -side if side else 1.0), 0.0])
  draw.line(_flat(marks[NOSE_RIDGE] + ridge_offset), fill=nose_shadow,
            width=max(1, int(round(0.06 * iod))), joint="curve")
  draw.line(_flat(marks[NOSE_BASE]), fill=nose_shadow, width=max(1, int(round(0.05 * iod))),
            joint="curve")
  nostril_radii = np.array([0.07, 0.04]) * iod
  for outer, inner in ((31, 32), (35, 34)):
    centre = 0.4 * marks[outer] + 0.6 * marks[inner] - np.array([0.0, 0.03 * iod])
    draw.ellipse([*(centre - nostril_radii), *(centre + nostril_radii)], fill=_colour(skin * 0.35))
  # Lips, then the inner mouth (degenerate when closed, which still leaves the dark line between the lips).
  _polygon(draw, marks[OUTER_LIPS], _colour(lip_colour))
  _polygon(draw, marks[INNER_LIPS], _colour(mouth_colour))
  # Upper teeth in an open mouth: a band under the upper inner lip, tapering to the corners.
  opening = marks[66] - marks[62]
  opening_height = float(np.linalg.norm(opening))
  if opening_height > 0.08 * iod and rng.uniform() < 0.7:
    down = opening / opening_height
    depth = min(0.5 * opening_height, 0.15 * iod) * np.array([0.0, 0.7, 1.0, 0.7, 0.0])[:, None]
    upper = marks[[60, 61, 62, 63, 64]]
    _polygon(draw, np.concatenate([upper, (upper + depth * down)[::-1]]), _colour(np.array([235, 230, 210.0])
                                                                                  * rng.uniform(0.75, 1.0)))
  draw.line(_flat(marks[np.r_[INNER_LIPS, INNER_LIPS[:1]]]), fill=_colour(mouth_colour),
            width=max(1, int(round(0.03 * iod))), joint="curve")

  occlusion_mask = None
  if rng.uniform() < config.occluder_probability:
    occlusion_mask = Image.new("L", (big, big), 0)
    _draw_occluder(draw, ImageDraw.Draw(occlusion_mask), rng, marks, skin, iod)

  # --- Down to the output size, then camera effects. ---
  if ss > 1:
    image = image.reduce(ss)
  if rng.uniform() < config.blur_probability:
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, config.max_blur_sigma) * image_size / 128))
  pixels_out = np.asarray(image, dtype=np.float32)
  # Lighting: a linear gradient in a random direction, and a global contrast/brightness change.
  light_angle = rng.uniform(0, 2 * math.pi)
  ramp = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
  strength = rng.uniform(0.0, 0.6)
  contrast = rng.uniform(0.8, 1.15)
  gain = contrast * (1.0 + strength * (math.cos(light_angle) * ramp[None, :] + math.sin(light_angle) * ramp[:, None]))
  pixels_out *= gain[..., None]
  # Brightness offset, plus 0.5 so that the truncating uint8 cast below rounds.
  pixels_out += np.float32(rng.uniform(-20, 20) + 0.5)
  pixels_out += _sensor_noise(rng, image_size, rng.uniform(0, config.max_noise_std))
  if rng.uniform() < config.grayscale_probability:
    pixels_out[...] = (pixels_out @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
  np.clip(pixels_out, 0, 255, out=pixels_out)
  result = {
      "image": pixels_out.astype(np.uint8),
      "landmarks": landmarks,
      "image_id": f"synthetic/{split}/seed{seed}/{index:08d}",
  }
  if return_occlusion:
    occluded = np.zeros(NUM_LANDMARKS, dtype=np.int32)
    if occlusion_mask is not None:
      mask = np.asarray(occlusion_mask)
      cells = np.clip(np.floor(marks).astype(int), 0, big - 1)  # Canvas pixel holding each landmark.
      occluded = (mask[cells[:, 1], cells[:, 0]] > 0).astype(np.int32)
    result["occluded"] = occluded
  return result


def generate(split: str, *, num_examples: int, image_size: int = 128, seed: int = 0, start: int = 0,
             config: RenderConfig = DEFAULT_CONFIG) -> Iterator[dict]:
  """Yields examples ``start .. start + num_examples - 1`` of ``split`` (see :func:`render_example`)."""
  if num_examples < 0:
    raise ValueError(f"num_examples must be non-negative, got {num_examples}")
  example_rng(split, start, seed)  # Validates split and seed before the first yield.
  for index in range(start, start + num_examples):
    yield render_example(split, index, image_size=image_size, seed=seed, config=config)


def contact_sheet(examples, *, columns: int = 6, zoom: int = 2, draw_landmarks: bool = True) -> Image.Image:
  """Tiles rendered examples into one image, landmarks as green dots, to look at what the renderer makes."""
  examples = list(examples)
  if not examples:
    raise ValueError("contact_sheet needs at least one example")
  size = examples[0]["image"].shape[0] * zoom
  rows = -(-len(examples) // columns)
  sheet = Image.new("RGB", (columns * size, rows * size))
  for position, example in enumerate(examples):
    tile = Image.fromarray(example["image"]).resize((size, size), Image.NEAREST)
    if draw_landmarks:
      tile_draw = ImageDraw.Draw(tile)
      # Pixel centres: output pixel p spans zoomed pixels [zoom * p, zoom * (p + 1)).
      for x, y in (example["landmarks"] + 0.5) * zoom - 0.5:
        tile_draw.ellipse([x - 1.2, y - 1.2, x + 1.2, y + 1.2], fill=(0, 255, 0))
    sheet.paste(tile, ((position % columns) * size, (position // columns) * size))
  return sheet


def main(argv=None) -> int:
  """``python -m kd_landmarks.datasets.synthetic --output sheet.png``: a contact sheet and the render speed."""
  parser = argparse.ArgumentParser(description="Render synthetic faces into a contact sheet and time them.")
  parser.add_argument("--output", required=True, help="PNG path of the contact sheet")
  parser.add_argument("--split", default="train", choices=sorted(SPLIT_KEYS))
  parser.add_argument("--num_examples", type=int, default=24)
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_landmarks", action="store_true", help="leave the landmark dots off")
  args = parser.parse_args(argv)
  load_shape_prior()
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  examples = list(generate(args.split, num_examples=args.num_examples, image_size=args.image_size, seed=args.seed))
  cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
  contact_sheet(examples, draw_landmarks=not args.no_landmarks).save(args.output)
  print(f"{args.output}: {len(examples)} faces at {args.image_size}px; {len(examples) / cpu:.0f} images/s per "
        f"CPU-second ({len(examples) / wall:.0f} images/s wall clock)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
