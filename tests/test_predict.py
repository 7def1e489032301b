"""predict.py and detect.py: geometry worked by hand, the learned box map, and the CLI on real photos."""
import errno
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kd_landmarks import coords
from kd_landmarks import errors
from kd_landmarks.deploy import detect
from kd_landmarks.deploy import predict
from kd_landmarks.deploy import runtimes
from kd_landmarks.datasets import readers
import predict_fixtures


class _ConstantModel:
  """Stands in for a student: always predicts the same normalised landmarks (no parameters)."""

  def __init__(self, points_normalized):
    self.points = jnp.asarray(points_normalized, dtype=jnp.float32)

  def apply(self, variables, images, train=False):
    del variables, train
    return jnp.broadcast_to(self.points, (images.shape[0],) + self.points.shape)


class _FixedDetector:
  name = "fixed"

  def __init__(self, detections):
    self.detections = detections

  def detect(self, image):
    del image
    return list(self.detections)


def _meta(image_size, num_landmarks):
  return {"model": "constant", "num_landmarks": num_landmarks, "image_size": image_size,
          "dataset": "300w", "overrides": {}, "dtype": "float32"}


def test_landmarks_to_image_matches_closed_form():
  # A crop of side S covering the box (cx, cy, side * scale): normalised n maps to cx + n * side * scale
  # (the crop spans [-0.5, 0.5] of the scaled box), independent of S.
  cx, cy, side, scale, size = 140.25, 77.5, 93.0, 1.05, 224
  normalized = np.array([[0.0, 0.0], [0.5, -0.5], [-0.25, 0.125], [0.31, 0.07]])
  _, crop_to_image = predict.crop_for_landmark_box(np.zeros((300, 300, 3), np.uint8), (cx, cy, side),
                                                   image_size=size, box_scale=scale)
  mapped = predict.landmarks_to_image(normalized, crop_to_image, size)
  expected = np.array([cx, cy]) + normalized * side * scale
  np.testing.assert_allclose(mapped, expected, atol=0.01)


def test_crop_samples_the_image_where_the_affine_says():
  # On a linear ramp, any interpolation (and PIL's antialiasing filter) returns the ramp's value at the
  # sampled point, so each crop pixel must hold image_value(crop_to_image(pixel)).
  height, width = 120, 160
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
  image = np.stack([xs * 1.5, ys * 2.0, 0 * xs + 100], axis=-1).astype(np.uint8)
  crop, crop_to_image = predict.crop_for_landmark_box(image, (80.0, 60.0, 40.0), image_size=32,
                                                      box_scale=1.05)
  grid = np.stack(np.meshgrid(np.arange(32.0), np.arange(32.0)), axis=-1).reshape(-1, 2)
  where = coords.apply_affine(crop_to_image, grid)
  np.testing.assert_allclose(crop[..., 0].reshape(-1) * 255, where[:, 0] * 1.5, atol=1.0)
  np.testing.assert_allclose(crop[..., 1].reshape(-1) * 255, where[:, 1] * 2.0, atol=1.0)


def test_predictor_maps_crop_centre_to_box_from_detector():
  # Detector box (x0, y0, x1, y1) = (40, 50, 140, 150): centre (90, 100), width 100. Box map
  # (offset 0.1, 0.2, scale 1.2) -> landmark box (100, 120, 120); with the 1.05 crop margin a
  # prediction n lands at (100, 120) + n * 126.
  points = np.array([[0.0, 0.0], [0.5, 0.5], [-0.5, 0.25]])
  predictor = predict.Predictor.from_module(
      _ConstantModel(points), {}, _meta(32, 3),
      detector=_FixedDetector([detect.Detection((40.0, 50.0, 140.0, 150.0), 1.5)]),
      box_map=detect.BoxMap(0.1, 0.2, 1.2, source="test"), box_scale=1.05)
  faces = predictor.predict_faces(np.zeros((240, 200, 3), np.uint8))
  assert len(faces) == 1
  np.testing.assert_allclose(faces[0].crop_box, (100.0, 120.0, 120.0), atol=1e-9)
  np.testing.assert_allclose(faces[0].landmarks, np.array([100.0, 120.0]) + points * 126.0, atol=0.01)


