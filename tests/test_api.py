"""kd_landmarks.Predictor: the same landmarks from every backend, boxes without dlib, faces in one batch."""
import os
import sys

import jax
import numpy as np
import pytest

import kd_landmarks
from kd_landmarks import Predictor
from kd_landmarks import coords
from kd_landmarks.deploy import detect
from kd_landmarks.deploy import export
from kd_landmarks.deploy import predict
from kd_landmarks.datasets import images as image_io
from kd_landmarks.datasets import readers
import predict_fixtures

TAKEO = os.path.join(export.FIXTURE_DIR, "takeo.ppm")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with a tiny student and its float32 ONNX export (with a fitted box map beside it)."""
  workdir = tmp_path_factory.mktemp("run")
  model_dir = predict_fixtures.write_model_dir(workdir / "student_kd")
  detect.save_box_map(model_dir, "dlib_hog", detect.BoxMap(0.02, 0.1, 1.1, source="fitted on test",
                                                           num_faces=3))
  assert export.main(["--checkpoint", model_dir, "--format", "onnx"]) == 0
  return str(workdir), model_dir, os.path.join(model_dir, "export", "student_kd.onnx")


def _takeo():
  image = image_io.read_image(TAKEO)
  landmarks = readers.read_pts(os.path.join(export.FIXTURE_DIR, "takeo.pts"))
  cx, cy, side = coords.square_box_from_landmarks(landmarks)
  # Two face boxes of different framing on the same photo (the second shifted and larger).
  boxes = np.array([[cx - 0.45 * side, cy - 0.55 * side, cx + 0.45 * side, cy + 0.35 * side],
                    [cx - 0.5 * side + 6, cy - 0.6 * side, cx + 0.5 * side + 6, cy + 0.4 * side]])
  return image, boxes


def test_predictor_is_the_package_api():
  assert kd_landmarks.Predictor is predict.Predictor


def test_jax_landmarks_equal_the_model_on_the_crop_by_hand(run):
  # Independent of the runner: the module as training builds it (default CPU layer implementations),
  # applied to crop / 255, mapped to the photo through the crop's affine (coords.py).
  _, model_dir, _ = run
  from kd_landmarks.training import checkpoint

  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  image, boxes = _takeo()
  predictor = Predictor.load(model_dir)
  assert predictor.backend == "jax" and predictor.box_map.fitted
  got = predictor.predict(image, boxes=boxes)
  assert got.shape == (2, 68, 2)
  cuts = []
  for x0, y0, x1, y1 in boxes:
    w = x1 - x0
    landmark_box = ((x0 + x1) / 2 + 0.02 * w, (y0 + y1) / 2 + 0.1 * w, 1.1 * w)  # the fitted box map
    cuts.append(predict.crop_for_landmark_box(image, landmark_box, image_size=64, box_scale=1.05))
  # One batch of both crops, as the predictor runs them (batch size changes float32 summation order).
  normalized = np.asarray(module.apply(variables, np.stack([crop for crop, _ in cuts]), train=False))
  for points, out, (_, crop_to_image) in zip(got, normalized, cuts):
    pixels = (out + 0.5) * 64 - 0.5
    expected = pixels @ crop_to_image[:2, :2].T + crop_to_image[:2, 2]
    # float32 rounding of jit against eager (this untrained model's points reach 500 px): 1e-5 relative.
    np.testing.assert_allclose(points, expected, rtol=1e-5, atol=1e-3)


def test_jax_and_onnx_backends_agree_in_photo_pixels(run):
  workdir, _, onnx_path = run
  image, boxes = _takeo()
  jax_predictor = Predictor.load(workdir)  # a training workdir: its student_kd
  onnx_predictor = Predictor.load(onnx_path, backend="onnx")
  assert onnx_predictor.backend == "onnx" and onnx_predictor.image_size == 64
  # The exported folder carries the model's box map and model name.
  assert onnx_predictor.box_map.to_json() == jax_predictor.box_map.to_json()
  assert onnx_predictor.box_map.fitted and onnx_predictor.meta["model"] == "mobilenet_v2_tiny"
  a, b = jax_predictor.predict(image, boxes=boxes), onnx_predictor.predict(image, boxes=boxes)
  # 1e-4 normalised units of a crop of side 1.05 * 1.1 * w pixels.
  tolerance = export.FP32_TOLERANCE * 1.05 * 1.1 * (boxes[:, 2] - boxes[:, 0]).max()
  np.testing.assert_allclose(a, b, atol=tolerance, rtol=0)
  # Different boxes give different landmarks (the boxes are really used).
  assert np.abs(a[0] - a[1]).max() > 1.0


def test_faces_run_in_one_batch_and_match_one_by_one(run):
  _, model_dir, _ = run
  image, boxes = _takeo()
  predictor = Predictor.load(model_dir)
  batches = []
  runner = predictor.runner

  def counting(crops):
    batches.append(len(crops))
    return runner(crops)

  predictor.runner = counting
  together = predictor.predict(image, boxes=np.concatenate([boxes, boxes[:1]]))
  assert batches == [3]
  one_by_one = np.stack([predictor.predict(image, boxes=box[None])[0] for box in boxes])
  # Batch 4 (padded) against batch 1: float32 reassociation only (this untrained model's outputs reach
  # hundreds of pixels).
  np.testing.assert_allclose(together[:2], one_by_one, atol=2e-3)
  np.testing.assert_allclose(together[2], together[0], atol=1e-6)


def test_boxes_need_no_dlib_and_detection_says_how_to_get_it(run, monkeypatch):
  _, model_dir, onnx_path = run
  monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
  image, boxes = _takeo()
  predictor = Predictor.load(onnx_path)
  assert predictor.predict(image, boxes=boxes).shape == (2, 68, 2)
  with pytest.raises(ImportError, match="needs dlib"):
    predictor.predict(image)


def test_detector_path_uses_the_detections_best_first(run):
  _, model_dir, _ = run

  class _Fixed:
    name = "dlib_hog"

    def detect(self, image):
      return [detect.Detection(tuple(box), score) for box, score in zip(_takeo()[1], (2.0, 1.0))]

  image, boxes = _takeo()
  predictor = Predictor.load(model_dir, detector=_Fixed())
  faces = predictor.predict_faces(image)
  assert [face.score for face in faces] == [2.0, 1.0]
  np.testing.assert_allclose(np.stack([f.landmarks for f in faces]), predictor.predict(image, boxes=boxes),
                             atol=1e-6)
  assert predictor.predict(np.zeros((40, 30, 3), np.uint8), boxes=np.zeros((0, 4))).shape == (0, 68, 2)


def test_bad_inputs_are_named(run, tmp_path):
  _, model_dir, onnx_path = run
  with pytest.raises(ValueError, match="runs in jax, not onnx"):
    Predictor.load(model_dir, backend="onnx")
  with pytest.raises(ValueError, match="unknown backend"):
    Predictor.load(model_dir, backend="tensorrt")
  with pytest.raises(FileNotFoundError, match="no such workdir"):
    Predictor.load(str(tmp_path / "missing"))
  (tmp_path / "model.pt").write_bytes(b"x")
  with pytest.raises(ValueError, match="give a .onnx or .tflite file"):
    Predictor.load(str(tmp_path / "model.pt"))
  predictor = Predictor.load(onnx_path)
  with pytest.raises(ValueError, match="RGB uint8"):
    predictor.predict(np.zeros((10, 10), np.float32), boxes=[[0, 0, 5, 5]])
  with pytest.raises(ValueError, match="x1 > x0"):
    predictor.predict(np.zeros((10, 10, 3), np.uint8), boxes=[[5, 0, 0, 5]])


def test_cli_runs_an_exported_file(run, tmp_path, monkeypatch):
  # The CLI is the API: an .onnx file through --checkpoint, boxes from a detector stub.
  _, _, onnx_path = run
  image, boxes = _takeo()
  monkeypatch.setattr(detect, "get_detector", lambda name: type(
      "Fixed", (), {"name": name, "detect": lambda self, im: [detect.Detection(tuple(boxes[0]), 1.0)]})())
  out = tmp_path / "out"
  assert predict.main(["--checkpoint", onnx_path, TAKEO, "--out", str(out)]) == 0
  import json
  (face,) = json.loads((out / "takeo.json").read_text())["faces"]
  expected = Predictor.load(onnx_path).predict(image, boxes=boxes[:1])[0]
  np.testing.assert_allclose(face["landmarks"], expected, atol=2e-3)


def test_video_tracking_is_the_same_in_jax_and_onnx(run):
  # The tracker calls the Predictor only (detector, box map, landmarks on boxes), so every backend tracks
  # alike: the same frames detected, the same identities, landmarks within the exports' tolerance.
  _, model_dir, onnx_path = run
  image, boxes = _takeo()

  class _First:
    name = "dlib_hog"

    def detect(self, frame):
      return [detect.Detection(tuple(boxes[0]), 1.0)]

  frames = [np.roll(image, shift, axis=1) for shift in range(6)]
  # The untrained student's landmark box changes size about 10x from frame to frame, which the default rule
  # calls lost: a lenient rule keeps every second frame on the tracked box.
  rule = predict.video.TrackingRule(redetect_every=2, max_scale_change=30.0, max_shift=30.0, min_inside=0.0)
  tracks, schedules = {}, {}
  for path in (model_dir, onnx_path):
    predictor = Predictor.load(path, detector=_First())
    results = list(predictor.predict_video(frames, rule=rule, smoothing=True))
    schedules[predictor.backend] = [(r.detector_ran, [f.track_id for f in r.faces]) for r in results]
    tracks[predictor.backend] = np.stack([r.faces[0].landmarks for r in results])
  # Identities: the tracked box outgrows the next detection's, so each detection starts a new face.
  assert schedules["onnx"] == schedules["jax"] == [(True, [0]), (False, [0]), (True, [1]), (False, [1]),
                                                   (True, [2]), (False, [2])]
  # The tolerance in pixels of the largest crop (a tracked one) and twice for the smoothing's two inputs.
  crop_side = max(max(r.faces[0].crop_box[2] for r in results) * 1.05, 200.0)
  np.testing.assert_allclose(tracks["onnx"], tracks["jax"], atol=2 * export.FP32_TOLERANCE * crop_side)
