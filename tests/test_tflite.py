"""export --format tflite: float32 equals JAX within 1e-4 in LiteRT, int8 takes camera bytes and stays close.

Needs the extra 'tflite' (tensorflow, ai-edge-litert); skipped without it.
"""
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TFLite export needs the 'tflite' extra: pip install -e '.[tflite]'")
litert = pytest.importorskip("ai_edge_litert.interpreter",
                             reason="LiteRT checks need the 'tflite' extra: pip install -e '.[tflite]'")

from kd_landmarks import Predictor  # noqa: E402
from kd_landmarks.deploy import export  # noqa: E402
from kd_landmarks.deploy import export_tflite  # noqa: E402
import predict_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  from kd_landmarks.training import checkpoint

  model_dir = predict_fixtures.write_model_dir(tmp_path_factory.mktemp("run") / "student_kd")
  # ONNX first, then TFLite into the same folder: export.json keeps both.
  assert export.main(["--checkpoint", model_dir, "--format", "onnx"]) == 0
  assert export.main(["--checkpoint", model_dir, "--format", "tflite", "--quantize"]) == 0
  with open(os.path.join(model_dir, "export", "export.json")) as f:
    report = json.load(f)
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  return module, variables, meta, report


def test_float32_tflite_matches_the_model(exported):
  # Independent of the serving function: the module with its default (CPU) layer implementations on
  # uint8 / 255, against LiteRT's interpreter (batch 1, five crops one by one through the runner).
  module, variables, meta, report = exported
  rng = np.random.default_rng(0)
  images = np.concatenate([export.fixture_crops(64, count=2), rng.integers(0, 256, (3, 64, 64, 3))]
                          ).astype(np.uint8)
  expected = np.asarray(jax.jit(lambda x: module.apply(variables, x, train=False))(
      images.astype(np.float32) / 255.0))
  got = export_tflite.run_litert(report["tflite_float32"]["path"], images)
  assert got.shape == (5, 68, 2)
  # Batch 1 and fully static: every op is a builtin that XNNPACK takes (ReLU6 fused into the Conv).
  interpreter = litert.Interpreter(model_path=report["tflite_float32"]["path"])
  assert list(interpreter.get_input_details()[0]["shape_signature"]) == [1, 64, 64, 3]
  ops = {op["op_name"] for op in interpreter._get_ops_details()}  # pylint: disable=protected-access
  assert {"CONV_2D", "DEPTHWISE_CONV_2D"} <= ops and not {"MAXIMUM", "MINIMUM", "SHAPE", "GATHER"} & ops
  np.testing.assert_allclose(got, expected, atol=export.FP32_TOLERANCE, rtol=0)
  assert report["tflite_float32"]["max_abs_error_vs_jax"] <= export.FP32_TOLERANCE


def test_int8_tflite_takes_camera_bytes_stores_int8_and_stays_close(exported):
  _, _, meta, report = exported
  path = report["tflite_int8"]["path"]
  interpreter = litert.Interpreter(model_path=path)
  (detail,) = interpreter.get_input_details()
  # uint8 in with scale 1, zero point 0: the bytes are the pixel values, as in the float file.
  assert detail["dtype"] == np.uint8 and detail["quantization"] == (1.0, 0)
  assert list(detail["shape"]) == [1, 64, 64, 3]
  tensors = interpreter.get_tensor_details()
  # Convolution weights (4-D constants) are int8; the activations between layers are int8 too.
  weights = [t for t in tensors if len(t["shape"]) == 4 and t["shape"][0] != 1]
  assert weights and all(t["dtype"] == np.int8 for t in weights)
  assert report["tflite_int8"]["size_mb"] < 0.6 * report["tflite_float32"]["size_mb"]
  # The quantisation error, against the spread of the predictions (the ONNX int8 test's criterion).
  images = export.fixture_crops(64, count=4)
  float_out = export_tflite.run_litert(report["tflite_float32"]["path"], images)
  int8_out = export_tflite.run_litert(path, images)
  spread = np.abs(float_out - float_out.mean(axis=1, keepdims=True)).mean()
  assert np.abs(int8_out - float_out).mean() < 0.25 * spread