def test_large_photos_are_detected_shrunk_and_boxes_scaled_back():
  # 2560 x 1920 -> shrunk by 2 to 1280 x 960. A box over small pixels 100..199 (extent 99.5..199.5)
  # covers full-size pixels 200..399, i.e. extent 199.5..399.5.
  seen_shapes = []

  class _Recorder(_FixedDetector):

    def detect(self, image):
      seen_shapes.append(image.shape)
      return super().detect(image)

  predictor = predict.Predictor.from_module(
      _ConstantModel(np.zeros((2, 2))), {}, _meta(32, 2),
      detector=_Recorder([detect.Detection((99.5, 49.5, 199.5, 149.5), 1.0)]),
      box_map=detect.BoxMap(0.0, 0.0, 1.0, source="test"), box_scale=1.0)
  (detection,) = predictor.detect(np.zeros((1920, 2560, 3), np.uint8))
  assert seen_shapes == [(960, 1280, 3)]
  np.testing.assert_allclose(detection.box, (199.5, 99.5, 399.5, 299.5), atol=1e-9)
  (detection,) = predictor.detect(np.zeros((100, 120, 3), np.uint8))  # small photos: untouched
  assert seen_shapes[-1] == (100, 120, 3) and detection.box == (99.5, 49.5, 199.5, 149.5)


def test_read_photo_applies_exif_orientation(tmp_path):
  # Orientation 6 = the camera was turned 90 degrees clockwise: viewers show the photo rotated, so a
  # 60 x 40 (w x h) JPEG displays as 40 x 60, with its top-left corner moved to the top-right.
  pixels = np.zeros((40, 60, 3), np.uint8)
  pixels[:10, :10] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
  upright = predict.read_photo(str(tmp_path / "phone.jpg"))
  assert upright.shape == (60, 40, 3)
  assert upright[:10, -10:].mean() > 200 and upright[:10, :10].mean() < 50


def test_box_map_fit_recovers_a_known_map():
  rng = np.random.default_rng(0)
  det = np.stack([rng.uniform(50, 500, 40), rng.uniform(50, 500, 40), rng.uniform(30, 300, 40)], -1)
  truth = detect.BoxMap(-0.03, 0.11, 1.17, source="truth")
  fitted = detect.fit_box_map_from_pairs(det, truth(det), source="fit")
  assert (fitted.offset_x, fitted.offset_y, fitted.side_scale) == pytest.approx((-0.03, 0.11, 1.17))
  np.testing.assert_allclose(fitted.residual_std, 0.0, atol=1e-12)
  assert fitted.num_faces == 40 and fitted.fitted


def test_fit_box_map_pairs_detections_with_their_own_face():
  # Two faces per image; the detector also returns a decoy far away. The fit must use, for each
  # annotated face, the detection on that face: det box = landmark box shrunk by 0.8 and raised by 0.1 side.
  rng = np.random.default_rng(1)
  examples = []
  for _ in range(6):
    landmarks = rng.uniform(0, 1, (68, 2)) * rng.uniform(40, 90) + rng.uniform(10, 60, 2)
    cx, cy, side = coords.square_box_from_landmarks(landmarks)
    w = 0.8 * side
    dcx, dcy = cx, cy - 0.1 * side
    face = detect.Detection((dcx - w / 2, dcy - w / 2, dcx + w / 2, dcy + w / 2), 1.0)
    decoy = detect.Detection((400.0, 400.0, 450.0, 450.0), 3.0)
    examples.append({"image": np.zeros((8, 8, 3), np.uint8), "landmarks": landmarks,
                     "detections": [decoy, face]})

  class _PerExampleDetector:
    name = "per_example"

    def __init__(self):
      self.calls = iter(examples)

    def detect(self, image):
      return next(self.calls)["detections"]

  box_map, stats = detect.fit_box_map(_PerExampleDetector(), examples, source="test", progress=False)
  assert stats["matched"] == 6 and stats["missed"] == 0
  # landmark centre = det centre + 0.1 side = det centre + 0.125 det width; side = 1.25 det width.
  assert (box_map.offset_x, box_map.offset_y, box_map.side_scale) == pytest.approx((0.0, 0.125, 1.25))


