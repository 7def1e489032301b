"""Custom datasets: a user's own faces with any number of points, some of them missing.

Fixtures are written here (synthetic faces with 5 or 21 of their 68 points, kd_landmarks.datasets.synthetic):
each accepted form is prepared and read back, the derived flip pairs are compared with hand-written tables,
masked losses and NME are checked against hand computations, bad input gives one line naming file and line,
and the whole pipeline runs on a tiny 21-point set with missing points."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_formats as ff
import train_fixtures as fx
from kd_landmarks import augment
from kd_landmarks import errors
from kd_landmarks import losses
from kd_landmarks import metrics
from kd_landmarks import shapes
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import flips
from kd_landmarks.datasets import images as images_lib
from kd_landmarks.datasets import info
from kd_landmarks.datasets import load_split
from kd_landmarks.training import train
from test_main import _main
from test_train import _single_device_step
from test_train import _state

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Hand-written pairs of the fixtures' schemes (indices into ff.POINTS_5 / ff.POINTS_21), read off the iBUG
# layout: 5 points = outer eye corners, nose tip (midline), mouth corners.
PAIRS_5 = ((0, 1), (3, 4))
# 21 points: jaw 0..4 (chin 2 central), brows 5, 6 | 7, 8, nose 9, 10 central, nostrils 11 | 12, eye corners
# 13, 14 | 15, 16, mouth corners 17 | 19, lip centres 18, 20 central.
PAIRS_21 = ((0, 4), (1, 3), (5, 8), (6, 7), (11, 12), (13, 16), (14, 15), (17, 19))


def _prepare(manual_dir, data_dir):
  return builder.prepare("custom", data_dir=data_dir, manual_dir=manual_dir, show_progress=False)


def _all(source):
  return [source[i] for i in range(len(source))]


# ------------------------------------------------------------------------------------------ flip pairs


def test_derived_flip_pairs_match_the_hand_written_tables():
  mean = np.load(ROOT / "kd_landmarks" / "datasets" / "data" / "shape_prior_68.npz")["mean"]
  table_68 = tuple(sorted(tuple(sorted(pair)) for pair in flips._ibug68_pairs()))
  assert flips.derive_flip_pairs(mean) == table_68
  assert flips.derive_flip_pairs(mean[list(ff.POINTS_5)]) == PAIRS_5
  assert flips.derive_flip_pairs(mean[list(ff.POINTS_21)]) == PAIRS_21
  # A face off-centre in its frame: the mirror line is found, not assumed at the points' mean x.
  shifted = mean[list(ff.POINTS_21)] + np.array([0.3, 0.0])
  assert flips.derive_flip_pairs(shifted) == PAIRS_21


def test_flip_pairs_that_are_no_involution_are_refused_naming_the_file(tmp_path):
  ff.write_custom(tmp_path, form="csv", num_faces=4, splits=["train"] * 3 + ["test"],
                  description={"flip_pairs": [[0, 1], [1, 3]]})
  with pytest.raises(errors.DataError) as caught:
    _prepare(tmp_path, tmp_path / "data")
  message = str(caught.value)
  assert str(tmp_path / "dataset.json") in message and "involution" in message and "\n" not in message


# ---------------------------------------------------------------------------------------- masked losses


def test_masked_losses_by_hand():
  pred = jnp.array([[[0.1, 0.0], [0.0, -0.2], [0.4, 0.4]]])
  gt = jnp.zeros((1, 3, 2))
  visible = jnp.array([[1.0, 1.0, 0.0]])
  # L2 over the 4 coordinates of the two visible points: (0.01 + 0 + 0 + 0.04) / 4.
  assert float(losses.l2_loss(pred, gt, weights=visible)) == pytest.approx(0.05 / 4)
  assert float(losses.l1_loss(pred, gt, weights=visible)) == pytest.approx(0.3 / 4)
  # A missing point's value changes nothing; all-ones weights are the plain mean.
  moved = pred.at[0, 2].set(jnp.array([9.0, -9.0]))
  assert float(losses.l2_loss(moved, gt, weights=visible)) == pytest.approx(0.05 / 4)
  assert float(losses.l2_loss(pred, gt, weights=jnp.ones((1, 3)))) == pytest.approx(float(losses.l2_loss(pred, gt)))
  # KD-Loss and each of its terms: the mean of the per-coordinate values over the visible points only.
  tough = jnp.array([[[0.2, 0.1], [0.05, -0.1], [0.0, 0.0]]])
  tolerant = jnp.array([[[-0.1, 0.2], [0.1, 0.1], [0.3, 0.3]]])
  per_coordinate = losses.kd_loss_terms(pred, gt, tough, tolerant, reduction="none")
  masked = losses.kd_loss_terms(pred, gt, tough, tolerant, weights=visible)
  for name in ("main", "tough", "tolerant", "total"):
    assert float(masked[name]) == pytest.approx(float(per_coordinate[name][0, :2].mean()), rel=1e-6), name
  # Loss_main by hand (Eq. 13, |d| <= 0.5: |d|): (0.1 + 0 + 0 + 0.2) / 4.
  assert float(masked["main"]) == pytest.approx(0.3 / 4)
  student_kd = losses.get_student_loss("kd")
  assert float(student_kd(pred, gt, tough, tolerant, weights=visible)) == pytest.approx(float(masked["total"]))
  with pytest.raises(ValueError, match="reduction='mean'"):
    losses.l2_loss(pred, gt, weights=visible, reduction="none")


# ------------------------------------------------------------------------------------------------ NME


def _register(**description):
  base = {"name": "t", "num_landmarks": 3, "flip_pairs": [[0, 1]], "normalization": "box",
          "splits": ["train", "test"]}
  return info.register_custom(info.custom_info(dict(base, **description)))


def test_nme_over_visible_points_with_each_normaliser_by_hand():
  gt = np.array([[[0.0, 0.0], [4.0, 0.0], [2.0, 9.0]]])
  pred = gt + np.array([[[3.0, 4.0], [0.0, 1.0], [50.0, 50.0]]])  # errors 5, 1 and a wild missing point
  visible = np.array([[True, True, False]])
  _register(normalization={"points": [0, 1]})
  # (5 + 1) / 2 visible points over the distance of points 0 and 1 (4).
  assert metrics.nme(pred, gt, dataset="custom", visible=visible)[0] == pytest.approx(3.0 / 4.0)
  assert "points 0 and 1" in metrics.normalization_text("custom")
  _register(normalization="box")
  # Box of the visible ground truth: 4 wide, 0 high would be degenerate; give the face box instead.
  box = np.array([[0.0, -2.0, 4.0, 7.0]])  # 4 x 9: sqrt(36) = 6
  assert metrics.nme(pred, gt, dataset="custom", visible=visible, face_box=box)[0] == pytest.approx(3.0 / 6.0)
  # Without a face box: the bounding box of all three (all visible), 4 x 9 as well; the mean runs over 3.
  all_visible = metrics.nme(pred, gt, dataset="custom")[0]
  assert all_visible == pytest.approx((5 + 1 + np.hypot(50, 50)) / 3 / 6.0)
  assert "box" in metrics.normalization_text("custom")
  result = metrics.split_metrics(pred, gt, dataset="custom", visible=visible, face_box=box)
  assert result["nme"] == pytest.approx(0.5) and result["fr"] == 1.0 and "nme_inter_pupil" not in result


# ------------------------------------------------------------------------------------- the shape model


def _low_rank_faces(num_faces=60, num_landmarks=21, rank=2, seed=0):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(num_landmarks, 2))
  modes = rng.normal(size=(rank, num_landmarks, 2)) * 0.3
  params = rng.normal(size=(num_faces, rank))
  faces = mean + np.einsum("nr,rkc->nkc", params, modes)
  return faces * rng.uniform(50, 100, (num_faces, 1, 1)) + rng.uniform(100, 200, (num_faces, 1, 2))


def _box_normalised(points):
  low, high = points.min(axis=1), points.max(axis=1)
  return (points - ((low + high) / 2)[:, None]) / (high - low).max(axis=1)[:, None, None]


def test_missing_points_are_filled_from_the_shape_model_without_bias():
  faces = _low_rank_faces()
  visible = np.ones(faces.shape[:2], bool)
  rng = np.random.default_rng(1)
  for row in range(len(faces)):
    visible[row, rng.choice(21, 3, replace=False)] = False
  # The faces turned furthest to one side lose the same point: a mean over annotated points only would move.
  visible[np.argsort(faces[:, 0, 0] - faces[:, :, 0].mean(1))[-15:], 0] = False
  hidden = np.where(visible[..., None], faces, np.nan)
  model, filled = shapes.fit_shape_model_with_missing(hidden, visible, keep=0.9)
  # Exactly low-rank faces (up to scale and translation): every hidden point is recovered.
  np.testing.assert_allclose(filled, faces, atol=1e-3)
  truth = shapes.fit_shape_model(_box_normalised(faces))
  np.testing.assert_allclose(model.mean, truth.mean, atol=1e-6)
  naive = np.nanmean(np.where(visible[..., None], _box_normalised(np.where(visible[..., None], faces, 0)), np.nan), 0)
  assert np.abs(naive.reshape(-1) - truth.mean).max() > 1e-3  # what the fill avoids
  # Complete faces: exactly fit_shape_model of their box-normalised form.
  complete_model, unchanged = shapes.fit_shape_model_with_missing(faces, np.ones_like(visible))
  np.testing.assert_array_equal(unchanged, faces)
  np.testing.assert_allclose(complete_model.eigenvalues, truth.eigenvalues, atol=1e-12)


# ----------------------------------------------------------------------------------- flags on a flip


def test_point_masks_are_relabelled_with_the_flip():
  rng = np.random.default_rng(0)
  landmarks = (16 + rng.uniform(-6, 6, (4, 5, 2))).astype(np.float32)
  visible = np.array([[1, 0, 1, 1, 1], [1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 0, 1]], bool)
  images = np.zeros((4, 32, 32, 3), np.uint8)
  permutation = np.array([1, 0, 2, 4, 3])
  config = augment.AugmentConfig(flip=True, flip_probability=1.0, rotation=False, photometric=False, noise=False)
  _, sets, _ = augment.augment(jax.random.PRNGKey(0), images, {"landmarks": landmarks}, out_size=16,
                               flip_permutation=permutation, config=config, point_masks={"visible": visible})
  np.testing.assert_array_equal(np.asarray(sets["visible"]), visible[:, permutation])
  config = augment.AugmentConfig(flip=False, rotation=False, photometric=False, noise=False)
  _, sets, _ = augment.augment(jax.random.PRNGKey(0), images, {"landmarks": landmarks}, out_size=16,
                               flip_permutation=None, config=config, point_masks={"visible": visible})
  np.testing.assert_array_equal(np.asarray(sets["visible"]), visible)


def test_the_train_step_weighs_each_point_by_its_augmented_visibility():
  """The compiled KD step's loss is KD-Loss over the visible points, the mask flipped with the image."""
  source = fx.InMemorySource(8)
  batch = fx.make_batch(source, range(4))
  rng = np.random.default_rng(2)
  tough = (batch["landmarks"] + rng.normal(0, 0.7, batch["landmarks"].shape)).astype(np.float32)
  tolerant = (batch["landmarks"] + rng.normal(0, 1.3, batch["landmarks"].shape)).astype(np.float32)
  visible = rng.random((4, fx.NUM_LANDMARKS)) > 0.3
  config = augment.AugmentConfig(rotation=True, max_rotation_degrees=30.0, flip=True, flip_probability=0.5)
  permutation = flips.flip_permutation(fx.NUM_LANDMARKS)
  spec = train.StepSpec(target="student", loss_fn=losses.get_student_loss("kd"), loss_variant="paper",
                        image_size=fx.IMAGE_SIZE, flip_permutation=permutation, augment_config=config,
                        learning_rate_fn=lambda step: 1e-2, distill=True, masked=True)
  assert "visible" in train.batch_keys(spec)
  state = _state()
  step_rng = jax.random.PRNGKey(11)
  _, step_metrics = _single_device_step(spec, state, dict(batch, tough=tough, tolerant=tolerant,
                                                          visible=visible), step_rng)

  def hand(mask, *, relabel=True):
    augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(step_rng, 0))
    images, sets, _ = augment.augment(
        augment_rng, jnp.asarray(batch["image"]), {"landmarks": batch["landmarks"], "tough": tough,
                                                   "tolerant": tolerant},
        out_size=spec.image_size, flip_permutation=permutation, config=config,
        point_masks={"visible": mask} if relabel else {})
    pred, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
                             mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    weights = sets["visible"] if relabel else mask
    return float(losses.kd_loss(pred.astype(jnp.float32), sets["landmarks"], sets["tough"], sets["tolerant"],
                                weights=None if weights is None else jnp.asarray(weights)))

  expected = hand(visible)
  np.testing.assert_allclose(step_metrics["loss"], expected, rtol=1e-5)
  # Each wire matters: without the mask, or with the mask not relabelled on the flip, the loss differs.
  assert abs(hand(None, relabel=False) - expected) > 1e-4 * abs(expected)
  assert abs(hand(visible, relabel=False) - expected) > 1e-4 * abs(expected)