def test_export_json_and_model_card_keep_both_formats(exported):
  _, _, _, report = exported
  assert {"float32", "tflite_float32", "tflite_int8"} <= set(report)
  out_dir = os.path.dirname(report["tflite_float32"]["path"])
  card = open(os.path.join(out_dir, "MODEL_CARD.md")).read()
  assert "| `student_kd.tflite` | TFLite float32 |" in card and "| `student_kd.onnx` | ONNX float32 |" in card
  assert f"{report['tflite_int8']['mean_px_error_vs_jax']:.3f} px" in card


def test_litert_predictor_equals_the_jax_predictor(exported):
  _, _, meta, report = exported
  model_dir = os.path.dirname(os.path.dirname(report["tflite_float32"]["path"]))
  from kd_landmarks.datasets import images as image_io

  image = image_io.read_image(predict_fixtures.TAKEO_DIR / "takeo.ppm")
  boxes = np.array([[35.5, 75.5, 126.5, 166.5], [30.5, 64.5, 135.5, 169.5]])
  predictor = Predictor.load(report["tflite_float32"]["path"], backend="litert")
  assert predictor.backend == "litert"
  expected = Predictor.load(model_dir).predict(image, boxes=boxes)
  tolerance = export.FP32_TOLERANCE * 1.05 * 1.04 * 105  # 1e-4 of the largest crop, in photo pixels
  np.testing.assert_allclose(predictor.predict(image, boxes=boxes), expected, atol=tolerance, rtol=0)
  # The int8 file runs face by face inside the same call too.
  assert Predictor.load(report["tflite_int8"]["path"]).predict(image, boxes=boxes).shape == (2, 68, 2)


def test_int8_input_is_raw_bytes_even_when_calibration_crops_lack_the_extremes(exported, tmp_path):
  # Calibration crops clipped to 40..210: without pinning the input range, the converter would quantise the
  # input with scale 170/255 and a non-zero zero point, and raw camera bytes would be misread.
  module, variables, meta, _ = exported
  crops = np.clip(export.fixture_crops(64, count=4), 40, 210).astype(np.uint8)
  path = tmp_path / "narrow.int8.tflite"
  path.write_bytes(export_tflite.to_tflite_int8(module, variables, 64, crops))
  (detail,) = litert.Interpreter(model_path=str(path)).get_input_details()
  assert detail["quantization"] == (1.0, 0)


def test_litert_tracks_a_video_like_the_jax_predictor(exported):
  # The tracker calls the Predictor only (detector, box map, landmarks on boxes): the LiteRT backend detects
  # on the same frames, keeps the same identities and gives the JAX landmarks within the export's tolerance.
  from kd_landmarks.deploy import detect
  from kd_landmarks.deploy import predict
  from kd_landmarks.datasets import images as image_io
  _, _, meta, report = exported
  model_dir = os.path.dirname(os.path.dirname(report["tflite_float32"]["path"]))
  image = image_io.read_image(predict_fixtures.TAKEO_DIR / "takeo.ppm")
  box = (35.5, 75.5, 126.5, 166.5)

  class _First:
    name = "dlib_hog"

    def detect(self, frame):
      return [detect.Detection(box, 1.0)]

  frames = [np.roll(image, shift, axis=1) for shift in range(4)]
  # The untrained student's landmark box changes size a lot between frames: a lenient rule keeps tracking.
  rule = predict.video.TrackingRule(redetect_every=2, max_scale_change=30.0, max_shift=30.0, min_inside=0.0)
  tracks, schedules = {}, {}
  for path, backend in ((model_dir, "jax"), (report["tflite_float32"]["path"], "litert")):
    predictor = Predictor.load(path, backend=backend, detector=_First())
    results = list(predictor.predict_video(frames, rule=rule, smoothing=False))
    schedules[backend] = [(r.detector_ran, [f.track_id for f in r.faces]) for r in results]
    tracks[backend] = np.stack([r.faces[0].landmarks for r in results])
  assert schedules["litert"] == schedules["jax"] and schedules["jax"][0] == (True, [0])
  crop_side = max(max(r.faces[0].crop_box[2] for r in results) * 1.05, 200.0)
  np.testing.assert_allclose(tracks["litert"], tracks["jax"], atol=2 * export.FP32_TOLERANCE * crop_side)