def test_box_map_json_round_trip_and_default(tmp_path):
  assert not detect.load_box_map(str(tmp_path), "dlib_hog").fitted
  fitted = detect.BoxMap(0.01, 0.09, 1.1, source="fitted on 300w/train", num_faces=12,
                         residual_std=(0.01, 0.02, 0.03))
  detect.save_box_map(str(tmp_path), "dlib_hog", fitted)
  detect.save_box_map(str(tmp_path), "dlib_cnn", detect.BoxMap(0, 0.2, 1.0, source="fitted on x"))
  assert detect.load_box_map(str(tmp_path), "dlib_hog") == fitted
  (tmp_path / detect.BOX_MAP_JSON).write_text('{"dlib_hog": {"offset_x": 1}}')
  with pytest.raises(ValueError, match="fit-box-map"):
    detect.load_box_map(str(tmp_path), "dlib_hog")


def test_fit_box_map_cli_learns_on_the_models_training_split(tmp_path, monkeypatch):
  # The plumbing: dataset and split come from model.json, the map lands in box_map.json, predict uses it.
  from kd_landmarks.training import checkpoint
  from kd_landmarks import datasets

  model_dir = str(tmp_path / "student_kd")
  checkpoint.write_model_json(model_dir, _meta(32, 68) | {"dataset": "cofw"})
  rng = np.random.default_rng(2)
  examples = [{"image": np.zeros((8, 8, 3), np.uint8),
               "landmarks": rng.uniform(0, 1, (29, 2)) * 60 + rng.uniform(20, 40, 2)} for _ in range(5)]
  requested = []

  def load_split(dataset, split, data_dir):
    requested.append((dataset, split, data_dir))
    return examples

  class _BoxFromLandmarks:
    """Returns the landmark box shifted up by 0.1 and shrunk to 0.8 of its side."""
    name = "dlib_hog"

    def __init__(self):
      self.next_example = iter(examples)

    def detect(self, image):
      cx, cy, side = coords.square_box_from_landmarks(next(self.next_example)["landmarks"])
      w = 0.8 * side
      top = cy - 0.1 * side - w / 2
      return [detect.Detection((cx - w / 2, top, cx + w / 2, top + w), 1.0)]

  monkeypatch.setattr(datasets, "load_split", load_split)
  monkeypatch.setattr(detect, "get_detector", lambda name: _BoxFromLandmarks())
  assert predict.main(["fit-box-map", "--checkpoint", model_dir, "--data_dir", "/data"]) == 0
  assert requested == [("cofw", "train", "/data")]
  box_map = detect.load_box_map(model_dir, "dlib_hog")
  assert box_map.fitted and box_map.num_faces == 5 and box_map.source == "fitted on cofw/train"
  assert (box_map.offset_x, box_map.offset_y, box_map.side_scale) == pytest.approx((0.0, 0.125, 1.25))


@pytest.mark.parametrize("detector_name", ["dlib_hog", "dlib_hog_fast"])
def test_dlib_hog_finds_the_real_face_near_its_landmarks(detector_name):
  pytest.importorskip("dlib")
  image = np.asarray(Image.open(predict_fixtures.TAKEO_DIR / "takeo.ppm").convert("RGB"))
  landmarks = readers.read_pts(predict_fixtures.TAKEO_DIR / "takeo.pts")
  detector = detect.get_detector(detector_name)
  assert detector.name == detector_name  # box maps are stored under this name
  detections = detector.detect(image)
  assert len(detections) == 1
  match = detect.match_detection(detections, landmarks, min_iou=0.5)
  assert match is not None and match.score > 0
  # The default map must put the crop on the face: its box within 10% of the landmark box.
  mapped = detect.DEFAULT_BOX_MAPS[detector_name](match.centre_width)
  truth = coords.square_box_from_landmarks(landmarks)
  assert np.all(np.abs(mapped - truth) < 0.1 * truth[2])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return predict_fixtures.write_model_dir(tmp_path_factory.mktemp("run") / "student_kd")