# ------------------------------------------------------------------------------------- each accepted form


def test_a_five_point_csv_without_splits_or_missing_points(tmp_path):
  faces = ff.write_custom(tmp_path / "manual", form="csv", num_faces=12)
  _prepare(tmp_path / "manual", tmp_path / "data")
  scheme = info.get_info("custom")
  assert scheme.num_landmarks == 5 and scheme.flip_pairs == PAIRS_5 and scheme.normalization == "box"
  assert scheme.splits == ("train", "test") and scheme.label == "manual"
  stored = _all(load_split("custom", "train", tmp_path / "data")) + _all(load_split("custom", "test", tmp_path / "data"))
  assert len(stored) == 12 and 1 <= len(load_split("custom", "test", tmp_path / "data")) <= 4
  by_id = {example["image_id"]: example for example in stored}
  for face in faces:
    example = by_id[face["image"] + "#0"]
    np.testing.assert_allclose(example["landmarks_original"], face["landmarks"], atol=1e-3)
    assert example["visible"].all()
    low, high = face["landmarks"].min(0), face["landmarks"].max(0)
    np.testing.assert_allclose(example["face_box"], np.concatenate([low, high]), atol=1e-3)
  assert flips.flip_permutation("custom").tolist() == [1, 0, 2, 4, 3]


