"""TFLite/LiteRT export of a trained student (paper Section 4.6, Table 6: the student on phones).

Route: the serving function of :mod:`kd_landmarks.deploy.export` (uint8 crop -> normalised landmarks, the same
function the ONNX export traces) -> ``jax2tf.convert`` -> ``tf.lite.TFLiteConverter``. TensorFlow is needed
only here (extra ``tflite``: ``pip install 'kd_landmarks[tflite]'``); nothing else in kd_landmarks imports it.

* ``<name>.tflite``: float32, input uint8 ``[1, S, S, 3]``, output float32 ``[1, K, 2]``: the ONNX contract
  at batch 1. Refused unless LiteRT's interpreter matches JAX within ``serving.FP32_TOLERANCE`` on the check
  crops.
* ``<name>.int8.tflite``: full-integer post-training quantisation (int8 weights per channel and int8
  activations, ranges from representative face crops), batch 1. Its input is uint8 quantised with scale 1
  and zero point 0, so the camera's bytes go in unchanged; its output stays float32 (dequantised inside).
  Its error against JAX is measured and written to ``export.json``.

Batch 1, not a dynamic batch: a batch-polymorphic graph keeps SHAPE/GATHER/BROADCAST_TO ops and an
unfused ReLU6 (MAXIMUM/MINIMUM), which LiteRT's XNNPACK delegate does not take, and ran 30x slower (full
MobileNetV2 at 224 px, one thread of the 2-core dev VM under load: 1067 ms against 36 ms per face). A phone
runs one face per invoke; :class:`kd_landmarks.deploy.runtimes.LiteRtRunner` loops over the faces of a call.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from kd_landmarks import errors
from kd_landmarks import files
from kd_landmarks.deploy import runtimes
from kd_landmarks.deploy import serving

# Batch of both files: what a phone runs (one face per invoke); static shapes let XNNPACK take every op.
BATCH = 1


def _tf():
  try:
    import tensorflow as tf  # Optional, heavy (extra 'tflite'): imported only by this module.
    from jax.experimental import jax2tf
  except ImportError as error:
    raise errors.MissingExtraError("--format tflite needs TensorFlow: pip install 'kd_landmarks[tflite]' (tensorflow, "
                      "ai-edge-litert)") from error
  return tf, jax2tf


def _converter(module, variables, image_size: int, *, batch: int | None = BATCH, dtype):
  tf, jax2tf = _tf()
  # Variables are closed over: jax2tf embeds them as constants, which the converter folds into the graph.
  serve = serving.serving_function(module, variables)
  shape = [batch, int(image_size), int(image_size), 3]
  function = tf.function(jax2tf.convert(serve, polymorphic_shapes=["(b, ...)"] if batch is None else None),
                         autograph=False, input_signature=[tf.TensorSpec(shape, dtype, name=serving.INPUT_NAME)])
  return tf, tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], function)


def to_tflite_float32(module, variables, image_size: int) -> bytes:
  """The float32 TFLite flatbuffer: uint8 ``[1, S, S, 3]`` in, float32 ``[1, K, 2]`` out."""
  tf, converter = _converter(module, variables, image_size, dtype=np.uint8)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def to_tflite_int8(module, variables, image_size: int, representative_crops: np.ndarray) -> bytes:
  """Full-integer int8 TFLite flatbuffer calibrated on ``representative_crops`` (uint8 ``[N, S, S, 3]``).

  The quantised graph is traced on float32 pixel values (0..255; the serving function divides by 255
  inside), and its input is declared uint8: the converter then quantises the input with the calibrated
  range. The range is pinned to exactly [0, 255] (one calibration crop has a 0 and a 255 pixel), which
  gives scale 1 and zero point 0: uint8 bytes in, as in the float file.
  """
  tf, converter = _converter(module, variables, image_size, dtype=np.float32)
  crops = np.asarray(representative_crops, dtype=np.float32).copy()
  crops[0, 0, 0, :] = 0.0
  crops[0, 0, 1, :] = 255.0

  def representative_dataset():
    for crop in crops:
      yield [crop[None]]

  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = representative_dataset
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = tf.uint8
  converter.inference_output_type = tf.float32
  return converter.convert()


def run_litert(path: str, images_uint8: np.ndarray, *, threads: int = 1) -> np.ndarray:
  """Runs a ``.tflite`` export in ai-edge-litert's interpreter (the runtime a phone app links)."""

  return runtimes.LiteRtRunner(path, threads=threads)(images_uint8)


def export_tflite(module, variables, meta: dict, out_dir: str, *, quantize: bool = False,
                  check_images: np.ndarray | None = None, calibration_images: np.ndarray | None = None,
                  name: str = "student") -> dict:
  """Writes ``out_dir/<name>.tflite`` (and ``<name>.int8.tflite``), checks them with LiteRT against JAX,
  and returns what was made (the ``tflite_float32`` / ``tflite_int8`` entries of ``export.json``)."""

  image_size = int(meta["image_size"])
  os.makedirs(out_dir, exist_ok=True)
  if check_images is None:
    check_images = serving.fixture_crops(image_size, count=4)
  check_images = np.asarray(check_images, dtype=np.uint8)
  expected = np.asarray(jax.jit(serving.serving_function(module, variables))(check_images))

  start = time.perf_counter()
  float_path = os.path.join(out_dir, f"{name}.tflite")
  with files.atomic_write(float_path, "wb") as f:
    f.write(to_tflite_float32(module, variables, image_size))
  report = {"tflite_export_seconds": round(time.perf_counter() - start, 1),
            "check_images": int(len(check_images))}
  error = float(np.abs(run_litert(float_path, check_images) - expected).max())
  report["tflite_float32"] = {"path": float_path, "size_mb": round(os.path.getsize(float_path) / 1e6, 3),
                              "max_abs_error_vs_jax": error, "runtime": "ai-edge-litert interpreter",
                              "batch": BATCH}
  if not error <= serving.FP32_TOLERANCE:
    raise RuntimeError(f"{float_path}: LiteRT differs from JAX by {error:.3g} > {serving.FP32_TOLERANCE} "
                       "(normalised units); the export is wrong, do not ship it")
  if quantize:
    if calibration_images is None:
      calibration_images = serving.fixture_crops(image_size)
    int8_path = os.path.join(out_dir, f"{name}.int8.tflite")
    with files.atomic_write(int8_path, "wb") as f:
      f.write(to_tflite_int8(module, variables, image_size, calibration_images))
    int8_error = np.abs(run_litert(int8_path, check_images) - expected)
    report["tflite_int8"] = {"path": int8_path, "size_mb": round(os.path.getsize(int8_path) / 1e6, 3),
                             "paper_table6_size_mb": serving.PAPER_MODEL_SIZE_MB,
                             "calibration_images": int(len(calibration_images)), "batch": BATCH,
                             "max_abs_error_vs_jax": float(int8_error.max()),
                             "mean_px_error_vs_jax": float(
                                 np.linalg.norm(int8_error * image_size, axis=-1).mean())}
  return report