def test_cli_on_the_real_photo_writes_json_and_overlay(model_dir, tmp_path):
  pytest.importorskip("dlib")
  out = tmp_path / "out"
  assert predict.main(["--checkpoint", model_dir, str(predict_fixtures.TAKEO_DIR / "takeo.ppm"),
                       "--out", str(out)]) == 0
  # Strict JSON (no NaN), readable by any JSON parser.
  result = json.loads((out / "takeo.json").read_text(), parse_constant=_reject_constant)
  assert (result["width"], result["height"]) == (150, 225)
  assert result["box_map"]["fitted"] is False and result["box_map"]["source"].startswith("default")
  (face,) = result["faces"]
  assert len(face["landmarks"]) == 68 and np.isfinite(face["landmarks"]).all()
  landmarks = readers.read_pts(predict_fixtures.TAKEO_DIR / "takeo.pts")
  assert detect.box_iou(face["box"], _square(coords.square_box_from_landmarks(landmarks))) > 0.5
  with Image.open(out / "takeo.png") as overlay:
    assert overlay.size == (150, 225)


def test_cli_on_a_folder_reports_bad_and_faceless_files(model_dir, tmp_path):
  pytest.importorskip("dlib")
  folder = tmp_path / "photos"
  folder.mkdir()
  shutil.copy(predict_fixtures.TAKEO_DIR / "takeo.ppm", folder / "takeo.ppm")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  Image.fromarray(np.full((120, 90, 3), 128, np.uint8)).save(folder / "blank.png")
  (folder / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  assert predict.main(["--checkpoint", model_dir, str(folder), "--out", str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["counts"] == {"ok": 1, "no_face": 1, "error": 1, "skipped": 1}
  status = {os.path.basename(r["image"]): r for r in summary["images"]}
  assert status["broken.jpg"]["status"] == "error" and "cannot decode" in status["broken.jpg"]["reason"]
  assert status["blank.png"]["status"] == "no_face"
  assert json.loads((out / "blank.json").read_text())["faces"] == []
  # The overlays: the faceless photo unchanged (nothing to draw), the face's with its green landmarks.
  np.testing.assert_array_equal(np.asarray(Image.open(out / "blank.png").convert("RGB")),
                                np.full((120, 90, 3), 128, np.uint8))
  overlay = np.asarray(Image.open(out / "takeo.png").convert("RGB"))
  landmarks = np.asarray(json.loads((out / "takeo.json").read_text())["faces"][0]["landmarks"])
  points = np.round(landmarks).astype(int)
  inside = points[(points[:, 0] >= 0) & (points[:, 0] < 150) & (points[:, 1] >= 0) & (points[:, 1] < 225)]
  assert len(inside) >= 5
  for x, y in inside:
    np.testing.assert_array_equal(overlay[y, x], [0, 255, 0])


def test_cli_uses_a_fitted_box_map(model_dir, tmp_path):
  pytest.importorskip("dlib")
  # A map stored in the model dir replaces the default, and the crop box follows it exactly.
  local_dir = tmp_path / "model"
  shutil.copytree(model_dir, local_dir)
  box_map = detect.BoxMap(0.0, 0.5, 2.0, source="fitted on test/train", num_faces=3)
  detect.save_box_map(str(local_dir), "dlib_hog", box_map)
  out = tmp_path / "out"
  predict.main(["--checkpoint", str(local_dir), str(predict_fixtures.TAKEO_DIR / "takeo.ppm"),
                "--out", str(out)])
  result = json.loads((out / "takeo.json").read_text())
  assert result["box_map"]["fitted"] is True
  (face,) = result["faces"]
  x0, y0, x1, y1 = face["box"]
  np.testing.assert_allclose(face["crop_box"], [(x0 + x1) / 2, (y0 + y1) / 2 + 0.5 * (x1 - x0),
                                                2.0 * (x1 - x0)], atol=2e-3)


def _square(box):
  cx, cy, side = box
  return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _reject_constant(name):
  raise AssertionError(f"{name} is not valid JSON")


# ---------------------------------------------------------------------------------------------- bad use


def test_out_folder_holding_the_inputs_is_refused_and_nothing_is_written(model_dir, tmp_path, capsys):
  # Probe: `predict --out <the input folder>` overwrote input images with overlays.
  folder = tmp_path / "photos"
  folder.mkdir()
  Image.fromarray(np.full((40, 30, 3), 7, np.uint8)).save(folder / "face.png")
  before = (folder / "face.png").read_bytes()
  assert predict.main(["--checkpoint", model_dir, str(folder), "--out", str(folder)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"error: --out {folder} is the folder of the input {folder}/face.png: predict writes <name>.png "
                 "overlays and <name>.json there, which would overwrite photos; choose another --out")
  assert sorted(os.listdir(folder)) == ["face.png"] and (folder / "face.png").read_bytes() == before
  # The library call refuses too, through another spelling of the same folder.
  with pytest.raises(ValueError, match="is the folder of the input"):
    predict.predict_files(None, [str(folder / "face.png")], str(folder / "." / ".." / "photos"))


def test_exit_status_is_non_zero_only_when_every_input_failed(model_dir, tmp_path, capsys):
  pytest.importorskip("dlib")
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  (folder / "notes.txt").write_text("not an image")
  assert predict.main(["--checkpoint", model_dir, str(folder), str(tmp_path / "missing.jpg"),
                       "--out", str(tmp_path / "out")]) == 1
  captured = capsys.readouterr()
  assert captured.out.startswith("0 input(s) with faces, 0 without a face, 2 unreadable, 1 skipped")
  assert captured.err.strip().splitlines()[-1] == "error: all 3 input(s) failed (none could be read as an image or video)"
  # One readable photo (faceless) among the failures: exit 0.
  Image.fromarray(np.full((120, 90, 3), 128, np.uint8)).save(folder / "blank.png")
  assert predict.main(["--checkpoint", model_dir, str(folder), "--out", str(tmp_path / "out2")]) == 0


def test_cli_on_a_corrupt_model_json_is_one_line(model_dir, tmp_path, capsys):
  # Probe: a corrupt model.json gave a JSONDecodeError naming no file.
  local_dir = tmp_path / "model"
  shutil.copytree(model_dir, local_dir)
  (local_dir / "model.json").write_text('{"model": "mobilenet')
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photo)
  assert predict.main(["--checkpoint", str(local_dir), str(photo), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith(f"error: {local_dir}/model.json is not valid JSON (")
  assert not (tmp_path / "out").exists()


def _constant_predictor(points):
  return predict.Predictor.from_module(_ConstantModel(points), {}, _meta(32, len(points)),
                                       detector=_FixedDetector([]), box_map=detect.BoxMap(0.0, 0.0, 1.0,
                                                                                          source="test"))


def test_boxes_of_any_shape_but_f_by_4_or_f_by_5_are_refused(tmp_path):
  # Probe: boxes of shape [1, 8] were reshaped into two faces.
  points = np.array([[0.0, 0.0], [0.25, -0.25]])
  predictor = _constant_predictor(points)
  photo = np.zeros((200, 200, 3), np.uint8)
  with pytest.raises(errors.ArgumentError, match=r"^boxes must have shape \[F, 4\] \(x0, y0, x1, y1\) or "
                     r"\[F, 5\] \(with a score\), one row per face; got shape \[1, 8\]$"):
    predictor.predict(photo, boxes=[[10, 10, 60, 60, 100, 100, 150, 150]])
  with pytest.raises(errors.ArgumentError, match=r"got shape \[4\] \(one face: \[\[x0, y0, x1, y1\]\]\)"):
    predictor.predict(photo, boxes=[10, 10, 60, 60])
  with pytest.raises(errors.ArgumentError, match="finite"):
    predictor.predict(photo, boxes=[[10, 10, np.nan, 60]])
  # [F, 4] and [F, 5] give the same landmarks; the fifth column is recorded as the face's score only.
  # Box (10, 20, 110, 120) with the identity box map: landmark box (60, 70, 100), crop side 105.
  four = predictor.predict_faces(photo, boxes=[[10, 20, 110, 120]])
  five = predictor.predict_faces(photo, boxes=[[10, 20, 110, 120, 0.75]])
  np.testing.assert_allclose(four[0].landmarks, np.array([60.0, 70.0]) + points * 105.0, atol=0.01)
  np.testing.assert_array_equal(five[0].landmarks, four[0].landmarks)
  assert (four[0].score, five[0].score) == (None, 0.75)
  assert predictor.predict(photo, boxes=np.zeros((0, 4))).shape == (0, 2, 2)
  with pytest.raises(errors.ArgumentError, match=r"a photo is RGB uint8 \[H, W, 3\]"):
    predictor.predict(photo[..., 0], boxes=[[10, 20, 110, 120]])


def test_existing_outputs_are_kept_unless_overwrite(model_dir, tmp_path, capsys):
  # Probe: files that --out already held were overwritten without notice.
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photo)
  out = tmp_path / "out"
  out.mkdir()
  (out / "photo.png").write_bytes(b"an overlay of an earlier run")
  command = ["--checkpoint", model_dir, str(photo), "--out", str(out), "--detector", "dlib_hog"]
  assert predict.main(command) == errors.EXIT_CODE
  assert capsys.readouterr().err.strip() == (
      f"error: --out {out} already holds {out}/photo.png: pass --overwrite (overwrite=True) to replace them, "
      "or choose another --out")
  assert os.listdir(out) == ["photo.png"] and (out / "photo.png").read_bytes() == b"an overlay of an earlier run"
  # The library call refuses the same way; with overwrite the run replaces the file.
  predictor = _constant_predictor(np.zeros((2, 2)))
  with pytest.raises(errors.ArgumentError, match=f"already holds {out}/photo.png"):
    predict.predict_files(predictor, [str(photo)], str(out), progress=False)
  summary = predict.predict_files(predictor, [str(photo)], str(out), progress=False, overwrite=True)
  assert summary["counts"]["no_face"] == 1
  assert sorted(os.listdir(out)) == ["photo.json", "photo.png", "summary.json"]
  with Image.open(out / "photo.png") as overlay:
    assert overlay.size == (20, 20)


def test_a_full_disk_during_predict_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
  # Probe: a full disk during predict left partial files and no summary.json, after a traceback.
  photos = tmp_path / "photos"
  photos.mkdir()
  for name in ("a.png", "b.png"):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photos / name)
  out = tmp_path / "out"
  real_dump = json.dump
  written = []

  def dump_until_full(value, f, **kwargs):
    if written:  # The second JSON file finds the disk full, half-way through.
      f.write('{"image": ')
      raise OSError(errno.ENOSPC, "No space left on device")
    written.append(f.name)
    return real_dump(value, f, **kwargs)

  monkeypatch.setattr(predict.json, "dump", dump_until_full)
  with pytest.raises(errors.WriteError, match=rf"^cannot write {out}/b.json: the disk is full"):
    predict.predict_files(_constant_predictor(np.zeros((2, 2))), [str(photos)], str(out), progress=False)
  # a.* are whole; of b nothing, not even a temporary file.
  assert sorted(os.listdir(out)) == ["a.json", "a.png"]
  json.loads((out / "a.json").read_text())


def test_model_json_image_size_disagreeing_with_the_checkpoint_is_refused(model_dir, tmp_path, capsys):
  # Probe: a model.json whose image_size disagreed with the checkpoint was used (5.2 px off on average).
  local_dir = tmp_path / "student_kd"
  shutil.copytree(model_dir, local_dir)
  meta = json.loads((local_dir / "model.json").read_text())
  assert meta["image_size"] == predict_fixtures.TINY_IMAGE_SIZE == 64
  (local_dir / "model.json").write_text(json.dumps(dict(meta, image_size=48)))
  message = (f"{local_dir}/model.json says image_size=48 but the checkpoint {local_dir}/best/1 was trained with "
             f"image_size=64: set \"image_size\": 64 in {local_dir}/model.json (or retrain)")
  with pytest.raises(errors.UserError) as raised:
    predict.Predictor.load(str(local_dir))
  assert str(raised.value) == message
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photo)
  assert predict.main(["--workdir", str(tmp_path), str(photo), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.strip() == f"error: {message}"
  (local_dir / "model.json").write_text(json.dumps(meta))
  assert predict.Predictor.load(str(local_dir)).image_size == 64  # Consistent again: loads.


def test_a_workdir_without_the_model_names_the_phase_that_trains_it(model_dir, tmp_path, capsys):
  # Probe: export (and predict) on a workdir without a student: a traceback about model.json.
  workdir = tmp_path / "run"
  shutil.copytree(model_dir, workdir / "teacher_tough")
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photo)
  assert predict.main(["--workdir", str(workdir), str(photo), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {workdir} has no trained student_kd ({workdir}/student_kd/model.json is missing); it has "
      "teacher_tough (pass --model NAME). Train it: `python -m kd_landmarks.main --config <config>:phase=student "
      f"--workdir {workdir} --config.student_loss=kd` (after the teachers)")
  with pytest.raises(errors.MissingFileError, match="phase=teacher_tolerant"):
    predict.Predictor.load(str(workdir), model="teacher_tolerant")


def _truncated_onnx(tmp_path):
  onnx = pytest.importorskip("onnx")
  pytest.importorskip("onnxruntime")
  from onnx import helper
  graph = helper.make_graph(
      [helper.make_node("Identity", ["crops"], ["landmarks"])], "g",
      [helper.make_tensor_value_info("crops", onnx.TensorProto.UINT8, ["B", 8, 8, 3])],
      [helper.make_tensor_value_info("landmarks", onnx.TensorProto.UINT8, ["B", 8, 8, 3])])
  whole = helper.make_model(graph).SerializeToString()
  path = tmp_path / "student_kd.onnx"
  path.write_bytes(whole[:len(whole) // 2])
  return path


def test_a_truncated_exported_model_is_one_line_naming_the_file(tmp_path, capsys):
  # Probe: a truncated .onnx / .tflite given to predict or Predictor.load gave a runtime's traceback.
  onnx_path = _truncated_onnx(tmp_path)
  with pytest.raises(runtimes.ModelFileError, match=rf"^{onnx_path}: ONNX Runtime cannot load it \(InvalidProtobuf: "
                     r".*\): the file is truncated or not an ONNX model; export it again"):
    predict.Predictor.load(str(onnx_path))
  # A .tflite cut before its FlatBuffer identifier is refused before LiteRT (which may not be installed).
  tflite_path = tmp_path / "student_kd.tflite"
  tflite_path.write_bytes(b"\x1c\x00\x00")
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photo)
  assert predict.main(["--checkpoint", str(tflite_path), str(photo), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {tflite_path}: not a TFLite model (its first 8 bytes b'\\x1c\\x00\\x00' lack the identifier "
      "b'TFL3'): the file is truncated or of another format; export it again with `kd-landmarks-export` (or "
      "copy the whole file again)")
  assert not (tmp_path / "out").exists()


def test_export_json_disagreeing_with_the_file_shapes_is_refused(tmp_path):
  ort = pytest.importorskip("onnxruntime")
  from onnx import helper, TensorProto
  graph = helper.make_graph(
      [helper.make_node("Reshape", ["crops", "shape"], ["flat"]),
       helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["sliced"]),
       helper.make_node("Cast", ["sliced"], ["cast"], to=TensorProto.FLOAT),
       helper.make_node("Reshape", ["cast", "out_shape"], ["landmarks"])], "g",
      [helper.make_tensor_value_info("crops", TensorProto.UINT8, ["B", 8, 8, 3])],
      [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["B", 5, 2])],
      initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 192]),
                   helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
                   helper.make_tensor("ends", TensorProto.INT64, [1], [10]),
                   helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                   helper.make_tensor("out_shape", TensorProto.INT64, [3], [-1, 5, 2])])
  path = tmp_path / "student_kd.onnx"
  path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
  assert ort.InferenceSession(str(path)).get_outputs()[0].shape == ["B", 5, 2]
  (tmp_path / "export.json").write_text(json.dumps({"image_size": 8, "num_landmarks": 68}))
  with pytest.raises(runtimes.ModelFileError, match=rf"^{tmp_path}/export.json says num_landmarks=68 but {path} "
                     r"has 5 \(its output shape\): the folder mixes exports of two models"):
    runtimes.runner_for_file(str(path))
  (tmp_path / "export.json").write_text(json.dumps({"image_size": 8, "num_landmarks": 5}))
  assert runtimes.runner_for_file(str(path)).num_landmarks == 5
