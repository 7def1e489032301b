"""Tests of the synthetic face renderer and its shape prior (kd_landmarks/datasets/synthetic.py)."""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import time

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from scipy.spatial import procrustes

from kd_landmarks import coords
from kd_landmarks.datasets import synthetic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CSV_DIR = REPO_ROOT / "tests" / "data" / "keypoints_68"  # Shipped with the tests (MIT, see its README).
HAVE_CSVS = all((CSV_DIR / name).is_file() for name in ("keypoints_frames_train.csv", "keypoints_frames_test.csv"))
needs_csvs = pytest.mark.skipif(not HAVE_CSVS, reason=f"real 68-point CSVs not found in {CSV_DIR}")

# No occluders, blur, noise or gaze: features sit exactly where the landmarks say.
CLEAN = synthetic.RenderConfig(occluder_probability=0.0, blur_probability=0.0, max_noise_std=0.0, max_gaze=0.0)


def _load_tool():
  spec = importlib.util.spec_from_file_location("make_shape_prior", REPO_ROOT / "tools" / "make_shape_prior.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _luminance(pixels):
  return pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _polygon_mask(polygon, size):
  """Pixels whose centres lie inside ``polygon`` (rasterised by matplotlib, independently of PIL)."""
  ys, xs = np.mgrid[0:size, 0:size]
  inside = PolygonPath(polygon).contains_points(np.stack([xs.ravel(), ys.ravel()], axis=-1))
  return inside.reshape(size, size)


# --- Determinism and independence ---------------------------------------------------------------------


def test_same_arguments_give_identical_examples():
  first = synthetic.render_example("train", 7, image_size=64, seed=3)
  second = synthetic.render_example("train", 7, image_size=64, seed=3)
  np.testing.assert_array_equal(first["image"], second["image"])
  np.testing.assert_array_equal(first["landmarks"], second["landmarks"])
  assert first["image_id"] == second["image_id"]


def test_example_does_not_depend_on_what_was_generated_before():
  long_run = list(synthetic.generate("test", num_examples=5, image_size=48, seed=1))
  alone = synthetic.render_example("test", 3, image_size=48, seed=1)
  np.testing.assert_array_equal(long_run[3]["image"], alone["image"])
  np.testing.assert_array_equal(long_run[3]["landmarks"], alone["landmarks"])
  # Starting in the middle gives the same examples as the full run.
  tail = list(synthetic.generate("test", num_examples=2, image_size=48, seed=1, start=3))
  np.testing.assert_array_equal(tail[0]["image"], long_run[3]["image"])
  np.testing.assert_array_equal(tail[1]["landmarks"], long_run[4]["landmarks"])


def test_splits_seeds_and_indices_give_different_faces():
  def landmarks(split, index, seed):
    return synthetic.render_example(split, index, image_size=48, seed=seed)["landmarks"]
  reference = landmarks("train", 0, 0)
  for other in (landmarks("test", 0, 0), landmarks("train", 1, 0), landmarks("train", 0, 1)):
    assert np.abs(other - reference).max() > 0.5


def test_image_ids_are_unique_and_name_the_example():
  examples = list(synthetic.generate("train", num_examples=6, image_size=32, seed=2))
  ids = [example["image_id"] for example in examples]
  assert len(set(ids)) == len(ids)
  assert all(isinstance(i, str) and "train" in i for i in ids)
  assert synthetic.render_example("test", 4, image_size=32, seed=2)["image_id"] not in ids


# --- Shapes, dtypes, geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 96, 128])
def test_shapes_and_dtypes(image_size):
  example = synthetic.render_example("train", 0, image_size=image_size)
  assert example["image"].shape == (image_size, image_size, 3)
  assert example["image"].dtype == np.uint8
  assert example["landmarks"].shape == (68, 2)
  assert example["landmarks"].dtype == np.float32
  assert np.all(np.isfinite(example["landmarks"]))


def test_landmarks_stay_inside_the_image_and_faces_fill_a_good_part_of_it():
  size = 128
  for example in synthetic.generate("train", num_examples=60, image_size=size, seed=5):
    points = example["landmarks"]
    assert points.min() >= 0 and points.max() <= size - 1, example["image_id"]
    _, _, side = coords.square_box_from_landmarks(points)
    low, high = synthetic.DEFAULT_CONFIG.face_size_range
    assert low * size - 1e-3 <= side <= high * size + 1e-3, (example["image_id"], side)


def test_in_plane_rotation_covers_the_configured_range():
  # The angle of the eye line: spread over roughly +-30 degrees, never far beyond (yaw adds a little).
  angles = []
  for example in synthetic.generate("train", num_examples=80, image_size=32, seed=11):
    points = example["landmarks"].astype(np.float64)
    delta = points[42:48].mean(axis=0) - points[36:42].mean(axis=0)
    angles.append(np.degrees(np.arctan2(delta[1], delta[0])))
  angles = np.array(angles)
  assert np.abs(angles).max() < 45
  assert angles.min() < -15 and angles.max() > 15


def test_geometry_is_resolution_independent():
  # Everything but the 1 px margin scales with the image: normalised landmarks agree across sizes.
  for index in range(5):
    small = synthetic.render_example("test", index, image_size=64)["landmarks"]
    large = synthetic.render_example("test", index, image_size=256)["landmarks"]
    np.testing.assert_allclose(coords.to_normalized(small, 64), coords.to_normalized(large, 256), atol=0.02)


# --- The pixels follow the landmarks ----------------------------------------------------------------------


@pytest.mark.parametrize("supersample", [1, 2, 3])
def test_drawn_shapes_land_where_the_coordinates_say_without_bias(supersample):
  # Draw random quadrilaterals the way the renderer does (PIL on the supersampled canvas, box filter down)
  # and compare the rendered centroid with the exact centroid of the continuous polygon.
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(supersample)
  size = 40
  ys, xs = np.mgrid[0:size, 0:size]
  errors = []
  for _ in range(200):
    centre = rng.uniform(15, 25, size=2)
    # Corners roughly a quarter turn apart: convex quadrilaterals, never slivers.
    angles = rng.uniform(0, 2 * np.pi) + np.arange(4) * np.pi / 2 + rng.uniform(-0.4, 0.4, size=4)
    quad = centre + np.stack([np.cos(angles), np.sin(angles)], -1) * rng.uniform(5, 9, size=(4, 1))
    canvas = Image.new("L", (size * supersample, size * supersample), 0)
    ImageDraw.Draw(canvas).polygon(synthetic.to_canvas(quad, supersample).ravel().tolist(), fill=255)
    coverage = np.asarray(canvas.reduce(supersample) if supersample > 1 else canvas, dtype=np.float64)
    x, y = quad[:, 0], quad[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    exact = np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (3 * cross.sum())
    rendered = np.array([(coverage * xs).sum(), (coverage * ys).sum()]) / coverage.sum()
    errors.append(rendered - exact)
  errors = np.array(errors)
  # Without the half-pixel correction in to_canvas the mean error is -0.5 / supersample.
  assert np.all(np.abs(errors.mean(axis=0)) < 0.05), errors.mean(axis=0)
  assert np.abs(errors).max() < 0.5, np.abs(errors).max()


def test_pupil_pixel_is_dark():
  # With the gaze fixed, the pupil (near-black) is centred on each eye's landmark centroid.
  checked = 0
  for example in synthetic.generate("train", num_examples=40, image_size=160, config=CLEAN):
    points = example["landmarks"]
    for eye in (synthetic.RIGHT_EYE, synthetic.LEFT_EYE):
      outline = points[eye]
      height = np.linalg.norm(outline[[1, 2]].mean(axis=0) - outline[[5, 4]].mean(axis=0))
      if height < 2.5:  # A (nearly) closed eye hides the pupil.
        continue
      x, y = np.round(outline.mean(axis=0)).astype(int)
      skin_point = np.round(0.5 * points[30] + 0.5 * points[2 if eye is synthetic.RIGHT_EYE else 14]).astype(int)
      pupil = _luminance(example["image"][y, x])
      skin = _luminance(example["image"][skin_point[1], skin_point[0]])
      assert pupil < 80, (example["image_id"], pupil)
      assert pupil < skin, (example["image_id"], pupil, skin)
      checked += 1
  assert checked >= 30


def _region_contrast(image, inside, outside):
  return np.abs(image[inside].mean(axis=0) - image[outside].mean(axis=0)).sum()


def test_mouth_and_eyes_differ_from_the_surrounding_skin_and_misplaced_landmarks_see_less():
  size = 128
  contrasts, shifted_contrasts = [], []
  for example in synthetic.generate("test", num_examples=20, image_size=size, config=CLEAN):
    image = example["image"].astype(np.float64)
    points = example["landmarks"].astype(np.float64)

    def contrast(offset):
      moved = points + offset
      lips = _polygon_mask(moved[synthetic.OUTER_LIPS], size)
      # Skin: the region between the nose base and the upper lip, and the cheeks, minus lips and nose.
      cheeks = _polygon_mask(np.concatenate([moved[[2, 3, 4, 5]], moved[[48, 31, 39]]]), size)
      cheeks |= _polygon_mask(np.concatenate([moved[[14, 13, 12, 11]], moved[[54, 35, 42]]]), size)
      cheeks &= ~lips
      eyes = _polygon_mask(moved[synthetic.RIGHT_EYE], size) | _polygon_mask(moved[synthetic.LEFT_EYE], size)
      if lips.sum() < 4 or cheeks.sum() < 20 or eyes.sum() < 4:
        return None
      return _region_contrast(image, lips, cheeks) + _region_contrast(image, eyes, cheeks)

    true_contrast = contrast(np.zeros(2))
    if true_contrast is None:
      continue
    contrasts.append(true_contrast)
    # The same regions taken 4 px off: a renderer that misplaces features by that much would score here.
    shifted_contrasts.append(np.mean([contrast(np.array(d)) or 0 for d in ([4, 0], [-4, 0], [0, 4], [0, -4])]))
  contrasts, shifted_contrasts = np.array(contrasts), np.array(shifted_contrasts)
  assert len(contrasts) >= 15
  # Lips and eyes stand out from the skin in every image (summed RGB difference of region means).
  assert np.all(contrasts > 30), contrasts
  assert np.mean(contrasts > shifted_contrasts) >= 0.9, (contrasts, shifted_contrasts)


def test_occlusion_flags_mark_covered_landmarks():
  none = synthetic.RenderConfig(occluder_probability=0.0)
  always = synthetic.RenderConfig(occluder_probability=1.0)
  for index in range(5):
    assert synthetic.render_example("train", index, image_size=48, config=none,
                                    return_occlusion=True)["occluded"].sum() == 0
  flags = np.stack([synthetic.render_example("train", index, image_size=48, config=always,
                                             return_occlusion=True)["occluded"] for index in range(20)])
  assert flags.dtype == np.int32 and flags.shape == (20, 68)
  # Every occluder is placed on the face; most cover at least one landmark, none covers all of them.
  assert (flags.sum(axis=1) > 0).mean() >= 0.5
  assert flags.mean() < 0.8


# --- Bad input --------------------------------------------------------------------------------------------


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match="unknown synthetic split.*choose from"):
    synthetic.render_example("validation", 0)
  with pytest.raises(ValueError, match="unknown synthetic split"):
    next(synthetic.generate("valid", num_examples=1))
  with pytest.raises(ValueError, match="num_examples"):
    next(synthetic.generate("train", num_examples=-1))
  with pytest.raises(ValueError, match="image_size"):
    synthetic.render_example("train", 0, image_size=8)
  with pytest.raises(ValueError, match="non-negative"):
    synthetic.render_example("train", -1)
  with pytest.raises(ValueError, match="face_size_range"):
    synthetic.RenderConfig(face_size_range=(0.5, 1.2))
  with pytest.raises(ValueError, match="occluder_probability"):
    dataclasses.replace(synthetic.DEFAULT_CONFIG, occluder_probability=1.5)
  with pytest.raises(FileNotFoundError, match="make_shape_prior"):
    synthetic.load_shape_prior("/nonexistent/shape_prior_68.npz")


# --- The shape prior --------------------------------------------------------------------------------------


def test_prior_is_a_valid_point_distribution_model():
  prior = synthetic.load_shape_prior()
  modes = prior.modes.reshape(len(prior.stddevs), -1)
  np.testing.assert_allclose(modes @ modes.T, np.eye(len(modes)), atol=1e-5)
  assert np.all(np.diff(prior.stddevs) <= 0) and np.all(prior.stddevs > 0)
  np.testing.assert_allclose(prior.mean.mean(axis=0), 0, atol=1e-6)
  # Image axes, upright: brows above the eyes above the nose tip above the chin; right eye on the left.
  mean = prior.mean
  assert mean[17:27, 1].mean() < mean[36:48, 1].mean() < mean[30, 1] < mean[8, 1]
  assert mean[36:42, 0].mean() < mean[42:48, 0].mean()
  eye_delta = mean[42:48].mean(axis=0) - mean[36:42].mean(axis=0)
  assert abs(eye_delta[1]) < 1e-6 * abs(eye_delta[0]) + 1e-7


@needs_csvs
def test_prior_mean_and_spread_match_the_aligned_real_shapes():
  tool = _load_tool()
  prior = synthetic.load_shape_prior()
  shapes = tool.read_shapes(CSV_DIR)
  assert len(shapes) == 4232
  # Independent alignment: scipy's Procrustes of every shape onto the prior's mean (both standardised).
  aligned = []
  for shape in shapes:
    standard_mean, fitted, _ = procrustes(prior.mean, shape)
    # scipy also scales the fit by cos(angle between the shapes); the prior averages unit-norm shapes.
    aligned.append(fitted / np.linalg.norm(fitted))
  aligned = np.stack(aligned)
  # scipy scales the mean to unit norm; the prior stores the mean of unit-norm shapes (slightly shorter).
  norm = np.linalg.norm(prior.mean)
  np.testing.assert_allclose(standard_mean * norm, prior.mean, atol=1e-6)
  np.testing.assert_allclose(aligned.mean(axis=0), prior.mean, atol=2e-4)
  # The spread of the aligned shapes along each mode is that mode's standard deviation.
  projections = (aligned - aligned.mean(axis=0)).reshape(len(aligned), -1) @ prior.modes.reshape(
      len(prior.stddevs), -1).T
  np.testing.assert_allclose(projections.std(axis=0, ddof=1), prior.stddevs, rtol=0.02)


@needs_csvs
def test_tool_regenerates_the_shipped_prior_byte_for_byte(tmp_path):
  output = tmp_path / "shape_prior_68.npz"
  assert _load_tool().main(["--csv_dir", str(CSV_DIR), "--output", str(output)]) == 0
  assert output.read_bytes() == synthetic.SHAPE_PRIOR_PATH.read_bytes()


def test_tool_names_the_bad_line(tmp_path):
  tool = _load_tool()
  header = "," + ",".join(str(i) for i in range(136)) + "\n"
  good = "a.jpg," + ",".join(["1.0"] * 136) + "\n"
  (tmp_path / "keypoints_frames_train.csv").write_text(header + good + "b.jpg,1.0,2.0\n")
  (tmp_path / "keypoints_frames_test.csv").write_text(header + good)
  with pytest.raises(ValueError, match=r"keypoints_frames_train.csv:3: expected 137 columns"):
    tool.read_shapes(tmp_path)
  with pytest.raises(FileNotFoundError, match="--csv_dir"):
    tool.read_shapes(tmp_path / "missing")


def test_procrustes_alignment_recovers_a_known_similarity():
  # Rotated, scaled, shifted copies of one shape align onto the same mean exactly.
  tool = _load_tool()
  prior = synthetic.load_shape_prior()
  rng = np.random.default_rng(0)
  copies = []
  for _ in range(5):
    angle = rng.uniform(-1, 1)
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    copies.append(prior.mean @ rotation * rng.uniform(10, 100) + rng.uniform(-50, 50, size=2))
  aligned, _, _ = tool.generalized_procrustes(np.stack(copies))
  np.testing.assert_allclose(aligned, np.broadcast_to(aligned[0], aligned.shape), atol=1e-9)


# --- Speed (printed, not asserted) ------------------------------------------------------------------------


def test_speed_smoke(capsys):
  synthetic.render_example("train", 0)  # Loads the prior and the noise bank.
  count = 40
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  for example in synthetic.generate("train", num_examples=count, image_size=128, seed=9):
    assert example["image"].shape == (128, 128, 3)
  cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
  with capsys.disabled():
    print(f"\nsynthetic: {count / cpu:.0f} images/s per CPU-second at 128 px ({count / wall:.0f} wall clock)")