@pytest.mark.parametrize("form", ["jsonl", "pts"])
def test_a_21_point_set_with_missing_points(tmp_path, form):
  splits = ["train"] * 10 + ["test"] * 4
  faces = ff.write_custom(tmp_path / "manual", form=form, points=ff.POINTS_21, num_faces=14, splits=splits,
                          missing_per_face=3, keep_visible=(13, 16),
                          description={"splits": ["train", "test"], "normalization": {"points": [13, 16]},
                                       "flip_pairs": [list(pair) for pair in PAIRS_21]})
  _prepare(tmp_path / "manual", tmp_path / "data")
  scheme = info.get_info("custom")
  assert scheme.num_landmarks == 21 and scheme.flip_pairs == PAIRS_21 and scheme.outer_eye_corners == (13, 16)
  for split, first in (("train", 0), ("test", 10)):
    stored = _all(load_split("custom", split, tmp_path / "data"))
    assert len(stored) == splits.count(split)
    for example, face in zip(stored, faces[first:]):
      np.testing.assert_array_equal(example["visible"], face["visible"])
      seen = face["visible"]
      # .pts files keep 6 decimals of 1-based values; the others 4 decimals.
      np.testing.assert_allclose(example["landmarks_original"][seen], face["landmarks"][seen], atol=1e-3)
      # Missing points are filled (finite, near the face), never NaN; the soft landmarks are finite too.
      assert np.isfinite(example["landmarks"]).all() and np.isfinite(example["soft_landmarks"]).all()
      box = example["face_box"]
      assert np.all(example["landmarks_original"][~seen] > box[:2] - (box[2:] - box[:2]))
  metadata = json.loads(next((tmp_path / "data").rglob("metadata.json")).read_text())["custom"]
  assert metadata["missing_points"] == {"train": 30, "test": 12} and not metadata["flip_pairs_derived"]


