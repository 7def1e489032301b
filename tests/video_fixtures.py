"""Shared by the video tests: a bright disc as the face, a model that finds it in the crop and a detector
that finds it in the frame, so that tracking, detection and smoothing are checked on values known by
construction (a trained student would make every expected number a measurement)."""
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from kd_landmarks import coords
from kd_landmarks.datasets import synthetic
from kd_landmarks.deploy import detect
from kd_landmarks.deploy import predict
from kd_landmarks.deploy import video

CROP_SIZE = 48
# The landmarks of a disc of radius R at C are C + R * TEMPLATE: the synthetic mean face, its square box of
# side 2.4 centred on 0, so the evaluation crop (box x 1.05) holds the whole disc with a margin.
_mean = synthetic.load_shape_prior().mean
_cx, _cy, _side = coords.square_box_from_landmarks(_mean)
TEMPLATE = (_mean - np.array([_cx, _cy])) * (2.4 / _side)
# The disc detector's box is the disc's square (side 2R); the landmark box has side 2.4R, same centre.
BOX_MAP = detect.BoxMap(0.0, 0.0, 1.2, source="fitted: disc fixture")
BACKGROUND, DISC = 50, 210


def disc_landmarks(centre, radius) -> np.ndarray:
  return np.asarray(centre, np.float64) + radius * TEMPLATE


class DiscModel:
  """Stands in for a student: landmarks ``C + R * TEMPLATE`` from the bright disc's centroid ``C`` and
  area ``pi R^2`` in the crop (intensity-weighted, so sensor noise moves them a little)."""

  def apply(self, variables, images, train=False):
    del variables, train
    size = images.shape[1]
    gray = images.mean(axis=-1)
    weight = jnp.clip((gray * 255.0 - BACKGROUND) / (DISC - BACKGROUND), 0.0, 1.0)
    ys, xs = jnp.mgrid[0:size, 0:size].astype(jnp.float32)
    mass = weight.sum(axis=(1, 2)) + 1e-6
    cx = (weight * xs).sum(axis=(1, 2)) / mass
    cy = (weight * ys).sum(axis=(1, 2)) / mass
    radius = jnp.sqrt(mass / jnp.pi)
    points = jnp.stack([cx, cy], -1)[:, None, :] + radius[:, None, None] * jnp.asarray(TEMPLATE, jnp.float32)
    return (points + 0.5) / size - 0.5

  def __hash__(self):
    return id(self)


class DiscDetector:
  """Finds every disc: the square around each bright connected region, larger first. Counts its calls."""
  name = "disc"

  def __init__(self):
    self.calls = 0

  def detect(self, image):
    self.calls += 1
    labels, count = ndimage.label(np.asarray(image).mean(axis=-1) > (BACKGROUND + DISC) / 2)
    found = []
    for index, region in enumerate(ndimage.find_objects(labels)):
      mask = labels[region] == index + 1
      ys, xs = np.nonzero(mask)
      cy, cx = ys.mean() + region[0].start, xs.mean() + region[1].start
      radius = np.sqrt(mask.sum() / np.pi)
      found.append(detect.Detection((cx - radius, cy - radius, cx + radius, cy + radius), float(mask.sum())))
    return sorted(found, key=lambda d: -d.score)


def disc_predictor(detector=None):
  meta = {"model": "disc", "num_landmarks": 68, "image_size": CROP_SIZE, "dataset": "synthetic",
          "overrides": {}, "dtype": "float32"}
  return predict.Predictor.from_module(DiscModel(), {}, meta, detector=detector or DiscDetector(),
                                       box_map=BOX_MAP)


def disc_image(size, centres, radius, supersample=8) -> np.ndarray:
  """Grey discs on a darker background, each pixel the disc's coverage of ``supersample``^2 sub-pixels
  (PIL's ellipse rounds its bounds to whole pixels, which would move a disc's centre)."""
  height, width = size
  offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
  ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
  xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
  covered = np.zeros((height * supersample, width * supersample), bool)
  for cx, cy in centres:
    covered |= (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= radius ** 2
  coverage = covered.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
  gray = np.round(BACKGROUND + (DISC - BACKGROUND) * coverage).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)


def disc_clip(shifts, *, size=(120, 160), centre=(70.0, 60.0), radius=14.0, noise_std=6.0, seed=0):
  """A disc moved by per-frame shifts (pixels); frames, ground-truth landmarks [T, 68, 2]."""
  image = disc_image(size, [centre], radius)
  affines = [video.similarity(shift=shift) for shift in shifts]
  frames, truth = video.warped_clip(image, disc_landmarks(centre, radius), affines, noise_std=noise_std,
                                    seed=seed)
  return frames, truth