def test_tfds_build_writes_what_prepare_writes(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top (one test runs tfds's command)
  import sys  # pylint: disable=g-import-not-at-top
  ff.write_custom(tmp_path / "manual", form="csv", num_faces=8, splits=["train"] * 6 + ["test"] * 2)
  _prepare(tmp_path / "manual", tmp_path / "prepared")
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-m", "kd_landmarks.datasets.tfds_build", "kd_landmarks/custom",
                           "--imports", "kd_landmarks.datasets.builder", "--manual_dir", str(tmp_path / "manual"),
                           "--data_dir", str(tmp_path / "built"), "--download_config", '{"compute_stats": "skip"}'],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for split in ("train", "test"):
    built, prepared = _all(load_split("custom", split, tmp_path / "built")), _all(load_split("custom", split, tmp_path / "prepared"))
    assert len(built) == len(prepared)
    for ours, theirs in zip(built, prepared):
      for key in ("landmarks", "soft_landmarks", "visible", "face_box", "image"):
        np.testing.assert_array_equal(ours[key], theirs[key])


# -------------------------------------------------------------------------------------------- bad input


def _csv_with(tmp_path, edit):
  ff.write_custom(tmp_path, form="csv", num_faces=6, splits=["train"] * 4 + ["test"] * 2)
  path = tmp_path / "annotations.csv"
  lines = path.read_text().splitlines()
  lines[3] = edit(lines[3])  # the face on line 4 of the file
  path.write_text("\n".join(lines) + "\n")
  return f"{path}:4"


def _cells(line, change):
  cells = line.split(",")
  change(cells)
  return ",".join(cells)


@pytest.mark.parametrize("edit, expected", [
    (lambda line: line.replace(",train", ",1.0,train"), "fields, the header has"),          # a point too many
    (lambda line: _cells(line, lambda c: c.__setitem__(1, "nan")), "NaN"),
    (lambda line: _cells(line, lambda c: c.__setitem__(1, "900")), "far outside"),
    (lambda line: _cells(line, lambda c: c.__setitem__(0, "nowhere.png")), "does not exist"),
    (lambda line: _cells(line, lambda c: [c.__setitem__(i, "") for i in range(1, 7)]), "2 annotated points; a face needs at least 3"),
])
def test_bad_csv_rows_are_one_line_naming_file_and_line(tmp_path, edit, expected):
  where = _csv_with(tmp_path, edit)
  with pytest.raises(errors.DataError) as caught:
    _prepare(tmp_path, tmp_path / "data")
  message = str(caught.value)
  assert message.startswith(where + ":") and expected in message and "\n" not in message, message


def test_inconsistent_point_counts_name_the_file_and_line(tmp_path):
  ff.write_custom(tmp_path / "j", form="jsonl", num_faces=5)
  path = tmp_path / "j" / "annotations.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  rows[2]["points"] = rows[2]["points"][:4]
  path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
  with pytest.raises(errors.DataError, match=f"^{path}:3: 4 points, but {path}:1 has 5"):
    _prepare(tmp_path / "j", tmp_path / "data")
  faces = ff.write_custom(tmp_path / "p", form="pts", num_faces=5)
  short = (tmp_path / "p" / faces[3]["image"]).with_suffix(".pts")
  short.write_text(ff.pts_text(faces[3]["landmarks"][:4]))
  with pytest.raises(errors.DataError, match=f"^{short}: 4 points, but .*face_000.pts has 5"):
    _prepare(tmp_path / "p", tmp_path / "data")


def test_a_pts_face_with_two_images_or_none_is_refused_naming_them(tmp_path):
  """Which photo a .pts belongs to cannot be told when two share its stem: never pick one silently."""
  faces = ff.write_custom(tmp_path / "p", form="pts", num_faces=5)
  image = tmp_path / "p" / faces[2]["image"]
  twin = image.with_suffix(".png" if image.suffix.lower() != ".png" else ".jpg")
  twin.write_bytes(image.read_bytes())
  pts = image.with_suffix(".pts")
  first, second = sorted([image, twin])
  with pytest.raises(errors.UserError) as raised:
    _prepare(tmp_path / "p", tmp_path / "data")
  assert str(raised.value).startswith(f"{pts}: 2 images for one annotation: {first} and {second}; ")
  image.unlink()
  twin.unlink()
  with pytest.raises(errors.UserError, match=f"^{pts}: no image next to it"):
    _prepare(tmp_path / "p", tmp_path / "data")


def test_a_missing_normalising_point_is_refused(tmp_path):
  faces = ff.write_custom(tmp_path, form="jsonl", num_faces=6, missing_per_face=1, seed=3,
                          splits=["train"] * 4 + ["test"] * 2, description={"normalization": {"points": [0, 1]}})
  line = 1 + next(i for i, face in enumerate(faces) if not face["visible"][:2].all())
  with pytest.raises(errors.DataError, match=f"^{tmp_path / 'annotations.jsonl'}:{line}: point [01] is missing, "
                                             "but the NME is normalised by the distance of points"):
    _prepare(tmp_path, tmp_path / "data")


def test_custom_without_its_data_dir_is_a_config_error(tmp_path):
  from test_main import _config  # pylint: disable=g-import-not-at-top (the demo config)
  from kd_landmarks import pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="config.data_dir"):
    pipeline.validate_config(_config(dataset="custom"))
  with pytest.raises(errors.ConfigError, match="prepare --dataset custom"):
    pipeline.validate_config(_config(dataset="custom", data_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------------ end to end


def test_the_whole_pipeline_on_a_21_point_set_with_missing_points(tmp_path):
  """prepare (JSON lines), then one config line: teachers, cache, students, eval, report; export ONNX."""
  manual, data, workdir = tmp_path / "manual", tmp_path / "data", tmp_path / "run"
  faces = ff.write_custom(manual, form="jsonl", points=ff.POINTS_21, num_faces=30, missing_per_face=3,
                          splits=["train"] * 22 + ["test"] * 8, keep_visible=(13, 16),
                          description={"name": "faces21", "normalization": {"points": [13, 16]}})
  from kd_landmarks.datasets.__main__ import main as prepare_main  # pylint: disable=g-import-not-at-top
  assert prepare_main(["prepare", "--dataset", "custom", "--manual_dir", str(manual), "--data_dir", str(data)]) == 0
  overrides = ["--config.dataset=custom", f"--config.data_dir={data}", "--config.image_size=32",
               "--config.student_image_size=0", "--config.teacher_model=mobilenet_v2_tiny", "--config.teacher.batch_size=8",
               "--config.teacher.num_train_steps=3", "--config.student.batch_size=8",
               "--config.student.num_train_steps=3", "--config.student_seeds=1", "--config.log_every_steps=1",
               "--config.eval_batch_size=8"]
  result = _main("--config", "configs/demo.py", "--workdir", str(workdir), *overrides, timeout=1500)
  assert result.returncode == 0, result.stderr[-4000:]
  test_faces = faces[22:]
  gt = np.stack([face["landmarks"] for face in test_faces])
  visible = np.stack([face["visible"] for face in test_faces])
  for model in ("teacher_tough", "teacher_tolerant", "student_l2", "student_kd"):
    meta = json.loads((workdir / model / "model.json").read_text())
    assert meta["num_landmarks"] == 21 and meta["scheme"]["flip_pairs"] == [list(p) for p in PAIRS_21]
    arrays = np.load(workdir / model / "eval" / "test.npz")
    assert arrays["pred"].shape == (8, 21, 2)
    np.testing.assert_array_equal(arrays["visible"], visible)
    np.testing.assert_allclose(arrays["gt"][visible], gt[visible], atol=1e-3)
    # NME by hand: the visible points' mean error over the distance of points 13 and 16.
    errors_px = np.linalg.norm(arrays["pred"] - gt, axis=-1)
    per_image = (np.where(visible, errors_px, 0).sum(1) / visible.sum(1)
                 / np.linalg.norm(gt[:, 13] - gt[:, 16], axis=-1))
    stored = json.loads((workdir / model / "eval" / "metrics.json").read_text())["test"]
    assert stored["nme"] == pytest.approx(per_image.mean(), rel=1e-4)
  report = (workdir / "report.md").read_text()
  assert "NME is normalised by the distance between points 13 and 16" in report
  assert "Custom set `faces21`, 21 points" in report
  exported = _main_module("kd_landmarks.deploy.export", "--workdir", str(workdir), "--model", "student_kd")
  assert exported.returncode == 0, exported.stderr[-3000:]
  card = (workdir / "student_kd" / "export" / "MODEL_CARD.md").read_text()
  assert "`faces21` (custom): 21 points" in card and json.dumps([list(p) for p in PAIRS_21]) in card
  assert "NME normalised by the distance between points 13 and 16" in card
  from kd_landmarks.deploy import predict  # pylint: disable=g-import-not-at-top (onnxruntime)
  predictor = predict.Predictor.load(str(workdir / "student_kd" / "export" / "student_kd.onnx"))
  image = images_lib.read_image(manual / test_faces[0]["image"])
  low, high = np.nanmin(gt[0], 0), np.nanmax(gt[0], 0)
  found = predictor.predict(image, boxes=[(low[0], low[1], high[0], high[1])])
  assert found.shape == (1, 21, 2) and np.isfinite(found).all()


def _main_module(module, *args, timeout=600):
  import subprocess  # pylint: disable=g-import-not-at-top (the command as a user runs it)
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=timeout)
